//! `DataKeys.ReWrap` and `DataKeys.ReWrapBatch`: a blob moves to the primary version of its own key,
//! or to another key of the same or a higher level, bound to the same encryption context.
//!
//! A wrapped data key is unwrapped and wrapped again inside the HSM in one worker job and never
//! reaches this process; an HSM ciphertext is decrypted and encrypted again in one worker job (the
//! payload is zeroized there). The caller needs the right to decrypt under the blob's key version and
//! to encrypt under the destination's primary version (`KeyUse::ReWrapFrom` / `ReWrapTo`); nothing is
//! released to it. Must never lower a blob's classification, release a data key or a payload, or
//! let one bad item of a batch fail the others.
#![forbid(unsafe_code)]

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use kms_proto::v1 as pb;
use tokio::task::JoinSet;
use tonic::Request;

use super::{AppState, Limits};
use crate::authz::{Caller, KeyGrant, KeyUse, LoadedKey};
use crate::blob::{self, BlobError, CiphertextBlob, Header, WrappedKeyBlob, IV_LEN, TAG_LEN, WRAPPED_KEY_LEN};
use crate::context::{self, ContextDigest};
use crate::hsm::{BindingInput, DecryptPayload, ReEncryptPayload, ReWrapDataKey, UnwrapDataKey};
use crate::ids::{KeyId, KeyPurpose, ObjectId};
use crate::status::ApiError;

/// The most items one `ReWrapBatch` may hold (the proto's contract).
pub const MAX_BATCH_ITEMS: usize = 1000;

/// Items of one batch in flight at once. The HSM worker pool is the bottleneck; a few more jobs
/// than workers keep it busy without flooding its queue for other callers.
const BATCH_CONCURRENCY: usize = 8;

/// `DataKeys.ReWrap`.
pub async fn re_wrap(state: &AppState, request: Request<pb::ReWrapRequest>) -> Result<pb::ReWrapResponse, ApiError> {
    let caller = state.caller(&request)?;
    let item = ReWrapItem::parse(request.into_inner(), state.limits)?;
    if let Some(name) = &item.destination {
        crate::audit::facts::note_subject(&format!("to key {name}"));
    }
    let source = state.key_by_id(item.blob.header().key_id).await?;
    let destination = match &item.destination {
        Some(name) if name != source.name() => state.key_by_name(name).await?,
        _ => source.clone(),
    };
    rewrap(state, &caller, item, source, destination).await
}

/// `DataKeys.ReWrapBatch`: every item is handled like a `ReWrap` and gets its own status; the batch
/// fails as a whole only when the caller is unknown or the batch is empty or too large.
pub async fn re_wrap_batch(
    state: &AppState,
    request: Request<pb::ReWrapBatchRequest>,
) -> Result<pb::ReWrapBatchResponse, ApiError> {
    let caller = state.caller(&request)?;
    let items = request.into_inner().items;
    if items.is_empty() {
        return Err(ApiError::invalid("items", "is empty; send at least one blob to re-wrap"));
    }
    if items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::invalid(
            "items",
            format!("holds {} items; a batch holds at most {MAX_BATCH_ITEMS}", items.len()),
        ));
    }
    let parsed: Vec<Result<ReWrapItem, ApiError>> =
        items.into_iter().map(|r| ReWrapItem::parse(r, state.limits)).collect();
    let keys = BatchKeys::load(state, &parsed).await;
    // Quoted in the message of an item that failed internally, and logged with its details.
    let batch_id = super::request_id();
    // Every item is a record of its own (`ReWrapBatchItem`, request id `<batch request>#<index>`),
    // durable before the batch's answer leaves.
    let parent = crate::audit::facts::current().unwrap_or_default();
    let item_facts = move |index: usize| crate::audit::RequestFacts {
        rpc: "ReWrapBatchItem",
        request_id: format!("{}#{index}", parent.request_id),
        caller: parent.caller.clone(),
        cert_fingerprint: parent.cert_fingerprint.clone(),
        ..Default::default()
    };
    let mut results: Vec<Option<pb::ReWrapResult>> = vec![None; parsed.len()];
    let mut queue = parsed.into_iter().enumerate();
    let mut running = JoinSet::new();
    loop {
        while running.len() < BATCH_CONCURRENCY {
            let Some((index, item)) = queue.next() else { break };
            let facts = item_facts(index);
            match item.map_err(Arc::new).and_then(|item| keys.for_item(item)) {
                Ok((item, source, destination)) => {
                    let (state, caller) = (state.clone(), caller.clone());
                    running.spawn(async move {
                        let audit = state.audit.clone();
                        let outcome = audited_item(&audit, facts, async {
                            crate::audit::facts::note_context(&item.digest.0);
                            rewrap(&state, &caller, item, source, destination).await.map_err(Arc::new)
                        })
                        .await;
                        (index, outcome)
                    });
                }
                Err(e) => {
                    let outcome = audited_item(&state.audit, facts, async { Err::<pb::ReWrapResponse, _>(e) }).await;
                    results[index] = Some(item_result(&batch_id, index, outcome));
                }
            }
        }
        match running.join_next().await {
            Some(Ok((index, outcome))) => results[index] = Some(item_result(&batch_id, index, outcome)),
            // A task that panicked: its slot stays empty and is reported below.
            Some(Err(_)) => {}
            None => break,
        }
    }
    let results = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            r.unwrap_or_else(|| {
                item_result(&batch_id, index, Err(Arc::new(ApiError::Internal("re-wrap task failed"))))
            })
        })
        .collect();
    Ok(pb::ReWrapBatchResponse { results })
}

