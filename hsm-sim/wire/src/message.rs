//! Requests and responses: the header, the operations ([`Op`]), their arguments ([`Request`]) and
//! results ([`Reply`]).
//!
//! Owns the layout of every message. Must never accept a frame with trailing bytes, an unknown
//! operation or another protocol version.

use std::fmt;

use cryptoki_sys::CKR_OK;

use crate::attribute::{decode_results, decode_template, encode_results, encode_template};
use crate::codec::{Blob, Decoder, Encoder, Frame, WireError};
use crate::mechanism::{decode_mechanism, encode_mechanism};
use crate::{AttrResult, Attribute, Mechanism, MAX_FRAME, MAX_HANDLES, MAX_LIST, MAX_PIN, VERSION};

/// The operations of the protocol. Each is one round trip, and most are one PKCS#11 function (the
/// crypto operations stand for their `Init` call and the call that completes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    GetSlotList,
    GetSlotInfo,
    GetTokenInfo,
    GetMechanismList,
    GetMechanismInfo,
    InitToken,
    InitPin,
    SetPin,
    OpenSession,
    CloseSession,
    CloseAllSessions,
    GetSessionInfo,
    Login,
    Logout,
    CreateObject,
    CopyObject,
    DestroyObject,
    GetAttributeValue,
    SetAttributeValue,
    FindObjects,
    Encrypt,
    Decrypt,
    Sign,
    Verify,
    Digest,
    GenerateKey,
    GenerateKeyPair,
    WrapKey,
    UnwrapKey,
    DeriveKey,
    SeedRandom,
    GenerateRandom,
}

/// Code, operation and the PKCS#11 name of the function it answers. Codes never change meaning.
const OPS: [(u16, Op, &str); 32] = [
    (1, Op::GetSlotList, "C_GetSlotList"),
    (2, Op::GetSlotInfo, "C_GetSlotInfo"),
    (3, Op::GetTokenInfo, "C_GetTokenInfo"),
    (4, Op::GetMechanismList, "C_GetMechanismList"),
    (5, Op::GetMechanismInfo, "C_GetMechanismInfo"),
    (6, Op::InitToken, "C_InitToken"),
    (7, Op::InitPin, "C_InitPIN"),
    (8, Op::SetPin, "C_SetPIN"),
    (9, Op::OpenSession, "C_OpenSession"),
    (10, Op::CloseSession, "C_CloseSession"),
    (11, Op::CloseAllSessions, "C_CloseAllSessions"),
    (12, Op::GetSessionInfo, "C_GetSessionInfo"),
    (13, Op::Login, "C_Login"),
    (14, Op::Logout, "C_Logout"),
    (15, Op::CreateObject, "C_CreateObject"),
    (16, Op::CopyObject, "C_CopyObject"),
    (17, Op::DestroyObject, "C_DestroyObject"),
    (18, Op::GetAttributeValue, "C_GetAttributeValue"),
    (19, Op::SetAttributeValue, "C_SetAttributeValue"),
    (20, Op::FindObjects, "C_FindObjects"),
    (21, Op::Encrypt, "C_Encrypt"),
    (22, Op::Decrypt, "C_Decrypt"),
    (23, Op::Sign, "C_Sign"),
    (24, Op::Verify, "C_Verify"),
    (25, Op::Digest, "C_Digest"),
    (26, Op::GenerateKey, "C_GenerateKey"),
    (27, Op::GenerateKeyPair, "C_GenerateKeyPair"),
    (28, Op::WrapKey, "C_WrapKey"),
    (29, Op::UnwrapKey, "C_UnwrapKey"),
    (30, Op::DeriveKey, "C_DeriveKey"),
    (31, Op::SeedRandom, "C_SeedRandom"),
    (32, Op::GenerateRandom, "C_GenerateRandom"),
];

impl Op {
    pub fn code(self) -> u16 {
        OPS.iter().find(|(_, op, _)| *op == self).map(|(c, _, _)| *c).unwrap_or(0)
    }

    pub fn from_code(code: u16) -> Option<Op> {
        OPS.iter().find(|(c, _, _)| *c == code).map(|(_, op, _)| *op)
    }

