//! Between the wire and `cryptoki`: mechanisms and templates rebuilt from the wire, attribute
//! values, token, slot, mechanism and session information turned back into wire values, and
//! `cryptoki` errors turned into `CK_RV` codes.
//!
//! Templates go to SoftHSM as `cryptoki`'s vendor-defined attributes with the exact bytes of the
//! C layout, so SoftHSM (not this code) validates every value, as it does in process. Must never
//! accept a mechanism parameter `cryptoki` cannot express (those mechanisms answer
//! `CKR_MECHANISM_INVALID`).

use cryptoki::error::{Error as CkError, Rv as CkRv, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismInfo, MechanismType};
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::session::{SessionInfo, SessionState, UserType};
use cryptoki::slot::{Limit, SlotInfo, TokenInfo};
use cryptoki_sys::*;
use hsm_sim_wire::{self as wire, AttrValue, MechParam};
use zeroize::Zeroize;

use super::nested;

pub(super) type Ckr = CK_RV;

/// The `CK_RV` of a `cryptoki` error; errors that are not a token's answer (a value `cryptoki`
/// could not convert) are `CKR_GENERAL_ERROR`.
pub(super) fn rv(e: CkError) -> Ckr {
    match e {
        CkError::Pkcs11(code, _) => rv_of(code),
        _ => CKR_GENERAL_ERROR,
    }
}

fn rv_of(e: RvError) -> Ckr {
    match e {
        RvError::VendorDefined(c) | RvError::UnknownErrorCode(c) => c,
        other => wire::rv_codes().find(|c| CkRv::from(*c) == CkRv::Error(other)).unwrap_or(CKR_GENERAL_ERROR),
    }
}

/// A template as `cryptoki` attributes, with the buffers its nested templates point into. The
/// buffers live as long as the `Template`; use [`Template::attributes`] only while it is alive.
pub(super) struct Template {
    attributes: Vec<Attribute>,
    _nested: nested::Buffers,
}

impl Template {
    pub(super) fn from_wire(t: &[wire::Attribute]) -> Result<Template, Ckr> {
        let mut buffers = nested::Buffers::default();
        let mut attributes = Vec::with_capacity(t.len());
        for a in t {
            let bytes = match &a.value {
                AttrValue::Template(inner) => buffers.layout(inner)?,
                flat => flat_bytes(flat).ok_or(CKR_ATTRIBUTE_VALUE_INVALID)?,
            };
            attributes.push(Attribute::VendorDefined((AttributeType::VendorDefined(a.attr_type), bytes)));
        }
        Ok(Template { attributes, _nested: buffers })
    }

    pub(super) fn attributes(&self) -> &[Attribute] {
        &self.attributes
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        // Templates carry key values (CKA_VALUE of C_CreateObject).
        for a in &mut self.attributes {
            if let Attribute::VendorDefined((_, bytes)) = a {
                bytes.zeroize();
            }
        }
    }
}

/// A value that is not a nested template, in this machine's C layout.
pub(super) fn flat_bytes(v: &AttrValue) -> Option<Vec<u8>> {
    match v {
        AttrValue::Bytes(b) => Some(b.to_vec()),
        AttrValue::Ulong(x) => Some((*x as CK_ULONG).to_ne_bytes().to_vec()),
        AttrValue::UlongList(l) => Some(l.iter().flat_map(|x| (*x as CK_ULONG).to_ne_bytes()).collect()),
        AttrValue::Template(_) => None,
    }
}

