//! `KmsClient`: one mutual-TLS channel to the service and a plain-Rust method per RPC.
//!
//! Methods take borrowed Rust values (names, byte slices, a `BTreeMap` context) and return either
//! the proto message (for key metadata) or a small typed struct whose data keys are `Zeroizing`.
//! Each call is bounded by the configured timeout, which is also sent to the server
//! (`grpc-timeout`). Answers that break the contract (a 31-byte data key, a plaintext key when a
//! sealed one was asked) are refused rather than passed on.
//!
//! The lifecycle, approval and re-wrap calls live in submodules of their own
//! ([`key_lifecycle`], [`approvals`], [`rewrap`]); they share this module's channel, deadline and
//! error mapping.
//!
//! Limits that a careful reader should know: the TLS private key is copied into tonic's
//! `Identity` (not zeroized), and a plaintext data key passes through prost's decode buffers
//! before it reaches a `Zeroizing`. Use `Delivery::ToRecipient` when the key must not exist in
//! plain on the wire or in those buffers.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod audit;
pub mod callers;
pub mod key_lifecycle;
pub mod rewrap;
pub mod token_objects;

pub use approvals::ApprovedChange;
pub use callers::CallerChange;
pub use key_lifecycle::KeyChangeOutcome;
pub use rewrap::{ReWrapItem, MAX_REWRAP_BATCH};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use kms_proto::v1::data_keys_client::DataKeysClient;
use kms_proto::v1::hsm_crypto_client::HsmCryptoClient;
use kms_proto::v1::key_admin_client::KeyAdminClient;
use kms_proto::v1::{
    Classification, CreateKeyRequest, DataKeyDelivery, DecryptDataKeyRequest, DecryptRequest,
    EncryptRequest, EncryptResponse, GenerateDataKeyRequest, GetKeyRequest, Key, KeyPurpose,
    ListKeysRequest,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, DEFAULT_TIMEOUT};
use crate::error::{ClientError, EndpointProblem, ResponseProblem};
use crate::recipient::{RecipientKey, SealBinding, DATA_KEY_LEN};

/// A connected client. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct KmsClient {
    channel: Channel,
    endpoint: String,
    timeout: Duration,
}

/// Which keys `list_keys` returns. The default lists every key the caller may see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only keys of this level.
    pub classification: Option<Classification>,
    /// Only keys whose name starts with this prefix.
    pub name_prefix: Option<String>,
}

/// How `generate_data_key` should deliver the data key.
#[derive(Debug, Clone, Copy)]
pub enum Delivery<'a> {
    /// The plaintext data key and the wrapped blob (UNCLASSIFIED and PERSONAL only).
    PlaintextAndWrapped,
    /// The wrapped blob only.
    WrappedOnly,
    /// The wrapped blob, and the data key sealed to this recipient key (whose public half an
    /// officer registered for the caller), which the client opens locally: the plaintext never
    /// crosses the network. Required for SENSITIVE_PERSONAL.
    ToRecipient(&'a RecipientKey),
    /// The wrapped blob, and the data key sealed to the caller's registered recipient key with this
    /// fingerprint (SHA-256 of its SEC1 point), returned sealed in
    /// [`GeneratedDataKey::recipient_sealed`] and not opened: for a caller that hands it on to
    /// the holder of the private key.
    SealedFor([u8; 32]),
}

impl Delivery<'_> {
    /// The wire delivery and the fingerprint of the recipient key to seal to.
    fn wire(&self) -> (DataKeyDelivery, String) {
        match self {
            Delivery::PlaintextAndWrapped => (DataKeyDelivery::PlaintextAndWrapped, String::new()),
            Delivery::WrappedOnly => (DataKeyDelivery::WrappedOnly, String::new()),
            Delivery::ToRecipient(recipient) => (DataKeyDelivery::WrappedToRecipient, recipient.fingerprint_hex()),
            Delivery::SealedFor(fingerprint) => (DataKeyDelivery::WrappedToRecipient, crate::recipient::hex(fingerprint)),
        }
    }
}