    /// The PKCS#11 function this operation completes, e.g. `C_WrapKey`, `C_Encrypt`.
    pub fn name(self) -> &'static str {
        OPS.iter().find(|(_, op, _)| *op == self).map(|(_, _, n)| *n).unwrap_or("C_Unknown")
    }

    /// The operation a PKCS#11 function name belongs to: `C_WrapKey`, and for the crypto
    /// operations also their `Init`, `Update` and `Final` calls (`C_EncryptInit` is `Encrypt`),
    /// and `C_FindObjectsInit`/`C_FindObjectsFinal` (`FindObjects`).
    pub fn from_function_name(name: &str) -> Option<Op> {
        if let Some((_, op, _)) = OPS.iter().find(|(_, _, n)| *n == name) {
            return Some(*op);
        }
        let base = ["Init", "Update", "Final"].iter().find_map(|suffix| name.strip_suffix(suffix))?;
        OPS.iter().find(|(_, _, n)| *n == base).map(|(_, op, _)| *op)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Request,
    Response,
}

const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;

/// The fixed start of every frame body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub id: u32,
    pub op: Op,
}

/// Header length: version, kind, id, op.
const HEADER_LEN: usize = 1 + 1 + 4 + 2;

fn encode_header(e: &mut Encoder, kind: u8, id: u32, op: Op) {
    e.u8(VERSION).u8(kind).u32(id).u16(op.code());
}

fn decode_header(d: &mut Decoder<'_>) -> Result<Header, WireError> {
    let version = d.u8("version")?;
    if version != VERSION {
        return Err(WireError::BadVersion { version });
    }
    let kind = match d.u8("kind")? {
        KIND_REQUEST => FrameKind::Request,
        KIND_RESPONSE => FrameKind::Response,
        kind => return Err(WireError::BadKind { kind }),
    };
    let id = d.u32("request id")?;
    let code = d.u16("operation")?;
    let op = Op::from_code(code).ok_or(WireError::UnknownOp { op: code })?;
    Ok(Header { kind, id, op })
}

/// Reads only the header (for relaying and fault injection without decoding the arguments).
pub fn peek_header(body: &[u8]) -> Result<Header, WireError> {
    decode_header(&mut Decoder::new(body.get(..HEADER_LEN).unwrap_or(body)))
}

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

/// `CK_SLOT_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub description: [u8; 64],
    pub manufacturer: [u8; 32],
    pub flags: u64,
    pub hardware_version: [u8; 2],
    pub firmware_version: [u8; 2],
}

/// `CK_TOKEN_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub label: [u8; 32],
    pub manufacturer: [u8; 32],
    pub model: [u8; 16],
    pub serial: [u8; 16],
    pub flags: u64,
    /// `ulMaxSessionCount`, `ulSessionCount`, `ulMaxRwSessionCount`, `ulRwSessionCount`,
    /// `ulMaxPinLen`, `ulMinPinLen`, `ulTotalPublicMemory`, `ulFreePublicMemory`,
    /// `ulTotalPrivateMemory`, `ulFreePrivateMemory`, in that order; `u64::MAX` is
    /// `CK_UNAVAILABLE_INFORMATION` and `0` for the maxima `CK_EFFECTIVELY_INFINITE`.
    pub counts: [u64; 10],
    pub hardware_version: [u8; 2],
    pub firmware_version: [u8; 2],
    pub utc_time: [u8; 16],
}

/// `CK_MECHANISM_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MechanismInfo {
    pub min_key_size: u64,
    pub max_key_size: u64,
    pub flags: u64,
}

/// `CK_SESSION_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub slot: u64,
    pub state: u64,
    pub flags: u64,
    pub device_error: u64,
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
    use crate::{AttrValue, MechParam};
    use cryptoki_sys::*;

    fn round_trip(r: Request) {
        let f = r.encode(7);
        let (id, back) = Request::decode(f.body()).expect("decode");
        assert_eq!((id, back), (7, r));
        assert_eq!(peek_header(f.body()).unwrap().id, 7);
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