/// The wire value of an attribute `cryptoki` read back, or `None` for a kind it has no wire form
/// for (reported as `CKR_ATTRIBUTE_TYPE_INVALID`).
pub(super) fn attribute_value(a: &Attribute) -> Option<AttrValue> {
    let bytes = |b: &[u8]| Some(AttrValue::Bytes(wire::Blob::from_slice(b)));
    let flag = |b: bool| Some(AttrValue::Bytes(wire::Blob::new(vec![u8::from(b)])));
    match a {
        Attribute::AlwaysAuthenticate(b)
        | Attribute::AlwaysSensitive(b)
        | Attribute::Copyable(b)
        | Attribute::Decapsulate(b)
        | Attribute::Decrypt(b)
        | Attribute::Derive(b)
        | Attribute::Destroyable(b)
        | Attribute::Encapsulate(b)
        | Attribute::Encrypt(b)
        | Attribute::Extractable(b)
        | Attribute::Local(b)
        | Attribute::Modifiable(b)
        | Attribute::NeverExtractable(b)
        | Attribute::Private(b)
        | Attribute::Sensitive(b)
        | Attribute::Sign(b)
        | Attribute::SignRecover(b)
        | Attribute::Token(b)
        | Attribute::Trusted(b)
        | Attribute::Unwrap(b)
        | Attribute::Verify(b)
        | Attribute::VerifyRecover(b)
        | Attribute::Wrap(b)
        | Attribute::WrapWithTrusted(b) => flag(*b),
        Attribute::AcIssuer(v)
        | Attribute::Application(v)
        | Attribute::AttrTypes(v)
        | Attribute::Base(v)
        | Attribute::CheckValue(v)
        | Attribute::Coefficient(v)
        | Attribute::EcParams(v)
        | Attribute::EcPoint(v)
        | Attribute::Exponent1(v)
        | Attribute::Exponent2(v)
        | Attribute::HashOfIssuerPublicKey(v)
        | Attribute::HashOfSubjectPublicKey(v)
        | Attribute::Id(v)
        | Attribute::Issuer(v)
        | Attribute::Label(v)
        | Attribute::Modulus(v)
        | Attribute::ObjectId(v)
        | Attribute::Owner(v)
        | Attribute::Prime(v)
        | Attribute::Prime1(v)
        | Attribute::Prime2(v)
        | Attribute::PrivateExponent(v)
        | Attribute::PublicExponent(v)
        | Attribute::PublicKeyInfo(v)
        | Attribute::Seed(v)
        | Attribute::SerialNumber(v)
        | Attribute::Subject(v)
        | Attribute::UniqueId(v)
        | Attribute::Url(v)
        | Attribute::Value(v)
        | Attribute::ValidationModuleId(v)
        | Attribute::ValidationCountry(v)
        | Attribute::ValidationCertificateIdentifier(v)
        | Attribute::ValidationCertificateUri(v)
        | Attribute::ValidationVendorUri(v)
        | Attribute::ValidationProfile(v)
        | Attribute::VendorDefined((_, v)) => bytes(v),
        Attribute::ModulusBits(u)
        | Attribute::ValueLen(u)
        | Attribute::ObjectValidationFlags(u)
        | Attribute::ValidationLevel(u)
        | Attribute::ValidationFlag(u) => Some(AttrValue::Ulong(**u)),
        Attribute::Class(c) => Some(AttrValue::Ulong(**c)),
        Attribute::KeyType(k) => Some(AttrValue::Ulong(**k)),
        Attribute::CertificateType(c) => Some(AttrValue::Ulong(**c)),
        Attribute::KeyGenMechanism(m) => Some(AttrValue::Ulong(**m)),
        Attribute::AllowedMechanisms(list) => Some(AttrValue::UlongList(list.iter().map(|m| **m).collect())),
        Attribute::StartDate(d) | Attribute::EndDate(d) => {
            let d: &CK_DATE = d;
            let mut raw = Vec::with_capacity(8);
            raw.extend_from_slice(&d.year);
            raw.extend_from_slice(&d.month);
            raw.extend_from_slice(&d.day);
            bytes(&raw)
        }
        _ => None,
    }
}

