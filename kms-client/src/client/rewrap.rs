//! `KmsClient`'s re-wrap calls (`DataKeys.ReWrap`, `ReWrapBatch`): move a wrapped data key or an
//! HSM ciphertext to the primary version of its key, or to another key, keeping its context.
//!
//! Blobs are not secret (the server unwraps and wraps again inside the HSM), so they travel as
//! plain `Vec<u8>`. A batch answers item by item: one bad blob fails its own item, not the batch.
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::data_keys_client::DataKeysClient;
use std::collections::BTreeMap;

use kms_proto::v1::{ReWrapBatchRequest, ReWrapRequest, ReWrapResponse, ReWrapResult};

use super::{to_wire_context, KmsClient};
use crate::error::{ClientError, ResponseProblem};

/// The most items one `ReWrapBatch` call may carry (the service's limit).
pub const MAX_REWRAP_BATCH: usize = 1000;

/// One blob to re-wrap.
#[derive(Debug, Clone, Copy)]
pub struct ReWrapItem<'a> {
    /// A wrapped data key (from `generate_data_key`) or an HSM ciphertext (from `encrypt`).
    pub blob: &'a [u8],
    /// The context the blob is bound to; the new blob is bound to the same one.
    pub context: &'a BTreeMap<String, String>,
    /// The key to re-wrap under (same level or higher); `None` for the blob's own key.
    pub destination_key: Option<&'a str>,
}

impl ReWrapItem<'_> {
    fn wire(&self) -> ReWrapRequest {
        ReWrapRequest {
            blob: self.blob.to_vec(),
            encryption_context: to_wire_context(self.context),
            destination_key: self.destination_key.unwrap_or_default().to_owned(),
        }
    }
}

impl KmsClient {
    /// Re-wraps one blob under the primary version of its key, or of `destination_key`.
    pub async fn re_wrap(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
        destination_key: Option<&str>,
    ) -> Result<ReWrapResponse, ClientError> {
        let item = ReWrapItem {
            blob,
            context,
            destination_key,
        };
        let response = self
            .call(Retry::Safe, |channel| {
            let request = self.request(item.wire().clone());
            async move { DataKeysClient::new(channel).re_wrap(request).await }
        })
            .await?;
        checked(response)
    }

    /// Re-wraps up to [`MAX_REWRAP_BATCH`] blobs in one call. The outer error is the call's
    /// (nothing was re-wrapped); otherwise there is one result per item, in order, each either the
    /// new blob or that item's own status.
    pub async fn re_wrap_batch(
        &self,
        items: &[ReWrapItem<'_>],
    ) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError> {
        if items.len() > MAX_REWRAP_BATCH {
            return Err(ClientError::BatchTooLarge {
                items: items.len(),
                max: MAX_REWRAP_BATCH,
            });
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let request = ReWrapBatchRequest {
            items: items.iter().map(ReWrapItem::wire).collect(),
        };
        let response = self
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { DataKeysClient::new(channel).re_wrap_batch(request).await }
        })
            .await?;
        batch_results(items.len(), response.results)
    }
}

/// One result per item, or the whole answer is refused: a shorter or longer list cannot be
/// matched to the items, and guessing would pair blobs with the wrong lines.
fn batch_results(
    sent: usize,
    results: Vec<ReWrapResult>,
) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError> {
    if results.len() != sent {
        return Err(ClientError::BadResponse(ResponseProblem::BatchLength {
            sent,
            received: results.len(),
        }));
    }
    Ok(results.into_iter().map(item_result).collect())
}

fn item_result(result: ReWrapResult) -> Result<ReWrapResponse, ClientError> {
    let code = tonic::Code::from_i32(result.code);
    if code != tonic::Code::Ok {
        return Err(tonic::Status::new(code, result.message).into());
    }
    let response =
        result
            .result
            .ok_or(ClientError::BadResponse(ResponseProblem::MissingField {
                field: "result",
            }))?;
    checked(response)
}

/// An empty blob would silently replace a good one in the caller's storage.
fn checked(response: ReWrapResponse) -> Result<ReWrapResponse, ClientError> {
    if response.blob.is_empty() {
        return Err(ClientError::BadResponse(ResponseProblem::MissingField {
            field: "blob",
        }));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(blob: &[u8]) -> ReWrapResult {
        ReWrapResult {
            code: 0,
            message: String::new(),
            result: Some(ReWrapResponse {
                blob: blob.to_vec(),
                key_version: 2,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn item_statuses_are_kept_per_item() {
        let failed = ReWrapResult {
            code: tonic::Code::InvalidArgument as i32,
            message: "invalid blob: bad magic".into(),
            result: None,
        };
        let results = batch_results(2, vec![ok(b"new"), failed]).unwrap();
        assert_eq!(results[0].as_ref().unwrap().blob, b"new");
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: invalid blob: bad magic");
    }

    #[test]
    fn a_result_list_of_the_wrong_length_is_refused() {
        let err = batch_results(3, vec![ok(b"a"), ok(b"b")]).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::BadResponse(ResponseProblem::BatchLength {
                    sent: 3,
                    received: 2
                })
            ),
            "{err}"
        );
    }

    #[test]
    fn a_success_without_a_blob_is_refused() {
        let empty = ReWrapResult {
            code: 0,
            message: String::new(),
            result: None,
        };
        let results = batch_results(2, vec![empty, ok(b"")]).unwrap();
        for r in results {
            assert!(
                matches!(
                    r,
                    Err(ClientError::BadResponse(
                        ResponseProblem::MissingField { .. }
                    ))
                ),
                "{r:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_batch_is_not_sent() {
        let channel =
            tonic::transport::Endpoint::from_static("https://kms.invalid:7443").connect_lazy();
        let client = KmsClient::from_channel(channel, "https://kms.invalid:7443");
        let context = BTreeMap::new();
        let items = vec![
            ReWrapItem {
                blob: b"x",
                context: &context,
                destination_key: None,
            };
            MAX_REWRAP_BATCH + 1
        ];
        let err = client.re_wrap_batch(&items).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::BatchTooLarge {
                    items: 1001,
                    max: 1000
                }
            ),
            "{err}"
        );
    }
}
