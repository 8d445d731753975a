//! The client and `kmsctl` against a stub `kms.v1` server over real mutual TLS.
//!
//! This is not the end-to-end suite (that one runs the real server on SoftHSM, in the workspace's
//! `tests/` crate). It checks the client's own side of the wire: the TLS set-up (CA, client
//! identity, server name), the mapping of requests and answers, opening recipient-sealed keys
//! produced by an independent implementation of the sealing format, and kmsctl's output and exit
//! codes. The stub seals with code written here from the format description, not with the
//! client's own test helper, so the two sides are checked against each other. For the lifecycle
//! it answers just enough (a change made, one awaiting a second officer, a conflict, a re-wrap
//! batch with a bad item) to check how kmsctl prints them and how `rewrap` handles its files.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;

use aes_kw::KekAes256;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hkdf::Hkdf;
use kms_client::proto::approvals_server::{Approvals, ApprovalsServer};
use kms_client::proto::data_keys_server::{DataKeys, DataKeysServer};
use kms_client::proto::hsm_crypto_server::{HsmCrypto, HsmCryptoServer};
use kms_client::proto::key_admin_server::{KeyAdmin, KeyAdminServer};
use kms_client::proto::*;
use kms_client::{
    ClientError, Delivery, KeyChangeOutcome, KeyFilter, KmsClient, ReWrapItem, RecipientKey,
};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sha2::Sha256;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

const DATA_KEY: [u8; 32] = [0x11; 32];
const WRAPPED: &[u8] = b"stub-wrapped-blob";

// ---- the stub server ----

struct Stub;

fn require_client_cert<T>(request: &Request<T>) -> Result<(), Status> {
    match request.peer_certs() {
        Some(certs) if !certs.is_empty() => Ok(()),
        _ => Err(Status::unauthenticated("no client certificate")),
    }
}

fn stub_key(name: &str) -> Key {
    Key {
        id: "00112233445566778899aabbccddeeff".into(),
        name: name.into(),
        classification: Classification::Personal.into(),
        purpose: KeyPurpose::Envelope.into(),
        state: KeyState::Enabled.into(),
        primary_version: 1,
        versions: vec![KeyVersion {
            version: 1,
            state: KeyState::Enabled.into(),
            created_at_unix: 1_751_328_000,
            destroy_at_unix: 0,
        }],
        created_at_unix: 1_751_328_000,
        rotation_period_days: 0,
        rotated_at_unix: 1_751_328_000,
        next_rotation_at_unix: 1_782_864_000,
        destroy_at_unix: 0,
    }
}

/// 2025-07-08T00:00:00Z.
const DESTROY_AT: i64 = 1_751_932_800;
const APPROVAL_ID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn stub_approval(key: &str, action: ApprovalAction) -> Approval {
    Approval {
        id: APPROVAL_ID.into(),
        key: key.into(),
        version: 0,
        action: action.into(),
        state: ApprovalState::Pending.into(),
        requested_by: "urn:kms:caller:alice".into(),
        requested_at_unix: 1_751_328_000,
        expires_at_unix: 1_751_414_400,
        decided_by: String::new(),
        decided_at_unix: 0,
        classification: Classification::SensitivePersonal.into(),
        subject: String::new(),
        change: String::new(),
    }
}

/// The recipient keys "registered" with the stub, by hex fingerprint (SHA-256 of the SEC1 point).
static RECIPIENTS: std::sync::Mutex<BTreeMap<String, Vec<u8>>> = std::sync::Mutex::new(BTreeMap::new());

fn register_recipient(sec1: &[u8]) -> String {
    use sha2::Digest;
    let fingerprint: String = Sha256::digest(sec1).iter().map(|b| format!("{b:02x}")).collect();
    RECIPIENTS.lock().unwrap().insert(fingerprint.clone(), sec1.to_vec());
    fingerprint
}

fn registered_recipient(fingerprint: &str) -> Result<Vec<u8>, Status> {
    RECIPIENTS
        .lock()
        .unwrap()
        .get(fingerprint)
        .cloned()
        .ok_or_else(|| Status::permission_denied("recipient key is not registered"))
}

