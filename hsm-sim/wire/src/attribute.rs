//! Attributes on the wire: templates (type and typed value) and `C_GetAttributeValue` answers.
//!
//! Owns the table of which attribute types hold a `CK_ULONG`, a list of them, or a nested template
//! ([`value_kind`]); both sides use it, so the byte layout of those values never crosses the wire.
//! Must never decode a nested template inside a nested template (PKCS#11 defines none), nor accept
//! more than [`crate::MAX_TEMPLATE`] attributes at any level.

use cryptoki_sys::*;

use crate::codec::{Blob, Decoder, Encoder, WireError};
use crate::{MAX_ATTRIBUTE_VALUE, MAX_TEMPLATE, MAX_ULONG_LIST};

/// How an attribute type's value is laid out in C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// One `CK_ULONG` (or an alias: `CK_OBJECT_CLASS`, `CK_KEY_TYPE`, `CK_MECHANISM_TYPE`, ...).
    Ulong,
    /// An array of `CK_MECHANISM_TYPE`.
    UlongList,
    /// An array of `CK_ATTRIBUTE`.
    Template,
    /// Bytes as they are: `CK_BBOOL`, byte strings, `CK_DATE`, and every type not listed here.
    Bytes,
}

/// The layout of `attr_type`'s value.
pub fn value_kind(attr_type: u64) -> ValueKind {
    match attr_type {
        CKA_CLASS
        | CKA_CERTIFICATE_TYPE
        | CKA_CERTIFICATE_CATEGORY
        | CKA_JAVA_MIDP_SECURITY_DOMAIN
        | CKA_NAME_HASH_ALGORITHM
        | CKA_KEY_TYPE
        | CKA_MODULUS_BITS
        | CKA_PRIME_BITS
        | CKA_SUBPRIME_BITS
        | CKA_VALUE_BITS
        | CKA_VALUE_LEN
        | CKA_KEY_GEN_MECHANISM
        | CKA_MECHANISM_TYPE
        | CKA_HW_FEATURE_TYPE
        | CKA_AUTH_PIN_FLAGS
        | CKA_PROFILE_ID
        | CKA_PARAMETER_SET
        | CKA_OBJECT_VALIDATION_FLAGS
        | CKA_VALIDATION_TYPE
        | CKA_VALIDATION_LEVEL
        | CKA_VALIDATION_FLAG
        | CKA_VALIDATION_AUTHORITY_TYPE => ValueKind::Ulong,
        CKA_ALLOWED_MECHANISMS => ValueKind::UlongList,
        CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE | CKA_DERIVE_TEMPLATE => ValueKind::Template,
        _ => ValueKind::Bytes,
    }
}

/// A typed attribute value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// The caller's bytes, unchanged (also a `CK_ULONG` type whose value had the wrong length: the
    /// token, not the wire, refuses it).
    Bytes(Blob),
    Ulong(u64),
    UlongList(Vec<u64>),
    Template(Vec<Attribute>),
}

const TAG_BYTES: u8 = 0;
const TAG_ULONG: u8 = 1;
const TAG_ULONG_LIST: u8 = 2;
const TAG_TEMPLATE: u8 = 3;

/// One attribute of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    pub attr_type: u64,
    pub value: AttrValue,
}

impl Attribute {
    pub fn new(attr_type: u64, value: AttrValue) -> Attribute {
        Attribute { attr_type, value }
    }

    pub fn bool(attr_type: u64, v: bool) -> Attribute {
        Attribute::new(attr_type, AttrValue::Bytes(Blob::new(vec![u8::from(v)])))
    }

    pub fn ulong(attr_type: u64, v: u64) -> Attribute {
        Attribute::new(attr_type, AttrValue::Ulong(v))
    }

    /// The value as a `CK_BBOOL`, if it is one byte.
    pub fn as_bool(&self) -> Option<bool> {
        match &self.value {
            AttrValue::Bytes(b) if b.len() == 1 => Some(b[0] != 0),
            _ => None,
        }
    }
}

/// Whether `template` sets `CKA_TOKEN` to true (`None` when it does not mention `CKA_TOKEN`).
pub fn template_token(template: &[Attribute]) -> Option<bool> {
    template.iter().find(|a| a.attr_type == CKA_TOKEN).and_then(Attribute::as_bool)
}

pub(crate) fn encode_value(e: &mut Encoder, v: &AttrValue, depth: u8) {
    match v {
        AttrValue::Bytes(b) => {
            e.u8(TAG_BYTES).bytes(b);
        }
        AttrValue::Ulong(x) => {
            e.u8(TAG_ULONG).u64(*x);
        }
        AttrValue::UlongList(l) => {
            e.u8(TAG_ULONG_LIST).u64_list(l);
        }
        AttrValue::Template(t) => {
            e.u8(TAG_TEMPLATE);
            encode_template_at(e, t, depth + 1);
        }
    }
}