/// A `cryptoki` mechanism borrowing its parameters from `m`.
pub(super) fn mechanism(m: &mut wire::Mechanism) -> Result<Mechanism<'_>, Ckr> {
    let code = m.mechanism;
    let bad = CKR_MECHANISM_PARAM_INVALID;
    let none = matches!(m.param, MechParam::None);
    let plain = |mech: Mechanism<'static>| if none { Ok(mech) } else { Err(bad) };
    match (code, &mut m.param) {
        (CKM_AES_CBC | CKM_AES_CBC_PAD, MechParam::Bytes(iv)) => {
            let iv: [u8; 16] = iv.as_slice().try_into().map_err(|_| bad)?;
            Ok(if code == CKM_AES_CBC { Mechanism::AesCbc(iv) } else { Mechanism::AesCbcPad(iv) })
        }
        (CKM_AES_GCM, MechParam::Gcm { iv, aad, tag_bits, .. }) => {
            let params = GcmParams::new(iv.as_mut_slice(), aad.as_slice(), (*tag_bits as CK_ULONG).into()).map_err(|_| bad)?;
            Ok(Mechanism::AesGcm(params))
        }
        (CKM_ECDH1_DERIVE, MechParam::Ecdh1 { kdf, shared_data, public_data }) => {
            let shared: &[u8] = shared_data.as_slice();
            let kdf = match *kdf {
                CKD_NULL if shared.is_empty() => EcKdf::null(),
                CKD_SHA1_KDF => EcKdf::sha1(shared),
                CKD_SHA224_KDF => EcKdf::sha224(shared),
                CKD_SHA256_KDF => EcKdf::sha256(shared),
                CKD_SHA384_KDF => EcKdf::sha384(shared),
                CKD_SHA512_KDF => EcKdf::sha512(shared),
                _ => return Err(bad),
            };
            Ok(Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(kdf, public_data.as_slice())))
        }
        (
            CKM_RSA_PKCS_PSS | CKM_SHA1_RSA_PKCS_PSS | CKM_SHA256_RSA_PKCS_PSS | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS,
            MechParam::Pss { hash, mgf, salt_len },
        ) => {
            let p = PkcsPssParams {
                hash_alg: MechanismType::try_from(*hash).map_err(|_| bad)?,
                mgf: mgf_type(*mgf)?,
                s_len: (*salt_len as CK_ULONG).into(),
            };
            Ok(match code {
                CKM_RSA_PKCS_PSS => Mechanism::RsaPkcsPss(p),
                CKM_SHA1_RSA_PKCS_PSS => Mechanism::Sha1RsaPkcsPss(p),
                CKM_SHA256_RSA_PKCS_PSS => Mechanism::Sha256RsaPkcsPss(p),
                CKM_SHA384_RSA_PKCS_PSS => Mechanism::Sha384RsaPkcsPss(p),
                _ => Mechanism::Sha512RsaPkcsPss(p),
            })
        }
        (CKM_RSA_PKCS_OAEP, MechParam::Oaep { hash, mgf, source, source_data }) => {
            let source = match *source {
                CKZ_DATA_SPECIFIED if !source_data.is_empty() => PkcsOaepSource::data_specified(source_data.as_slice()),
                CKZ_DATA_SPECIFIED | 0 => PkcsOaepSource::empty(),
                _ => return Err(bad),
            };
            let hash = MechanismType::try_from(*hash).map_err(|_| bad)?;
            Ok(Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf_type(*mgf)?, source)))
        }
        (CKM_AES_KEY_GEN, _) => plain(Mechanism::AesKeyGen),
        (CKM_AES_ECB, _) => plain(Mechanism::AesEcb),
        (CKM_AES_KEY_WRAP, _) => plain(Mechanism::AesKeyWrap),
        (CKM_AES_KEY_WRAP_PAD, _) => plain(Mechanism::AesKeyWrapPad),
        (CKM_AES_CMAC, _) => plain(Mechanism::AesCMac),
        (CKM_RSA_PKCS_KEY_PAIR_GEN, _) => plain(Mechanism::RsaPkcsKeyPairGen),
        (CKM_RSA_PKCS, _) => plain(Mechanism::RsaPkcs),
        (CKM_RSA_X_509, _) => plain(Mechanism::RsaX509),
        (CKM_SHA1_RSA_PKCS, _) => plain(Mechanism::Sha1RsaPkcs),
        (CKM_SHA224_RSA_PKCS, _) => plain(Mechanism::Sha224RsaPkcs),
        (CKM_SHA256_RSA_PKCS, _) => plain(Mechanism::Sha256RsaPkcs),
        (CKM_SHA384_RSA_PKCS, _) => plain(Mechanism::Sha384RsaPkcs),
        (CKM_SHA512_RSA_PKCS, _) => plain(Mechanism::Sha512RsaPkcs),
        (CKM_EC_KEY_PAIR_GEN, _) => plain(Mechanism::EccKeyPairGen),
        (CKM_EC_EDWARDS_KEY_PAIR_GEN, _) => plain(Mechanism::EccEdwardsKeyPairGen),
        (CKM_ECDSA, _) => plain(Mechanism::Ecdsa),
        (CKM_ECDSA_SHA1, _) => plain(Mechanism::EcdsaSha1),
        (CKM_ECDSA_SHA224, _) => plain(Mechanism::EcdsaSha224),
        (CKM_ECDSA_SHA256, _) => plain(Mechanism::EcdsaSha256),
        (CKM_ECDSA_SHA384, _) => plain(Mechanism::EcdsaSha384),
        (CKM_ECDSA_SHA512, _) => plain(Mechanism::EcdsaSha512),
        (CKM_SHA_1, _) => plain(Mechanism::Sha1),
        (CKM_SHA224, _) => plain(Mechanism::Sha224),
        (CKM_SHA256, _) => plain(Mechanism::Sha256),
        (CKM_SHA384, _) => plain(Mechanism::Sha384),
        (CKM_SHA512, _) => plain(Mechanism::Sha512),
        (CKM_SHA_1_HMAC, _) => plain(Mechanism::Sha1Hmac),
        (CKM_SHA224_HMAC, _) => plain(Mechanism::Sha224Hmac),
        (CKM_SHA256_HMAC, _) => plain(Mechanism::Sha256Hmac),
        (CKM_SHA384_HMAC, _) => plain(Mechanism::Sha384Hmac),
        (CKM_SHA512_HMAC, _) => plain(Mechanism::Sha512Hmac),
        (CKM_GENERIC_SECRET_KEY_GEN, _) => plain(Mechanism::GenericSecretKeyGen),
        (
            CKM_AES_CBC | CKM_AES_CBC_PAD | CKM_AES_GCM | CKM_ECDH1_DERIVE | CKM_RSA_PKCS_PSS | CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS | CKM_SHA384_RSA_PKCS_PSS | CKM_SHA512_RSA_PKCS_PSS | CKM_RSA_PKCS_OAEP,
            _,
        ) => Err(bad),
        _ => Err(CKR_MECHANISM_INVALID),
    }
}

