//! Registered calling systems: the `callers` table, its record type, and the decoding of every
//! column. Like key rows, caller rows carry a MAC computed inside the HSM (`crate::keyauth`), which
//! this module stores but never checks: a clearance raised or a role added with the sqlite3 shell
//! is refused on load, not trusted.
#![forbid(unsafe_code)]

use super::db::{params, Conn, DbErrorKind, Row, Value, ValueRef};

use super::records::RowMac;
use super::requests::{decide_request_in, RequestRecord};
use super::{Store, StoreError};
use crate::classification::Classification;
use crate::config::Role;

/// One registered calling system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerRecord {
    /// The client certificate's URI SAN.
    pub identity: String,
    pub agency: String,
    pub name: String,
    /// Approved information-system security level, 1..=5.
    pub system_level: u8,
    pub clearance: Classification,
    /// Sorted, without duplicates, at least one.
    pub roles: Vec<Role>,
    /// Exact key names, or prefixes ending in `*`; `*` allows every key. Sorted, no duplicates.
    pub allowed_keys: Vec<String>,
    pub active: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// Incremented by every change (optimistic concurrency, as for keys).
    pub revision: u64,
    /// The P-256 public keys its data keys may be sealed to, in the order they were added; at most
    /// [`MAX_RECIPIENT_KEYS`], no duplicates.
    pub recipient_keys: Vec<RecipientKeyRecord>,
}

/// Most recipient keys one caller may have registered at once.
pub const MAX_RECIPIENT_KEYS: usize = 8;

/// A registered recipient key: an uncompressed SEC1 P-256 point (validated as a point when it is
/// registered; the row's MAC vouches for it afterwards).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientKeyRecord {
    pub public_key: [u8; 65],
    /// Unix seconds.
    pub added_at: i64,
}

impl RecipientKeyRecord {
    /// SHA-256 of the uncompressed point: how requests and audit records name the key.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.public_key).into()
    }
}

/// A caller row as read from the file, not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCaller {
    pub record: CallerRecord,
    pub mac: RowMac,
}

const COLUMNS: &str = "identity, agency, name, system_level, clearance, roles, allowed_keys, active, created_at, updated_at, \
                       revision, row_mac, recipient_keys";

/// A caller's columns in the order of [`COLUMNS`].
fn row_values(c: &CallerRecord, mac: &RowMac) -> [Value; 13] {
    [
        Value::Text(c.identity.clone()),
        Value::Text(c.agency.clone()),
        Value::Text(c.name.clone()),
        Value::Integer(i64::from(c.system_level)),
        Value::Integer(i64::from(c.clearance.to_byte())),
        Value::Text(roles_column(&c.roles)),
        Value::Text(c.allowed_keys.join("\n")),
        Value::Integer(i64::from(c.active)),
        Value::Integer(c.created_at),
        Value::Integer(c.updated_at),
        Value::Integer(c.revision as i64),
        Value::Blob(mac.0.to_vec()),
        Value::Text(recipient_keys_column(&c.recipient_keys)),
    ]
}

/// One line per key: `hex(point) added_at`.
fn recipient_keys_column(keys: &[RecipientKeyRecord]) -> String {
    keys.iter().map(|k| format!("{} {}", crate::ids::hex(&k.public_key), k.added_at)).collect::<Vec<_>>().join("\n")
}

impl Store {
    /// Registers a caller; [`StoreError::DuplicateName`] (naming the identity) if it exists.
    pub fn insert_caller(&self, c: &CallerRecord, mac: &RowMac) -> Result<(), StoreError> {
        self.write("insert caller", |tx| insert_caller_in(tx, c, mac))
    }

    /// Replaces a caller's row if it is still at `expected_revision` (identity and creation time
    /// never change); [`StoreError::Conflict`] otherwise.
    pub fn update_caller(&self, c: &CallerRecord, mac: &RowMac, expected_revision: u64) -> Result<(), StoreError> {
        self.write("update caller", |tx| update_caller_in(tx, c, mac, expected_revision))
    }

