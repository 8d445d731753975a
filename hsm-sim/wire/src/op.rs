//! The operations of the protocol ([`Op`]) and the frame header every body starts with.
//!
//! Owns the table of operation codes and PKCS#11 names. Must never reuse a code for another
//! operation: codes are the protocol.

use std::fmt;

use crate::codec::{Decoder, Encoder, WireError};
use crate::VERSION;

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
pub(crate) const OPS: [(u16, Op, &str); 32] = [
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

    /// Whether the operation runs in a session (all but the slot, token and mechanism queries,
    /// `C_InitToken`, `C_OpenSession` and `C_CloseAllSessions`).
    pub fn has_session(self) -> bool {
        !matches!(
            self,
            Op::GetSlotList
                | Op::GetSlotInfo
                | Op::GetTokenInfo
                | Op::GetMechanismList
                | Op::GetMechanismInfo
                | Op::InitToken
                | Op::OpenSession
                | Op::CloseAllSessions
        )
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

pub(crate) const KIND_REQUEST: u8 = 1;
pub(crate) const KIND_RESPONSE: u8 = 2;

/// The fixed start of every frame body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub id: u32,
    pub op: Op,
}

/// Header length: version, kind, id, op.
pub(crate) const HEADER_LEN: usize = 1 + 1 + 4 + 2;

pub(crate) fn encode_header(e: &mut Encoder, kind: u8, id: u32, op: Op) {
    e.u8(VERSION).u8(kind).u32(id).u16(op.code());
}

pub(crate) fn decode_header(d: &mut Decoder<'_>) -> Result<Header, WireError> {
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

