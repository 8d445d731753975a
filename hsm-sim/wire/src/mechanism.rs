//! Mechanisms on the wire: the type and its parameter, typed by the table in [`param_kind`].
//!
//! Owns which mechanisms carry which parameter structure. Must never carry a pointer value or a C
//! struct's raw bytes: a parameter the table does not describe cannot be sent.

use cryptoki_sys::*;

use crate::codec::{Blob, Decoder, Encoder, WireError};
use crate::{MAX_AAD, MAX_PARAM};

/// The C structure of a mechanism's parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// No parameter.
    None,
    /// A byte string: an IV (`CKM_AES_CBC`, `CKM_AES_CBC_PAD`, the optional IV of `CKM_AES_KEY_WRAP*`).
    Bytes,
    /// `CK_GCM_PARAMS`.
    Gcm,
    /// `CK_ECDH1_DERIVE_PARAMS`.
    Ecdh1,
    /// `CK_RSA_PKCS_PSS_PARAMS`.
    Pss,
    /// `CK_RSA_PKCS_OAEP_PARAMS`.
    Oaep,
}

/// The parameter structure of `mechanism` (`None` for every mechanism not listed).
pub fn param_kind(mechanism: u64) -> ParamKind {
    match mechanism {
        CKM_AES_CBC | CKM_AES_CBC_PAD | CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP => {
            ParamKind::Bytes
        }
        CKM_AES_GCM => ParamKind::Gcm,
        CKM_ECDH1_DERIVE | CKM_ECDH1_COFACTOR_DERIVE => ParamKind::Ecdh1,
        CKM_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => ParamKind::Pss,
        CKM_RSA_PKCS_OAEP => ParamKind::Oaep,
        _ => ParamKind::None,
    }
}

/// A typed mechanism parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MechParam {
    None,
    Bytes(Blob),
    Gcm {
        iv: Blob,
        /// `ulIvBits` (PKCS#11 3.0 layout; 0 when the caller used the 2.40 layout without it).
        iv_bits: u64,
        aad: Blob,
        tag_bits: u64,
    },
    Ecdh1 {
        kdf: u64,
        shared_data: Blob,
        public_data: Blob,
    },
    Pss {
        hash: u64,
        mgf: u64,
        salt_len: u64,
    },
    Oaep {
        hash: u64,
        mgf: u64,
        source: u64,
        source_data: Blob,
    },
}

/// A mechanism with its parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mechanism {
    pub mechanism: u64,
    pub param: MechParam,
}

impl Mechanism {
    pub fn plain(mechanism: u64) -> Mechanism {
        Mechanism { mechanism, param: MechParam::None }
    }
}

const P_NONE: u8 = 0;
const P_BYTES: u8 = 1;
const P_GCM: u8 = 2;
const P_ECDH1: u8 = 3;
const P_PSS: u8 = 4;
const P_OAEP: u8 = 5;

pub(crate) fn encode_mechanism(e: &mut Encoder, m: &Mechanism) {
    e.u64(m.mechanism);
    match &m.param {
        MechParam::None => {
            e.u8(P_NONE);
        }
        MechParam::Bytes(b) => {
            e.u8(P_BYTES).bytes(b);
        }
        MechParam::Gcm { iv, iv_bits, aad, tag_bits } => {
            e.u8(P_GCM).bytes(iv).u64(*iv_bits).bytes(aad).u64(*tag_bits);
        }
        MechParam::Ecdh1 { kdf, shared_data, public_data } => {
            e.u8(P_ECDH1).u64(*kdf).bytes(shared_data).bytes(public_data);
        }
        MechParam::Pss { hash, mgf, salt_len } => {
            e.u8(P_PSS).u64(*hash).u64(*mgf).u64(*salt_len);
        }
        MechParam::Oaep { hash, mgf, source, source_data } => {
            e.u8(P_OAEP).u64(*hash).u64(*mgf).u64(*source).bytes(source_data);
        }
    }
}

pub(crate) fn decode_mechanism(d: &mut Decoder<'_>) -> Result<Mechanism, WireError> {
    let mechanism = d.u64("mechanism")?;
    let param = match d.u8("mechanism parameter tag")? {
        P_NONE => MechParam::None,
        P_BYTES => MechParam::Bytes(d.bytes("mechanism parameter", MAX_PARAM)?),
        P_GCM => MechParam::Gcm {
            iv: d.bytes("GCM IV", MAX_PARAM)?,
            iv_bits: d.u64("GCM IV bits")?,
            aad: d.bytes("GCM AAD", MAX_AAD)?,
            tag_bits: d.u64("GCM tag bits")?,
        },
        P_ECDH1 => MechParam::Ecdh1 {
            kdf: d.u64("ECDH KDF")?,
            shared_data: d.bytes("ECDH shared data", MAX_PARAM)?,
            public_data: d.bytes("ECDH public data", MAX_PARAM)?,
        },
        P_PSS => MechParam::Pss {
            hash: d.u64("PSS hash")?,
            mgf: d.u64("PSS MGF")?,
            salt_len: d.u64("PSS salt length")?,
        },
        P_OAEP => MechParam::Oaep {
            hash: d.u64("OAEP hash")?,
            mgf: d.u64("OAEP MGF")?,
            source: d.u64("OAEP source")?,
            source_data: d.bytes("OAEP source data", MAX_PARAM)?,
        },
        tag => return Err(WireError::BadTag { field: "mechanism parameter tag", tag }),
    };
    Ok(Mechanism { mechanism, param })
}
