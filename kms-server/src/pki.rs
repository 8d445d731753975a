//! Certificates for the development server and the tests: a CA, server certificates, and client
//! certificates that carry the caller identity as a URI SAN (see [`crate::identity`]).
//!
//! Everything is ECDSA P-256 made with `rcgen`, and standard enough for rustls/webpki: leaves have
//! a random serial, subject and authority key identifiers, `basicConstraints CA:FALSE`, a key usage
//! and exactly one extended key usage; the CA has `CA:TRUE, pathlen:0` and `keyCertSign`.
//!
//! **Never** used for production PKI: agencies bring their own CAs. Private keys leave this module
//! only as `Zeroizing<String>` PEM, and key files are written with mode 0600.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_cert::der::{Decode, Tag, Tagged};
use zeroize::Zeroizing;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Certificates start an hour in the past so that small clock differences do not reject them.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("certificate generation failed while {op}: {source}")]
    Rcgen { op: &'static str, source: rcgen::Error },
    #[error("the CA certificate cannot be used: {reason}")]
    BadCaCertificate { reason: &'static str },
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("the system clock is before 1970")]
    Clock,
    #[error("the system random generator failed")]
    Random,
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

fn rcgen_err(op: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { op, source }
}

/// How long a leaf certificate is valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Validity {
    /// From an hour ago for one year.
    #[default]
    OneYear,
    /// From an hour ago for this many days.
    Days(u32),
    /// Expired yesterday (valid for the day before): for tests of expired-certificate refusal.
    Expired,
    /// Valid from tomorrow for a year: for tests of not-yet-valid refusal.
    NotYetValid,
    /// From an hour ago for ten years (the CA's own validity).
    Ca,
}

/// A certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

impl IssuedCert {
    /// Writes the certificate and the key (mode 0600) to two files, replacing existing ones.
    pub fn write_files(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        std::fs::write(cert_path, &self.cert_pem)
            .map_err(|source| PkiError::Write { path: cert_path.to_owned(), source })?;
        write_private(key_path, self.key_pem.as_bytes())
    }
}

/// Writes a secret file with mode 0600 (also tightening an existing file before overwriting it).
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_owned(), source };
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)
}

