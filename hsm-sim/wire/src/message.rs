//! Requests and responses: the operations' arguments ([`Request`]) and results ([`Reply`]), after
//! the header of [`crate::op`].
//!
//! Owns the layout of every message. Must never accept a frame with trailing bytes, an unknown
//! operation or another protocol version.

use cryptoki_sys::CKR_OK;

use crate::attribute::{decode_results, decode_template, encode_results, encode_template};
use crate::codec::{Blob, Decoder, Encoder, Frame, WireError};
use crate::mechanism::{decode_mechanism, encode_mechanism};
use crate::info::{MechanismInfo, SessionInfo, SlotInfo, TokenInfo};
use crate::op::{decode_header, encode_header, FrameKind, Header, Op, KIND_REQUEST, KIND_RESPONSE};
use crate::{AttrResult, Attribute, Mechanism, MAX_FRAME, MAX_HANDLES, MAX_LIST, MAX_PIN};

/// The arguments of one operation. Handles are the server's (the client module translates).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    GetSlotList { token_present: bool },
    GetSlotInfo { slot: u64 },
    GetTokenInfo { slot: u64 },
    GetMechanismList { slot: u64 },
    GetMechanismInfo { slot: u64, mechanism: u64 },
    InitToken { slot: u64, so_pin: Option<Blob>, label: [u8; 32] },
    InitPin { session: u64, pin: Option<Blob> },
    SetPin { session: u64, old_pin: Option<Blob>, new_pin: Option<Blob> },
    OpenSession { slot: u64, flags: u64 },
    CloseSession { session: u64 },
    CloseAllSessions { slot: u64 },
    GetSessionInfo { session: u64 },
    Login { session: u64, user_type: u64, pin: Option<Blob> },
    Logout { session: u64 },
    CreateObject { session: u64, template: Vec<Attribute> },
    CopyObject { session: u64, object: u64, template: Vec<Attribute> },
    DestroyObject { session: u64, object: u64 },
    GetAttributeValue { session: u64, object: u64, types: Vec<u64> },
    SetAttributeValue { session: u64, object: u64, template: Vec<Attribute> },
    FindObjects { session: u64, template: Vec<Attribute> },
    Encrypt { session: u64, mechanism: Mechanism, key: u64, data: Blob },
    Decrypt { session: u64, mechanism: Mechanism, key: u64, data: Blob },
    Sign { session: u64, mechanism: Mechanism, key: u64, data: Blob },
    Verify { session: u64, mechanism: Mechanism, key: u64, data: Blob, signature: Blob },
    Digest { session: u64, mechanism: Mechanism, data: Blob },
    GenerateKey { session: u64, mechanism: Mechanism, template: Vec<Attribute> },
    GenerateKeyPair { session: u64, mechanism: Mechanism, public_template: Vec<Attribute>, private_template: Vec<Attribute> },
    WrapKey { session: u64, mechanism: Mechanism, wrapping_key: u64, key: u64 },
    UnwrapKey { session: u64, mechanism: Mechanism, unwrapping_key: u64, wrapped: Blob, template: Vec<Attribute> },
    DeriveKey { session: u64, mechanism: Mechanism, base_key: u64, template: Vec<Attribute> },
    SeedRandom { session: u64, seed: Blob },
    GenerateRandom { session: u64, len: u32 },
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Request::GetSlotList { .. } => Op::GetSlotList,
            Request::GetSlotInfo { .. } => Op::GetSlotInfo,
            Request::GetTokenInfo { .. } => Op::GetTokenInfo,
            Request::GetMechanismList { .. } => Op::GetMechanismList,
            Request::GetMechanismInfo { .. } => Op::GetMechanismInfo,
            Request::InitToken { .. } => Op::InitToken,
            Request::InitPin { .. } => Op::InitPin,
            Request::SetPin { .. } => Op::SetPin,
            Request::OpenSession { .. } => Op::OpenSession,
            Request::CloseSession { .. } => Op::CloseSession,
            Request::CloseAllSessions { .. } => Op::CloseAllSessions,
            Request::GetSessionInfo { .. } => Op::GetSessionInfo,
            Request::Login { .. } => Op::Login,
            Request::Logout { .. } => Op::Logout,
            Request::CreateObject { .. } => Op::CreateObject,
            Request::CopyObject { .. } => Op::CopyObject,
            Request::DestroyObject { .. } => Op::DestroyObject,
            Request::GetAttributeValue { .. } => Op::GetAttributeValue,
            Request::SetAttributeValue { .. } => Op::SetAttributeValue,
            Request::FindObjects { .. } => Op::FindObjects,
            Request::Encrypt { .. } => Op::Encrypt,
            Request::Decrypt { .. } => Op::Decrypt,
            Request::Sign { .. } => Op::Sign,
            Request::Verify { .. } => Op::Verify,
            Request::Digest { .. } => Op::Digest,
            Request::GenerateKey { .. } => Op::GenerateKey,
            Request::GenerateKeyPair { .. } => Op::GenerateKeyPair,
            Request::WrapKey { .. } => Op::WrapKey,
            Request::UnwrapKey { .. } => Op::UnwrapKey,
            Request::DeriveKey { .. } => Op::DeriveKey,
            Request::SeedRandom { .. } => Op::SeedRandom,
            Request::GenerateRandom { .. } => Op::GenerateRandom,
        }
    }

    /// The session the request runs in, for the operations that take one.
    pub fn session(&self) -> Option<u64> {
        match self {
            Request::GetSlotList { .. }
            | Request::GetSlotInfo { .. }
            | Request::GetTokenInfo { .. }
            | Request::GetMechanismList { .. }
            | Request::GetMechanismInfo { .. }
            | Request::InitToken { .. }
            | Request::OpenSession { .. }
            | Request::CloseAllSessions { .. } => None,
            Request::InitPin { session, .. }
            | Request::SetPin { session, .. }
            | Request::CloseSession { session }
            | Request::GetSessionInfo { session }
            | Request::Login { session, .. }
            | Request::Logout { session }
            | Request::CreateObject { session, .. }
            | Request::CopyObject { session, .. }
            | Request::DestroyObject { session, .. }
            | Request::GetAttributeValue { session, .. }
            | Request::SetAttributeValue { session, .. }
            | Request::FindObjects { session, .. }
            | Request::Encrypt { session, .. }
            | Request::Decrypt { session, .. }
            | Request::Sign { session, .. }
            | Request::Verify { session, .. }
            | Request::Digest { session, .. }
            | Request::GenerateKey { session, .. }
            | Request::GenerateKeyPair { session, .. }
            | Request::WrapKey { session, .. }
            | Request::UnwrapKey { session, .. }
            | Request::DeriveKey { session, .. }
            | Request::SeedRandom { session, .. }
            | Request::GenerateRandom { session, .. } => Some(*session),
        }
    }

    pub fn encode(&self, id: u32) -> Frame {
        let mut e = Encoder::new();
        encode_header(&mut e, KIND_REQUEST, id, self.op());
        match self {
            Request::GetSlotList { token_present } => {
                e.bool(*token_present);
            }
            Request::GetSlotInfo { slot }
            | Request::GetTokenInfo { slot }
            | Request::GetMechanismList { slot }
            | Request::CloseAllSessions { slot } => {
                e.u64(*slot);
            }
            Request::GetMechanismInfo { slot, mechanism } => {
                e.u64(*slot).u64(*mechanism);
            }
            Request::InitToken { slot, so_pin, label } => {
                e.u64(*slot).opt_bytes(so_pin.as_deref()).raw(label);
            }
            Request::InitPin { session, pin } => {
                e.u64(*session).opt_bytes(pin.as_deref());
            }
            Request::SetPin { session, old_pin, new_pin } => {
                e.u64(*session).opt_bytes(old_pin.as_deref()).opt_bytes(new_pin.as_deref());
            }
            Request::OpenSession { slot, flags } => {
                e.u64(*slot).u64(*flags);
            }
            Request::CloseSession { session } | Request::GetSessionInfo { session } | Request::Logout { session } => {
                e.u64(*session);
            }
            Request::Login { session, user_type, pin } => {
                e.u64(*session).u64(*user_type).opt_bytes(pin.as_deref());
            }
            Request::CreateObject { session, template } | Request::FindObjects { session, template } => {
                e.u64(*session);
                encode_template(&mut e, template);
            }
            Request::CopyObject { session, object, template } | Request::SetAttributeValue { session, object, template } => {
                e.u64(*session).u64(*object);
                encode_template(&mut e, template);
            }
            Request::DestroyObject { session, object } => {
                e.u64(*session).u64(*object);
            }
            Request::GetAttributeValue { session, object, types } => {
                e.u64(*session).u64(*object).u64_list(types);
            }
            Request::Encrypt { session, mechanism, key, data }
            | Request::Decrypt { session, mechanism, key, data }
            | Request::Sign { session, mechanism, key, data } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.u64(*key).bytes(data);
            }
            Request::Verify { session, mechanism, key, data, signature } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.u64(*key).bytes(data).bytes(signature);
            }
            Request::Digest { session, mechanism, data } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.bytes(data);
            }
            Request::GenerateKey { session, mechanism, template } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                encode_template(&mut e, template);
            }
            Request::GenerateKeyPair { session, mechanism, public_template, private_template } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                encode_template(&mut e, public_template);
                encode_template(&mut e, private_template);
            }
            Request::WrapKey { session, mechanism, wrapping_key, key } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.u64(*wrapping_key).u64(*key);
            }
            Request::UnwrapKey { session, mechanism, unwrapping_key, wrapped, template } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.u64(*unwrapping_key).bytes(wrapped);
                encode_template(&mut e, template);
            }
            Request::DeriveKey { session, mechanism, base_key, template } => {
                e.u64(*session);
                encode_mechanism(&mut e, mechanism);
                e.u64(*base_key);
                encode_template(&mut e, template);
            }
            Request::SeedRandom { session, seed } => {
                e.u64(*session).bytes(seed);
            }
            Request::GenerateRandom { session, len } => {
                e.u64(*session).u32(*len);
            }
        }
        e.finish()
    }

    /// Decodes a request body; returns its id too.
    pub fn decode(body: &[u8]) -> Result<(u32, Request), WireError> {
        let mut d = Decoder::new(body);
        let h = decode_header(&mut d)?;
        if h.kind != FrameKind::Request {
            return Err(WireError::BadKind { kind: KIND_RESPONSE });
        }
        let data = |d: &mut Decoder<'_>, f| d.bytes(f, MAX_FRAME);
        let pin = |d: &mut Decoder<'_>| d.opt_bytes("PIN", MAX_PIN);
        let r = match h.op {
            Op::GetSlotList => Request::GetSlotList { token_present: d.bool("token present")? },
            Op::GetSlotInfo => Request::GetSlotInfo { slot: d.u64("slot")? },
            Op::GetTokenInfo => Request::GetTokenInfo { slot: d.u64("slot")? },
            Op::GetMechanismList => Request::GetMechanismList { slot: d.u64("slot")? },
            Op::GetMechanismInfo => Request::GetMechanismInfo { slot: d.u64("slot")?, mechanism: d.u64("mechanism")? },
            Op::InitToken => Request::InitToken { slot: d.u64("slot")?, so_pin: pin(&mut d)?, label: d.fixed("label")? },
            Op::InitPin => Request::InitPin { session: d.u64("session")?, pin: pin(&mut d)? },
            Op::SetPin => Request::SetPin { session: d.u64("session")?, old_pin: pin(&mut d)?, new_pin: pin(&mut d)? },
            Op::OpenSession => Request::OpenSession { slot: d.u64("slot")?, flags: d.u64("flags")? },
            Op::CloseSession => Request::CloseSession { session: d.u64("session")? },
            Op::CloseAllSessions => Request::CloseAllSessions { slot: d.u64("slot")? },
            Op::GetSessionInfo => Request::GetSessionInfo { session: d.u64("session")? },
            Op::Login => Request::Login { session: d.u64("session")?, user_type: d.u64("user type")?, pin: pin(&mut d)? },
            Op::Logout => Request::Logout { session: d.u64("session")? },
            Op::CreateObject => Request::CreateObject { session: d.u64("session")?, template: decode_template(&mut d)? },
            Op::CopyObject => Request::CopyObject {
                session: d.u64("session")?,
                object: d.u64("object")?,
                template: decode_template(&mut d)?,
            },
            Op::DestroyObject => Request::DestroyObject { session: d.u64("session")?, object: d.u64("object")? },
            Op::GetAttributeValue => Request::GetAttributeValue {
                session: d.u64("session")?,
                object: d.u64("object")?,
                types: d.u64_list("attribute types", crate::MAX_TEMPLATE)?,
            },
            Op::SetAttributeValue => Request::SetAttributeValue {
                session: d.u64("session")?,
                object: d.u64("object")?,
                template: decode_template(&mut d)?,
            },
            Op::FindObjects => Request::FindObjects { session: d.u64("session")?, template: decode_template(&mut d)? },
            Op::Encrypt | Op::Decrypt | Op::Sign => {
                let session = d.u64("session")?;
                let mechanism = decode_mechanism(&mut d)?;
                let key = d.u64("key")?;
                let data = data(&mut d, "data")?;
                match h.op {
                    Op::Encrypt => Request::Encrypt { session, mechanism, key, data },
                    Op::Decrypt => Request::Decrypt { session, mechanism, key, data },
                    _ => Request::Sign { session, mechanism, key, data },
                }
            }
            Op::Verify => Request::Verify {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                key: d.u64("key")?,
                data: data(&mut d, "data")?,
                signature: data(&mut d, "signature")?,
            },
            Op::Digest => Request::Digest {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                data: data(&mut d, "data")?,
            },
            Op::GenerateKey => Request::GenerateKey {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                template: decode_template(&mut d)?,
            },
            Op::GenerateKeyPair => Request::GenerateKeyPair {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                public_template: decode_template(&mut d)?,
                private_template: decode_template(&mut d)?,
            },
            Op::WrapKey => Request::WrapKey {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                wrapping_key: d.u64("wrapping key")?,
                key: d.u64("key")?,
            },
            Op::UnwrapKey => Request::UnwrapKey {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                unwrapping_key: d.u64("unwrapping key")?,
                wrapped: data(&mut d, "wrapped key")?,
                template: decode_template(&mut d)?,
            },
            Op::DeriveKey => Request::DeriveKey {
                session: d.u64("session")?,
                mechanism: decode_mechanism(&mut d)?,
                base_key: d.u64("base key")?,
                template: decode_template(&mut d)?,
            },
            Op::SeedRandom => Request::SeedRandom { session: d.u64("session")?, seed: data(&mut d, "seed")? },
            Op::GenerateRandom => {
                let session = d.u64("session")?;
                let len = d.u32("random length")?;
                if len as usize > crate::MAX_RANDOM {
                    return Err(WireError::TooLong { field: "random length", len: len.into(), max: crate::MAX_RANDOM as u64 });
                }
                Request::GenerateRandom { session, len }
            }
        };
        d.finish()?;
        Ok((h.id, r))
    }
}

