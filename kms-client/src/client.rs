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

/// A connected client. Cheap to clone: clones share the connections.
///
/// Given several endpoints (`https://a:7443,https://b:7443`: servers sharing one store and one
/// HSM), it spreads calls over them in turn, stops using one that fails (a transport error or
/// `UNAVAILABLE`) or that reports NOT_SERVING on `grpc.health.v1`, and tries it again after
/// [`ENDPOINT_RETRY_AFTER`] or as soon as its health check says SERVING. A call is retried on
/// another endpoint only when that is safe ([`Retry::Safe`]: data keys, decrypt, encrypt,
/// re-wrap, reads); a key creation or lifecycle change is never retried by the client.
#[derive(Clone)]
pub struct KmsClient {
    pool: std::sync::Arc<Pool>,
    endpoint: String,
    timeout: Duration,
}

/// How long an endpoint that failed is left alone before it is tried again.
pub const ENDPOINT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// How often, with several endpoints, each one's `grpc.health.v1` state is asked.
pub const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// Whether a call may be sent again to another endpoint after a failure that leaves its fate
/// unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Sending it twice is harmless (it creates nothing the caller relies on being unique).
    Safe,
    /// It changes the service's state; a second attempt could do it twice.
    Never,
}

/// The endpoints of one client and what is known of each.
struct Pool {
    endpoints: Vec<PooledEndpoint>,
    next: std::sync::atomic::AtomicUsize,
}

struct PooledEndpoint {
    url: String,
    channel: Channel,
    /// Not used before this moment (set when it failed or reported NOT_SERVING).
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Pool {
    /// The next endpoint in turn that is not resting; if all are, the one whose rest ends first.
    fn pick(&self, avoid: &[usize]) -> usize {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::Instant::now();
        let mut fallback: Option<(usize, std::time::Instant)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if avoid.contains(&i) && avoid.len() < n {
                continue;
            }
            match *self.endpoints[i].down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
                Some(until) if until > now => {
                    if fallback.is_none_or(|(_, f)| until < f) {
                        fallback = Some((i, until));
                    }
                }
                _ => return i,
            }
        }
        fallback.map_or(start % n, |(i, _)| i)
    }

    fn set_down(&self, i: usize, down: bool) {
        let mut until = self.endpoints[i].down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *until = down.then(|| std::time::Instant::now() + ENDPOINT_RETRY_AFTER);
    }
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
    ///
    /// `cfg.endpoint` may name several servers, separated by commas. With one, connecting fails
    /// if it cannot be reached; with several, it fails only if none can, and the others are
    /// connected to when they come up.
    pub async fn connect(cfg: ClientConfig) -> Result<KmsClient, ClientError> {
        let urls: Vec<String> = cfg.endpoint.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        if urls.is_empty() {
            return Err(ClientError::InvalidEndpoint { endpoint: cfg.endpoint.clone(), problem: EndpointProblem::Unparsable });
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in &urls {
            endpoints.push(endpoint_of(url, &cfg)?);
        }
        let channels: Vec<Channel> = if endpoints.len() == 1 {
            let channel = endpoints[0]
                .connect()
                .await
                .map_err(|source| ClientError::Connect { endpoint: urls[0].clone(), source })?;
            vec![channel]
        } else {
            // All at once: one endpoint that is down must not hold up the others.
            let mut attempts = tokio::task::JoinSet::new();
            for (i, endpoint) in endpoints.iter().enumerate() {
                let endpoint = endpoint.clone();
                attempts.spawn(async move { (i, endpoint.connect().await) });
            }
            let mut connected: Vec<Option<Channel>> = vec![None; endpoints.len()];
            let mut first_error = None;
            while let Some(joined) = attempts.join_next().await {
                match joined {
                    Ok((i, Ok(channel))) => connected[i] = Some(channel),
                    Ok((i, Err(source))) => {
                        first_error.get_or_insert(ClientError::Connect { endpoint: urls[i].clone(), source });
                    }
                    Err(_) => {}
                }
            }
            if connected.iter().all(Option::is_none) {
                return Err(first_error.unwrap_or(ClientError::InvalidEndpoint {
                    endpoint: cfg.endpoint.clone(),
                    problem: EndpointProblem::Unparsable,
                }));
            }
            // The others are connected to when they are first used.
            connected.into_iter().zip(&endpoints).map(|(c, e)| c.unwrap_or_else(|| e.connect_lazy())).collect()
        };
        let pool = std::sync::Arc::new(Pool {
            endpoints: urls
                .iter()
                .zip(channels)
                .map(|(url, channel)| PooledEndpoint { url: url.clone(), channel, down_until: std::sync::Mutex::new(None) })
                .collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        });
        if pool.endpoints.len() > 1 {
            spawn_health_watch(std::sync::Arc::downgrade(&pool), cfg.timeout);
        }
        Ok(KmsClient { pool, endpoint: cfg.endpoint, timeout: cfg.timeout })
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
        let endpoint = endpoint.into();
        let pool = std::sync::Arc::new(Pool {
            endpoints: vec![PooledEndpoint { url: endpoint.clone(), channel, down_until: std::sync::Mutex::new(None) }],
            next: std::sync::atomic::AtomicUsize::new(0),
        });
        KmsClient { pool, endpoint, timeout: DEFAULT_TIMEOUT }
    }

    /// The endpoint (or the comma-separated endpoints) this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoints that are not resting after a failure or a NOT_SERVING answer.
    pub fn usable_endpoints(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        self.pool
            .endpoints
            .iter()
            .filter(|e| e.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none_or(|u| u <= now))
            .map(|e| e.url.clone())
            .collect()
    }

    /// The raw generated clients, for requests the typed methods do not express (tests sending
    /// malformed requests, for instance). They use the next endpoint in turn, without this
    /// client's timeout or failover.
    pub fn key_admin(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel())
    }

    /// See [`KmsClient::key_admin`].
    pub fn data_keys(&self) -> DataKeysClient<Channel> {
        DataKeysClient::new(self.channel())
    }

    /// See [`KmsClient::key_admin`].
    pub fn hsm_crypto(&self) -> HsmCryptoClient<Channel> {
        HsmCryptoClient::new(self.channel())
    }

    /// The mutual-TLS channel of the next endpoint in turn, for generic gRPC calls (reflection,
    /// health, or tests that call a method the contract does not have).
    pub fn channel(&self) -> Channel {
        self.pool.endpoints[self.pool.pick(&[])].channel.clone()
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
        // A fresh idempotency key per creation: the server answers a retry of it (on another
        // endpoint, after the first attempt's fate was lost) with the key the first attempt made,
        // so the creation may be retried like a data key.
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).map_err(|_| ClientError::Random)?;
        let request = CreateKeyRequest {
            name: name.to_owned(),
            classification: classification.into(),
            purpose: purpose.unwrap_or(KeyPurpose::Unspecified).into(),
            rotation_period_days: rotation_days.unwrap_or(0),
            idempotency_key: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).create_key(request).await }
        })
            .await
    }

    /// The key named `name`.
    pub async fn get_key(&self, name: &str) -> Result<Key, ClientError> {
        let request = GetKeyRequest {
            name: name.to_owned(),
        };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).get_key(request).await }
        })
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
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).list_keys(request).await }
        })
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
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { DataKeysClient::new(channel).generate_data_key(request).await }
        })
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
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { DataKeysClient::new(channel).decrypt_data_key(request).await }
        })
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
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { HsmCryptoClient::new(channel).encrypt(request).await }
        })
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
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { HsmCryptoClient::new(channel).decrypt(request).await }
        })
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

    /// Runs one call under the client's deadline, on the next usable endpoint; `make` builds the
    /// call for a channel. A transport failure or `UNAVAILABLE` rests that endpoint and, for a
    /// [`Retry::Safe`] call, sends it again to another endpoint (each at most once, all within the
    /// one deadline). tonic's own endpoint timeout would report `CANCELLED`; a missed deadline is
    /// `DEADLINE_EXCEEDED`.
    async fn call<T, F, Fut>(&self, retry: Retry, make: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tried = Vec::new();
        loop {
            let i = self.pool.pick(&tried);
            tried.push(i);
            let url = &self.pool.endpoints[i].url;
            let status = match tokio::time::timeout_at(deadline, make(self.pool.endpoints[i].channel.clone())).await {
                Ok(Ok(response)) => {
                    self.pool.set_down(i, false);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => transport_status(url, status),
                Err(_elapsed) => {
                    return Err(tonic::Status::deadline_exceeded(format!(
                        "no answer from {} within {} s",
                        url,
                        self.timeout.as_secs_f64()
                    ))
                    .into())
                }
            };
            if status.code() != tonic::Code::Unavailable {
                return Err(status.into());
            }
            if self.pool.endpoints.len() > 1 {
                self.pool.set_down(i, true);
            }
            if retry == Retry::Never || tried.len() >= self.pool.endpoints.len() {
                return Err(status.into());
            }
        }
    }
}

