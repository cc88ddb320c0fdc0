//! Domain actors of an Atlas node: group session actors under a supervisor, and the device
//! directory. The MLS rules live in plain types ([`mls`]) that the actors call, so they are
//! tested without actors. Nothing here depends on HTTP or WebSocket. Sessions reach the actors
//! through [`GroupMsg`] and receive pushes through [`Deliver`].

pub mod directory;
mod group;
pub mod keyring;
mod metrics;
pub mod mls;
mod supervisor;
pub mod transparency;

pub use directory::{Directory, LoginError};
pub use group::{
    GroupArgs, GroupMsg, GroupSession, GroupSettings, ReceiptSigning, Submission, SyncPage,
};
pub use keyring::{Keyring, KeyringError, NextKey};
pub use metrics::ActorMetrics;
pub use supervisor::{GroupSupervisor, SupervisorArgs, SupervisorMsg};
pub use transparency::{KeyTransparency, KtError};

pub use group::now_ms;

use atlas_protocol::{DeviceId, ErrorCode};
use atlas_storage::StorageError;

/// Registers a new group from its creator's GroupInfo. The GroupInfo must carry the ratchet
/// tree, name the group id `group` and have `creator` as its only member. Returns the epoch.
pub async fn create_group(
    store: &atlas_storage::Store,
    group: &atlas_protocol::GroupId,
    group_info: &[u8],
    creator: &DeviceId,
) -> Result<u64, GroupError> {
    let state = mls::PublicState::from_group_info(group_info)?;
    if state.group_id() != group.as_bytes() {
        return Err(GroupError::Mls(mls::MlsError::Unexpected(format!(
            "GroupInfo is for another group id than {group}"
        ))));
    }
    let members: Vec<&DeviceId> = state.member_devices().collect();
    if members != [creator] {
        return Err(GroupError::Mls(mls::MlsError::Unexpected(
            "a new group must contain exactly its creator's device".into(),
        )));
    }
    let meta = atlas_storage::GroupMeta {
        epoch: state.epoch(),
        last_seq: 0,
        first_seq: 1,
        created_at_ms: now_ms(),
    };
    let change = atlas_storage::Change::CreateGroup {
        group: group.clone(),
        meta,
        public_state: state.to_bytes(),
    };
    match store.write_done(change).await {
        Ok(()) => Ok(meta.epoch),
        Err(StorageError::GroupExists(g)) => Err(GroupError::Exists(g.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Sink for frames pushed to connected devices; implemented by the node's presence registry.
pub trait Deliver: Send + Sync + 'static {
    /// Queues an encoded server frame for every connection of each device. Must not block: a
    /// connection whose queue is full is closed as a slow consumer instead.
    fn push(&self, devices: &[DeviceId], frame: bytes::Bytes);
}

/// Failures of group operations, each mapped to a wire [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group does not exist.
    #[error("group {0} not found")]
    NotFound(String),
    /// The group already exists.
    #[error("group {0} already exists")]
    Exists(String),
    /// The device is not in the group's roster at the group's current epoch (the second
    /// field). The error frame carries the epoch. A client can then tell a removal it has not
    /// read yet from a server that lost commits it read.
    #[error("device {0} is not a member of the group at epoch {1}")]
    NotMember(DeviceId, u64),
    /// The message was for an old or future epoch; process the log and retry.
    #[error("message is not for the current epoch {current}")]
    StaleEpoch { current: u64 },
    /// MLS validation failed.
    #[error(transparent)]
    Mls(#[from] mls::MlsError),
    /// Storage failed; nothing was acknowledged.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The actor is stopping or its queue is closed; retry.
    #[error("group actor unavailable, retry")]
    Unavailable,
    /// Other nodes of the cluster kept appending to the group first; retry.
    #[error("the group is busy on other nodes, retry: {0}")]
    Busy(String),
    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request is invalid before any group rule applies (a malformed group id, a message
    /// over the size limit); carries the error code to send.
    #[error("{1}")]
    Invalid(ErrorCode, String),
}

impl GroupError {
    /// Returns the error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::GroupNotFound,
            Self::Exists(_) => ErrorCode::GroupExists,
            Self::NotMember(..) => ErrorCode::NotMember,
            Self::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            Self::Mls(_) => ErrorCode::InvalidMlsMessage,
            Self::Storage(StorageError::Unavailable(_)) => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::StorageFailure,
            Self::Unavailable | Self::Busy(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Invalid(code, _) => *code,
        }
    }
}
