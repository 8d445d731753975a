//! Authorisation: the one place that decides whether a caller may do something.
//!
//! A handler can act on a key only while holding an [`Authorized`] value, and only the methods of
//! [`Policy`] can make one (its fields are private to this module). The rules come from the level table's
//! level table: a caller needs a role for the RPC family, a system security level at least the key
//! level's minimum, a clearance at least the key's level; the key's level must be approved for the
//! token and, for TOP_SECRET, the deployment must declare an isolated network; and a data key leaves
//! the service only as its level allows. Refusals name the rule, never a secret.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::classification::{Classification, DataKeyRelease, LevelRules};
use crate::config::Role;
use crate::ids::KeyPurpose;
use crate::identity::PeerIdentity;
use crate::store::{CallerRecord, KeyRecord, KeyState};

/// A caller's registration (`CallerRecord`, as the store holds it and `KeyAuth` authenticates it)
/// is what the policy judges by.
impl CallerRecord {
    /// Whether `key` is in the caller's allowed keys: exact names, or prefixes ending in `*`; `*`
    /// allows every key; an empty list allows none.
    pub fn allows_key(&self, key: &str) -> bool {
        self.allowed_keys.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => p == key,
        })
    }
}

/// An authenticated caller: a registered profile and the certificate it presented.
#[derive(Clone, Debug)]
pub struct Caller {
    profile: Arc<CallerRecord>,
    fingerprint: [u8; 32],
}

impl Caller {
    pub fn identity(&self) -> &str {
        &self.profile.identity
    }

    pub fn profile(&self) -> &CallerRecord {
        &self.profile
    }

    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }
}

/// Why a request was refused. Maps to UNAUTHENTICATED, PERMISSION_DENIED or FAILED_PRECONDITION.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    #[error("caller {identity} is not registered")]
    UnknownCaller { identity: String },
    #[error("caller {identity} was revoked")]
    CallerRevoked { identity: String },
    #[error("caller {identity} may not use key {key}: it is not among the caller's allowed keys")]
    KeyNotAllowed { identity: String, key: String },
    #[error("caller {identity} lacks the {needed} role")]
    MissingRole { identity: String, needed: &'static str },
    #[error("caller {identity} has system security level {has}; {level} keys need level {needs} or higher")]
    SystemLevelTooLow { identity: String, has: u8, needs: u8, level: Classification },
    #[error("caller {identity} is cleared up to {clearance}; the key is {level}")]
    ClearanceTooLow { identity: String, clearance: Classification, level: Classification },
    #[error("token {token} is approved up to {approved}; {level} keys may not be used on it")]
    TokenNotApproved { token: String, approved: Classification, level: Classification },
    #[error("TOP_SECRET keys are refused: the deployment does not declare an isolated network")]
    TopSecretNeedsIsolatedNetwork,
    #[error("{level} data keys never leave the HSM: encrypt state-secret data with HsmCrypto.Encrypt")]
    DataKeyNeverReleased { level: Classification },
    #[error("{level} data keys are only released sealed to a registered recipient key of the caller (WRAPPED_TO_RECIPIENT, or DecryptDataKey with sealed)")]
    DataKeyOnlySealed { level: Classification },
    #[error("key {key} has purpose {purpose}; this operation needs purpose {needed}")]
    WrongPurpose { key: String, purpose: KeyPurpose, needed: KeyPurpose },
    #[error("key {key} is {state}; only ENABLED keys may be used")]
    KeyNotEnabled { key: String, state: &'static str },
    #[error("key {key} version {version} is {state}; only ENABLED versions may be used")]
    VersionNotEnabled { key: String, version: u32, state: &'static str },
    #[error("key {key} has no version {version}")]
    NoSuchVersion { key: String, version: u32 },
    #[error("{level} keys may not have purpose ENVELOPE: state-secret data keys never leave the HSM")]
    EnvelopeNotAllowed { level: Classification },
    #[error("officer {identity} filed this request and cannot decide it; a different officer must approve or reject it")]
    OwnRequest { identity: String },
    #[error("caller {identity} cannot change its own registration; another officer must")]
    OwnRegistration { identity: String },
    #[error("officer {identity} may not {action} caller {subject}: {why}")]
    OutsideScope { identity: String, action: &'static str, subject: String, why: String },
    #[error("the request was filed by {identity}, who is no longer an active officer; it can only be rejected")]
    RequesterGone { identity: String },
    #[error("recipient key {fingerprint} is not registered for caller {identity}: data keys are sealed only to keys an officer registered")]
    RecipientNotRegistered { identity: String, fingerprint: String },
    #[error("caller {identity} has no registered recipient key: an officer registers one (`kmsctl caller recipient-key add`)")]
    NoRecipientKey { identity: String },
    #[error("caller {identity} has {count} registered recipient keys: name one by its fingerprint (recipient_key_fingerprint)")]
    RecipientAmbiguous { identity: String, count: usize },
}

/// The gRPC class of a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedClass {
    Unauthenticated,
    PermissionDenied,
    FailedPrecondition,
}

impl Denied {
    pub fn class(&self) -> DeniedClass {
        match self {
            Denied::UnknownCaller { .. } | Denied::CallerRevoked { .. } => DeniedClass::Unauthenticated,
            Denied::KeyNotAllowed { .. }
            | Denied::MissingRole { .. }
            | Denied::SystemLevelTooLow { .. }
            | Denied::ClearanceTooLow { .. }
            | Denied::OwnRequest { .. }
            | Denied::OwnRegistration { .. }
            | Denied::OutsideScope { .. } => DeniedClass::PermissionDenied,
            Denied::RecipientNotRegistered { .. } => DeniedClass::PermissionDenied,
            Denied::RequesterGone { .. } | Denied::NoRecipientKey { .. } | Denied::RecipientAmbiguous { .. } => {
                DeniedClass::FailedPrecondition
            }
            Denied::TokenNotApproved { .. }
            | Denied::TopSecretNeedsIsolatedNetwork
            | Denied::DataKeyNeverReleased { .. }
            | Denied::DataKeyOnlySealed { .. }
            | Denied::WrongPurpose { .. }
            | Denied::KeyNotEnabled { .. }
            | Denied::VersionNotEnabled { .. }
            | Denied::NoSuchVersion { .. }
            | Denied::EnvelopeNotAllowed { .. } => DeniedClass::FailedPrecondition,
        }
    }
}

/// What an exchange service wants to do with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// Generate a data key; `release` says how its plaintext leaves (None: wrapped only).
    GenerateDataKey { release: Option<Release> },
    /// Unwrap a data key of `version`.
    DecryptDataKey { version: u32, release: Release },
    /// Encrypt a payload inside the HSM.
    Encrypt,
    /// Decrypt a payload of `version` inside the HSM.
    Decrypt { version: u32 },
    /// Re-wrap a blob made under `version`: the caller may decrypt under it, but nothing is released
    /// (the data key or payload goes straight into a new blob). `purpose` is what the blob's kind
    /// needs: ENVELOPE for a wrapped data key, HSM_ENCRYPT for an HSM ciphertext.
    ReWrapFrom { version: u32, purpose: KeyPurpose },
    /// Re-wrap a blob under this key's primary version (as for generating or encrypting).
    ReWrapTo { purpose: KeyPurpose },
}

/// How a plaintext data key leaves the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Plaintext,
    SealedToRecipient,
}