/// The tonic endpoint of one `https://` URL, with the configuration's TLS and deadline.
fn endpoint_of(url: &str, cfg: &ClientConfig) -> Result<Endpoint, ClientError> {
    let invalid = |problem| ClientError::InvalidEndpoint { endpoint: url.to_owned(), problem };
    let uri: Uri = url.parse().map_err(|_| invalid(EndpointProblem::Unparsable))?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid(EndpointProblem::NotHttps));
    }
    let host = match uri.host() {
        Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        _ => return Err(invalid(EndpointProblem::NoHost)),
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.ca_pem))
        .identity(Identity::from_pem(&cfg.cert_pem, &*cfg.key_pem))
        .domain_name(host);
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|_| invalid(EndpointProblem::Unparsable))?
        .tls_config(tls)
        .map_err(|source| ClientError::Tls { endpoint: url.to_owned(), source })?
        .connect_timeout(cfg.timeout)
        .tcp_nodelay(true))
}

/// With several endpoints: asks each one's `grpc.health.v1` state every [`HEALTH_EVERY`]; one
/// that answers NOT_SERVING (or does not answer) rests, one that answers SERVING is used again
/// at once. Ends when the client is dropped.
fn spawn_health_watch(pool: std::sync::Weak<Pool>, timeout: Duration) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            for (i, e) in pool.endpoints.iter().enumerate() {
                let mut health = HealthClient::new(e.channel.clone());
                let asked = tokio::time::timeout(timeout.min(HEALTH_EVERY * 4), health.check(HealthCheckRequest { service: String::new() }));
                let serving = matches!(asked.await, Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32);
                pool.set_down(i, !serving);
            }
        }
    });
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
