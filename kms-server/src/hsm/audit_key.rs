//! The audit checkpoint signing key: an ECDSA P-256 key pair made inside the token at first start,
//! whose private half is sensitive, non-extractable and can only sign. It signs the SHA-256 digest of
//! an audit checkpoint (raw `CKM_ECDSA`, a 64-byte `r || s`); auditors verify with the public half
//! alone, which the service hands out.
//!
//! Must never make the private half extractable, and never sign anything but a digest handed in by
//! the audit log.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::session::Session;

use super::error::HsmError;
use super::handles::{self, HandleCache};
use super::pool::Worker;
use super::templates::{self, AUDIT_PUBLIC_KEY_ID, AUDIT_SIGNING_KEY_ID};

/// Finds the key pair, creating it if the token has none, caches the private handle, and returns the
/// public key as an uncompressed SEC1 point (65 bytes). Run once at open.
pub(crate) fn ensure_key(session: &Session, cache: &HandleCache) -> Result<Vec<u8>, HsmError> {
    let private = handles::find(session, AUDIT_SIGNING_KEY_ID)?;
    let public = handles::find(session, AUDIT_PUBLIC_KEY_ID)?;
    let (private, public) = match (private, public) {
        (Some(private), Some(public)) => (private, public),
        (None, leftover) => {
            // No private half: nothing was ever signed with it. A public half alone is what a
            // generation interrupted half-way leaves; it is replaced.
            if let Some(h) = leftover {
                session.destroy_object(h)?;
            }
            tracing::info!("creating the token's audit checkpoint signing key (ECDSA P-256)");
            session.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &templates::audit_public_key(),
                &templates::audit_private_key(),
            )?
            .swap()
        }
        (Some(_), None) => return Err(HsmError::AuditKeyIncomplete),
    };
    cache.insert(AUDIT_SIGNING_KEY_ID, private);
    public_point(session, public)
}

/// Finds the key pair without ever creating it (a re-opening after the HSM was lost), caches the
/// private handle and returns the public point; `None` if the token has no such pair.
pub(crate) fn find_key(session: &Session, cache: &HandleCache) -> Result<Option<Vec<u8>>, HsmError> {
    match (handles::find(session, AUDIT_SIGNING_KEY_ID)?, handles::find(session, AUDIT_PUBLIC_KEY_ID)?) {
        (Some(private), Some(public)) => {
            cache.insert(AUDIT_SIGNING_KEY_ID, private);
            public_point(session, public).map(Some)
        }
        _ => Ok(None),
    }
}

fn public_point(session: &Session, public: cryptoki::object::ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or(HsmError::AuditKeyIncomplete)?;
    sec1_point(&point).ok_or(HsmError::AuditKeyIncomplete)
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the SEC1 point (some modules give the bare point).
fn sec1_point(attr: &[u8]) -> Option<Vec<u8>> {
    let bare = match attr {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        [0x04, ..] if attr.len() == 65 => attr,
        _ => return None,
    };
    p256::PublicKey::from_sec1_bytes(bare).ok()?;
    Some(bare.to_vec())
}

/// Signs a 32-byte digest with the private half (`CKM_ECDSA`): 64 bytes, `r || s`.
pub(crate) fn sign_digest(w: &Worker, digest: &[u8; 32]) -> Result<Vec<u8>, HsmError> {
    w.with_object(AUDIT_SIGNING_KEY_ID, |h| Ok(w.session.sign(&Mechanism::Ecdsa, h, digest)?))
}

/// `generate_key_pair` answers (public, private); callers here want (private, public).
trait Swap<A, B> {
    fn swap(self) -> (B, A);
}

impl<A, B> Swap<A, B> for (A, B) {
    fn swap(self) -> (B, A) {
        (self.1, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::sec1_point;

    #[test]
    fn ec_point_is_unwrapped_from_its_octet_string_and_checked() {
        let key = p256::SecretKey::from_slice(&[7u8; 32]).expect("scalar");
        let bare = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public_key(), false).as_bytes().to_vec();
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(&bare);
        assert_eq!(sec1_point(&wrapped).as_deref(), Some(bare.as_slice()));
        assert_eq!(sec1_point(&bare).as_deref(), Some(bare.as_slice()));
        let mut off_curve = bare.clone();
        off_curve[64] ^= 1;
        assert_eq!(sec1_point(&off_curve), None);
        assert_eq!(sec1_point(&[0x04, 0x41]), None);
    }
}