/// What an officer wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAction {
    CreateKey { level: Classification, purpose: KeyPurpose },
    /// Read key metadata and approval requests.
    ReadKeys,
}

/// Registering, updating, listing and revoking callers. A caller row can only be sealed (and so
/// only be accepted on load) with one of these in hand: see `KeyAuth::seal_caller`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerAdmin;

/// What an auditor wants to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditRead {
    Records,
    Checkpoints,
    /// Where the trail stood at its newest commit (the anchor kept outside the audit file).
    Anchor,
}

/// A lifecycle change to an existing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    Rotate,
    SetSchedule,
    Enable,
    Disable,
    EnableVersion,
    DisableVersion,
    /// Schedule the destruction of the key.
    Destroy,
    /// Schedule the destruction of one version.
    DestroyVersion,
    CancelDestroy,
}

impl KeyChange {
    /// For messages: "rotating", "disabling", ...
    pub fn gerund(self) -> &'static str {
        match self {
            KeyChange::Rotate => "rotating",
            KeyChange::SetSchedule => "changing the rotation schedule of",
            KeyChange::Enable | KeyChange::EnableVersion => "enabling",
            KeyChange::Disable | KeyChange::DisableVersion => "disabling",
            KeyChange::Destroy | KeyChange::DestroyVersion => "destroying",
            KeyChange::CancelDestroy => "cancelling the destruction of",
        }
    }
}

/// Whether a change may be made now or must wait for a second officer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approval {
    /// The level's rules let one officer make this change.
    NotNeeded,
    /// The level's rules (the level table, "two officers") require a second, different officer: the handler
    /// must file an approval request instead of making the change.
    SecondOfficerRequired,
    /// A second officer, different from the requester, approved the change.
    Approved,
}

/// A lifecycle change that passed the role, level, clearance and allowed-key checks, with the key
/// as it was when authorised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeGrant {
    pub level: Classification,
    pub change: KeyChange,
    pub approval: Approval,
    pub key: KeyRecord,
}

impl ChangeGrant {
    /// The authorised key read afresh (under the lifecycle lock, say): the same key, by id.
    pub fn fresh(&self, loaded: LoadedKey) -> Option<KeyRecord> {
        (loaded.0.id == self.key.id).then_some(loaded.0)
    }
}

/// A key row read from the store and authenticated by the HSM, that no caller has been authorised
/// to act on yet. Only [`Policy`] (and the grants it makes) open it, so a handler that skips
/// authorisation has no [`KeyRecord`] (no id, versions or objects) to hand to the HSM: forgetting
/// the check does not compile.
#[derive(Clone, Debug)]
pub struct LoadedKey(KeyRecord);

impl LoadedKey {
    pub fn new(record: KeyRecord) -> LoadedKey {
        LoadedKey(record)
    }

    /// The key's name, for messages.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The key's level, for checks made before authorisation (a blob's level against its key's).
    pub fn classification(&self) -> Classification {
        self.0.classification
    }

    /// For the server's own lifecycle task, which acts for no caller (its changes are audited under
    /// the schedule's identity). A request handler must never call it.
    pub fn danger_open_for_server_task(self) -> KeyRecord {
        self.0
    }
}

/// Proof that `caller` may perform `action`. Only [`Policy`] makes these.
#[derive(Debug)]
pub struct Authorized<A> {
    caller: Caller,
    action: A,
}

impl<A> Authorized<A> {
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Whether the authorised caller may see or use `key` (to filter listings).
    pub fn allows_key(&self, key: &str) -> bool {
        self.caller.profile.allows_key(key)
    }

    pub fn action(&self) -> &A {
        &self.action
    }
}

impl Authorized<AdminAction> {
    /// Opens a key for an officer allowed to read keys, if it is among the officer's allowed keys
    /// and within its clearance.
    pub fn reveal(&self, key: LoadedKey) -> Result<KeyRecord, Denied> {
        check_key_allowed(&self.caller, &key.0.name)?;
        let p = self.caller.profile();
        if key.0.classification > p.clearance {
            return Err(Denied::ClearanceTooLow { identity: p.identity.clone(), clearance: p.clearance, level: key.0.classification });
        }
        Ok(key.0)
    }