    /// Writes a caller change that a second officer approved, and the APPROVED request, in one
    /// transaction: a registration (`expected_revision` `None`) or an update of the row at that
    /// revision.
    pub fn write_caller_with_request(
        &self,
        c: &CallerRecord,
        mac: &RowMac,
        expected_revision: Option<u64>,
        request: &RequestRecord,
        request_mac: &RowMac,
    ) -> Result<(), StoreError> {
        self.write("approved caller change", |tx| {
            match expected_revision {
                None => insert_caller_in(tx, c, mac)?,
                Some(r) => update_caller_in(tx, c, mac, r)?,
            }
            decide_request_in(tx, request, request_mac)
        })
    }

    pub fn caller_by_identity(&self, identity: &str) -> Result<Option<StoredCaller>, StoreError> {
        self.read("read caller", |conn| {
            conn.query_opt(&format!("SELECT {COLUMNS} FROM callers WHERE identity = ?1"), &params![identity])
                .map_err(StoreError::db("read caller"))?
                .map(|r| decode(&r))
                .transpose()
        })
    }

    /// Every caller (by identity), revoked ones too.
    pub fn list_callers(&self) -> Result<Vec<StoredCaller>, StoreError> {
        self.read("list callers", |conn| {
            conn.query(&format!("SELECT {COLUMNS} FROM callers ORDER BY identity"), &[])
                .map_err(StoreError::db("list callers"))?
                .iter()
                .map(decode)
                .collect()
        })
    }
}

fn insert_caller_in(conn: &mut dyn Conn, c: &CallerRecord, mac: &RowMac) -> Result<(), StoreError> {
    check(c).map_err(|what| StoreError::InvalidRecord { key: format!("caller {}", c.identity), what })?;
    let inserted = conn.execute(
        &format!("INSERT INTO callers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
        &row_values(c, mac),
    );
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if e.kind == DbErrorKind::UniqueViolation => {
            Err(StoreError::DuplicateName { name: format!("caller {}", c.identity) })
        }
        Err(e) => Err(StoreError::db("insert caller")(e)),
    }
}

fn update_caller_in(conn: &mut dyn Conn, c: &CallerRecord, mac: &RowMac, expected_revision: u64) -> Result<(), StoreError> {
    check(c).map_err(|what| StoreError::InvalidRecord { key: format!("caller {}", c.identity), what })?;
    let expected = Value::Integer(expected_revision as i64);
    let changed = conn
        .execute(
            &format!(
                "UPDATE callers SET ({COLUMNS}) = (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 WHERE identity = ?1 AND created_at = ?9 AND revision = ?14"
            ),
            &row_values(c, mac).into_iter().chain([expected]).collect::<Vec<_>>(),
        )
        .map_err(StoreError::db("update caller"))?;
    if changed != 1 {
        return Err(StoreError::Conflict { key: format!("caller {}", c.identity) });
    }
    Ok(())
}

fn roles_column(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// The rules every caller row keeps, on writing and on reading.
pub fn check(c: &CallerRecord) -> Result<(), &'static str> {
    if c.identity.is_empty() || c.identity.len() > 512 {
        return Err("the identity must be 1 to 512 bytes");
    }
    if c.name.len() > 200 || c.agency.len() > 200 {
        return Err("name and agency are at most 200 bytes");
    }
    if !(1..=5).contains(&c.system_level) {
        return Err("the system level is 1 to 5");
    }
    if c.roles.is_empty() || c.roles.windows(2).any(|w| w[0] >= w[1]) {
        return Err("roles are at least one, sorted, without duplicates");
    }
    if c.allowed_keys.windows(2).any(|w| w[0] >= w[1]) || c.allowed_keys.len() > 256 {
        return Err("allowed keys are sorted, without duplicates, at most 256");
    }
    if let Some(bad) = c.allowed_keys.iter().find(|p| validate_pattern(p).is_err()) {
        let _ = bad;
        return Err("an allowed-key pattern is not a key name or a prefix ending in *");
    }
    if c.updated_at < c.created_at || c.revision == 0 {
        return Err("times and revision are inconsistent");
    }
    if c.recipient_keys.len() > MAX_RECIPIENT_KEYS {
        return Err("at most 8 recipient keys");
    }
    if c.recipient_keys.iter().any(|k| k.public_key[0] != 4) {
        return Err("a recipient key is not an uncompressed point");
    }
    for (i, k) in c.recipient_keys.iter().enumerate() {
        if c.recipient_keys[..i].iter().any(|o| o.public_key == k.public_key) {
            return Err("a recipient key is registered twice");
        }
    }
    Ok(())
}