/// The result of a successful operation; its shape is fixed by the operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// The operation returns nothing (or it failed).
    None,
    SlotList(Vec<u64>),
    SlotInfo(SlotInfo),
    TokenInfo(TokenInfo),
    MechanismList(Vec<u64>),
    MechanismInfo(MechanismInfo),
    Session(u64),
    SessionInfo(SessionInfo),
    Object(u64),
    KeyPair { public: u64, private: u64 },
    Data(Blob),
    Attributes(Vec<AttrResult>),
    Objects(Vec<u64>),
}

/// A `CK_RV` and, when it is `CKR_OK`, the operation's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub rv: u64,
    pub reply: Reply,
}

impl Response {
    pub fn ok(reply: Reply) -> Response {
        Response { rv: CKR_OK, reply }
    }

    pub fn error(rv: u64) -> Response {
        Response { rv, reply: Reply::None }
    }

    pub fn encode(&self, id: u32, op: Op) -> Frame {
        let mut e = Encoder::new();
        encode_header(&mut e, KIND_RESPONSE, id, op);
        e.u64(self.rv);
        if self.rv == CKR_OK {
            match &self.reply {
                Reply::None => {}
                Reply::SlotList(v) | Reply::MechanismList(v) | Reply::Objects(v) => {
                    e.u64_list(v);
                }
                Reply::SlotInfo(s) => {
                    e.raw(&s.description).raw(&s.manufacturer).u64(s.flags).raw(&s.hardware_version).raw(&s.firmware_version);
                }
                Reply::TokenInfo(t) => {
                    e.raw(&t.label).raw(&t.manufacturer).raw(&t.model).raw(&t.serial).u64(t.flags);
                    for c in t.counts {
                        e.u64(c);
                    }
                    e.raw(&t.hardware_version).raw(&t.firmware_version).raw(&t.utc_time);
                }
                Reply::MechanismInfo(m) => {
                    e.u64(m.min_key_size).u64(m.max_key_size).u64(m.flags);
                }
                Reply::Session(h) | Reply::Object(h) => {
                    e.u64(*h);
                }
                Reply::SessionInfo(s) => {
                    e.u64(s.slot).u64(s.state).u64(s.flags).u64(s.device_error);
                }
                Reply::KeyPair { public, private } => {
                    e.u64(*public).u64(*private);
                }
                Reply::Data(b) => {
                    e.bytes(b);
                }
                Reply::Attributes(r) => encode_results(&mut e, r),
            }
        }
        e.finish()
    }

