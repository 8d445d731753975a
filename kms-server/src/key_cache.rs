//! The authenticated key rows of recent requests, kept so that a request for a key whose row has
//! not changed reads no SQLite row, verifies no MAC, and leaves the async runtime for nothing but
//! the HSM.
//!
//! Freshness comes from the store itself, not from a timer: every lookup first reads the store's
//! key change counter ([`ChangeProbe`]: a counter that triggers move with every change to a key
//! or version row, by any connection, this process's or another's, and the schema version). When
//! it has moved, the whole cache is dropped and the request reads the store as before. A row
//! changed by an officer, the lifecycle task, another server sharing the file, or someone with
//! the sqlite3 shell is therefore never served from here; an edited row is read again and fails
//! its MAC check. Commits that change no key (the audit anchor, moved after every group of
//! requests) keep the cache: were it dropped on every commit, every request would read its row
//! and verify its MAC in the HSM again.
//!
//! Only rows that passed [`crate::keyauth::KeyAuth::verify`] are kept. An entry is tagged with
//! the change counter read *before* its row was read, so a row read while a commit landed is
//! dropped at the next lookup rather than kept as current.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::ids::KeyId;
use crate::store::{ChangeProbe, KeyRecord};

/// Past this many keys the cache starts again from empty (a bound on memory, not a policy: rows
/// are only ever served while the store is unchanged).
const MAX_ENTRIES: usize = 100_000;

/// A moment of the store, as its change counter; `None` means "unknown", which matches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreVersion(Option<(i64, i64)>);

pub struct KeyCache {
    probe: ChangeProbe,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    version: Option<(i64, i64)>,
    by_name: HashMap<String, Arc<KeyRecord>>,
    by_id: HashMap<KeyId, Arc<KeyRecord>>,
}

/// What a lookup found: the row, or the store version to tag the row with once read.
pub enum Lookup {
    Hit(Arc<KeyRecord>),
    Miss(StoreVersion),
}

impl KeyCache {
    pub fn new(probe: ChangeProbe) -> KeyCache {
        KeyCache { probe, inner: Mutex::new(Inner::default()) }
    }

    /// The row of the key named `name`, if the cache holds it and the store has not changed.
    pub fn by_name(&self, name: &str) -> Lookup {
        self.lookup(|inner| inner.by_name.get(name).cloned())
    }

    /// The row of the key with this id, as [`KeyCache::by_name`].
    pub fn by_id(&self, id: KeyId) -> Lookup {
        self.lookup(|inner| inner.by_id.get(&id).cloned())
    }

    fn lookup(&self, get: impl FnOnce(&Inner) -> Option<Arc<KeyRecord>>) -> Lookup {
        let now = self.probe.version();
        let mut inner = self.lock();
        if now.is_none() || inner.version != now {
            inner.by_name.clear();
            inner.by_id.clear();
            inner.version = now;
            return Lookup::Miss(StoreVersion(now));
        }
        match get(&inner) {
            Some(record) => Lookup::Hit(record),
            None => Lookup::Miss(StoreVersion(now)),
        }
    }

    /// Keeps `record`, authenticated and read at or after `seen`; dropped if the store has changed
    /// since `seen` as far as the cache knows.
    pub fn insert(&self, seen: StoreVersion, record: Arc<KeyRecord>) {
        let mut inner = self.lock();
        if seen.0.is_none() || inner.version != seen.0 {
            return;
        }
        if inner.by_id.len() >= MAX_ENTRIES {
            inner.by_name.clear();
            inner.by_id.clear();
        }
        // A renamed or recreated key cannot leave a stale alias: any change moved the version.
        inner.by_name.insert(record.name.clone(), Arc::clone(&record));
        inner.by_id.insert(record.id, record);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent (inserts and clears), so a poisoned lock is safe.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::Classification;
    use crate::store::{RowMac, Store};

    fn record(name: &str, byte: u8) -> KeyRecord {
        crate::store::tests::key(name, Classification::Personal, byte, 1)
    }

    fn hit(l: Lookup) -> Option<Arc<KeyRecord>> {
        match l {
            Lookup::Hit(r) => Some(r),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn rows_are_served_only_while_the_store_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.db");
        let store = Store::open(&path).unwrap();
        let cache = KeyCache::new(store.change_probe().unwrap());
        let a = record("a", 1);
        store.insert_key(&a, &RowMac([0; 32])).unwrap();

        let Lookup::Miss(seen) = cache.by_name("a") else { panic!("hit on an empty cache") };
        cache.insert(seen, Arc::new(a.clone()));
        assert_eq!(hit(cache.by_name("a")).as_deref(), Some(&a));
        assert_eq!(hit(cache.by_id(a.id)).as_deref(), Some(&a));
        assert!(hit(cache.by_name("b")).is_none());

        // Any commit, here by another connection, empties the cache.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("UPDATE keys SET rotation_period_days = 9").unwrap();
        assert!(hit(cache.by_name("a")).is_none());
        assert!(hit(cache.by_id(a.id)).is_none());

        // A row read before a commit is not kept after it.
        let Lookup::Miss(before) = cache.by_name("a") else { panic!("hit after a change") };
        other.execute_batch("UPDATE keys SET rotation_period_days = 10").unwrap();
        assert!(hit(cache.by_name("a")).is_none()); // the cache learns of the commit here
        cache.insert(before, Arc::new(a.clone()));
        assert!(hit(cache.by_name("a")).is_none());
    }
}
