//! Key-version objects on the token: create, destroy, look up, inspect, list.
//!
//! Runs inside a worker job only. Must never read a key's value, and never create a token key from
//! anything but [`templates::token_key`].

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};

use super::error::HsmError;
use super::handles;
use super::pool::Worker;
use super::templates::{self, BINDING_KEY_ID};
use crate::ids::{KeyPurpose, ObjectId};

/// The security attributes of a key object, as the token reports them (none of them is sensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyObjectInfo {
    pub token: bool,
    pub private: bool,
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub modifiable: bool,
    pub copyable: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub encrypt: bool,
    pub decrypt: bool,
    pub sign: bool,
    pub verify: bool,
    /// Whether the token would hand out `CKA_VALUE` (asked with `C_GetAttributeInfo`, the value itself
    /// is never read). Must be false for every service key.
    pub value_readable: bool,
}

pub(crate) fn create(w: &Worker, id: &ObjectId, label: &str, purpose: KeyPurpose) -> Result<(), HsmError> {
    // CKA_IDs stay unique without a C_FindObjects (which SoftHSM answers by scanning every object:
    // creation would slow down with every key made). The handle cache knows every key object on
    // the token: start-up reconciliation lists them all once, and every creation and destruction
    // goes through here, under the token write lock. (The token belongs to this service; see
    // ARCHITECTURE.md.)
    let _write = w.token_write_lock();
    if w.handles.get(id.as_bytes()).is_some() {
        return Err(HsmError::ObjectExists { id: id.clone() });
    }
    let handle = w.session.generate_key(&Mechanism::AesKeyGen, &templates::token_key(id, label, purpose))?;
    w.handles.insert(id.as_bytes(), handle);
    Ok(())
}

pub(crate) fn destroy(w: &Worker, id: &ObjectId) -> Result<(), HsmError> {
    let _write = w.token_write_lock();
    w.handles.destroy_with_copy(&w.session, id.as_bytes(), |h| Ok(w.session.destroy_object(h)?))
}

pub(crate) fn exists(w: &Worker, id: &ObjectId) -> Result<bool, HsmError> {
    if w.handles.get(id.as_bytes()).is_some() {
        return Ok(true);
    }
    match handles::find(&w.session, id.as_bytes())? {
        Some(h) => {
            w.handles.insert(id.as_bytes(), h);
            Ok(true)
        }
        None => Ok(false),
    }
}

const INSPECTED: [AttributeType; 14] = [
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::AlwaysSensitive,
    AttributeType::Extractable,
    AttributeType::NeverExtractable,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::Verify,
];

pub(crate) fn inspect(w: &Worker, id: &ObjectId) -> Result<KeyObjectInfo, HsmError> {
    w.with_object(id.as_bytes(), |h| {
        let mut info = KeyObjectInfo {
            token: false,
            private: false,
            sensitive: false,
            always_sensitive: false,
            extractable: false,
            never_extractable: false,
            modifiable: false,
            copyable: false,
            wrap: false,
            unwrap: false,
            encrypt: false,
            decrypt: false,
            sign: false,
            verify: false,
            value_readable: false,
        };
        for attr in w.session.get_attributes(h, &INSPECTED)? {
            match attr {
                Attribute::Token(b) => info.token = b,
                Attribute::Private(b) => info.private = b,
                Attribute::Sensitive(b) => info.sensitive = b,
                Attribute::AlwaysSensitive(b) => info.always_sensitive = b,
                Attribute::Extractable(b) => info.extractable = b,
                Attribute::NeverExtractable(b) => info.never_extractable = b,
                Attribute::Modifiable(b) => info.modifiable = b,
                Attribute::Copyable(b) => info.copyable = b,
                Attribute::Wrap(b) => info.wrap = b,
                Attribute::Unwrap(b) => info.unwrap = b,
                Attribute::Encrypt(b) => info.encrypt = b,
                Attribute::Decrypt(b) => info.decrypt = b,
                Attribute::Sign(b) => info.sign = b,
                Attribute::Verify(b) => info.verify = b,
                _ => {}
            }
        }
        let value = w.session.get_attribute_info(h, &[AttributeType::Value])?;
        info.value_readable = matches!(value.first(), Some(AttributeInfo::Available(_)));
        Ok(info)
    })
}