/// A blob of either kind, parsed (not yet authenticated: only the HSM decides that).
enum SourceBlob {
    DataKey(WrappedKeyBlob),
    Ciphertext(CiphertextBlob),
}

impl SourceBlob {
    fn parse(bytes: &[u8]) -> Result<SourceBlob, BlobError> {
        match WrappedKeyBlob::parse(bytes) {
            Ok(b) => Ok(SourceBlob::DataKey(b)),
            // A well-formed header of the other kind.
            Err(BlobError::WrongKind { .. }) => CiphertextBlob::parse(bytes).map(SourceBlob::Ciphertext),
            Err(e) => Err(e),
        }
    }

    fn header(&self) -> &Header {
        match self {
            SourceBlob::DataKey(b) => &b.header,
            SourceBlob::Ciphertext(c) => &c.header,
        }
    }

    /// The purpose of the keys this kind of blob is made with, at both ends.
    fn purpose(&self) -> KeyPurpose {
        match self {
            SourceBlob::DataKey(_) => KeyPurpose::Envelope,
            SourceBlob::Ciphertext(_) => KeyPurpose::HsmEncrypt,
        }
    }
}

/// One request item that passed validation.
struct ReWrapItem {
    blob: SourceBlob,
    digest: ContextDigest,
    /// The destination key's name; `None` for the blob's own key.
    destination: Option<String>,
}

impl ReWrapItem {
    fn parse(req: pb::ReWrapRequest, limits: Limits) -> Result<ReWrapItem, ApiError> {
        let blob = SourceBlob::parse(&req.blob)?;
        if let SourceBlob::Ciphertext(c) = &blob {
            // A re-wrap is a new encryption: the payload limit of Encrypt applies.
            let payload = c.ciphertext.len().saturating_sub(TAG_LEN);
            if payload > limits.max_payload_bytes {
                return Err(ApiError::invalid(
                    "blob",
                    format!("holds a {payload}-byte payload; the limit is {} bytes", limits.max_payload_bytes),
                ));
            }
        }
        let digest = context::digest(&req.encryption_context)?;
        crate::audit::facts::note_context(&digest.0);
        let destination = Some(req.destination_key).filter(|n| !n.is_empty());
        Ok(ReWrapItem { blob, digest, destination })
    }
}

type Shared<T> = Result<T, Arc<ApiError>>;

/// The keys a batch names, each loaded and authenticated once however many items name it.
struct BatchKeys {
    by_id: HashMap<KeyId, Shared<LoadedKey>>,
    by_name: HashMap<String, Shared<LoadedKey>>,
}

impl BatchKeys {
    async fn load(state: &AppState, items: &[Result<ReWrapItem, ApiError>]) -> BatchKeys {
        let mut keys = BatchKeys { by_id: HashMap::new(), by_name: HashMap::new() };
        for item in items.iter().flatten() {
            let id = item.blob.header().key_id;
            if let Entry::Vacant(slot) = keys.by_id.entry(id) {
                slot.insert(state.key_by_id(id).await.map_err(Arc::new));
            }
            if let Some(name) = &item.destination {
                if let Entry::Vacant(slot) = keys.by_name.entry(name.clone()) {
                    slot.insert(state.key_by_name(name).await.map_err(Arc::new));
                }
            }
        }
        keys
    }

    /// The item with its source and destination keys, or the error of the first that failed to load.
    fn for_item(&self, item: ReWrapItem) -> Shared<(ReWrapItem, LoadedKey, LoadedKey)> {
        let source = self.get(&self.by_id, &item.blob.header().key_id)?;
        let destination = match &item.destination {
            Some(name) => self.get(&self.by_name, name)?,
            None => source.clone(),
        };
        Ok((item, source, destination))
    }