/// A generated data key.
pub struct GeneratedDataKey {
    /// The self-describing wrapped blob to store next to the data; `decrypt_data_key` turns it
    /// back into the key.
    pub wrapped: Vec<u8>,
    /// The data key: sent by the server (`PlaintextAndWrapped`) or opened locally
    /// (`ToRecipient`); `None` for `WrappedOnly`.
    pub plaintext: Option<Zeroizing<[u8; DATA_KEY_LEN]>>,
    /// The sealed bytes as received, for `ToRecipient` (already opened into `plaintext`).
    pub recipient_sealed: Option<Vec<u8>>,
    /// Hex id of the key that wrapped it.
    pub key_id: String,
    pub key_version: u32,
}

/// A data key recovered from its wrapped blob.
pub struct DecryptedDataKey {
    pub plaintext: Zeroizing<[u8; DATA_KEY_LEN]>,
    pub key_id: String,
    pub key_version: u32,
    pub classification: Classification,
}

/// A payload decrypted inside the HSM.
pub struct Decrypted {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub key_id: String,
    pub key_version: u32,
}

impl KmsClient {
    /// Connects over mutual TLS: the server must present a certificate for the endpoint's host
    /// issued by `cfg.ca_pem`, and the client presents `cfg.cert_pem`/`cfg.key_pem`.
    pub async fn connect(cfg: ClientConfig) -> Result<KmsClient, ClientError> {
        let invalid = |problem| ClientError::InvalidEndpoint {
            endpoint: cfg.endpoint.clone(),
            problem,
        };
        let uri: Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| invalid(EndpointProblem::Unparsable))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid(EndpointProblem::NotHttps));
        }
        let host = match uri.host() {
            Some(host) if !host.is_empty() => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            _ => return Err(invalid(EndpointProblem::NoHost)),
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cfg.ca_pem))
            .identity(Identity::from_pem(&cfg.cert_pem, &*cfg.key_pem))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|_| invalid(EndpointProblem::Unparsable))?
            .tls_config(tls)
            .map_err(|source| ClientError::Tls {
                endpoint: cfg.endpoint.clone(),
                source,
            })?
            .connect_timeout(cfg.timeout)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: cfg.endpoint.clone(),
                source,
            })?;
        Ok(KmsClient {
            channel,
            endpoint: cfg.endpoint,
            timeout: cfg.timeout,
        })
    }

    /// Reads the PEM files and connects; the usual entry point for tools and tests.
    pub async fn connect_with_files(
        endpoint: impl Into<String>,
        ca_path: impl AsRef<std::path::Path>,
        cert_path: impl AsRef<std::path::Path>,
        key_path: impl AsRef<std::path::Path>,
    ) -> Result<KmsClient, ClientError> {
        KmsClient::connect(ClientConfig::from_files(
            endpoint, ca_path, cert_path, key_path,
        )?)
        .await
    }

    /// Wraps an existing channel (for instance one built with custom settings).
    pub fn from_channel(channel: Channel, endpoint: impl Into<String>) -> KmsClient {
        KmsClient {
            channel,
            endpoint: endpoint.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The raw generated clients, for requests the typed methods do not express (tests sending
    /// malformed requests, for instance). They share this client's connection but not its timeout.
    pub fn key_admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel.clone())
    }

    /// See [`KmsClient::key_admin`].
    pub fn data_keys(&self) -> DataKeysClient<Channel> {
        DataKeysClient::new(self.channel.clone())
    }

    /// See [`KmsClient::key_admin`].
    pub fn hsm_crypto(&self) -> HsmCryptoClient<Channel> {
        HsmCryptoClient::new(self.channel.clone())
    }

    /// The mutual-TLS channel itself, for generic gRPC calls (reflection, health, or tests that
    /// call a method the contract does not have).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    // ---- KeyAdmin ----

    /// Creates a key. `purpose: None` lets the server choose (ENVELOPE below CONFIDENTIAL,
    /// HSM_ENCRYPT from CONFIDENTIAL up); `rotation_days: None` (or `Some(0)`) means the level's
    /// default rotation period.
    pub async fn create_key(
        &self,
        name: &str,
        classification: Classification,
        purpose: Option<KeyPurpose>,
        rotation_days: Option<u32>,
    ) -> Result<Key, ClientError> {
        let request = CreateKeyRequest {
            name: name.to_owned(),
            classification: classification.into(),
            purpose: purpose.unwrap_or(KeyPurpose::Unspecified).into(),
            rotation_period_days: rotation_days.unwrap_or(0),
        };
        self.call(self.key_admin().create_key(self.request(request)))
            .await
    }

    /// The key named `name`.
    pub async fn get_key(&self, name: &str) -> Result<Key, ClientError> {
        let request = GetKeyRequest {
            name: name.to_owned(),
        };
        self.call(self.key_admin().get_key(self.request(request)))
            .await
    }

    /// The keys that match `filter`.
    pub async fn list_keys(&self, filter: &KeyFilter) -> Result<Vec<Key>, ClientError> {
        let request = ListKeysRequest {
            classification: filter
                .classification
                .unwrap_or(Classification::Unspecified)
                .into(),
            name_prefix: filter.name_prefix.clone().unwrap_or_default(),
        };
        Ok(self
            .call(self.key_admin().list_keys(self.request(request)))
            .await?
            .keys)
    }

    // ---- DataKeys ----

    /// Generates a data key under the envelope key `key`, bound to `context`.
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
        delivery: Delivery<'_>,
    ) -> Result<GeneratedDataKey, ClientError> {
        let (wire_delivery, recipient_key_fingerprint) = delivery.wire();
        let request = GenerateDataKeyRequest {
            key: key.to_owned(),
            delivery: wire_delivery.into(),
            encryption_context: to_wire_context(context),
            recipient_key_fingerprint,
        };
        let mut response = self
            .call(self.data_keys().generate_data_key(self.request(request)))
            .await?;
        let sent_plaintext = take_secret(&mut response.plaintext_data_key);
        let (plaintext, recipient_sealed) = match delivery {
            Delivery::PlaintextAndWrapped => (Some(data_key_from(&sent_plaintext)?), None),
            Delivery::WrappedOnly => {
                if !sent_plaintext.is_empty() {
                    return Err(ClientError::BadResponse(ResponseProblem::UnwantedPlaintext));
                }
                (None, None)
            }
            Delivery::ToRecipient(recipient) => {
                let binding = SealBinding::new(&response.key_id, response.key_version, context)?;
                let sealed = open_sealed(
                    recipient,
                    &sent_plaintext,
                    &response.recipient_sealed_data_key,
                    &binding,
                )?;
                (Some(sealed), Some(response.recipient_sealed_data_key))
            }
            Delivery::SealedFor(fingerprint) => {
                if !sent_plaintext.is_empty() {
                    return Err(ClientError::BadResponse(ResponseProblem::UnwantedPlaintext));
                }
                let sealed = response.recipient_sealed_data_key;
                if sealed.len() != crate::recipient::SEALED_LEN || sealed[0] != crate::recipient::FORMAT_VERSION {
                    return Err(ClientError::BadResponse(ResponseProblem::MissingSealedKey));
                }
                if response.recipient_key_fingerprint != crate::recipient::hex(&fingerprint) {
                    return Err(ClientError::BadResponse(ResponseProblem::SealedToAnotherKey));
                }
                (None, Some(sealed))
            }
        };
        Ok(GeneratedDataKey {
            wrapped: response.wrapped_data_key,
            plaintext,
            recipient_sealed,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Turns a wrapped blob back into its data key. `key`, when set, must be the blob's key.
    /// With a `recipient`, the server seals the key to it and the client opens it locally.
    pub async fn decrypt_data_key(
        &self,
        wrapped: &[u8],
        context: &BTreeMap<String, String>,
        key: Option<&str>,
        recipient: Option<&RecipientKey>,
    ) -> Result<DecryptedDataKey, ClientError> {
        let request = DecryptDataKeyRequest {
            wrapped_data_key: wrapped.to_vec(),
            encryption_context: to_wire_context(context),
            key: key.unwrap_or_default().to_owned(),
            sealed: recipient.is_some(),
            recipient_key_fingerprint: recipient.map(RecipientKey::fingerprint_hex).unwrap_or_default(),
        };
        let mut response = self
            .call(self.data_keys().decrypt_data_key(self.request(request)))
            .await?;
        let sent_plaintext = take_secret(&mut response.plaintext_data_key);
        let plaintext = match recipient {
            None => data_key_from(&sent_plaintext)?,
            Some(recipient) => open_sealed(
                recipient,
                &sent_plaintext,
                &response.recipient_sealed_data_key,
                &SealBinding::new(&response.key_id, response.key_version, context)?,
            )?,
        };
        let classification = Classification::try_from(response.classification).map_err(|_| {
            ClientError::BadResponse(ResponseProblem::UnknownClassification {
                value: response.classification,
            })
        })?;
        Ok(DecryptedDataKey {
            plaintext,
            key_id: response.key_id,
            key_version: response.key_version,
            classification,
        })
    }

    // ---- HsmCrypto ----

    /// Encrypts `plaintext` inside the HSM under `key`, bound to `context`. The answer's
    /// `ciphertext` is the self-describing blob to store.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<EncryptResponse, ClientError> {
        let request = EncryptRequest {
            key: key.to_owned(),
            plaintext: plaintext.to_vec(),
            encryption_context: to_wire_context(context),
        };
        self.call(self.hsm_crypto().encrypt(self.request(request)))
            .await
    }

    /// Decrypts a ciphertext blob inside the HSM. `key`, when set, must be the blob's key.
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        key: Option<&str>,
    ) -> Result<Decrypted, ClientError> {
        let request = DecryptRequest {
            ciphertext: ciphertext.to_vec(),
            encryption_context: to_wire_context(context),
            key: key.unwrap_or_default().to_owned(),
        };
        let mut response = self
            .call(self.hsm_crypto().decrypt(self.request(request)))
            .await?;
        Ok(Decrypted {
            plaintext: take_secret(&mut response.plaintext),
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    // ---- plumbing ----

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Runs one call under the client's deadline. tonic's own endpoint timeout would report
    /// `CANCELLED`; a missed deadline is `DEADLINE_EXCEEDED`.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(transport_status(&self.endpoint, status).into()),
            Err(_elapsed) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from {} within {} s",
                self.endpoint,
                self.timeout.as_secs_f64()
            ))
            .into()),
        }
    }
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Debug for GeneratedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedDataKey")
            .field("wrapped", &format_args!("{} bytes", self.wrapped.len()))
            .field("plaintext", &self.plaintext.as_ref().map(|_| "<redacted>"))
            .field(
                "recipient_sealed",
                &self.recipient_sealed.as_ref().map(Vec::len),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for DecryptedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptedDataKey")
            .field("plaintext", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("classification", &self.classification)
            .finish()
    }
}

