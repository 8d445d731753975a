//! What the store's record rules need from a database, and nothing more: run a statement with
//! parameters, read rows of plain values, inside a transaction the backend opens and commits.
//!
//! The record rules (validation of every column read back, the state rules, optimistic
//! concurrency by revision, the intent protocol) are written once, in the modules above, against
//! [`Conn`]; the backends ([`super::sqlite`], [`super::postgres`]) only move values. Statements are
//! written once too, in the SQL both backends understand, with SQLite's `?N` placeholders (the
//! PostgreSQL backend renumbers them as `$N`). What differs (the schema's DDL, the change probe)
//! lives in the backend.
//!
//! A row read back is hostile input whichever backend it came from: [`ValueRef`] carries whatever
//! type the database holds (SQLite's columns hold any type an editor wrote), and the decoders
//! refuse what they do not expect.
#![forbid(unsafe_code)]

use std::fmt;

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    /// Only ever read back (from a hostile SQLite row); the store never writes a float.
    Real(f64),
    Text(String),
    /// Only ever read back: text that is not UTF-8 (a damaged or edited SQLite row), kept as its
    /// bytes so that the decoder refuses it as it would any other malformed column.
    InvalidText(Vec<u8>),
    Blob(Vec<u8>),
}

/// A borrowed column value, as the decoders match it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::InvalidText(t) => ValueRef::Text(t),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }
}

/// A value that can be a statement parameter (by reference: `params!` never moves its arguments).
pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! to_value_int {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Integer(i64::from(*self))
            }
        }
    )*};
}
to_value_int!(i64, i32, u32, u8, bool);

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// Parameters for a statement: `params![a, b, c]` is a `Vec<Value>`.
macro_rules! params {
    () => { Vec::<$crate::store::db::Value>::new() };
    ($($p:expr),+ $(,)?) => { vec![$($crate::store::db::ToValue::to_value(&$p)),+] };
}
pub(crate) use params;

/// One row read back: its values, in the order of the statement's columns.
#[derive(Clone, Debug)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    pub(super) fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// Column `i`, whatever type it holds.
    pub fn get_ref(&self, i: usize) -> Result<ValueRef<'_>, DbError> {
        self.values.get(i).map(Value::as_ref).ok_or_else(|| DbError::other(format!("no column {i} in the row")))
    }

    /// Column `i` as an integer; an error names the column if it is not one.
    pub fn int(&self, i: usize) -> Result<i64, DbError> {
        match self.get_ref(i)? {
            ValueRef::Integer(v) => Ok(v),
            _ => Err(DbError::other(format!("column {i} is not an integer"))),
        }
    }

    /// Column `i` as text; an error if it is not UTF-8 text.
    pub fn text(&self, i: usize) -> Result<String, DbError> {
        match self.get_ref(i)? {
            ValueRef::Text(t) => {
                std::str::from_utf8(t).map(str::to_owned).map_err(|_| DbError::other(format!("column {i} is not UTF-8")))
            }
            _ => Err(DbError::other(format!("column {i} is not text"))),
        }
    }

    /// Column `i` as bytes; an error if it is not a blob.
    pub fn blob(&self, i: usize) -> Result<Vec<u8>, DbError> {
        match self.get_ref(i)? {
            ValueRef::Blob(b) => Ok(b.to_vec()),
            _ => Err(DbError::other(format!("column {i} is not a blob"))),
        }
    }
}

/// A connection inside a transaction (or, for reads, a consistent snapshot) that the backend
/// opened and will commit or roll back.
pub trait Conn {
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    /// Runs a query; every row it returns.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
}

impl dyn Conn + '_ {
    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The one row a query must return.
    pub fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?.ok_or_else(|| DbError::other("the query returned no row".to_owned()))
    }
}

/// What kind of failure a database reported: what the store's callers may do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorKind {
    /// A unique or primary-key constraint refused the row.
    UniqueViolation,
    /// Another transaction holds a lock this one needs, or the two deadlocked, or a serialisable
    /// transaction lost: nothing was written; the operation may be retried.
    Contention,
    /// The database cannot be reached (connection refused or lost, server shutting down): nothing
    /// is known to have been written; the service answers `UNAVAILABLE`.
    Unavailable,
    /// Anything else (a bad statement, a full disk, a damaged file).
    Other,
}

/// A database failure, with the backend's own message (which names no parameter value: the
/// store's statements carry parameters, never inlined values).
#[derive(Clone, Debug)]
pub struct DbError {
    pub kind: DbErrorKind,
    pub backend: &'static str,
    pub message: String,
}

impl DbError {
    pub fn other(message: String) -> DbError {
        DbError { kind: DbErrorKind::Other, backend: "store", message }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bounded: a database message may quote a constraint or a statement, never at any length.
        write!(f, "{}: {}", self.backend, crate::bounded::text(&self.message, 400))
    }
}

impl std::error::Error for DbError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_convert_every_parameter_type() {
        let name = String::from("k");
        let none: Option<i64> = None;
        let p = params![1i64, 2u32, "a", &name, [1u8, 2].as_slice(), none, Some(7i64), true];
        assert_eq!(
            p,
            vec![
                Value::Integer(1),
                Value::Integer(2),
                Value::Text("a".into()),
                Value::Text("k".into()),
                Value::Blob(vec![1, 2]),
                Value::Null,
                Value::Integer(7),
                Value::Integer(1),
            ]
        );
    }

    #[test]
    fn typed_getters_refuse_other_types() {
        let row = Row::new(vec![Value::Integer(3), Value::Text("t".into()), Value::Blob(vec![9]), Value::Real(1.5)]);
        assert_eq!(row.int(0).unwrap(), 3);
        assert_eq!(row.text(1).unwrap(), "t");
        assert_eq!(row.blob(2).unwrap(), vec![9]);
        assert!(row.int(1).is_err());
        assert!(row.text(2).is_err());
        assert!(row.blob(3).is_err());
        assert!(row.get_ref(4).is_err());
        assert_eq!(row.get_ref(3).unwrap(), ValueRef::Real(1.5));
    }
}