/// The context digest, written here from the format description (docs/recipient-sealing.md).
fn stub_context_digest(context: &HashMap<String, String>) -> [u8; 32] {
    use sha2::Digest;
    let sorted: BTreeMap<&String, &String> = context.iter().collect();
    let mut h = Sha256::new();
    h.update(b"kms.v1 encryption context\0");
    h.update((sorted.len() as u32).to_be_bytes());
    for (k, v) in sorted {
        h.update((k.len() as u32).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u32).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().into()
}

const STUB_KEY_ID: [u8; 16] = [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];

fn expected_context() -> HashMap<String, String> {
    HashMap::from([("case".to_owned(), "7".to_owned())])
}

/// The sealing format, version 2, written independently of the client (see the module doc).
fn stub_seal(recipient_sec1: &[u8], data_key: &[u8; 32], context: &HashMap<String, String>) -> Result<Vec<u8>, Status> {
    let recipient = p256::PublicKey::from_sec1_bytes(recipient_sec1)
        .map_err(|_| Status::invalid_argument("recipient_public_key is not a P-256 point"))?;
    let ephemeral =
        p256::ecdh::EphemeralSecret::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ephemeral_sec1 = ephemeral
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let shared = ephemeral.diffie_hellman(&recipient);
    let salt = [ephemeral_sec1.as_slice(), recipient_sec1].concat();
    let mut wrap_key = [0u8; 32];
    let info = [
        b"kms.v1 recipient-sealed data key v2".as_slice(),
        &STUB_KEY_ID,
        &1u32.to_be_bytes(),
        &stub_context_digest(context),
    ]
    .concat();
    Hkdf::<Sha256>::new(Some(&salt), shared.raw_secret_bytes())
        .expand(&info, &mut wrap_key)
        .map_err(|_| Status::internal("hkdf"))?;
    let kwp = KekAes256::from(wrap_key)
        .wrap_with_padding_vec(data_key)
        .map_err(|_| Status::internal("kwp"))?;
    Ok([vec![2u8], ephemeral_sec1, kwp].concat())
}

#[tonic::async_trait]
impl KeyAdmin for Stub {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        if r.name == "taken" {
            return Err(Status::already_exists("key \"taken\" already exists"));
        }
        Ok(Response::new(Key {
            classification: r.classification,
            purpose: r.purpose,
            rotation_period_days: r.rotation_period_days,
            ..stub_key(&r.name)
        }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<Key>, Status> {
        require_client_cert(&request)?;
        let name = request.into_inner().name;
        match name.as_str() {
            "missing" => Err(Status::not_found("key \"missing\" does not exist")),
            "forbidden" => Err(Status::permission_denied(
                "caller lacks the security-officer role",
            )),
            _ => Ok(Response::new(stub_key(&name))),
        }
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        let keys = ["payroll", "tax/2025"]
            .into_iter()
            .filter(|n| n.starts_with(&r.name_prefix))
            .map(stub_key)
            .filter(|k| r.classification == 0 || k.classification == r.classification)
            .collect();
        Ok(Response::new(ListKeysResponse { keys, refused: Vec::new() }))
    }

    // The lifecycle RPCs are exercised end to end against the real server (tests/ crate); the stub
    // answers only what this file checks: kmsctl's rendering of a change made, a change awaiting a
    // second officer, a scheduled destruction, and a concurrent change (ABORTED).
    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        require_client_cert(&request)?;
        let name = request.into_inner().name;
        if name == "busy" {
            return Err(Status::aborted(
                "key busy was changed by another request; retry",
            ));
        }
        let mut key = stub_key(&name);
        key.versions.push(KeyVersion {
            version: 2,
            ..key.versions[0]
        });
        key.primary_version = 2;
        Ok(Response::new(KeyChangeResponse {
            key: Some(key),
            pending_approval: None,
        }))
    }

    async fn set_rotation_schedule(
        &self,
        _: Request<SetRotationScheduleRequest>,
    ) -> Result<Response<Key>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn enable_key(&self, _: Request<SetKeyStateRequest>) -> Result<Response<KeyChangeResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn list_unknown_objects(
        &self,
        _: Request<ListUnknownObjectsRequest>,
    ) -> Result<Response<ListUnknownObjectsResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn adopt_objects(&self, _: Request<AdoptObjectsRequest>) -> Result<Response<AdoptObjectsResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn destroy_unknown_object(
        &self,
        _: Request<DestroyUnknownObjectRequest>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn get_hsm_health(&self, _: Request<kms_client::proto::GetHsmHealthRequest>) -> Result<Response<kms_client::proto::HsmHealth>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn disable_key(
        &self,
        request: Request<SetKeyStateRequest>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        require_client_cert(&request)?;
        let name = request.into_inner().name;
        if name == "health" {
            return Ok(Response::new(KeyChangeResponse {
                key: Some(stub_key(&name)),
                pending_approval: Some(stub_approval(&name, ApprovalAction::DisableKey)),
            }));
        }
        Ok(Response::new(KeyChangeResponse {
            key: Some(Key {
                state: KeyState::Disabled.into(),
                next_rotation_at_unix: 0,
                ..stub_key(&name)
            }),
            pending_approval: None,
        }))
    }

    async fn enable_key_version(
        &self,
        _: Request<SetKeyVersionStateRequest>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn disable_key_version(
        &self,
        _: Request<SetKeyVersionStateRequest>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    async fn schedule_key_destruction(
        &self,
        request: Request<KeyTarget>,
    ) -> Result<Response<KeyChangeResponse>, Status> {
        require_client_cert(&request)?;
        let target = request.into_inner();
        if target.version != 0 {
            return Err(Status::unimplemented("the stub destroys whole keys only"));
        }
        Ok(Response::new(KeyChangeResponse {
            key: Some(Key {
                state: KeyState::PendingDestruction.into(),
                next_rotation_at_unix: 0,
                destroy_at_unix: DESTROY_AT,
                ..stub_key(&target.name)
            }),
            pending_approval: None,
        }))
    }

    async fn cancel_key_destruction(&self, _: Request<KeyTarget>) -> Result<Response<Key>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }
}

#[tonic::async_trait]
impl DataKeys for Stub {
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        if r.encryption_context != expected_context() {
            return Err(Status::invalid_argument(
                "the stub expects the context case=7",
            ));
        }
        let mut answer = GenerateDataKeyResponse {
            wrapped_data_key: WRAPPED.to_vec(),
            key_id: "00112233445566778899aabbccddeeff".into(),
            key_version: 1,
            ..Default::default()
        };
        match DataKeyDelivery::try_from(r.delivery) {
            Ok(DataKeyDelivery::PlaintextAndWrapped) => {
                answer.plaintext_data_key = DATA_KEY.to_vec()
            }
            Ok(DataKeyDelivery::WrappedOnly) => {}
            Ok(DataKeyDelivery::WrappedToRecipient) => {
                let to = registered_recipient(&r.recipient_key_fingerprint)?;
                answer.recipient_sealed_data_key = stub_seal(&to, &DATA_KEY, &r.encryption_context)?;
                answer.recipient_key_fingerprint = r.recipient_key_fingerprint.clone();
            }
            _ => return Err(Status::invalid_argument("delivery is unspecified")),
        }
        Ok(Response::new(answer))
    }

    async fn decrypt_data_key(
        &self,
        request: Request<DecryptDataKeyRequest>,
    ) -> Result<Response<DecryptDataKeyResponse>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        if r.wrapped_data_key != WRAPPED {
            return Err(Status::invalid_argument(
                "wrapped_data_key is not a blob of this service",
            ));
        }
        if r.encryption_context != expected_context() {
            return Err(Status::invalid_argument(
                "encryption context does not match the blob",
            ));
        }
        let mut answer = DecryptDataKeyResponse {
            key_id: "00112233445566778899aabbccddeeff".into(),
            key_version: 1,
            classification: Classification::SensitivePersonal.into(),
            ..Default::default()
        };
        if !r.sealed {
            answer.plaintext_data_key = DATA_KEY.to_vec();
        } else {
            let to = registered_recipient(&r.recipient_key_fingerprint)?;
            answer.recipient_sealed_data_key = stub_seal(&to, &DATA_KEY, &r.encryption_context)?;
        }
        Ok(Response::new(answer))
    }

    async fn re_wrap(&self, _: Request<ReWrapRequest>) -> Result<Response<ReWrapResponse>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }

    /// Re-wraps `old:X` into `new:X` at version 2 when the context is case=7; anything else fails
    /// its own item.
    async fn re_wrap_batch(
        &self,
        request: Request<ReWrapBatchRequest>,
    ) -> Result<Response<ReWrapBatchResponse>, Status> {
        require_client_cert(&request)?;
        let items = request.into_inner().items;
        if items.len() > 1000 {
            return Err(Status::invalid_argument("at most 1000 items"));
        }
        let results = items
            .into_iter()
            .map(|item| match item.blob.strip_prefix(b"old:") {
                Some(rest) if item.encryption_context == expected_context() => ReWrapResult {
                    code: 0,
                    message: String::new(),
                    result: Some(ReWrapResponse {
                        blob: [b"new:".as_slice(), rest].concat(),
                        key_id: "00112233445566778899aabbccddeeff".into(),
                        key_version: 2,
                        source_key_id: "00112233445566778899aabbccddeeff".into(),
                        source_key_version: 1,
                    }),
                },
                _ => ReWrapResult {
                    code: tonic::Code::InvalidArgument as i32,
                    message: "invalid blob: not a blob of this service".into(),
                    result: None,
                },
            })
            .collect();
        Ok(Response::new(ReWrapBatchResponse { results }))
    }
}

#[tonic::async_trait]
impl Approvals for Stub {
    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        require_client_cert(&request)?;
        Ok(Response::new(ListApprovalsResponse {
            approvals: vec![stub_approval("health", ApprovalAction::DisableKey)],
        }))
    }

    /// Approving `own` is the requester deciding their own request.
    async fn approve(
        &self,
        request: Request<DecideApprovalRequest>,
    ) -> Result<Response<ApproveResponse>, Status> {
        require_client_cert(&request)?;
        if request.into_inner().id == "own" {
            return Err(Status::permission_denied(
                "urn:kms:caller:alice filed this request and cannot decide it",
            ));
        }
        Ok(Response::new(ApproveResponse {
            approval: Some(Approval {
                state: ApprovalState::Approved.into(),
                decided_by: "urn:kms:caller:bob".into(),
                decided_at_unix: 1_751_400_000,
                ..stub_approval("health", ApprovalAction::DisableKey)
            }),
            key: Some(Key {
                state: KeyState::Disabled.into(),
                ..stub_key("health")
            }),
            caller: None,
        }))
    }

    async fn reject(
        &self,
        _: Request<DecideApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        Err(Status::unimplemented("not in the stub"))
    }
}