    /// The keys among `keys` the officer may see: among its allowed keys, within its clearance.
    pub fn visible(&self, keys: Vec<LoadedKey>) -> Vec<KeyRecord> {
        let clearance = self.caller.profile().clearance;
        keys.into_iter().filter(|k| self.allows_key(&k.0.name) && k.0.classification <= clearance).map(|k| k.0).collect()
    }
}

impl Authorized<CallerAdmin> {
    /// Whether the officer may manage `subject` (see it, change it, revoke it): not itself, and
    /// the registration must lie within the officer's own clearance, system level and allowed keys.
    /// Checked for a registration as it is and as it would become.
    pub fn check_scope(&self, action: &'static str, subject: &CallerRecord) -> Result<(), Denied> {
        let officer = self.caller.profile();
        if subject.identity == officer.identity {
            return Err(Denied::OwnRegistration { identity: officer.identity.clone() });
        }
        match outside_scope(officer, subject) {
            None => Ok(()),
            Some(why) => Err(Denied::OutsideScope {
                identity: officer.identity.clone(),
                action,
                subject: crate::bounded::owned(&subject.identity, crate::bounded::NAME),
                why,
            }),
        }
    }

    /// Whether the officer could see `subject` in a listing.
    pub fn sees(&self, subject: &CallerRecord) -> bool {
        outside_scope(self.caller.profile(), subject).is_none()
    }
}

/// Why `subject` lies outside what `officer` holds, if it does.
fn outside_scope(officer: &CallerRecord, subject: &CallerRecord) -> Option<String> {
    if subject.clearance > officer.clearance {
        return Some(format!("its clearance {} is above the officer's {}", subject.clearance, officer.clearance));
    }
    if subject.system_level > officer.system_level {
        return Some(format!("its system level {} is above the officer's {}", subject.system_level, officer.system_level));
    }
    if let Some(p) = subject.allowed_keys.iter().find(|p| !pattern_within(p, &officer.allowed_keys)) {
        return Some(format!("its allowed keys include {p:?}, which the officer's do not cover"));
    }
    None
}

/// Whether every key `pattern` allows is allowed by one of `outer` (exact names, `prefix*`, `*`).
pub fn pattern_within(pattern: &str, outer: &[String]) -> bool {
    outer.iter().any(|q| match (pattern.strip_suffix('*'), q.strip_suffix('*')) {
        (_, Some("")) => true,
        (Some(pp), Some(qp)) => pp.starts_with(qp),
        (None, Some(qp)) => pattern.starts_with(qp),
        (None, None) => pattern == q,
        (Some(_), None) => false,
    })
}

/// The role sets an identity may hold (separation of duties): officer alone; auditor alone or with
/// exchange; exchange alone. An officer who could also use keys could create a key and read the
/// data under it; an officer who could also audit would check its own work.
pub fn check_roles(roles: &[Role]) -> Result<(), &'static str> {
    let officer = roles.contains(&Role::Officer);
    if officer && roles.len() > 1 {
        return Err("an officer holds no other role: officer and auditor, and officer and exchange, are separate duties");
    }
    Ok(())
}

impl Authorized<KeyGrant> {
    /// The caller's registered recipient key that a data key may be sealed to: the one with this
    /// fingerprint, or the only one when `fingerprint` is `None`. A key the caller sent itself is
    /// never sealed to.
    pub fn recipient(&self, fingerprint: Option<[u8; 32]>) -> Result<crate::store::RecipientKeyRecord, Denied> {
        let p = self.caller.profile();
        let keys = &p.recipient_keys;
        match fingerprint {
            Some(f) => keys.iter().find(|k| k.fingerprint() == f).cloned().ok_or_else(|| Denied::RecipientNotRegistered {
                identity: p.identity.clone(),
                fingerprint: crate::ids::hex(&f),
            }),
            None => match keys.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(Denied::NoRecipientKey { identity: p.identity.clone() }),
                more => Err(Denied::RecipientAmbiguous { identity: p.identity.clone(), count: more.len() }),
            },
        }
    }
}

/// A key use that passed every check, with the key version it resolved to.
#[derive(Debug)]
pub struct KeyGrant {
    pub key: KeyRecord,
    pub version: u32,
    pub key_use: KeyUse,
}

/// The policy: registered callers and the level rules of this deployment.
#[derive(Debug)]
pub struct Policy {
    /// The registered callers, as authenticated from the store; replaced entry by entry when an
    /// officer registers, updates or revokes one.
    callers: RwLock<HashMap<String, Arc<CallerRecord>>>,
    rules: LevelRules,
    isolated_network: bool,
    token_label: String,
    approved_up_to: Classification,
}

impl Policy {
    pub fn new(
        callers: Vec<CallerRecord>,
        rules: LevelRules,
        isolated_network: bool,
        token_label: String,
        approved_up_to: Classification,
    ) -> Policy {
        let callers = RwLock::new(callers.into_iter().map(|c| (c.identity.clone(), Arc::new(c))).collect());
        Policy { callers, rules, isolated_network, token_label, approved_up_to }
    }

