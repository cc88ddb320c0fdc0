use atlas_protocol::{DeviceId, GroupId};
use std::path::Path;

/// Failures of the storage layer. None of them leaves a partial write behind: every change is
/// one atomic write set (completed at the next open if an I/O error cut it short) or one sled
/// transaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database could not be opened; `detail` gives sled's error and what to check.
    #[error("cannot open storage at {path}: {detail}")]
    Open { path: String, detail: String },
    /// Another process holds the database's lock.
    #[error(
        "cannot open storage at {path}: another process uses it, most likely an atlas node \
         started with the same data directory; stop that process, or give this node a data \
         directory of its own"
    )]
    InUse { path: String },
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
    /// Describes a panic of sled while opening the database at `path`. sled 0.34 panics on
    /// some damaged files instead of reporting them (seen with a file cut inside a segment).
    pub(crate) fn open_panicked(path: &Path, message: &str) -> Self {
        Self::open_failed_reading(path, message)
    }

    /// Returns the error of a database that opened but failed a read at start with `message`.
    pub(crate) fn open_failed_reading(path: &Path, message: &str) -> Self {
        Self::Open {
            path: path.display().to_string(),
            detail: format!(
                "sled failed while reading it ({message}); the database is damaged: restore \
                 the data directory from a backup, or, on a node of a cluster, empty it and \
                 start the node with --seeds so that it copies the data from the others"
            ),
        }
    }

    pub(crate) fn open(path: &Path, error: sled::Error) -> Self {
        let path = path.display().to_string();
        let detail = match error {
            // sled reports a held lock as an error of kind `Other` with this message.
            sled::Error::Io(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                return Self::InUse { path };
            }
            sled::Error::Corruption { .. } => format!(
                "{error}; the database is damaged: restore the data directory from a backup, or, \
                 on a node of a cluster, empty it and start the node with --seeds so that it \
                 copies the data from the others"
            ),
            other => format!("{other}; check the path, its permissions and free space"),
        };
        Self::Open { path, detail }
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