#[tonic::async_trait]
impl HsmCrypto for Stub {
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        let ciphertext = [
            b"ct:".as_slice(),
            &r.plaintext.iter().map(|b| b ^ 0xff).collect::<Vec<_>>(),
        ]
        .concat();
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id: "aa".into(),
            key_version: 3,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        require_client_cert(&request)?;
        let r = request.into_inner();
        let body = r
            .ciphertext
            .strip_prefix(b"ct:")
            .ok_or_else(|| Status::invalid_argument("not a ciphertext blob"))?;
        let plaintext = body.iter().map(|b| b ^ 0xff).collect();
        Ok(Response::new(DecryptResponse {
            plaintext,
            key_id: "aa".into(),
            key_version: 3,
        }))
    }
}

// ---- certificates and start-up ----

struct Pki {
    dir: tempfile::TempDir,
    server_cert: String,
    server_key: String,
    ca: String,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(issuer: &Issuer<'_, KeyPair>, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    (
        params.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// A CA, a server certificate for `localhost` and a client certificate, written as files the way
/// `kmsctl` reads them; plus `other-ca.pem`, an unrelated CA, and `foreign.pem`/`foreign.key`, a
/// client certificate that it issued.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca_params, ca_key, ca_pem) = ca("stub CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let (server_cert, server_key) = leaf(&issuer, "localhost");
    let (client_cert, client_key) = leaf(&issuer, "exchange.test");
    let (other_params, other_key, other_ca) = ca("unrelated CA");
    let (foreign_cert, foreign_key) = leaf(&Issuer::new(other_params, other_key), "intruder.test");
    std::fs::write(dir.path().join("foreign.pem"), foreign_cert).unwrap();
    std::fs::write(dir.path().join("foreign.key"), foreign_key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), other_ca).unwrap();
    std::fs::write(dir.path().join("client.pem"), client_cert).unwrap();
    std::fs::write(dir.path().join("client.key"), client_key).unwrap();
    Pki {
        dir,
        server_cert,
        server_key,
        ca: ca_pem,
    }
}