    /// Decodes a response body: its header and the result, shaped by the header's operation.
    pub fn decode(body: &[u8]) -> Result<(Header, Response), WireError> {
        let mut d = Decoder::new(body);
        let h = decode_header(&mut d)?;
        if h.kind != FrameKind::Response {
            return Err(WireError::BadKind { kind: KIND_REQUEST });
        }
        let rv = d.u64("rv")?;
        if rv != CKR_OK {
            d.finish()?;
            return Ok((h, Response::error(rv)));
        }
        let reply = match h.op {
            Op::GetSlotList => Reply::SlotList(d.u64_list("slot list", MAX_LIST)?),
            Op::GetMechanismList => Reply::MechanismList(d.u64_list("mechanism list", MAX_LIST)?),
            Op::FindObjects => Reply::Objects(d.u64_list("object handles", MAX_HANDLES)?),
            Op::GetSlotInfo => Reply::SlotInfo(SlotInfo {
                description: d.fixed("slot description")?,
                manufacturer: d.fixed("manufacturer")?,
                flags: d.u64("flags")?,
                hardware_version: d.fixed("hardware version")?,
                firmware_version: d.fixed("firmware version")?,
            }),
            Op::GetTokenInfo => {
                let label = d.fixed("label")?;
                let manufacturer = d.fixed("manufacturer")?;
                let model = d.fixed("model")?;
                let serial = d.fixed("serial")?;
                let flags = d.u64("flags")?;
                let mut counts = [0u64; 10];
                for c in &mut counts {
                    *c = d.u64("token counts")?;
                }
                Reply::TokenInfo(TokenInfo {
                    label,
                    manufacturer,
                    model,
                    serial,
                    flags,
                    counts,
                    hardware_version: d.fixed("hardware version")?,
                    firmware_version: d.fixed("firmware version")?,
                    utc_time: d.fixed("utc time")?,
                })
            }
            Op::GetMechanismInfo => Reply::MechanismInfo(MechanismInfo {
                min_key_size: d.u64("min key size")?,
                max_key_size: d.u64("max key size")?,
                flags: d.u64("flags")?,
            }),
            Op::OpenSession => Reply::Session(d.u64("session")?),
            Op::GetSessionInfo => Reply::SessionInfo(SessionInfo {
                slot: d.u64("slot")?,
                state: d.u64("state")?,
                flags: d.u64("flags")?,
                device_error: d.u64("device error")?,
            }),
            Op::CreateObject | Op::CopyObject | Op::GenerateKey | Op::UnwrapKey | Op::DeriveKey => {
                Reply::Object(d.u64("object")?)
            }
            Op::GenerateKeyPair => Reply::KeyPair { public: d.u64("public key")?, private: d.u64("private key")? },
            Op::Encrypt | Op::Decrypt | Op::Sign | Op::Digest | Op::WrapKey | Op::GenerateRandom => {
                Reply::Data(d.bytes("data", MAX_FRAME)?)
            }
            Op::GetAttributeValue => Reply::Attributes(decode_results(&mut d)?),
            Op::InitToken
            | Op::InitPin
            | Op::SetPin
            | Op::CloseSession
            | Op::CloseAllSessions
            | Op::Login
            | Op::Logout
            | Op::DestroyObject
            | Op::SetAttributeValue
            | Op::Verify
            | Op::SeedRandom => Reply::None,
        };
        d.finish()?;
        Ok((h, Response { rv, reply }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{peek_header, HEADER_LEN, OPS};
    use crate::{AttrValue, MechParam};
    use cryptoki_sys::*;

    fn round_trip(r: Request) {
        let f = r.encode(7);
        let (id, back) = Request::decode(f.body()).expect("decode");
        assert_eq!((id, back), (7, r));
        assert_eq!(peek_header(f.body()).unwrap().id, 7);
    }

    #[test]
    fn operations_know_whether_they_take_a_session() {
        let samples = [
            Request::GetSlotList { token_present: true },
            Request::OpenSession { slot: 1, flags: 0 },
            Request::CloseAllSessions { slot: 1 },
            Request::CloseSession { session: 1 },
            Request::GenerateRandom { session: 1, len: 1 },
            Request::InitToken { slot: 1, so_pin: None, label: [b' '; 32] },
        ];
        for r in samples {
            assert_eq!(r.op().has_session(), r.session().is_some(), "{:?}", r.op());
        }
    }

    #[test]
    fn requests_round_trip() {
        round_trip(Request::GetSlotList { token_present: true });
        round_trip(Request::Login { session: 3, user_type: CKU_USER, pin: Some(Blob::from_slice(b"1234")) });
        round_trip(Request::Encrypt {
            session: 1,
            mechanism: Mechanism {
                mechanism: CKM_AES_GCM,
                param: MechParam::Gcm { iv: Blob::new(vec![1; 12]), iv_bits: 96, aad: Blob::from_slice(b"aad"), tag_bits: 128 },
            },
            key: 9,
            data: Blob::from_slice(b"plain"),
        });
        round_trip(Request::UnwrapKey {
            session: 1,
            mechanism: Mechanism::plain(CKM_AES_KEY_WRAP_PAD),
            unwrapping_key: 2,
            wrapped: Blob::new(vec![0; 40]),
            template: vec![
                Attribute::ulong(CKA_CLASS, CKO_SECRET_KEY),
                Attribute::new(CKA_ALLOWED_MECHANISMS, AttrValue::UlongList(vec![CKM_AES_GCM])),
            ],
        });
        round_trip(Request::InitToken { slot: 4, so_pin: None, label: [b' '; 32] });
    }

    #[test]
    fn responses_round_trip_and_errors_carry_no_body() {
        let r = Response::ok(Reply::Attributes(vec![AttrResult::Sensitive, AttrResult::Value(AttrValue::Ulong(32))]));
        let f = r.encode(5, Op::GetAttributeValue);
        let (h, back) = Response::decode(f.body()).unwrap();
        assert_eq!((h.id, h.op, back), (5, Op::GetAttributeValue, r));
        let f = Response::error(CKR_DEVICE_ERROR).encode(6, Op::WrapKey);
        assert_eq!(f.body().len(), HEADER_LEN + 8);
        assert_eq!(Response::decode(f.body()).unwrap().1, Response::error(CKR_DEVICE_ERROR));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let f = Request::GetSlotList { token_present: false }.encode(1);
        let body = f.body();
        for cut in 0..body.len() {
            assert!(Request::decode(&body[..cut]).is_err());
        }
        let mut extra = body.to_vec();
        extra.push(0);
        assert_eq!(Request::decode(&extra), Err(WireError::TrailingBytes { count: 1 }));
        let mut bad = body.to_vec();
        bad[0] = 9;
        assert_eq!(Request::decode(&bad), Err(WireError::BadVersion { version: 9 }));
        // Arbitrary bytes never panic.
        let mut x: u32 = 1;
        for _ in 0..2000 {
            let mut junk = Vec::new();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                junk.push(x as u8);
            }
            let _ = Request::decode(&junk);
            let _ = Response::decode(&junk);
        }
    }

    #[test]
    fn function_names_map_to_operations() {
        assert_eq!(Op::from_function_name("C_WrapKey"), Some(Op::WrapKey));
        assert_eq!(Op::from_function_name("C_EncryptInit"), Some(Op::Encrypt));
        assert_eq!(Op::from_function_name("C_FindObjectsInit"), Some(Op::FindObjects));
        assert_eq!(Op::from_function_name("C_SignFinal"), Some(Op::Sign));
        assert_eq!(Op::from_function_name("C_Nothing"), None);
        for (code, op, name) in OPS {
            assert_eq!(Op::from_code(code), Some(op));
            assert_eq!(op.code(), code);
            assert_eq!(op.name(), name);
        }
    }
}