impl fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypted")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A status that tonic made locally from a transport failure (it has a `source`; statuses sent
/// by the server never do) says only "transport error" with code `UNKNOWN`. The useful part is
/// in the source chain: "received fatal alert: UnknownCA" when the server refuses our client
/// certificate during the handshake, for instance. When the server closes the connection during
/// the handshake (an expired or foreign certificate with TLS 1.3), tonic reports `CANCELLED`
/// ("connection closed") instead. Either becomes `UNAVAILABLE` (the server did not answer the
/// call) with the whole chain as its message. Server statuses pass through untouched.
fn transport_status(endpoint: &str, status: tonic::Status) -> tonic::Status {
    use std::error::Error as _;
    if status.source().is_none() {
        return status;
    }
    let code = match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled => tonic::Code::Unavailable,
        other => other,
    };
    tonic::Status::new(
        code,
        format!(
            "connection to {endpoint} failed: {}",
            crate::error::error_chain(&status)
        ),
    )
}

fn to_wire_context(context: &BTreeMap<String, String>) -> HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Moves a secret out of a decoded message into a zeroizing buffer, leaving an empty `Vec`.
fn take_secret(field: &mut Vec<u8>) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(std::mem::take(field))
}

fn data_key_from(bytes: &[u8]) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>, ClientError> {
    if bytes.is_empty() {
        return Err(ClientError::BadResponse(ResponseProblem::MissingPlaintext));
    }
    let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
    if bytes.len() != DATA_KEY_LEN {
        return Err(ClientError::BadResponse(ResponseProblem::DataKeyLength {
            actual: bytes.len(),
        }));
    }
    key.copy_from_slice(bytes);
    Ok(key)
}