/// Starts the stub on a free port; returns its endpoint.
async fn start_stub(pki: &Pki) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server_cert, &pki.server_key))
        .client_ca_root(Certificate::from_pem(&pki.ca));
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(KeyAdminServer::new(Stub))
        .add_service(DataKeysServer::new(Stub))
        .add_service(HsmCryptoServer::new(Stub))
        .add_service(ApprovalsServer::new(Stub));
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    format!("https://localhost:{port}")
}

async fn connect(pki: &Pki, endpoint: &str) -> KmsClient {
    KmsClient::connect_with_files(
        endpoint,
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    )
    .await
    .unwrap()
}

fn context() -> BTreeMap<String, String> {
    BTreeMap::from([("case".to_owned(), "7".to_owned())])
}

// ---- the library ----

#[tokio::test]
async fn client_talks_to_a_mutual_tls_server_and_keeps_status_codes() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    let client = connect(&pki, &endpoint).await;

    let key = client.get_key("payroll").await.unwrap();
    assert_eq!(key.name, "payroll");
    let created = client
        .create_key(
            "tax",
            Classification::Secret,
            Some(KeyPurpose::HsmEncrypt),
            Some(90),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            created.classification,
            created.purpose,
            created.rotation_period_days
        ),
        (5, 2, 90)
    );
    let listed = client
        .list_keys(&KeyFilter {
            name_prefix: Some("tax".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["tax/2025"]
    );

    let err = client.get_key("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    assert_eq!(
        err.status().unwrap().message(),
        "key \"missing\" does not exist"
    );
}

#[tokio::test]
async fn data_key_sealed_to_recipient_is_opened_locally() {
    let pki = pki();
    let client = connect(&pki, &start_stub(&pki).await).await;
    let recipient = RecipientKey::generate().unwrap();
    register_recipient(&recipient.public_key_sec1());

    let generated = client
        .generate_data_key("citizens", &context(), Delivery::ToRecipient(&recipient))
        .await
        .unwrap();
    assert_eq!(*generated.plaintext.unwrap(), DATA_KEY);
    assert_eq!(generated.recipient_sealed.unwrap().len(), 106);
    // A key the stub never registered is refused there, not sealed to.
    let stranger = RecipientKey::generate().unwrap();
    let err = client
        .generate_data_key("citizens", &context(), Delivery::ToRecipient(&stranger))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied));
    assert_eq!(generated.wrapped, WRAPPED);

    let decrypted = client
        .decrypt_data_key(WRAPPED, &context(), Some("citizens"), Some(&recipient))
        .await
        .unwrap();
    assert_eq!(*decrypted.plaintext, DATA_KEY);
    assert_eq!(decrypted.classification, Classification::SensitivePersonal);
}