/// An allowed-key pattern: `*`, a key name, or a key-name prefix followed by `*`.
pub fn validate_pattern(p: &str) -> Result<(), &'static str> {
    if p == "*" {
        return Ok(());
    }
    let body = p.strip_suffix('*').unwrap_or(p);
    if body.is_empty() || body.len() > 64 {
        return Err("must be *, a key name, or a key-name prefix followed by * (at most 64 characters)");
    }
    if !body.as_bytes()[0].is_ascii_alphanumeric() || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) {
        return Err("may hold only letters, digits and - _ . / (starting with a letter or digit), and a final *");
    }
    Ok(())
}

fn decode(row: &Row) -> Result<StoredCaller, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read caller column"));
    let label = match raw(0)? {
        ValueRef::Text(t) => format!("caller {}", String::from_utf8_lossy(t)),
        _ => "caller (unreadable identity)".to_owned(),
    };
    let corrupt = |what| StoreError::CorruptRow { key: label.clone(), what };
    let text = |v: ValueRef<'_>, what| match v {
        ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|_| corrupt(what)),
        _ => Err(corrupt(what)),
    };
    let int = |v: ValueRef<'_>, what| match v {
        ValueRef::Integer(i) => Ok(i),
        _ => Err(corrupt(what)),
    };
    let identity = text(raw(0)?, "identity is not text")?;
    let agency = text(raw(1)?, "agency is not text")?;
    let name = text(raw(2)?, "name is not text")?;
    let system_level = u8::try_from(int(raw(3)?, "system level is not an integer")?).map_err(|_| corrupt("system level out of range"))?;
    let clearance = u8::try_from(int(raw(4)?, "clearance is not an integer")?)
        .ok()
        .and_then(Classification::from_byte)
        .ok_or_else(|| corrupt("unknown clearance"))?;
    let roles = text(raw(5)?, "roles are not text")?
        .split(',')
        .map(|r| r.parse::<Role>().map_err(|_| corrupt("unknown role")))
        .collect::<Result<Vec<_>, _>>()?;
    let allowed = text(raw(6)?, "allowed keys are not text")?;
    let allowed_keys = if allowed.is_empty() { Vec::new() } else { allowed.split('\n').map(str::to_owned).collect() };
    let active = match int(raw(7)?, "active is not an integer")? {
        0 => false,
        1 => true,
        _ => return Err(corrupt("active is neither 0 nor 1")),
    };
    let created_at = int(raw(8)?, "creation time is not an integer")?;
    let updated_at = int(raw(9)?, "update time is not an integer")?;
    let revision = u64::try_from(int(raw(10)?, "revision is not an integer")?).map_err(|_| corrupt("revision out of range"))?;
    let mac = match raw(11)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| corrupt("metadata MAC is not 32 bytes"))?),
        _ => return Err(corrupt("metadata MAC is not a blob")),
    };
    let recipients = text(raw(12)?, "recipient keys are not text")?;
    let mut recipient_keys = Vec::new();
    for line in recipients.split('\n').filter(|l| !l.is_empty()) {
        let (point, added) = line.split_once(' ').ok_or_else(|| corrupt("a recipient key line is malformed"))?;
        let public_key: [u8; 65] = crate::ids::unhex(point)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| corrupt("a recipient key is not a 65-byte point"))?;
        let added_at = added.parse::<i64>().map_err(|_| corrupt("a recipient key's time is not an integer"))?;
        recipient_keys.push(RecipientKeyRecord { public_key, added_at });
    }
    let record = CallerRecord {
        identity,
        agency,
        name,
        system_level,
        clearance,
        roles,
        allowed_keys,
        active,
        created_at,
        updated_at,
        revision,
        recipient_keys,
    };
    check(&record).map_err(corrupt)?;
    Ok(StoredCaller { record, mac })
}