    /// Replaces the whole registry with `callers` (as authenticated from the store).
    pub fn replace_callers(&self, callers: Vec<CallerRecord>) {
        let fresh = callers.into_iter().map(|c| (c.identity.clone(), Arc::new(c))).collect();
        *self.callers.write().unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// Installs a caller's registration as it now is in the store (new, updated or revoked).
    pub fn set_caller(&self, profile: CallerRecord) {
        let mut callers = self.callers.write().unwrap_or_else(PoisonError::into_inner);
        callers.insert(profile.identity.clone(), Arc::new(profile));
    }

    pub fn rules(&self) -> &LevelRules {
        &self.rules
    }

    pub fn isolated_network(&self) -> bool {
        self.isolated_network
    }

    pub fn approved_up_to(&self) -> Classification {
        self.approved_up_to
    }

    /// The registration of `identity` as the policy holds it now, active or not.
    pub fn registration(&self, identity: &str) -> Option<Arc<CallerRecord>> {
        self.callers.read().unwrap_or_else(PoisonError::into_inner).get(identity).cloned()
    }

    /// Whether `identity` is a registered, active officer now (a request's filer is checked again
    /// when the request is decided).
    pub fn is_active_officer(&self, identity: &str) -> bool {
        self.registration(identity).is_some_and(|c| c.active && c.roles.contains(&Role::Officer))
    }

    /// Turns a verified certificate identity into a registered caller.
    pub fn authenticate(&self, peer: &PeerIdentity) -> Result<Caller, Denied> {
        let profile = self
            .callers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer.uri)
            .cloned()
            .ok_or_else(|| Denied::UnknownCaller { identity: peer.uri.clone() })?;
        if !profile.active {
            return Err(Denied::CallerRevoked { identity: peer.uri.clone() });
        }
        Ok(Caller { profile, fingerprint: peer.fingerprint })
    }

    /// Officer actions: create keys, read key metadata. `key` is the key the action
    /// names, if any: it must be among the caller's allowed keys.
    pub fn authorize_admin(
        &self,
        caller: &Caller,
        action: AdminAction,
        key: Option<&str>,
    ) -> Result<Authorized<AdminAction>, Denied> {
        require_role(caller, Role::Officer)?;
        if let Some(key) = key {
            check_key_allowed(caller, key)?;
        }
        match action {
            AdminAction::CreateKey { level, purpose } => {
                self.check_level(caller, level)?;
                if purpose == KeyPurpose::Envelope && level.data_key_release() == DataKeyRelease::Never {
                    return Err(Denied::EnvelopeNotAllowed { level });
                }
            }
            AdminAction::ReadKeys => {}
        }
        Ok(Authorized { caller: caller.clone(), action })
    }

    /// Managing callers: the officer role.
    pub fn authorize_caller_admin(&self, caller: &Caller) -> Result<Authorized<CallerAdmin>, Denied> {
        require_role(caller, Role::Officer)?;
        Ok(Authorized { caller: caller.clone(), action: CallerAdmin })
    }

    /// Reading the server's health (the HSM's state, errors and pools): officers and auditors.
    pub fn authorize_health_read(&self, caller: &Caller) -> Result<(), Denied> {
        let roles = &caller.profile().roles;
        if roles.contains(&Role::Officer) || roles.contains(&Role::Auditor) {
            Ok(())
        } else {
            Err(Denied::MissingRole { identity: caller.identity().to_owned(), needed: "officer or auditor" })
        }
    }

    /// Reading the audit trail: the auditor role, and nothing else is needed (or granted by it).
    pub fn authorize_audit_read(&self, caller: &Caller, what: AuditRead) -> Result<Authorized<AuditRead>, Denied> {
        require_role(caller, Role::Auditor)?;
        Ok(Authorized { caller: caller.clone(), action: what })
    }

    /// An officer's lifecycle change to a key of `level`: role, caller level and clearance, and
    /// whether the level's rules require a second officer (the grant says; the handler must obey).
    pub fn authorize_key_change(
        &self,
        caller: &Caller,
        key: LoadedKey,
        change: KeyChange,
    ) -> Result<Authorized<ChangeGrant>, Denied> {
        let key = key.0;
        require_role(caller, Role::Officer)?;
        check_key_allowed(caller, &key.name)?;
        let level = key.classification;
        self.check_level(caller, level)?;
        let approval =
            if self.needs_second_officer(level, change) { Approval::SecondOfficerRequired } else { Approval::NotNeeded };
        Ok(Authorized { caller: caller.clone(), action: ChangeGrant { level, change, approval, key } })
    }

    /// A second officer's approval (or rejection) of a change that `requested_by` filed: the
    /// approver needs the officer role, the level and clearance for the key, and must not be the
    /// requester.
    pub fn authorize_decision(
        &self,
        approver: &Caller,
        key: LoadedKey,
        change: KeyChange,
        requested_by: &str,
    ) -> Result<Authorized<ChangeGrant>, Denied> {
        let key = key.0;
        require_role(approver, Role::Officer)?;
        check_key_allowed(approver, &key.name)?;
        let level = key.classification;
        if approver.identity() == requested_by {
            return Err(Denied::OwnRequest { identity: requested_by.to_owned() });
        }
        self.check_level(approver, level)?;
        Ok(Authorized { caller: approver.clone(), action: ChangeGrant { level, change, approval: Approval::Approved, key } })
    }

    /// the level table's "two officers for destroy / disable" column, and "and for rotation" at TOP_SECRET.
    pub fn needs_second_officer(&self, level: Classification, change: KeyChange) -> bool {
        let rule = self.rules.get(level);
        match change {
            KeyChange::Disable | KeyChange::DisableVersion | KeyChange::Destroy | KeyChange::DestroyVersion => {
                rule.two_officer_destroy
            }
            KeyChange::Rotate => rule.two_officer_rotate,
            // Undoing a disabling that needed two officers needs two as well; otherwise one officer
            // could re-enable at once what two had agreed to stop.
            KeyChange::Enable | KeyChange::EnableVersion => rule.two_officer_destroy,
            KeyChange::SetSchedule | KeyChange::CancelDestroy => false,
        }
    }