#[tokio::test]
async fn plaintext_and_wrapped_only_deliveries() {
    let pki = pki();
    let client = connect(&pki, &start_stub(&pki).await).await;
    let both = client
        .generate_data_key("payroll", &context(), Delivery::PlaintextAndWrapped)
        .await
        .unwrap();
    assert_eq!(*both.plaintext.unwrap(), DATA_KEY);
    let wrapped_only = client
        .generate_data_key("payroll", &context(), Delivery::WrappedOnly)
        .await
        .unwrap();
    assert!(wrapped_only.plaintext.is_none() && wrapped_only.recipient_sealed.is_none());
    let err = client
        .decrypt_data_key(WRAPPED, &BTreeMap::new(), None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
}

#[tokio::test]
async fn lifecycle_changes_tell_a_change_made_from_one_awaiting_approval() {
    let pki = pki();
    let client = connect(&pki, &start_stub(&pki).await).await;
    let made = client.disable_key("payroll").await.unwrap();
    assert!(matches!(&made, KeyChangeOutcome::Made(k) if k.state == KeyState::Disabled as i32));
    let pending = client.disable_key("health").await.unwrap();
    let approval = pending.pending_approval().expect("awaits approval");
    assert_eq!(
        (approval.id.as_str(), approval.action),
        (APPROVAL_ID, ApprovalAction::DisableKey as i32)
    );
    assert_eq!(pending.key().state, KeyState::Enabled as i32, "unchanged");
    let approved = client.approve(APPROVAL_ID).await.unwrap();
    assert_eq!(approved.approval.decided_by, "urn:kms:caller:bob");
    assert_eq!(approved.key.as_ref().unwrap().state, KeyState::Disabled as i32);
    let err = client.approve("own").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied));
    assert_eq!(client.list_approvals(false).await.unwrap().len(), 1);
    let err = client.rotate_key("busy").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Aborted));
}