/// A secret-key token object as a listing sees it: its `CKA_ID` and `CKA_LABEL`, as the token
/// reports them (either may be empty). Whether it is the service's is decided by the caller
/// (`crate::object_label::is_service_object`), never assumed here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedObject {
    pub id: Vec<u8>,
    pub label: Vec<u8>,
}

/// Every secret-key token object with a `CKA_ID`, except the service's own binding key; the
/// handles of those with a 20-byte `CKA_ID` (key versions' shape) are cached. One `C_FindObjects`:
/// start-up reconciliation and officers' inventory of the token only.
pub(crate) fn list(w: &Worker) -> Result<Vec<ListedObject>, HsmError> {
    let mut objects = Vec::new();
    for (handle, id, label) in secret_token_objects(w)? {
        if id != BINDING_KEY_ID && !id.is_empty() {
            if id.len() == 20 && crate::object_label::is_service_object(&id, &label) {
                // Reconciliation inspects every live version next: cached handles spare a find each.
                w.handles.insert(&id, handle);
            }
            objects.push(ListedObject { id, label });
        }
    }
    objects.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(objects)
}

/// How many objects have neither `CKA_ID` nor `CKA_LABEL`: the shape of the debris a key
/// generation killed half-way leaves (SoftHSM writes an object in steps: the object file with its
/// default attributes first, then the template, then the value), and also of any other
/// application's unlabelled objects.
pub(crate) fn count_incomplete(w: &Worker) -> Result<usize, HsmError> {
    Ok(secret_token_objects(w)?.into_iter().filter(|(_, id, label)| id.is_empty() && label.is_empty()).count())
}

/// Destroys at most `max` objects with neither id nor label and returns how many it destroyed.
/// The caller decides `max` from what it can prove (one per creation the service had begun and
/// whose object is missing); the rest are left alone.
pub(crate) fn destroy_incomplete(w: &Worker, max: usize) -> Result<usize, HsmError> {
    if max == 0 {
        return Ok(0);
    }
    let _write = w.token_write_lock();
    let mut destroyed = 0;
    for (handle, id, label) in secret_token_objects(w)? {
        if destroyed == max {
            break;
        }
        if id.is_empty() && label.is_empty() {
            w.session.destroy_object(handle)?;
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

/// An object found on the token: its handle, `CKA_ID` and `CKA_LABEL`.
type SeenObject = (ObjectHandle, Vec<u8>, Vec<u8>);

/// Every secret-key object (or object with no readable class, which debris may be) with its
/// `CKA_ID` and `CKA_LABEL` (empty when absent or unreadable). Finds with an empty template: an object written half-way
/// may lack `CKA_TOKEN` or `CKA_CLASS` (or carry SoftHSM's default, `CKA_TOKEN=false`), and a
/// template naming them would not find it. The keys' session copies (which carry their token key's
/// `CKA_ID`) are left out by handle.
fn secret_token_objects(w: &Worker) -> Result<Vec<SeenObject>, HsmError> {
    let found = w.session.find_objects(&[])?;
    let mut objects = Vec::with_capacity(found.len());
    for h in found {
        if w.handles.is_copy(h) {
            continue;
        }
        let (mut class, mut id, mut label) = (None, Vec::new(), Vec::new());
        // An object whose attributes cannot be read at all (SoftHSM answers
        // `CKR_ATTRIBUTE_VALUE_INVALID` for an object file holding only its header) is debris
        // with neither id nor label.
        let attrs = w
            .session
            .get_attributes(h, &[AttributeType::Class, AttributeType::Id, AttributeType::Label])
            .unwrap_or_default();
        for attr in attrs {
            match attr {
                Attribute::Class(c) => class = Some(c),
                Attribute::Id(v) => id = v,
                Attribute::Label(v) => label = v,
                _ => {}
            }
        }
        if class.is_none() || class == Some(ObjectClass::SECRET_KEY) {
            objects.push((h, id, label));
        }
    }
    Ok(objects)
}