    /// Exchange-service use of a key. Resolves the version (the primary for new data) and checks
    /// every rule, in order: role, caller level and clearance, token approval and network, release
    /// rule, purpose, key and version state.
    pub fn authorize_key_use(
        &self,
        caller: &Caller,
        key: LoadedKey,
        key_use: KeyUse,
    ) -> Result<Authorized<KeyGrant>, Denied> {
        let key = key.0;
        require_role(caller, Role::Exchange)?;
        check_key_allowed(caller, &key.name)?;
        let level = key.classification;
        self.check_level(caller, level)?;
        let needed = match key_use {
            KeyUse::GenerateDataKey { release } => {
                check_release(level, release, true)?;
                KeyPurpose::Envelope
            }
            KeyUse::DecryptDataKey { release, .. } => {
                check_release(level, Some(release), false)?;
                KeyPurpose::Envelope
            }
            KeyUse::Encrypt | KeyUse::Decrypt { .. } => KeyPurpose::HsmEncrypt,
            KeyUse::ReWrapFrom { purpose, .. } | KeyUse::ReWrapTo { purpose } => {
                // Nothing is released, but data keys of a "never" level must not exist at all.
                if purpose == KeyPurpose::Envelope {
                    check_release(level, None, true)?;
                }
                purpose
            }
        };
        if key.purpose != needed {
            return Err(Denied::WrongPurpose { key: key.name.clone(), purpose: key.purpose, needed });
        }
        if key.state != KeyState::Enabled {
            return Err(Denied::KeyNotEnabled { key: key.name.clone(), state: key.state.as_str() });
        }
        let version = match key_use {
            KeyUse::GenerateDataKey { .. } | KeyUse::Encrypt | KeyUse::ReWrapTo { .. } => key.primary_version,
            KeyUse::DecryptDataKey { version, .. }
            | KeyUse::Decrypt { version }
            | KeyUse::ReWrapFrom { version, .. } => version,
        };
        // The audit record names the version the request resolved to, refused or not.
        crate::audit::facts::note_version(version);
        let v = key
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| Denied::NoSuchVersion { key: key.name.clone(), version })?;
        if v.state != KeyState::Enabled {
            return Err(Denied::VersionNotEnabled {
                key: key.name.clone(),
                version,
                state: v.state.as_str(),
            });
        }
        Ok(Authorized { caller: caller.clone(), action: KeyGrant { key, version, key_use } })
    }

    /// The checks every use of a level shares: caller level, clearance, token approval, network.
    fn check_level(&self, caller: &Caller, level: Classification) -> Result<(), Denied> {
        let p = caller.profile();
        let needs = self.rules.get(level).min_system_level;
        if p.system_level < needs {
            return Err(Denied::SystemLevelTooLow {
                identity: p.identity.clone(),
                has: p.system_level,
                needs,
                level,
            });
        }
        if p.clearance < level {
            return Err(Denied::ClearanceTooLow { identity: p.identity.clone(), clearance: p.clearance, level });
        }
        if level == Classification::TopSecret && !self.isolated_network {
            return Err(Denied::TopSecretNeedsIsolatedNetwork);
        }
        if level > self.approved_up_to {
            return Err(Denied::TokenNotApproved {
                token: self.token_label.clone(),
                approved: self.approved_up_to,
                level,
            });
        }
        Ok(())
    }
}

fn check_key_allowed(caller: &Caller, key: &str) -> Result<(), Denied> {
    if caller.profile().allows_key(key) {
        Ok(())
    } else {
        Err(Denied::KeyNotAllowed { identity: caller.identity().to_owned(), key: key.to_owned() })
    }
}

fn require_role(caller: &Caller, role: Role) -> Result<(), Denied> {
    if caller.profile().roles.contains(&role) {
        Ok(())
    } else {
        Err(Denied::MissingRole { identity: caller.identity().to_owned(), needed: role.as_str() })
    }
}