#[tokio::test]
async fn re_wrap_batch_answers_item_by_item() {
    let pki = pki();
    let client = connect(&pki, &start_stub(&pki).await).await;
    let ctx = context();
    let item = |blob: &'static [u8]| ReWrapItem {
        blob,
        context: &ctx,
        destination_key: None,
    };
    let results = client
        .re_wrap_batch(&[item(b"old:1"), item(b"garbage"), item(b"old:2")])
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap().blob, b"new:1");
    assert_eq!(results[0].as_ref().unwrap().key_version, 2);
    assert_eq!(
        results[1].as_ref().unwrap_err().to_string(),
        "INVALID_ARGUMENT: invalid blob: not a blob of this service"
    );
    assert_eq!(results[2].as_ref().unwrap().blob, b"new:2");
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    let err = KmsClient::connect_with_files(
        &endpoint,
        pki.path("other-ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    let result = async {
        let client = KmsClient::connect_with_files(
            &endpoint,
            pki.path("ca.pem"),
            pki.path("foreign.pem"),
            pki.path("foreign.key"),
        )
        .await?;
        client.get_key("payroll").await
    }
    .await;
    // With TLS 1.3 the client learns of the refusal on its first call, not at connect.
    let err = result.unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { .. }) || err.code() == Some(tonic::Code::Unavailable),
        "{err:?}"
    );
    assert!(err.to_string().contains("UnknownCA"), "{err}");
}

// ---- kmsctl ----