/// Whether requests can use `mechanism` at all (`C_GetMechanismList` lists only those).
pub(super) fn forwarded(mechanism_type: u64) -> bool {
    let mut m = wire::Mechanism::plain(mechanism_type);
    !matches!(mechanism(&mut m), Err(CKR_MECHANISM_INVALID))
}

fn mgf_type(mgf: u64) -> Result<PkcsMgfType, Ckr> {
    Ok(match mgf {
        CKG_MGF1_SHA1 => PkcsMgfType::MGF1_SHA1,
        CKG_MGF1_SHA224 => PkcsMgfType::MGF1_SHA224,
        CKG_MGF1_SHA256 => PkcsMgfType::MGF1_SHA256,
        CKG_MGF1_SHA384 => PkcsMgfType::MGF1_SHA384,
        CKG_MGF1_SHA512 => PkcsMgfType::MGF1_SHA512,
        _ => return Err(CKR_MECHANISM_PARAM_INVALID),
    })
}

pub(super) fn user_type(t: u64) -> Result<UserType, Ckr> {
    match t {
        CKU_SO => Ok(UserType::So),
        CKU_USER => Ok(UserType::User),
        CKU_CONTEXT_SPECIFIC => Ok(UserType::ContextSpecific),
        other => u32::try_from(other).map(UserType::VendorExtension).map_err(|_| CKR_USER_TYPE_INVALID),
    }
}

/// Blank-padded fixed-width text.
fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(text.bytes()) {
        *o = b;
    }
    out
}

fn version(v: cryptoki::types::Version) -> [u8; 2] {
    [v.major(), v.minor()]
}

pub(super) fn slot_info(i: &SlotInfo) -> wire::SlotInfo {
    let mut flags = 0;
    for (on, f) in [(i.token_present(), CKF_TOKEN_PRESENT), (i.removable_device(), CKF_REMOVABLE_DEVICE), (i.hardware_slot(), CKF_HW_SLOT)] {
        if on {
            flags |= f;
        }
    }
    wire::SlotInfo {
        description: padded(i.slot_description()),
        manufacturer: padded(i.manufacturer_id()),
        flags,
        hardware_version: version(i.hardware_version()),
        firmware_version: version(i.firmware_version()),
    }
}

