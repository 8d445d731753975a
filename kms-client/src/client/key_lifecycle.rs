//! `KmsClient`'s key lifecycle calls (`KeyAdmin` beyond create/get/list): rotate, schedule, enable,
//! disable, and schedule or cancel destruction, for a whole key or one version.
//!
//! A change that the key's level reserves for two officers comes back as
//! [`KeyChangeOutcome::AwaitingApproval`]: the server filed it as a request for a second officer
//! (see [`super::approvals`]) and changed nothing. Callers must look at the outcome, not assume the
//! change was made.
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::key_admin_client::KeyAdminClient;
use std::num::NonZeroU32;

use kms_proto::v1::{
    Approval, Key, KeyChangeResponse, KeyTarget, RotateKeyRequest, SetKeyStateRequest,
    SetKeyVersionStateRequest, SetRotationScheduleRequest,
};

use super::KmsClient;
use crate::error::{ClientError, ResponseProblem};

/// What a change that may need a second officer did.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChangeOutcome {
    /// The change was made; the key as it is now.
    Made(Key),
    /// The key's level needs a second officer for this change: it was filed as `approval` (state
    /// `PENDING`) and not made. `key` is the key as it still is.
    AwaitingApproval { key: Key, approval: Approval },
}

impl KeyChangeOutcome {
    /// The key after the change, or unchanged when the change awaits approval.
    pub fn key(&self) -> &Key {
        match self {
            KeyChangeOutcome::Made(key) | KeyChangeOutcome::AwaitingApproval { key, .. } => key,
        }
    }

    /// The request a second officer must approve, when the change was not made.
    pub fn pending_approval(&self) -> Option<&Approval> {
        match self {
            KeyChangeOutcome::Made(_) => None,
            KeyChangeOutcome::AwaitingApproval { approval, .. } => Some(approval),
        }
    }

    /// A `KeyChangeResponse` always carries the key; one without is refused.
    pub(crate) fn from_wire(response: KeyChangeResponse) -> Result<KeyChangeOutcome, ClientError> {
        let key = response
            .key
            .ok_or(ClientError::BadResponse(ResponseProblem::MissingField {
                field: "key",
            }))?;
        Ok(match response.pending_approval {
            None => KeyChangeOutcome::Made(key),
            Some(approval) => KeyChangeOutcome::AwaitingApproval { key, approval },
        })
    }
}