/// Opens a sealed key, refusing an answer that also carries the plaintext: the whole point of
/// a recipient is that the plaintext does not travel.
fn open_sealed(
    recipient: &RecipientKey,
    sent_plaintext: &[u8],
    sealed: &[u8],
    binding: &SealBinding,
) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>, ClientError> {
    if !sent_plaintext.is_empty() {
        return Err(ClientError::BadResponse(ResponseProblem::UnwantedPlaintext));
    }
    if sealed.is_empty() {
        return Err(ClientError::BadResponse(ResponseProblem::MissingSealedKey));
    }
    recipient.open(sealed, binding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> ClientConfig {
        ClientConfig {
            endpoint: endpoint.to_owned(),
            ca_pem: Vec::new(),
            cert_pem: Vec::new(),
            key_pem: Zeroizing::new(Vec::new()),
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn plain_http_and_hostless_endpoints_are_refused() {
        for (endpoint, expected) in [
            ("http://localhost:7443", EndpointProblem::NotHttps),
            ("localhost:7443", EndpointProblem::NotHttps),
            ("not a url", EndpointProblem::Unparsable),
        ] {
            match KmsClient::connect(config(endpoint)).await {
                Err(ClientError::InvalidEndpoint { problem, .. }) => {
                    assert_eq!(problem, expected, "{endpoint}")
                }
                other => panic!("{endpoint}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn transport_failures_become_unavailable_with_their_cause_and_server_statuses_pass() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: UnknownCA",
        );
        let local = tonic::Status::from_error(Box::new(io));
        let mapped = transport_status("https://kms:7443", local);
        assert_eq!(mapped.code(), tonic::Code::Unavailable);
        assert!(
            mapped.message().contains("https://kms:7443") && mapped.message().contains("UnknownCA"),
            "{mapped:?}"
        );
        let server = tonic::Status::permission_denied("caller level 2 below key level 3");
        let passed = transport_status("https://kms:7443", server);
        assert_eq!(
            (passed.code(), passed.message()),
            (
                tonic::Code::PermissionDenied,
                "caller level 2 below key level 3"
            )
        );
    }

    #[test]
    fn data_key_must_be_32_bytes() {
        assert!(matches!(
            data_key_from(&[1u8; 31]),
            Err(ClientError::BadResponse(ResponseProblem::DataKeyLength {
                actual: 31
            }))
        ));
        assert!(matches!(
            data_key_from(&[]),
            Err(ClientError::BadResponse(ResponseProblem::MissingPlaintext))
        ));
        assert_eq!(*data_key_from(&[9u8; 32]).unwrap(), [9u8; 32]);
    }

    #[test]
    fn sealed_answer_carrying_a_plaintext_key_is_refused() {
        let recipient = RecipientKey::generate().unwrap();
        let binding = SealBinding { key_id: [1; 16], key_version: 1, context_digest: [2; 32] };
        let sealed =
            crate::recipient::seal_to_recipient(&recipient.public_key_sec1(), &[3u8; 32], &binding).unwrap();
        assert!(matches!(
            open_sealed(&recipient, &[3u8; 32], &sealed, &binding),
            Err(ClientError::BadResponse(ResponseProblem::UnwantedPlaintext))
        ));
        assert!(matches!(
            open_sealed(&recipient, &[], &[], &binding),
            Err(ClientError::BadResponse(ResponseProblem::MissingSealedKey))
        ));
        assert_eq!(*open_sealed(&recipient, &[], &sealed, &binding).unwrap(), [3u8; 32]);
    }

    #[test]
    fn debug_output_redacts_data_keys() {
        let generated = GeneratedDataKey {
            wrapped: vec![1, 2, 3],
            plaintext: Some(Zeroizing::new([0xabu8; 32])),
            recipient_sealed: None,
            key_id: "00ff".into(),
            key_version: 1,
        };
        let debug = format!("{generated:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("171"),
            "{debug}"
        );
    }
}