/// The level table's release rule. `generating` allows a wrapped-only data key below the
/// state-secret levels.
fn check_release(level: Classification, release: Option<Release>, generating: bool) -> Result<(), Denied> {
    match (level.data_key_release(), release) {
        (DataKeyRelease::Never, _) => Err(Denied::DataKeyNeverReleased { level }),
        (DataKeyRelease::Plaintext, _) => Ok(()),
        (DataKeyRelease::SealedToRecipientOnly, Some(Release::SealedToRecipient)) => Ok(()),
        (DataKeyRelease::SealedToRecipientOnly, None) if generating => Ok(()),
        (DataKeyRelease::SealedToRecipientOnly, _) => Err(Denied::DataKeyOnlySealed { level }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{KeyId, ObjectId};
    use crate::store::VersionRecord;

    fn policy(approved: Classification, isolated: bool) -> Policy {
        let caller = |id: &str, lvl, clr, roles: Vec<Role>| CallerRecord {
            identity: id.into(),
            agency: "test".into(),
            name: id.into(),
            system_level: lvl,
            clearance: clr,
            roles,
            allowed_keys: vec!["*".into()],
            active: true,
            created_at: 0,
            updated_at: 0,
            revision: 1,
            recipient_keys: vec![],
        };
        Policy::new(
            vec![
                caller("urn:officer", 5, Classification::TopSecret, vec![Role::Officer]),
                caller("urn:x5", 5, Classification::TopSecret, vec![Role::Exchange]),
                caller("urn:x2", 2, Classification::TopSecret, vec![Role::Exchange]),
                caller("urn:x5-personal", 5, Classification::Personal, vec![Role::Exchange]),
            ],
            LevelRules::default(),
            isolated,
            "tok".into(),
            approved,
        )
    }

    fn caller(p: &Policy, id: &str) -> Caller {
        p.authenticate(&PeerIdentity { uri: id.into(), fingerprint: [0; 32] }).unwrap()
    }

    fn key(level: Classification, purpose: KeyPurpose) -> KeyRecord {
        let id = KeyId([1; 16]);
        KeyRecord {
            id,
            name: "k".into(),
            classification: level,
            purpose,
            state: KeyState::Enabled,
            primary_version: 1,
            rotation_period_days: 0,
            created_at: 0,
            rotated_at: 0,
            destroy_at: None,
            revision: 1,
            versions: vec![VersionRecord {
                version: 1,
                object_id: ObjectId::for_version(id, 1),
                state: KeyState::Enabled,
                created_at: 0,
                destroy_at: None,
            }],
        }
    }

    fn gen(release: Option<Release>) -> KeyUse {
        KeyUse::GenerateDataKey { release }
    }

    #[test]
    fn allowed_keys_are_exact_names_prefixes_or_everything() {
        let mut profile = p_profile(vec!["tax/*".into(), "citizens".into()]);
        assert!(profile.allows_key("tax/returns") && profile.allows_key("tax/") && profile.allows_key("citizens"));
        assert!(!profile.allows_key("citizens2") && !profile.allows_key("ta") && !profile.allows_key("health/tax/x"));
        profile.allowed_keys = vec![];
        assert!(!profile.allows_key("citizens"), "an empty list allows nothing");
        profile.allowed_keys = vec!["*".into()];
        assert!(profile.allows_key("anything/at/all"));
    }

    fn p_profile(allowed_keys: Vec<String>) -> CallerRecord {
        CallerRecord {
            identity: "urn:limited".into(),
            agency: "a".into(),
            name: "n".into(),
            system_level: 5,
            clearance: Classification::Secret,
            roles: vec![Role::Exchange, Role::Officer],
            allowed_keys,
            active: true,
            created_at: 0,
            updated_at: 0,
            revision: 1,
            recipient_keys: vec![],
        }
    }

    #[test]
    fn keys_outside_the_allow_list_and_revoked_callers_are_refused() {
        let p = policy(Classification::Secret, false);
        p.set_caller(p_profile(vec!["tax/*".into()]));
        let c = caller(&p, "urn:limited");
        let mut k = key(Classification::Personal, KeyPurpose::Envelope);
        k.name = "citizens".into();
        let denied = p.authorize_key_use(&c, LoadedKey(k.clone()), gen(Some(Release::Plaintext))).unwrap_err();
        assert_eq!(denied, Denied::KeyNotAllowed { identity: "urn:limited".into(), key: "citizens".into() });
        assert_eq!(denied.class(), DeniedClass::PermissionDenied);
        assert!(matches!(p.authorize_key_change(&c, LoadedKey(k.clone()), KeyChange::Rotate), Err(Denied::KeyNotAllowed { .. })));
        assert!(matches!(
            p.authorize_admin(&c, AdminAction::CreateKey { level: Classification::Personal, purpose: KeyPurpose::Envelope }, Some("citizens")),
            Err(Denied::KeyNotAllowed { .. })
        ));
        k.name = "tax/returns".into();
        assert!(p.authorize_key_use(&c, LoadedKey(k.clone()), gen(Some(Release::Plaintext))).is_ok());
        let grant = p.authorize_admin(&c, AdminAction::ReadKeys, None).unwrap();
        assert!(grant.allows_key("tax/x") && !grant.allows_key("citizens"));

        let mut revoked = p_profile(vec!["*".into()]);
        revoked.active = false;
        p.set_caller(revoked);
        let err = p.authenticate(&PeerIdentity { uri: "urn:limited".into(), fingerprint: [0; 32] }).unwrap_err();
        assert_eq!(err, Denied::CallerRevoked { identity: "urn:limited".into() });
        assert_eq!(err.class(), DeniedClass::Unauthenticated);
    }

    #[test]
    fn unknown_callers_are_unauthenticated() {
        let p = policy(Classification::Secret, false);
        let err = p.authenticate(&PeerIdentity { uri: "urn:nobody".into(), fingerprint: [0; 32] }).unwrap_err();
        assert_eq!(err.class(), DeniedClass::Unauthenticated);
    }

    #[test]
    fn roles_levels_and_clearance_are_checked() {
        let p = policy(Classification::Secret, false);
        let officer = caller(&p, "urn:officer");
        let k = key(Classification::Personal, KeyPurpose::Envelope);
        assert!(matches!(
            p.authorize_key_use(&officer, LoadedKey(k.clone()), gen(None)),
            Err(Denied::MissingRole { needed: "exchange", .. })
        ));
        let x2 = caller(&p, "urn:x2");
        assert!(p.authorize_key_use(&x2, LoadedKey(k.clone()), gen(Some(Release::Plaintext))).is_ok());
        let sp = key(Classification::SensitivePersonal, KeyPurpose::Envelope);
        assert!(matches!(
            p.authorize_key_use(&x2, LoadedKey(sp), gen(None)),
            Err(Denied::SystemLevelTooLow { has: 2, needs: 3, .. })
        ));
        let xp = caller(&p, "urn:x5-personal");
        let conf = key(Classification::Confidential, KeyPurpose::HsmEncrypt);
        assert!(matches!(
            p.authorize_key_use(&xp, LoadedKey(conf), KeyUse::Encrypt),
            Err(Denied::ClearanceTooLow { .. })
        ));
        let x = caller(&p, "urn:x5");
        assert!(matches!(
            p.authorize_admin(&x, AdminAction::ReadKeys, None),
            Err(Denied::MissingRole { needed: "officer", .. })
        ));
    }

    #[test]
    fn release_rules_follow_the_level_table() {
        let p = policy(Classification::Secret, false);
        let x = caller(&p, "urn:x5");
        let sp = key(Classification::SensitivePersonal, KeyPurpose::Envelope);
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(sp.clone()), gen(Some(Release::Plaintext))),
            Err(Denied::DataKeyOnlySealed { .. })
        ));
        assert!(p.authorize_key_use(&x, LoadedKey(sp.clone()), gen(Some(Release::SealedToRecipient))).is_ok());
        assert!(p.authorize_key_use(&x, LoadedKey(sp.clone()), gen(None)).is_ok());
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(sp), KeyUse::DecryptDataKey { version: 1, release: Release::Plaintext }),
            Err(Denied::DataKeyOnlySealed { .. })
        ));
        for level in [Classification::Confidential, Classification::Secret] {
            for r in [None, Some(Release::Plaintext), Some(Release::SealedToRecipient)] {
                assert!(matches!(
                    p.authorize_key_use(&x, LoadedKey(key(level, KeyPurpose::HsmEncrypt)), gen(r)),
                    Err(Denied::DataKeyNeverReleased { .. })
                ));
            }
        }
        let conf = key(Classification::Confidential, KeyPurpose::HsmEncrypt);
        let grant = p.authorize_key_use(&x, LoadedKey(conf), KeyUse::Encrypt).unwrap();
        assert_eq!(grant.action().version, 1);
    }

    #[test]
    fn token_approval_and_network_gate_levels() {
        let p = policy(Classification::Personal, false);
        let x = caller(&p, "urn:x5");
        let officer = caller(&p, "urn:officer");
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(key(Classification::Confidential, KeyPurpose::HsmEncrypt)), KeyUse::Encrypt),
            Err(Denied::TokenNotApproved { approved: Classification::Personal, .. })
        ));
        let create = |level, purpose| AdminAction::CreateKey { level, purpose };
        assert!(matches!(
            p.authorize_admin(&officer, create(Classification::SensitivePersonal, KeyPurpose::Envelope), None),
            Err(Denied::TokenNotApproved { .. })
        ));
        let all = policy(Classification::TopSecret, false);
        let officer = caller(&all, "urn:officer");
        assert!(matches!(
            all.authorize_admin(&officer, create(Classification::TopSecret, KeyPurpose::HsmEncrypt), None),
            Err(Denied::TopSecretNeedsIsolatedNetwork)
        ));
        assert!(matches!(
            all.authorize_admin(&officer, create(Classification::Secret, KeyPurpose::Envelope), None),
            Err(Denied::EnvelopeNotAllowed { .. })
        ));
        let isolated = policy(Classification::TopSecret, true);
        let officer = caller(&isolated, "urn:officer");
        assert!(isolated
            .authorize_admin(&officer, create(Classification::TopSecret, KeyPurpose::HsmEncrypt), None)
            .is_ok());
    }

    #[test]
    fn two_officer_changes_follow_the_level_table() {
        let p = policy(Classification::TopSecret, true);
        let officer = caller(&p, "urn:officer");
        let need = |level, change| p.authorize_key_change(&officer, LoadedKey(key(level, KeyPurpose::Envelope)), change).unwrap().action().approval;
        assert_eq!(need(Classification::Personal, KeyChange::Disable), Approval::NotNeeded);
        assert_eq!(need(Classification::Personal, KeyChange::Destroy), Approval::NotNeeded);
        assert_eq!(need(Classification::Secret, KeyChange::Rotate), Approval::NotNeeded);
        assert_eq!(need(Classification::Personal, KeyChange::Enable), Approval::NotNeeded);
        assert_eq!(need(Classification::Secret, KeyChange::CancelDestroy), Approval::NotNeeded);
        for (level, change) in [
            (Classification::SensitivePersonal, KeyChange::Enable),
            (Classification::Secret, KeyChange::EnableVersion),
            (Classification::SensitivePersonal, KeyChange::Disable),
            (Classification::SensitivePersonal, KeyChange::Destroy),
            (Classification::Confidential, KeyChange::DisableVersion),
            (Classification::Secret, KeyChange::DestroyVersion),
            (Classification::TopSecret, KeyChange::Rotate),
        ] {
            assert_eq!(need(level, change), Approval::SecondOfficerRequired, "{level} {change:?}");
        }
    }

    #[test]
    fn key_patterns_are_within_others_only_when_every_key_they_allow_is_allowed() {
        let outer = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(pattern_within("tax/a", &outer(&["tax/*"])));
        assert!(pattern_within("tax/a*", &outer(&["tax/*"])));
        assert!(pattern_within("tax/*", &outer(&["tax/*"])));
        assert!(pattern_within("anything*", &outer(&["*"])));
        assert!(pattern_within("*", &outer(&["*"])));
        assert!(pattern_within("tax/a", &outer(&["tax/a"])));
        assert!(!pattern_within("tax*", &outer(&["tax/*"])));
        assert!(!pattern_within("*", &outer(&["tax/*"])));
        assert!(!pattern_within("tax/*", &outer(&["tax/a"])));
        assert!(!pattern_within("health/a", &outer(&["tax/*", "tax/a"])));
        assert!(!pattern_within("x", &outer(&[])));
    }

    #[test]
    fn an_officer_holds_no_other_role() {
        assert!(check_roles(&[Role::Officer]).is_ok());
        assert!(check_roles(&[Role::Exchange]).is_ok());
        assert!(check_roles(&[Role::Auditor]).is_ok());
        assert!(check_roles(&[Role::Exchange, Role::Auditor]).is_ok());
        assert!(check_roles(&[Role::Officer, Role::Auditor]).is_err());
        assert!(check_roles(&[Role::Officer, Role::Exchange]).is_err());
    }

    #[test]
    fn the_requester_cannot_decide_their_own_request() {
        let p = policy(Classification::TopSecret, true);
        let officer = caller(&p, "urn:officer");
        let err = p.authorize_decision(&officer, LoadedKey(key(Classification::Secret, KeyPurpose::HsmEncrypt)), KeyChange::Destroy, "urn:officer").unwrap_err();
        assert_eq!(err, Denied::OwnRequest { identity: "urn:officer".into() });
        assert_eq!(err.class(), DeniedClass::PermissionDenied);
        let grant = p.authorize_decision(&officer, LoadedKey(key(Classification::Secret, KeyPurpose::HsmEncrypt)), KeyChange::Destroy, "urn:other").unwrap();
        assert_eq!(grant.action().approval, Approval::Approved);
    }

    #[test]
    fn purpose_and_states_are_checked() {
        let p = policy(Classification::Secret, false);
        let x = caller(&p, "urn:x5");
        let env = key(Classification::Personal, KeyPurpose::Envelope);
        assert!(matches!(p.authorize_key_use(&x, LoadedKey(env.clone()), KeyUse::Encrypt), Err(Denied::WrongPurpose { .. })));
        let mut disabled = env.clone();
        disabled.state = KeyState::Disabled;
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(disabled), gen(None)),
            Err(Denied::KeyNotEnabled { state: "DISABLED", .. })
        ));
        let mut vdis = env.clone();
        vdis.versions[0].state = KeyState::Destroyed;
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(vdis), gen(None)),
            Err(Denied::VersionNotEnabled { version: 1, state: "DESTROYED", .. })
        ));
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(env), KeyUse::DecryptDataKey { version: 7, release: Release::Plaintext }),
            Err(Denied::NoSuchVersion { version: 7, .. })
        ));
    }

    #[test]
    fn rewrap_uses_release_nothing_and_check_purpose_version_and_state() {
        let p = policy(Classification::Secret, false);
        let x = caller(&p, "urn:x5");
        let from = |version, purpose| KeyUse::ReWrapFrom { version, purpose };
        let to = |purpose| KeyUse::ReWrapTo { purpose };
        // SENSITIVE_PERSONAL data keys are only released sealed, but re-wrap releases nothing.
        let mut sp = key(Classification::SensitivePersonal, KeyPurpose::Envelope);
        assert_eq!(p.authorize_key_use(&x, LoadedKey(sp.clone()), from(1, KeyPurpose::Envelope)).unwrap().action().version, 1);
        sp.versions.push(VersionRecord { version: 2, object_id: ObjectId::for_version(sp.id, 2), ..sp.versions[0].clone() });
        sp.primary_version = 2;
        assert_eq!(p.authorize_key_use(&x, LoadedKey(sp.clone()), to(KeyPurpose::Envelope)).unwrap().action().version, 2);
        assert_eq!(p.authorize_key_use(&x, LoadedKey(sp.clone()), from(1, KeyPurpose::Envelope)).unwrap().action().version, 1);
        // The blob kind fixes the purpose.
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(sp.clone()), to(KeyPurpose::HsmEncrypt)),
            Err(Denied::WrongPurpose { needed: KeyPurpose::HsmEncrypt, purpose: KeyPurpose::Envelope, .. })
        ));
        let conf = key(Classification::Confidential, KeyPurpose::HsmEncrypt);
        assert!(p.authorize_key_use(&x, LoadedKey(conf.clone()), from(1, KeyPurpose::HsmEncrypt)).is_ok());
        assert!(p.authorize_key_use(&x, LoadedKey(conf.clone()), to(KeyPurpose::HsmEncrypt)).is_ok());
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(conf), to(KeyPurpose::Envelope)),
            Err(Denied::DataKeyNeverReleased { level: Classification::Confidential })
        ));
        // The source version must exist and be ENABLED; the key too.
        let mut vdis = sp.clone();
        vdis.versions[0].state = KeyState::Disabled;
        assert_eq!(
            p.authorize_key_use(&x, LoadedKey(vdis.clone()), from(1, KeyPurpose::Envelope)).unwrap_err(),
            Denied::VersionNotEnabled { key: "k".into(), version: 1, state: "DISABLED" }
        );
        assert!(p.authorize_key_use(&x, LoadedKey(vdis), to(KeyPurpose::Envelope)).is_ok());
        assert!(matches!(
            p.authorize_key_use(&x, LoadedKey(sp.clone()), from(9, KeyPurpose::Envelope)),
            Err(Denied::NoSuchVersion { version: 9, .. })
        ));
        let mut off = sp.clone();
        off.state = KeyState::Disabled;
        assert!(matches!(p.authorize_key_use(&x, LoadedKey(off), to(KeyPurpose::Envelope)), Err(Denied::KeyNotEnabled { .. })));
        // Clearance and system level apply to both ends.
        let xp = caller(&p, "urn:x5-personal");
        assert!(matches!(
            p.authorize_key_use(&xp, LoadedKey(sp.clone()), to(KeyPurpose::Envelope)),
            Err(Denied::ClearanceTooLow { clearance: Classification::Personal, level: Classification::SensitivePersonal, .. })
        ));
        let x2 = caller(&p, "urn:x2");
        assert!(matches!(
            p.authorize_key_use(&x2, LoadedKey(sp), from(1, KeyPurpose::Envelope)),
            Err(Denied::SystemLevelTooLow { has: 2, needs: 3, .. })
        ));
    }
}
