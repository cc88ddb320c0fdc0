//! MLS rules the server applies, on openmls public group state only, so it never has a group
//! secret. Plain types, unit-tested without actors.

use atlas_protocol::DeviceId;
use atlas_storage::KeyPackageRecord;
use openmls::framing::{MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, ProtocolMessage};
use openmls::group::{ProposalStore, PublicGroup};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Ciphersuite, ContentType, KeyPackageIn, LeafNodeIndex, ProtocolVersion,
    Sender, WireFormat,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use std::collections::{BTreeMap, HashMap};

/// The one ciphersuite Atlas accepts: device keys are Ed25519.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Longest KeyPackage lifetime accepted, in seconds (90 days).
pub const MAX_KEY_PACKAGE_LIFETIME_SECS: u64 = 90 * 24 * 3600;

/// Reasons an MLS message or KeyPackage is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MlsError {
    /// The bytes are not a well-formed MLSMessage.
    #[error("invalid MLS message: {0}")]
    Malformed(String),
    /// Well-formed, but of a kind this request does not take.
    #[error("unexpected MLS message: {0}")]
    Unexpected(String),
    /// The message is for another epoch than the group's current one.
    #[error("message for epoch {sent} but group is at epoch {current}")]
    WrongEpoch { sent: u64, current: u64 },
    /// The sender is not in the group's roster.
    #[error("device {0} is not a member of the group")]
    NotMember(DeviceId),
    /// openmls rejected the message.
    #[error("MLS validation failed: {0}")]
    Rejected(String),
    /// The KeyPackage failed a check.
    #[error("invalid key package: {0}")]
    KeyPackage(String),
}

/// Validates an uploaded KeyPackage for the logged-in device: signature and version (openmls),
/// the ciphersuite, a bounded lifetime that covers `now_secs`, a basic credential naming
/// `account`, and a leaf signature key equal to the device key.
pub fn validate_key_package(
    bytes: &[u8],
    device: DeviceId,
    device_key: &[u8],
    account: &str,
    now_secs: u64,
) -> Result<KeyPackageRecord, MlsError> {
    let crypto = RustCrypto::default();
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| MlsError::Malformed(e.to_string()))?;
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        return Err(MlsError::Unexpected("expected a KeyPackage".into()));
    };
    let key_package: KeyPackageIn = key_package;
    let key_package = key_package
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|e| MlsError::KeyPackage(e.to_string()))?;
    if key_package.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::KeyPackage(format!(
            "ciphersuite {:?} is not accepted, use {CIPHERSUITE:?}",
            key_package.ciphersuite()
        )));
    }
    let lifetime = key_package.life_time();
    let (not_before, not_after) = (lifetime.not_before(), lifetime.not_after());
    if not_after.saturating_sub(not_before) > MAX_KEY_PACKAGE_LIFETIME_SECS {
        return Err(MlsError::KeyPackage(format!(
            "lifetime of {} s exceeds the maximum of {MAX_KEY_PACKAGE_LIFETIME_SECS} s",
            not_after.saturating_sub(not_before)
        )));
    }
    if !(not_before <= now_secs && now_secs < not_after) {
        return Err(MlsError::KeyPackage(format!(
            "lifetime {not_before}..{not_after} does not cover the current time {now_secs}"
        )));
    }
    let leaf = key_package.leaf_node();
    if leaf.signature_key().as_slice() != device_key {
        return Err(MlsError::KeyPackage(
            "leaf signature key is not the device key".into(),
        ));
    }
    let identity = credential_account(leaf.credential())?;
    if identity != account {
        return Err(MlsError::KeyPackage(format!(
            "credential names account {identity:?}, the device belongs to {account:?}"
        )));
    }
    let hash_ref = key_package
        .hash_ref(&crypto)
        .map_err(|e| MlsError::KeyPackage(e.to_string()))?;
    Ok(KeyPackageRecord {
        hash_ref: hash_ref.as_slice().to_vec(),
        bytes: bytes.to_vec(),
        not_before,
        not_after,
        last_resort: key_package.last_resort(),
        device,
    })
}