    fn get<K: std::hash::Hash + Eq>(&self, map: &HashMap<K, Shared<LoadedKey>>, k: &K) -> Shared<LoadedKey> {
        match map.get(k) {
            Some(Ok(key)) => Ok(key.clone()),
            Some(Err(e)) => Err(Arc::clone(e)),
            None => Err(Arc::new(ApiError::Internal("a batch item names a key that was not loaded"))),
        }
    }
}

/// Runs one batch item with facts of its own and makes its record durable; an item whose record
/// cannot be written is answered `UNAVAILABLE` (its result is dropped).
async fn audited_item<T>(
    audit: &crate::audit::AuditLog,
    facts: crate::audit::RequestFacts,
    fut: impl std::future::Future<Output = Shared<T>>,
) -> Shared<T> {
    let (result, facts) = crate::audit::facts::scope(facts, fut).await;
    let (outcome, code, detail) = match &result {
        Ok(_) => (kms_audit::Outcome::Ok, 0, String::new()),
        Err(e) => {
            let status = e.to_status(&facts.request_id);
            let outcome = if e.is_fault() { kms_audit::Outcome::Failed } else { kms_audit::Outcome::Refused };
            (outcome, status.code() as i32, status.message().to_owned())
        }
    };
    match audit.append(crate::audit::record(&facts, outcome, code, &detail)).await {
        Ok(_) => result,
        Err(_) => Err(Arc::new(ApiError::AuditUnavailable)),
    }
}

/// Authorises both ends, checks that the level does not go down, and re-wraps inside the HSM.
async fn rewrap(
    state: &AppState,
    caller: &Caller,
    item: ReWrapItem,
    source: LoadedKey,
    destination: LoadedKey,
) -> Result<pb::ReWrapResponse, ApiError> {
    let header = *item.blob.header();
    if source.classification() != header.classification {
        return Err(ApiError::BlobLevelMismatch { in_blob: header.classification, of_key: source.classification() });
    }
    let purpose = item.blob.purpose();
    // A batch item's keys were loaded before its own audit scope: name them here.
    crate::audit::facts::note_key(source.name(), source.classification());
    crate::audit::facts::note_subject(&format!("to key {}", destination.name()));
    let from = state.policy.authorize_key_use(
        caller,
        source,
        KeyUse::ReWrapFrom { version: header.key_version, purpose },
    )?;
    let to = state.policy.authorize_key_use(caller, destination, KeyUse::ReWrapTo { purpose })?;
    let (from, to) = (from.action(), to.action());
    crate::audit::facts::note_subject(&format!("to key {} version {}", to.key.name, to.version));
    if to.key.classification < from.key.classification {
        return Err(ApiError::Precondition(format!(
            "key {} is {}, below the blob's level {}: a re-wrap keeps or raises a classification, never lowers it",
            to.key.name, to.key.classification, from.key.classification
        )));
    }
    let blob = match item.blob {
        SourceBlob::DataKey(b) => rewrap_data_key(state, from, to, b, &item.digest).await?,
        SourceBlob::Ciphertext(c) => reencrypt(state, from, to, c, &item.digest).await?,
    };
    Ok(pb::ReWrapResponse {
        blob,
        key_id: to.key.id.to_hex(),
        key_version: to.version,
        source_key_id: from.key.id.to_hex(),
        source_key_version: from.version,
    })
}

async fn rewrap_data_key(
    state: &AppState,
    from: &KeyGrant,
    to: &KeyGrant,
    blob: WrappedKeyBlob,
    digest: &ContextDigest,
) -> Result<Vec<u8>, ApiError> {
    let header = WrappedKeyBlob::header_for(to.key.classification, to.key.id, to.version);
    let out = state
        .hsm
        .rewrap_data_key(ReWrapDataKey {
            source: UnwrapDataKey {
                kek: ObjectId::for_version(from.key.id, from.version),
                level: from.key.classification,
                wrapped: blob.wrapped,
                binding: BindingInput { header: blob.header.to_bytes().to_vec(), context_digest: digest.0 },
                mac: blob.mac,
            },
            destination_kek: ObjectId::for_version(to.key.id, to.version),
            destination_level: to.key.classification,
            destination_binding: BindingInput { header: header.to_bytes().to_vec(), context_digest: digest.0 },
        })
        .await?;
    if out.wrapped.len() != WRAPPED_KEY_LEN {
        // The header already declares a 40-byte wrapping; never hand out a blob that lies.
        return Err(ApiError::Internal("the HSM re-wrapped a data key to an unexpected length"));
    }
    Ok(WrappedKeyBlob { header, wrapped: out.wrapped, mac: out.mac }.to_bytes())
}