pub(super) fn token_info(i: &TokenInfo) -> wire::TokenInfo {
    let mut flags = 0;
    for (on, f) in [
        (i.rng(), CKF_RNG),
        (i.write_protected(), CKF_WRITE_PROTECTED),
        (i.login_required(), CKF_LOGIN_REQUIRED),
        (i.user_pin_initialized(), CKF_USER_PIN_INITIALIZED),
        (i.restore_key_not_needed(), CKF_RESTORE_KEY_NOT_NEEDED),
        (i.clock_on_token(), CKF_CLOCK_ON_TOKEN),
        (i.protected_authentication_path(), CKF_PROTECTED_AUTHENTICATION_PATH),
        (i.dual_crypto_operations(), CKF_DUAL_CRYPTO_OPERATIONS),
        (i.token_initialized(), CKF_TOKEN_INITIALIZED),
        (i.secondary_authentication(), CKF_SECONDARY_AUTHENTICATION),
        (i.user_pin_count_low(), CKF_USER_PIN_COUNT_LOW),
        (i.user_pin_final_try(), CKF_USER_PIN_FINAL_TRY),
        (i.user_pin_locked(), CKF_USER_PIN_LOCKED),
        (i.user_pin_to_be_changed(), CKF_USER_PIN_TO_BE_CHANGED),
        (i.so_pin_count_low(), CKF_SO_PIN_COUNT_LOW),
        (i.so_pin_final_try(), CKF_SO_PIN_FINAL_TRY),
        (i.so_pin_locked(), CKF_SO_PIN_LOCKED),
        (i.so_pin_to_be_changed(), CKF_SO_PIN_TO_BE_CHANGED),
        (i.error_state(), CKF_ERROR_STATE),
    ] {
        if on {
            flags |= f;
        }
    }
    let limit = |l: Limit| match l {
        Limit::Max(n) => n,
        Limit::Unavailable => CK_UNAVAILABLE_INFORMATION,
        Limit::Infinite => CK_EFFECTIVELY_INFINITE,
    };
    let count = |c: Option<u64>| c.unwrap_or(CK_UNAVAILABLE_INFORMATION);
    let memory = |m: Option<usize>| m.map_or(CK_UNAVAILABLE_INFORMATION, |m| m as u64);
    let mut utc_time = [b' '; 16];
    if let Some(t) = i.utc_time() {
        let s = format!("{:04}{:02}{:02}{:02}{:02}{:02}00", t.year, t.month, t.day, t.hour, t.minute, t.second);
        utc_time = padded(&s);
    }
    wire::TokenInfo {
        label: padded(i.label()),
        manufacturer: padded(i.manufacturer_id()),
        model: padded(i.model()),
        serial: padded(i.serial_number()),
        flags,
        counts: [
            limit(i.max_session_count()),
            count(i.session_count()),
            limit(i.max_rw_session_count()),
            count(i.rw_session_count()),
            i.max_pin_length() as u64,
            i.min_pin_length() as u64,
            memory(i.total_public_memory()),
            memory(i.free_public_memory()),
            memory(i.total_private_memory()),
            memory(i.free_private_memory()),
        ],
        hardware_version: version(i.hardware_version()),
        firmware_version: version(i.firmware_version()),
        utc_time,
    }
}

pub(super) fn mechanism_info(i: &MechanismInfo) -> wire::MechanismInfo {
    let mut flags = 0;
    for (on, f) in [
        (i.hardware(), CKF_HW),
        (i.encrypt(), CKF_ENCRYPT),
        (i.decrypt(), CKF_DECRYPT),
        (i.digest(), CKF_DIGEST),
        (i.sign(), CKF_SIGN),
        (i.sign_recover(), CKF_SIGN_RECOVER),
        (i.verify(), CKF_VERIFY),
        (i.verify_recover(), CKF_VERIFY_RECOVER),
        (i.generate(), CKF_GENERATE),
        (i.generate_key_pair(), CKF_GENERATE_KEY_PAIR),
        (i.wrap(), CKF_WRAP),
        (i.unwrap(), CKF_UNWRAP),
        (i.derive(), CKF_DERIVE),
        (i.extension(), CKF_EXTENSION),
        (i.ec_f_p(), CKF_EC_F_P),
        (i.ec_f_2m(), CKF_EC_F_2M),
        (i.ec_from_parameters(), CKF_EC_ECPARAMETERS),
        (i.ec_from_oid(), CKF_EC_OID),
        (i.ec_uncompressed(), CKF_EC_UNCOMPRESS),
        (i.ec_compressed(), CKF_EC_COMPRESS),
        (i.message_encrypt(), CKF_MESSAGE_ENCRYPT),
        (i.message_decrypt(), CKF_MESSAGE_DECRYPT),
        (i.multi_message(), CKF_MULTI_MESSAGE),
    ] {
        if on {
            flags |= f;
        }
    }
    wire::MechanismInfo { min_key_size: i.min_key_size() as u64, max_key_size: i.max_key_size() as u64, flags }
}

pub(super) fn session_info(i: &SessionInfo) -> wire::SessionInfo {
    let state = match i.session_state() {
        SessionState::RoPublic => CKS_RO_PUBLIC_SESSION,
        SessionState::RoUser => CKS_RO_USER_FUNCTIONS,
        SessionState::RwPublic => CKS_RW_PUBLIC_SESSION,
        SessionState::RwUser => CKS_RW_USER_FUNCTIONS,
        SessionState::RwSecurityOfficer => CKS_RW_SO_FUNCTIONS,
    };
    let flags = CKF_SERIAL_SESSION | if i.read_write() { CKF_RW_SESSION } else { 0 };
    wire::SessionInfo { slot: i.slot_id().id(), state, flags, device_error: i.device_error() }
}