fn credential_account(credential: &openmls::prelude::Credential) -> Result<String, MlsError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|e| MlsError::KeyPackage(format!("credential is not a basic credential: {e}")))?;
    String::from_utf8(basic.identity().to_vec())
        .map_err(|_| MlsError::KeyPackage("credential identity is not UTF-8".into()))
}

/// Result of applying a commit to the public state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Epoch after the commit.
    pub epoch: u64,
    /// Devices the commit added.
    pub added: Vec<DeviceId>,
    /// Devices the commit removed.
    pub removed: Vec<DeviceId>,
}

/// A group's public MLS state: roster, epoch and tree, with no secrets.
pub struct PublicState {
    group: PublicGroup,
    storage: MemoryStorage,
    crypto: RustCrypto,
    /// Roster by device id, derived from the tree after every change.
    members: HashMap<DeviceId, LeafNodeIndex>,
}

impl PublicState {
    /// Builds the state from a GroupInfo MLSMessage that carries the ratchet tree extension;
    /// openmls checks the GroupInfo signature and the tree.
    pub fn from_group_info(bytes: &[u8]) -> Result<Self, MlsError> {
        let crypto = RustCrypto::default();
        let storage = MemoryStorage::default();
        let message = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|e| MlsError::Malformed(e.to_string()))?;
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(MlsError::Unexpected("expected a GroupInfo".into()));
        };
        if group_info.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::Unexpected(format!(
                "ciphersuite {:?} is not accepted, use {CIPHERSUITE:?}",
                group_info.ciphersuite()
            )));
        }
        let tree = group_info
            .extensions()
            .ratchet_tree()
            .ok_or_else(|| {
                MlsError::Unexpected("GroupInfo lacks the ratchet tree extension".into())
            })?
            .ratchet_tree()
            .clone();
        let (group, _) =
            PublicGroup::from_external(&crypto, &storage, tree, group_info, ProposalStore::new())
                .map_err(|e| MlsError::Rejected(e.to_string()))?;
        Ok(Self::with_group(group, storage, crypto))
    }

    /// Restores the state saved by [`PublicState::to_bytes`].
    pub fn from_bytes(group_id: &[u8], bytes: &[u8]) -> Result<Self, MlsError> {
        let values: BTreeMap<Vec<u8>, Vec<u8>> = rmp_serde::from_slice(bytes)
            .map_err(|e| MlsError::Malformed(format!("stored public state: {e}")))?;
        let storage = MemoryStorage::default();
        storage
            .values
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(values);
        let id = openmls::group::GroupId::from_slice(group_id);
        let group = PublicGroup::load(&storage, &id)
            .map_err(|e| MlsError::Malformed(format!("stored public state: {e}")))?
            .ok_or_else(|| MlsError::Malformed("stored public state is incomplete".into()))?;
        Ok(Self::with_group(group, storage, RustCrypto::default()))
    }

    fn with_group(group: PublicGroup, storage: MemoryStorage, crypto: RustCrypto) -> Self {
        let mut state = Self {
            group,
            storage,
            crypto,
            members: HashMap::new(),
        };
        state.refresh_members();
        state
    }

    fn refresh_members(&mut self) {
        self.members = self
            .group
            .members()
            .map(|m| (DeviceId::for_key(&m.signature_key), m.index))
            .collect();
    }

    /// Serializes the openmls storage entries of this group.
    pub fn to_bytes(&self) -> Vec<u8> {
        let values = self
            .storage
            .values
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let sorted: BTreeMap<&Vec<u8>, &Vec<u8>> = values.iter().collect();
        // A map of byte strings always encodes.
        rmp_serde::to_vec(&sorted).expect("public state encodes")
    }

    /// Returns the MLS group id.
    pub fn group_id(&self) -> &[u8] {
        self.group.group_id().as_slice()
    }

    /// Returns the current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// True when `device` is in the roster.
    pub fn is_member(&self, device: &DeviceId) -> bool {
        self.members.contains_key(device)
    }

    /// Devices in the roster.
    pub fn member_devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.members.keys()
    }

    /// Checks an application message: a PrivateMessage of this group, for the current epoch,
    /// carrying application content, from a device in the roster.
    pub fn check_application(&self, bytes: &[u8], sender: &DeviceId) -> Result<u64, MlsError> {
        let message = self.parse_protocol(bytes)?;
        if message.wire_format() != WireFormat::PrivateMessage {
            return Err(MlsError::Unexpected(
                "application messages must be PrivateMessage".into(),
            ));
        }
        if message.content_type() != ContentType::Application {
            return Err(MlsError::Unexpected(
                "handshake messages must be sent as PublicMessage commits".into(),
            ));
        }
        if !self.is_member(sender) {
            return Err(MlsError::NotMember(*sender));
        }
        self.check_epoch(&message)?;
        Ok(self.epoch())
    }

    /// Validates a commit (PublicMessage) sent by `sender` and, if valid, applies it.
    pub fn apply_commit(
        &mut self,
        bytes: &[u8],
        sender: &DeviceId,
    ) -> Result<CommitOutcome, MlsError> {
        let message = self.parse_protocol(bytes)?;
        if message.wire_format() != WireFormat::PublicMessage {
            return Err(MlsError::Unexpected(
                "commits must be sent as PublicMessage".into(),
            ));
        }
        if message.content_type() != ContentType::Commit {
            return Err(MlsError::Unexpected(
                "only commits with inline proposals are accepted as handshake messages".into(),
            ));
        }
        let Some(&sender_leaf) = self.members.get(sender) else {
            return Err(MlsError::NotMember(*sender));
        };
        self.check_epoch(&message)?;
        let processed = self
            .group
            .process_message(&self.crypto, message)
            .map_err(|e| MlsError::Rejected(e.to_string()))?;
        if *processed.sender() != Sender::Member(sender_leaf) {
            return Err(MlsError::Rejected(
                "commit is signed by another member than the sending device".into(),
            ));
        }
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(MlsError::Unexpected("expected a commit".into()));
        };
        let before: Vec<DeviceId> = self.members.keys().copied().collect();
        self.group
            .merge_commit(&self.storage, *staged)
            .map_err(|e| MlsError::Rejected(e.to_string()))?;
        self.refresh_members();
        let added = self
            .members
            .keys()
            .filter(|d| !before.contains(d))
            .copied()
            .collect();
        let removed = before
            .into_iter()
            .filter(|d| !self.members.contains_key(d))
            .collect();
        Ok(CommitOutcome {
            epoch: self.epoch(),
            added,
            removed,
        })
    }

    fn parse_protocol(&self, bytes: &[u8]) -> Result<ProtocolMessage, MlsError> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|e| MlsError::Malformed(e.to_string()))?;
        let message: ProtocolMessage = message
            .try_into_protocol_message()
            .map_err(|e| MlsError::Unexpected(e.to_string()))?;
        if message.group_id().as_slice() != self.group_id() {
            return Err(MlsError::Unexpected(
                "message belongs to another group".into(),
            ));
        }
        Ok(message)
    }

    fn check_epoch(&self, message: &ProtocolMessage) -> Result<(), MlsError> {
        let sent = message.epoch().as_u64();
        if sent != self.epoch() {
            return Err(MlsError::WrongEpoch {
                sent,
                current: self.epoch(),
            });
        }
        Ok(())
    }
}

/// Checks that `bytes` are an MLS Welcome message.
pub fn check_welcome(bytes: &[u8]) -> Result<(), MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| MlsError::Malformed(format!("welcome: {e}")))?;
    match message.extract() {
        MlsMessageBodyIn::Welcome(_) => Ok(()),
        _ => Err(MlsError::Unexpected("expected a Welcome".into())),
    }
}

#[cfg(test)]
mod tests;