/// Runs kmsctl with the connection in the environment, off the runtime's threads.
async fn kmsctl(
    pki: &Pki,
    endpoint: &str,
    ca: &str,
    args: &[&str],
    stdin: Option<&Path>,
) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kmsctl"));
    command
        .args(args)
        .env("KMS_ENDPOINT", endpoint)
        .env("KMS_CA", pki.path(ca))
        .env("KMS_CERT", pki.path("client.pem"))
        .env("KMS_KEY", pki.path("client.key"))
        .current_dir(pki.dir.path());
    if let Some(path) = stdin {
        command.stdin(std::fs::File::open(path).unwrap());
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsctl_exit_codes_and_error_lines() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;

    let out = kmsctl(&pki, &endpoint, "ca.pem", &["key", "get", "missing"], None).await;
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        stderr(&out),
        "kmsctl: NOT_FOUND: key \"missing\" does not exist\n"
    );
    assert!(out.stdout.is_empty());

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "get", "forbidden"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "create", "--name", "taken", "--level", "personal"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("kmsctl: ALREADY_EXISTS: "),
        "{}",
        stderr(&out)
    );

    let out = kmsctl(
        &pki,
        &endpoint,
        "other-ca.pem",
        &["key", "get", "payroll"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("kmsctl: UNAVAILABLE: cannot connect to"),
        "{}",
        stderr(&out)
    );

    let out = kmsctl(&pki, &endpoint, "ca.pem", &["key", "get", "payroll"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("classification   PERSONAL"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsctl_prints_json_and_opens_recipient_keys() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    // A recipient key pair, made by kmsctl itself; the stub "registers" its public half.
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["--output", "json", "recipient-key", "generate", "--out", "r.pem", "--public-out", "r.pub"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(pki.path("r.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    let public = std::fs::read_to_string(pki.path("r.pub")).unwrap();
    let point = <p256::PublicKey as p256::pkcs8::DecodePublicKey>::from_public_key_pem(&public).unwrap();
    let fingerprint = register_recipient(point.to_encoded_point(false).as_bytes());
    assert_eq!(made["fingerprint"], fingerprint);
    // It never overwrites a private key.
    let again = kmsctl(&pki, &endpoint, "ca.pem", &["recipient-key", "generate", "--out", "r.pem", "--public-out", "s.pub"], None).await;
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));

    let args = [
        "--output",
        "json",
        "datakey",
        "generate",
        "--key",
        "citizens",
        "--context",
        "case=7",
        "--recipient-key",
        "r.pem",
    ];
    let out = kmsctl(&pki, &endpoint, "ca.pem", &args, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["plaintext_data_key"], BASE64.encode(DATA_KEY));
    assert_eq!(json["wrapped_data_key"], BASE64.encode(WRAPPED));
    assert_eq!(json["key_version"], 1);

    // A sealed key opened offline with the private key from its file.
    let sealed = stub_seal(point.to_encoded_point(false).as_bytes(), &DATA_KEY, &expected_context()).unwrap();
    let sealed = BASE64.encode(sealed);
    let open = |ctx: &'static str| {
        let sealed = sealed.clone();
        let (pki, endpoint) = (&pki, &endpoint);
        async move {
            let args = [
                "--output", "json", "datakey", "open", "--sealed", &sealed, "--key-id", "00112233445566778899aabbccddeeff",
                "--key-version", "1", "--context", ctx, "--recipient-key", "r.pem",
            ];
            kmsctl(pki, endpoint, "ca.pem", &args, None).await
        }
    };
    let out = open("case=7").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["plaintext_data_key"], BASE64.encode(DATA_KEY));
    let out = open("case=8").await;
    assert_eq!(out.status.code(), Some(1), "another context does not open it: {}", stderr(&out));

    let args = [
        "datakey",
        "generate",
        "--key",
        "k",
        "--context",
        "case=7",
        "--no-plaintext",
        "--output",
        "json",
    ];
    let out = kmsctl(&pki, &endpoint, "ca.pem", &args, None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.get("plaintext_data_key").is_none(), "{json}");

    let wrapped = BASE64.encode(WRAPPED);
    let args = [
        "datakey",
        "decrypt",
        "--wrapped",
        &wrapped,
        "--context",
        "case=7",
        "--output",
        "json",
    ];
    let out = kmsctl(&pki, &endpoint, "ca.pem", &args, None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["classification"], "SENSITIVE_PERSONAL");
    assert_eq!(json["plaintext_data_key"], BASE64.encode(DATA_KEY));

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["--output", "json", "key", "list", "--prefix", "pay"],
        None,
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["keys"][0]["name"], "payroll");
    assert_eq!(json["keys"][0]["classification"], "PERSONAL");
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsctl_encrypts_and_decrypts_files_and_stdio() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    std::fs::write(pki.path("plain.txt"), b"state secret").unwrap();
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &[
            "encrypt",
            "--key",
            "s",
            "--in",
            "plain.txt",
            "--out",
            "c.bin",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("key_version  3"));
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["decrypt", "--in", "-", "--out", "-"],
        Some(&pki.path("c.bin")),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"state secret");
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsctl_prints_changes_pending_approvals_and_conflicts() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "disable", "health"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "awaiting a second officer: disabling key health needs another officer's approval; \
             nothing has changed yet\n\nid              0f1e2d3c4b5a69788796a5b4c3d2e1f0\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("  kmsctl approval reject 0f1e2d3c4b5a69788796a5b4c3d2e1f0\n"),
        "{text}"
    );
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "disable", "health", "--output", "json"],
        None,
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["pending_approval"]["id"], APPROVAL_ID);
    assert_eq!(json["key"]["state"], "ENABLED");

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "disable", "payroll"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "key payroll is DISABLED: it does no cryptography until it is enabled again\n\nname "
        ),
        "{}",
        stdout(&out)
    );

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "destroy", "payroll"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "key payroll will be destroyed at 2025-07-08T00:00:00Z; until then it does no \
             cryptography, and `kmsctl key cancel-destroy payroll` takes it back to DISABLED\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\nstate            PENDING_DESTRUCTION\n"),
        "{text}"
    );
    assert!(
        text.contains("\ndestroy_at       2025-07-08T00:00:00Z\n"),
        "{text}"
    );

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["key", "rotate", "payroll"],
        None,
    )
    .await;
    assert!(
        stdout(&out).starts_with("key payroll rotated: version 2 is the primary version\n"),
        "{}",
        stdout(&out)
    );
    let out = kmsctl(&pki, &endpoint, "ca.pem", &["key", "rotate", "busy"], None).await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "kmsctl: ABORTED: key busy was changed by another request; retry\n"
    );

    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["approval", "approve", "own"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = kmsctl(
        &pki,
        &endpoint,
        "ca.pem",
        &["approval", "approve", APPROVAL_ID],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "request 0f1e2d3c4b5a69788796a5b4c3d2e1f0 approved: disabling key health is done\n\n"
        ),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsctl_rewrap_keeps_line_order_copies_failures_and_exits_with_their_code() {
    let pki = pki();
    let endpoint = start_stub(&pki).await;
    let lines = [
        BASE64.encode(b"old:a"),
        BASE64.encode(b"old:b"),
        "%%% not base64".to_owned(),
        String::new(),
        BASE64.encode(b"forged"),
        BASE64.encode(b"old:c"),
    ];
    std::fs::write(pki.path("blobs.txt"), lines.join("\n") + "\n").unwrap();
    let args = [
        "rewrap",
        "--in",
        "blobs.txt",
        "--out",
        "new.txt",
        "--context",
        "case=7",
        "--batch-size",
        "2",
    ];
    let out = kmsctl(&pki, &endpoint, "ca.pem", &args, None).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let written = std::fs::read_to_string(pki.path("new.txt")).unwrap();
    assert_eq!(
        written,
        [
            BASE64.encode(b"new:a"),
            BASE64.encode(b"new:b"),
            lines[2].clone(),
            String::new(),
            lines[4].clone(),
            BASE64.encode(b"new:c"),
        ]
        .join("\n")
            + "\n"
    );
    assert_eq!(
        stdout(&out),
        "in         blobs.txt\n\
         out        new.txt\n\
         total      5\n\
         rewrapped  3\n\
         failed     2\n\
         \n\
         KEY_ID                            VERSION  BLOBS\n\
         00112233445566778899aabbccddeeff  2        3\n\
         \n\
         failed lines (copied unchanged):\n\
         \x20 line 3: INVALID_ARGUMENT: not standard base64: Invalid symbol 37, offset 0.\n\
         \x20 line 5: INVALID_ARGUMENT: invalid blob: not a blob of this service\n"
    );
    assert_eq!(
        stderr(&out),
        "kmsctl: 2 of 5 blobs were not re-wrapped and their lines were copied unchanged to \
         new.txt (first: line 3: INVALID_ARGUMENT: not standard base64: Invalid symbol 37, offset 0.)\n"
    );
    // stderr is not a terminal here: no progress bar.
    assert!(!stderr(&out).contains("re-wrapping"));

    // Every blob re-wrapped: exit 0, JSON summary, and the output may replace the input.
    std::fs::write(
        pki.path("good.txt"),
        format!("{}\n{}\n", BASE64.encode(b"old:x"), BASE64.encode(b"old:y")),
    )
    .unwrap();
    let args = [
        "rewrap",
        "--in",
        "good.txt",
        "--out",
        "good.txt",
        "--context",
        "case=7",
        "--output",
        "json",
    ];
    let out = kmsctl(&pki, &endpoint, "ca.pem", &args, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "in": "good.txt",
            "out": "good.txt",
            "total": 2,
            "rewrapped": 2,
            "failed": 0,
            "rewrapped_to": [{"key_id": "00112233445566778899aabbccddeeff", "key_version": 2, "blobs": 2}],
            "failures": [],
        })
    );
    assert_eq!(
        std::fs::read_to_string(pki.path("good.txt")).unwrap(),
        format!("{}\n{}\n", BASE64.encode(b"new:x"), BASE64.encode(b"new:y"))
    );
    let leftovers: Vec<_> = std::fs::read_dir(pki.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