async fn reencrypt(
    state: &AppState,
    from: &KeyGrant,
    to: &KeyGrant,
    blob: CiphertextBlob,
    digest: &ContextDigest,
) -> Result<Vec<u8>, ApiError> {
    let payload_len = blob.ciphertext.len().saturating_sub(TAG_LEN);
    let header = CiphertextBlob::header_for(to.key.classification, to.key.id, to.version, payload_len)
        .ok_or_else(|| ApiError::invalid("blob", "too large"))?;
    let mut iv = [0u8; IV_LEN];
    getrandom::getrandom(&mut iv).map_err(|_| ApiError::Internal("system random generator failed"))?;
    let ciphertext = state
        .hsm
        .reencrypt(ReEncryptPayload {
            source: DecryptPayload {
                key: ObjectId::for_version(from.key.id, from.version),
                level: from.key.classification,
                iv: blob.iv,
                aad: blob::ciphertext_aad(&blob.header, &digest.0),
                ciphertext: blob.ciphertext,
            },
            destination_key: ObjectId::for_version(to.key.id, to.version),
            destination_level: to.key.classification,
            destination_iv: iv,
            destination_aad: blob::ciphertext_aad(&header, &digest.0),
        })
        .await?;
    Ok(CiphertextBlob { header, iv, ciphertext }.to_bytes())
}

/// One item's answer. Refusals and faults are logged like whole requests (see `service::finish`),
/// with the item's index; the message never carries the context or key bytes.
fn item_result(batch_id: &str, index: usize, outcome: Shared<pb::ReWrapResponse>) -> pb::ReWrapResult {
    match outcome {
        Ok(result) => pb::ReWrapResult { code: tonic::Code::Ok as i32, message: String::new(), result: Some(result) },
        Err(e) => {
            let status = e.to_status(batch_id);
            let rpc = "ReWrapBatch";
            if e.is_fault() {
                tracing::error!(rpc, request_id = batch_id, item = index, error = %e, "batch item failed");
            } else {
                let (outcome, reason) = (status.code(), status.message());
                tracing::info!(rpc, request_id = batch_id, item = index, outcome = ?outcome, reason, "batch item refused");
            }
            pb::ReWrapResult { code: status.code() as i32, message: status.message().to_owned(), result: None }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::Classification;

    #[test]
    fn both_blob_kinds_parse_and_name_their_purpose() {
        let key = KeyId([3; 16]);
        let dk = WrappedKeyBlob {
            header: WrappedKeyBlob::header_for(Classification::Personal, key, 2),
            wrapped: vec![1; blob::WRAPPED_KEY_LEN],
            mac: [2; blob::MAC_LEN],
        };
        let parsed = SourceBlob::parse(&dk.to_bytes()).unwrap();
        assert!(matches!(&parsed, SourceBlob::DataKey(b) if *b == dk));
        assert_eq!(parsed.purpose(), KeyPurpose::Envelope);
        let header = CiphertextBlob::header_for(Classification::Secret, key, 1, 3).unwrap();
        let ct = CiphertextBlob { header, iv: [4; IV_LEN], ciphertext: vec![5; 3 + TAG_LEN] };
        let parsed = SourceBlob::parse(&ct.to_bytes()).unwrap();
        assert!(matches!(&parsed, SourceBlob::Ciphertext(c) if *c == ct));
        assert_eq!(parsed.purpose(), KeyPurpose::HsmEncrypt);
        assert_eq!(parsed.header().key_version, 1);
        let mut bad = ct.to_bytes();
        bad[5] = 7;
        assert_eq!(SourceBlob::parse(&bad).err(), Some(BlobError::UnknownKind(7)));
    }

    #[test]
    fn items_are_validated_before_any_key_is_loaded() {
        let limits = Limits { max_payload_bytes: 4 };
        let header = CiphertextBlob::header_for(Classification::Secret, KeyId([3; 16]), 1, 5).unwrap();
        let ct = CiphertextBlob { header, iv: [0; IV_LEN], ciphertext: vec![0; 5 + TAG_LEN] };
        let req = |blob: Vec<u8>, dest: &str| pb::ReWrapRequest {
            blob,
            encryption_context: Default::default(),
            destination_key: dest.into(),
        };
        let err = ReWrapItem::parse(req(ct.to_bytes(), ""), limits).err().unwrap();
        assert_eq!(err.to_string(), "invalid blob: holds a 5-byte payload; the limit is 4 bytes");
        let ok = ReWrapItem::parse(req(ct.to_bytes(), "plans"), Limits { max_payload_bytes: 5 }).unwrap();
        assert_eq!(ok.destination.as_deref(), Some("plans"));
        let own = ReWrapItem::parse(req(ct.to_bytes(), ""), Limits { max_payload_bytes: 5 }).unwrap();
        assert!(own.destination.is_none());
        let short = ReWrapItem::parse(req(vec![0; 3], ""), limits);
        assert!(matches!(short, Err(ApiError::Blob(BlobError::TooShort { len: 3 }))));
    }
}
