//! Who is on the other end of a TLS connection: the caller identity taken from the client
//! certificate that rustls has already verified against the configured CAs.
//!
//! The identity is the certificate's first URI subject alternative name (for example
//! `urn:kms:caller:tax-gateway`). A URI SAN is chosen over the subject CN because it is a single,
//! typed, unambiguous field that CAs issue for exactly this purpose (as SPIFFE does), whereas CNs are
//! free text that differ in spacing, case and encoding between CAs. A certificate without a URI SAN is
//! refused. This module never decides what a caller may do; that is `authz`.
#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

/// The verified peer of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's first URI SAN.
    pub uri: String,
    /// SHA-256 of the DER leaf certificate.
    pub fingerprint: [u8; 32],
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate could not be parsed")]
    Unparsable,
    #[error("the client certificate has no URI subject alternative name to identify the caller")]
    NoUriSan,
    /// The certificate does not chain to a configured CA or is not valid now.
    #[error("the client certificate of {identity} is not accepted: {reason}")]
    Untrusted { identity: String, reason: String },
}

/// Extracts the identity from the leaf of a verified client chain.
pub fn from_leaf_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let cert = Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let exts = cert.tbs_certificate.extensions.as_deref().unwrap_or(&[]);
    let mut uri = None;
    for ext in exts.iter().filter(|e| e.extn_id == SubjectAltName::OID) {
        let san = SubjectAltName::from_der(ext.extn_value.as_bytes())
            .map_err(|_| IdentityError::Unparsable)?;
        uri = san.0.iter().find_map(|name| match name {
            GeneralName::UniformResourceIdentifier(u) => Some(u.as_str().to_owned()),
            _ => None,
        });
        if uri.is_some() {
            break;
        }
    }
    let uri = uri.ok_or(IdentityError::NoUriSan)?;
    Ok(PeerIdentity { uri, fingerprint: Sha256::digest(der).into() })
}

/// The identity of the peer of a tonic request, if its certificate is trusted (it chains to a
/// configured CA and is valid now; see `crate::tls`). [`IdentityError::Untrusted`] names the rule
/// a presented certificate broke.
pub fn from_request<T>(request: &tonic::Request<T>) -> Result<PeerIdentity, IdentityError> {
    let info = request.extensions().get::<crate::tls::PeerInfo>().ok_or(IdentityError::NoCertificate)?;
    match &info.verdict {
        crate::tls::Verdict::Trusted => info.identity.clone(),
        crate::tls::Verdict::Refused(reason) => Err(IdentityError::Untrusted {
            identity: info.identity.as_ref().map(|i| i.uri.clone()).unwrap_or_else(|_| "(no URI SAN)".to_owned()),
            reason: reason.clone(),
        }),
    }
}

/// The identity a request's certificate claims, trusted or not: for the audit record only.
pub fn presented<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request.extensions().get::<crate::tls::PeerInfo>()?.identity.clone().ok()
}