impl KmsClient {
    /// Makes a new primary version of `name` now; earlier versions keep decrypting. TOP_SECRET
    /// keys need a second officer.
    pub async fn rotate_key(&self, name: &str) -> Result<KeyChangeOutcome, ClientError> {
        let request = RotateKeyRequest {
            name: name.to_owned(),
        };
        let response = self
            .call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).rotate_key(request).await }
        })
            .await?;
        KeyChangeOutcome::from_wire(response)
    }

    /// Sets the rotation period of `name` to `days` (1-3650), or to the level's default with 0.
    pub async fn set_rotation_schedule(&self, name: &str, days: u32) -> Result<Key, ClientError> {
        let request = SetRotationScheduleRequest {
            name: name.to_owned(),
            rotation_period_days: days,
        };
        self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).set_rotation_schedule(request).await }
        })
        .await
    }

    /// Enables a DISABLED key. SENSITIVE_PERSONAL and above (whose disabling needs two officers)
    /// need a second officer.
    pub async fn enable_key(&self, name: &str) -> Result<KeyChangeOutcome, ClientError> {
        let request = SetKeyStateRequest {
            name: name.to_owned(),
        };
        let response = self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).enable_key(request).await }
        }).await?;
        KeyChangeOutcome::from_wire(response)
    }

    /// Disables a key: it does no cryptography until enabled again. SENSITIVE_PERSONAL and above
    /// need a second officer.
    pub async fn disable_key(&self, name: &str) -> Result<KeyChangeOutcome, ClientError> {
        let request = SetKeyStateRequest {
            name: name.to_owned(),
        };
        let response = self
            .call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).disable_key(request).await }
        })
            .await?;
        KeyChangeOutcome::from_wire(response)
    }

    /// Enables a DISABLED version of `name` (a second officer at SENSITIVE_PERSONAL and above).
    pub async fn enable_key_version(&self, name: &str, version: u32) -> Result<KeyChangeOutcome, ClientError> {
        let request = SetKeyVersionStateRequest {
            name: name.to_owned(),
            version,
        };
        let response = self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).enable_key_version(request).await }
        }).await?;
        KeyChangeOutcome::from_wire(response)
    }

    /// Disables one version of `name` (not the primary one): blobs made with it no longer decrypt.
    pub async fn disable_key_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<KeyChangeOutcome, ClientError> {
        let request = SetKeyVersionStateRequest {
            name: name.to_owned(),
            version,
        };
        let response = self
            .call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).disable_key_version(request).await }
        })
            .await?;
        KeyChangeOutcome::from_wire(response)
    }

    /// Schedules the destruction of the whole key `name` after the deployment's waiting period
    /// (the answer's `destroy_at_unix` says when). Until then it does no cryptography and
    /// [`KmsClient::cancel_key_destruction`] takes it back to DISABLED.
    pub async fn schedule_key_destruction(
        &self,
        name: &str,
    ) -> Result<KeyChangeOutcome, ClientError> {
        self.schedule_destruction(target(name, None)).await
    }

    /// Schedules the destruction of one non-primary version. The version is `NonZeroU32` because
    /// version 0 on the wire means the whole key: a zero slipping through must not widen the
    /// destruction.
    pub async fn schedule_version_destruction(
        &self,
        name: &str,
        version: NonZeroU32,
    ) -> Result<KeyChangeOutcome, ClientError> {
        self.schedule_destruction(target(name, Some(version))).await
    }

    /// Takes a key whose destruction is pending back to DISABLED.
    pub async fn cancel_key_destruction(&self, name: &str) -> Result<Key, ClientError> {
        self.cancel_destruction(target(name, None)).await
    }

    /// Takes a version whose destruction is pending back to DISABLED.
    pub async fn cancel_version_destruction(
        &self,
        name: &str,
        version: NonZeroU32,
    ) -> Result<Key, ClientError> {
        self.cancel_destruction(target(name, Some(version))).await
    }

    async fn schedule_destruction(
        &self,
        target: KeyTarget,
    ) -> Result<KeyChangeOutcome, ClientError> {
        let response = self
            .call(Retry::Never, |channel| {
            let request = self.request(target.clone());
            async move { KeyAdminClient::new(channel).schedule_key_destruction(request).await }
        })
            .await?;
        KeyChangeOutcome::from_wire(response)
    }

    async fn cancel_destruction(&self, target: KeyTarget) -> Result<Key, ClientError> {
        self.call(Retry::Never, |channel| {
            let request = self.request(target.clone());
            async move { KeyAdminClient::new(channel).cancel_key_destruction(request).await }
        })
        .await
    }
}

/// The wire's `KeyTarget`: version 0 is the whole key.
fn target(name: &str, version: Option<NonZeroU32>) -> KeyTarget {
    KeyTarget {
        name: name.to_owned(),
        version: version.map_or(0, NonZeroU32::get),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_proto::v1::ApprovalState;

    #[test]
    fn a_change_without_a_pending_approval_was_made() {
        let key = Key {
            name: "citizens".into(),
            ..Default::default()
        };
        let outcome = KeyChangeOutcome::from_wire(KeyChangeResponse {
            key: Some(key.clone()),
            pending_approval: None,
        })
        .unwrap();
        assert_eq!(outcome, KeyChangeOutcome::Made(key.clone()));
        assert!(outcome.pending_approval().is_none());

        let approval = Approval {
            id: "ab".into(),
            state: ApprovalState::Pending.into(),
            ..Default::default()
        };
        let outcome = KeyChangeOutcome::from_wire(KeyChangeResponse {
            key: Some(key.clone()),
            pending_approval: Some(approval.clone()),
        })
        .unwrap();
        assert_eq!(outcome.pending_approval(), Some(&approval));
        assert_eq!(outcome.key(), &key);
    }

    #[test]
    fn an_answer_without_the_key_is_refused() {
        let err = KeyChangeOutcome::from_wire(KeyChangeResponse::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::BadResponse(ResponseProblem::MissingField { field: "key" })
            ),
            "{err}"
        );
    }

    #[test]
    fn the_whole_key_is_version_zero_on_the_wire_and_a_version_never_is() {
        assert_eq!(target("k", None).version, 0);
        assert_eq!(target("k", NonZeroU32::new(3)).version, 3);
    }
}