pub(crate) fn decode_value(d: &mut Decoder<'_>, depth: u8) -> Result<AttrValue, WireError> {
    match d.u8("attribute value tag")? {
        TAG_BYTES => Ok(AttrValue::Bytes(d.bytes("attribute value", MAX_ATTRIBUTE_VALUE)?)),
        TAG_ULONG => Ok(AttrValue::Ulong(d.u64("attribute value")?)),
        TAG_ULONG_LIST => Ok(AttrValue::UlongList(d.u64_list("attribute value list", MAX_ULONG_LIST)?)),
        TAG_TEMPLATE if depth == 0 => Ok(AttrValue::Template(decode_template_at(d, depth + 1)?)),
        TAG_TEMPLATE => Err(WireError::NestingTooDeep),
        tag => Err(WireError::BadTag { field: "attribute value tag", tag }),
    }
}

pub(crate) fn encode_template(e: &mut Encoder, t: &[Attribute]) {
    encode_template_at(e, t, 0);
}

fn encode_template_at(e: &mut Encoder, t: &[Attribute], depth: u8) {
    e.count(t.len());
    for a in t {
        e.u64(a.attr_type);
        encode_value(e, &a.value, depth);
    }
}

pub(crate) fn decode_template(d: &mut Decoder<'_>) -> Result<Vec<Attribute>, WireError> {
    decode_template_at(d, 0)
}

fn decode_template_at(d: &mut Decoder<'_>, depth: u8) -> Result<Vec<Attribute>, WireError> {
    // Each attribute is at least a type (8) and a tag (1).
    let n = d.count("template", MAX_TEMPLATE, 9)?;
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let attr_type = d.u64("attribute type")?;
        let value = decode_value(d, depth)?;
        t.push(Attribute { attr_type, value });
    }
    Ok(t)
}

/// One attribute of a `C_GetAttributeValue` answer, in the order asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrResult {
    Value(AttrValue),
    /// `CKR_ATTRIBUTE_SENSITIVE`: the object will not reveal it.
    Sensitive,
    /// `CKR_ATTRIBUTE_TYPE_INVALID`: the object has no such attribute (or the server cannot read
    /// this type back; see the server's module docs).
    TypeInvalid,
    /// The token answered `CK_UNAVAILABLE_INFORMATION` without an error.
    Unavailable,
}

const RESULT_VALUE: u8 = 0;
const RESULT_SENSITIVE: u8 = 1;
const RESULT_TYPE_INVALID: u8 = 2;
const RESULT_UNAVAILABLE: u8 = 3;

pub(crate) fn encode_results(e: &mut Encoder, r: &[AttrResult]) {
    e.count(r.len());
    for x in r {
        match x {
            AttrResult::Value(v) => {
                e.u8(RESULT_VALUE);
                encode_value(e, v, 0);
            }
            AttrResult::Sensitive => {
                e.u8(RESULT_SENSITIVE);
            }
            AttrResult::TypeInvalid => {
                e.u8(RESULT_TYPE_INVALID);
            }
            AttrResult::Unavailable => {
                e.u8(RESULT_UNAVAILABLE);
            }
        }
    }
}

pub(crate) fn decode_results(d: &mut Decoder<'_>) -> Result<Vec<AttrResult>, WireError> {
    let n = d.count("attribute results", MAX_TEMPLATE, 1)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(match d.u8("attribute result tag")? {
            RESULT_VALUE => AttrResult::Value(decode_value(d, 0)?),
            RESULT_SENSITIVE => AttrResult::Sensitive,
            RESULT_TYPE_INVALID => AttrResult::TypeInvalid,
            RESULT_UNAVAILABLE => AttrResult::Unavailable,
            tag => return Err(WireError::BadTag { field: "attribute result tag", tag }),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_templates_round_trip_one_level_only() {
        let inner = vec![Attribute::bool(CKA_SENSITIVE, true), Attribute::ulong(CKA_KEY_TYPE, CKK_AES)];
        let t = vec![Attribute::new(CKA_UNWRAP_TEMPLATE, AttrValue::Template(inner))];
        let mut e = Encoder::new();
        encode_template(&mut e, &t);
        let f = e.finish();
        let mut d = Decoder::new(f.body());
        assert_eq!(decode_template(&mut d).unwrap(), t);
        d.finish().unwrap();

        let deep = vec![Attribute::new(
            CKA_WRAP_TEMPLATE,
            AttrValue::Template(vec![Attribute::new(CKA_UNWRAP_TEMPLATE, AttrValue::Template(vec![]))]),
        )];
        let mut e = Encoder::new();
        encode_template(&mut e, &deep);
        let f = e.finish();
        assert_eq!(decode_template(&mut Decoder::new(f.body())), Err(WireError::NestingTooDeep));
    }

    #[test]
    fn ulong_types_are_known() {
        assert_eq!(value_kind(CKA_CLASS), ValueKind::Ulong);
        assert_eq!(value_kind(CKA_VALUE_LEN), ValueKind::Ulong);
        assert_eq!(value_kind(CKA_ALLOWED_MECHANISMS), ValueKind::UlongList);
        assert_eq!(value_kind(CKA_UNWRAP_TEMPLATE), ValueKind::Template);
        assert_eq!(value_kind(CKA_LABEL), ValueKind::Bytes);
        assert_eq!(value_kind(CKA_TOKEN), ValueKind::Bytes);
    }
}