/// A certificate authority that issues server and client certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
    /// The CA's subject and key identifier, as rcgen needs them to issue.
    issuer_params: CertificateParams,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA (ECDSA P-256, ten years) with subject `CN=common_name`.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = cn(common_name);
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Validity::Ca)?;
        let cert = params.self_signed(&key).map_err(rcgen_err("self-signing the CA"))?;
        Ok(CertificateAuthority { cert_pem: cert.pem(), key, issuer_params: params })
    }

    /// Loads a CA saved with [`cert_pem`](Self::cert_pem) and [`key_pem`](Self::key_pem).
    ///
    /// The subject is rebuilt attribute by attribute (UTF8String, PrintableString or IA5String
    /// values, one attribute per RDN, as `generate` makes them) so that issued certificates name
    /// their issuer with the same bytes; the key identifier is taken from the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let bad = |reason| PkiError::BadCaCertificate { reason };
        let (label, der) =
            x509_cert::der::pem::decode_vec(cert_pem.as_bytes()).map_err(|_| bad("not a PEM document"))?;
        if label != "CERTIFICATE" {
            return Err(bad("the PEM label is not CERTIFICATE"));
        }
        let cert = x509_cert::Certificate::from_der(&der).map_err(|_| bad("not an X.509 certificate"))?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("loading the CA key"))?;
        let spki = &cert.tbs_certificate.subject_public_key_info.subject_public_key;
        if spki.raw_bytes() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for rdn in cert.tbs_certificate.subject.0.iter() {
            for atv in rdn.0.iter() {
                let arcs: Vec<u64> = atv.oid.arcs().map(u64::from).collect();
                let text =
                    || std::str::from_utf8(atv.value.value()).map_err(|_| bad("a subject attribute is not text"));
                let value = match atv.value.tag() {
                    Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
                    Tag::PrintableString => DnValue::PrintableString(
                        text()?.try_into().map_err(|_| bad("a PrintableString subject attribute is invalid"))?,
                    ),
                    Tag::Ia5String => DnValue::Ia5String(
                        text()?.try_into().map_err(|_| bad("an IA5String subject attribute is invalid"))?,
                    ),
                    _ => return Err(bad("a subject attribute has an unsupported string type")),
                };
                params.distinguished_name.push(DnType::from_oid(&arcs), value);
            }
        }
        let ski_oid = x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.29.14");
        let ski = cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|e| e.extn_id == ski_oid)
            .map(|e| x509_cert::ext::pkix::SubjectKeyIdentifier::from_der(e.extn_value.as_bytes()))
            .transpose()
            .map_err(|_| bad("the subject key identifier does not parse"))?;
        if let Some(ski) = ski {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski.0.as_bytes().to_vec());
        }
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ok(CertificateAuthority { cert_pem: cert_pem.to_owned(), key, issuer_params: params })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// A TLS server certificate (serverAuth) for these DNS names and IP addresses, valid one year.
    pub fn issue_server(&self, common_name: &str, dns_names: &[&str], ips: &[IpAddr]) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            sans.push(SanType::DnsName((*name).try_into().map_err(rcgen_err("encoding a DNS name"))?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue_leaf(common_name, sans, ExtendedKeyUsagePurpose::ServerAuth, Validity::OneYear)
    }

    /// A TLS client certificate (clientAuth) whose URI SAN is the caller identity.
    pub fn issue_client(
        &self,
        identity_uri: &str,
        common_name: &str,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let uri = SanType::URI(identity_uri.try_into().map_err(rcgen_err("encoding the identity URI"))?);
        self.issue_leaf(common_name, vec![uri], ExtendedKeyUsagePurpose::ClientAuth, validity)
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("generating a key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = cn(common_name);
        params.subject_alt_names = sans;
        params.serial_number = Some(random_serial()?);
        // ExplicitNoCa writes basicConstraints CA:FALSE and the subject key identifier.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity)?;
        let issuer = Issuer::from_params(&self.issuer_params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(rcgen_err("signing a certificate"))?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

fn cn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A positive 16-byte serial from the system generator (RFC 5280 allows up to 20).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|_| PkiError::Random)?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// Sets `not_before`/`not_after` from the system clock. Local inference names rcgen's time type, so
/// this crate does not depend on `time` directly.
fn set_validity(params: &mut CertificateParams, validity: Validity) -> Result<(), PkiError> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| PkiError::Clock)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(since_epoch.as_secs());
    let (not_before, not_after) = match validity {
        Validity::OneYear => (now - BACKDATE, now + 365 * DAY),
        Validity::Days(days) => (now - BACKDATE, now + days * DAY),
        Validity::Expired => (now - 2 * DAY, now - DAY),
        Validity::NotYetValid => (now + DAY, now + 366 * DAY),
        Validity::Ca => (now - BACKDATE, now + CA_VALIDITY),
    };
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::from_leaf_der;
    use x509_cert::ext::pkix::{AuthorityKeyIdentifier, ExtendedKeyUsage, SubjectKeyIdentifier};

    fn der_of(pem: &str) -> Vec<u8> {
        x509_cert::der::pem::decode_vec(pem.as_bytes()).unwrap().1
    }

    fn ext<'a>(cert: &'a x509_cert::Certificate, oid: &str) -> Option<&'a [u8]> {
        let oid = x509_cert::der::oid::ObjectIdentifier::new_unwrap(oid);
        cert.tbs_certificate.extensions.iter().flatten().find(|e| e.extn_id == oid).map(|e| e.extn_value.as_bytes())
    }

    fn ski(cert: &x509_cert::Certificate) -> Vec<u8> {
        SubjectKeyIdentifier::from_der(ext(cert, "2.5.29.14").expect("SKI")).unwrap().0.as_bytes().to_vec()
    }

    fn aki(cert: &x509_cert::Certificate) -> Vec<u8> {
        let aki = AuthorityKeyIdentifier::from_der(ext(cert, "2.5.29.35").expect("AKI")).unwrap();
        aki.key_identifier.expect("AKI key id").as_bytes().to_vec()
    }

    #[test]
    fn client_cert_carries_the_identity_as_uri_san_and_is_standard() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_client("urn:kms:caller:test-officer", "officer", Validity::default()).unwrap();
        let der = der_of(&issued.cert_pem);
        assert_eq!(from_leaf_der(&der).unwrap().uri, "urn:kms:caller:test-officer");

        let leaf = x509_cert::Certificate::from_der(&der).unwrap();
        let ca_cert = x509_cert::Certificate::from_der(&der_of(ca.cert_pem())).unwrap();
        assert_eq!(leaf.tbs_certificate.issuer, ca_cert.tbs_certificate.subject);
        assert_eq!(aki(&leaf), ski(&ca_cert));
        assert!(!ski(&leaf).is_empty());
        let eku = ExtendedKeyUsage::from_der(ext(&leaf, "2.5.29.37").expect("EKU")).unwrap();
        assert_eq!(eku.0, [x509_cert::der::oid::db::rfc5280::ID_KP_CLIENT_AUTH]);
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn server_cert_names_its_hosts() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_server("localhost", &["localhost"], &["127.0.0.1".parse().unwrap()]).unwrap();
        let leaf = x509_cert::Certificate::from_der(&der_of(&issued.cert_pem)).unwrap();
        let eku = ExtendedKeyUsage::from_der(ext(&leaf, "2.5.29.37").expect("EKU")).unwrap();
        assert_eq!(eku.0, [x509_cert::der::oid::db::rfc5280::ID_KP_SERVER_AUTH]);
        let san = ext(&leaf, "2.5.29.17").expect("SAN");
        assert!(san.windows(9).any(|w| w == b"localhost"));
        assert!(san.windows(4).any(|w| w == [127, 0, 0, 1]));
    }

    #[test]
    fn expired_validity_ends_in_the_past() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_client("urn:x", "x", Validity::Expired).unwrap();
        let leaf = x509_cert::Certificate::from_der(&der_of(&issued.cert_pem)).unwrap();
        let not_after = leaf.tbs_certificate.validity.not_after.to_unix_duration();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(not_after < now);
        let normal = ca.issue_client("urn:x", "x", Validity::default()).unwrap();
        let leaf = x509_cert::Certificate::from_der(&der_of(&normal.cert_pem)).unwrap();
        let not_after = leaf.tbs_certificate.validity.not_after.to_unix_duration();
        assert!(not_after > now + 364 * DAY);
    }

    #[test]
    fn a_saved_ca_issues_certificates_that_chain_to_it() {
        let ca = CertificateAuthority::generate("saved CA").unwrap();
        let reloaded = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = reloaded.issue_client("urn:y", "y", Validity::default()).unwrap();
        let leaf = x509_cert::Certificate::from_der(&der_of(&issued.cert_pem)).unwrap();
        let ca_cert = x509_cert::Certificate::from_der(&der_of(ca.cert_pem())).unwrap();
        use x509_cert::der::Encode;
        assert_eq!(leaf.tbs_certificate.issuer.to_der().unwrap(), ca_cert.tbs_certificate.subject.to_der().unwrap());
        assert_eq!(aki(&leaf), ski(&ca_cert));

        let other = CertificateAuthority::generate("other").unwrap();
        assert!(matches!(CertificateAuthority::from_pem(ca.cert_pem(), &other.key_pem()), Err(PkiError::KeyMismatch)));
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_client("urn:z", "z", Validity::default()).unwrap();
        let (c, k) = (dir.path().join("z.crt"), dir.path().join("z.key"));
        std::fs::write(&k, "old").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        issued.write_files(&c, &k).unwrap();
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&c).unwrap(), issued.cert_pem);
        assert_eq!(*std::fs::read_to_string(&k).unwrap(), **issued.key_pem);
    }
}
