//! Registered calling systems: the `callers` table, its record type, and the decoding of every
//! column. Like key rows, caller rows carry a MAC computed inside the HSM (`crate::keyauth`), which
//! this module stores but never checks: a clearance raised or a role added with the sqlite3 shell
//! is refused on load, not trusted.
#![forbid(unsafe_code)]

use rusqlite::types::{Value, ValueRef};
use rusqlite::{params_from_iter, OptionalExtension, Row};

use super::records::RowMac;
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
}

/// A caller row as read from the file, not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCaller {
    pub record: CallerRecord,
    pub mac: RowMac,
}

const COLUMNS: &str =
    "identity, agency, name, system_level, clearance, roles, allowed_keys, active, created_at, updated_at, revision, row_mac";

/// A caller's columns in the order of [`COLUMNS`].
fn row_values(c: &CallerRecord, mac: &RowMac) -> [Value; 12] {
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
    ]
}

impl Store {
    /// Registers a caller; [`StoreError::DuplicateName`] (naming the identity) if it exists.
    pub fn insert_caller(&self, c: &CallerRecord, mac: &RowMac) -> Result<(), StoreError> {
        check(c).map_err(|what| StoreError::InvalidRecord { key: format!("caller {}", c.identity), what })?;
        let conn = self.conn();
        let inserted = conn.execute(
            &format!("INSERT INTO callers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params_from_iter(row_values(c, mac)),
        );
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::DuplicateName { name: format!("caller {}", c.identity) })
            }
            Err(e) => Err(StoreError::Sqlite { op: "insert caller", source: e }),
        }
    }

    /// Replaces a caller's row if it is still at `expected_revision` (identity and creation time
    /// never change); [`StoreError::Conflict`] otherwise.
    pub fn update_caller(&self, c: &CallerRecord, mac: &RowMac, expected_revision: u64) -> Result<(), StoreError> {
        check(c).map_err(|what| StoreError::InvalidRecord { key: format!("caller {}", c.identity), what })?;
        let conn = self.conn();
        let expected = Value::Integer(expected_revision as i64);
        let changed = conn
            .execute(
                &format!(
                    "UPDATE callers SET ({COLUMNS}) = (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     WHERE identity = ?1 AND created_at = ?9 AND revision = ?13"
                ),
                params_from_iter(row_values(c, mac).into_iter().chain([expected])),
            )
            .map_err(StoreError::sqlite("update caller"))?;
        if changed != 1 {
            return Err(StoreError::Conflict { key: format!("caller {}", c.identity) });
        }
        Ok(())
    }

    pub fn caller_by_identity(&self, identity: &str) -> Result<Option<StoredCaller>, StoreError> {
        let conn = self.conn();
        conn.query_row(&format!("SELECT {COLUMNS} FROM callers WHERE identity = ?1"), [identity], |r| Ok(decode(r)))
            .optional()
            .map_err(StoreError::sqlite("read caller"))?
            .transpose()
    }

    /// Every caller (by identity), revoked ones too.
    pub fn list_callers(&self) -> Result<Vec<StoredCaller>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {COLUMNS} FROM callers ORDER BY identity")).map_err(StoreError::sqlite("list callers"))?;
        let rows = stmt.query_map([], |r| Ok(decode(r))).map_err(StoreError::sqlite("list callers"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(StoreError::sqlite("list callers"))??);
        }
        Ok(out)
    }
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

fn decode(row: &Row<'_>) -> Result<StoredCaller, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::sqlite("read caller column"));
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
    };
    check(&record).map_err(corrupt)?;
    Ok(StoredCaller { record, mac })
}
