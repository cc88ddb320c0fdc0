use atlas_protocol::{DeviceId, GroupId};
use std::path::Path;

/// Failures of the storage layer. None of them leaves a partial write behind: every change is
/// one sled batch or transaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database could not be opened; check the path, its permissions and free space.
    #[error("cannot open storage at {path}: {source}")]
    Open { path: String, source: sled::Error },
    /// The data directory was written by another storage format version; migrate it or start
    /// with an empty directory.
    #[error(
        "storage format version {found} is not supported, this build reads version {expected}: \
         run the build that wrote it, or start with an empty data directory"
    )]
    FormatVersion { found: u32, expected: u32 },
    /// A stored record does not decode: the data directory is damaged.
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// An I/O error from sled, such as a full disk.
    #[error("storage i/o failed: {0}")]
    Io(#[from] sled::Error),
    /// A flush failed earlier; the store refuses further work until the node restarts.
    #[error("storage flush failed, node must restart: {0}")]
    FlushFailed(String),
    /// A group with this id already exists.
    #[error("group {0} already exists")]
    GroupExists(GroupId),
    /// The device key is registered under another account.
    #[error("device {device} is registered under account {account:?}")]
    DeviceOwnedElsewhere { device: DeviceId, account: String },
    /// No device with this id is registered.
    #[error("device {0} is not registered")]
    UnknownDevice(DeviceId),
    /// The device was revoked or replaced by a key rotation.
    #[error("device {0} is revoked")]
    DeviceRevoked(DeviceId),
    /// A first registration named an account that already exists.
    #[error("account {0:?} already exists")]
    AccountTaken(String),
    /// The passkey credential is registered already, to this or another account.
    #[error("this passkey is registered already")]
    CredentialInUse,
    /// No passkey account has this name.
    #[error("account {0:?} does not exist")]
    UnknownAccount(String),
    /// An enrollment would exceed the number of active devices an account may have.
    #[error("account {account:?} already has {max} active devices")]
    TooManyDevices { account: String, max: usize },
    /// Another writer changed the state this change was computed from; reload and retry.
    #[error("concurrent change: {0}")]
    Conflict(String),
    /// A replicated log cannot commit a change, or confirm the latest changes for a read,
    /// now: it has no reachable leader, or this node is cut off from the majority.
    #[error(
        "the replicated log cannot commit or confirm changes now ({0}); its leader may be \
         changing or unreachable, so retry in a few seconds or on another node"
    )]
    Unavailable(String),
    /// Replicating a change failed in a way the change itself did not cause.
    #[error("replicating a change failed: {0}")]
    Replication(String),
}

impl StorageError {
    pub(crate) fn open(path: &Path, source: sled::Error) -> Self {
        Self::Open {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<sled::transaction::TransactionError<()>> for StorageError {
    fn from(e: sled::transaction::TransactionError<()>) -> Self {
        match e {
            sled::transaction::TransactionError::Storage(e) => Self::Io(e),
            sled::transaction::TransactionError::Abort(()) => Self::Corrupt {
                what: "transaction".into(),
                detail: "aborted without a reason".into(),
            },
        }
    }
}
