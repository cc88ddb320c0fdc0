//! Replicated logs on openraft, with the log and the state machine's progress kept in sled.
//!
//! A replicated log carries opaque commands. Once openraft commits a command on a majority,
//! every replica hands it to its [`Applier`] in log order, and the proposer gets the
//! applier's result. [`SledLogStore`] keeps the log, the vote and the purge point;
//! [`SledStateMachine`] keeps the last applied entry, the membership and the latest snapshot.
//!
//! [`SharedState`] is the node's applier: the logs of [`ReplicatedLogs`] carry every change
//! to the state that nodes share (see `atlas_storage::Change`), a log per shard for its
//! groups and one for the directory, and [`ClusterReplicator`] proposes them.

// openraft's traits return its `StorageError` and `RPCError` by value, and the helpers here
// pass them on unchanged.
#![allow(clippy::result_large_err)]

mod log_store;
mod logs;
mod proposals;
mod recover;
mod replica;
mod state_machine;
#[cfg(test)]
mod tests;
mod transport;

pub use log_store::SledLogStore;

pub use logs::{DIRECTORY_LOG, LogSettings, RemoveError, ReplicatedLogs, shard_log};
pub use proposals::{
    AppendObserver, AppendTimes, AppliedHook, ClusterReplicator, InstalledHook, LogHandle,
    ReplicationCheck, ShardStartHook, SharedState,
};
pub use recover::{RecoveredLog, known_peers, make_sole_voter, record_peer, recovery_identity};
pub use replica::{Replica, ReplicaSettings, ReplicaStatus, node_identity};
pub use state_machine::SledStateMachine;

use atlas_storage::Flusher;
use serde::{Deserialize, Serialize};
use std::error::Error;
use std::sync::Arc;

/// A command of the replicated log, opaque to the replication layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The result of applying a [`Command`], returned to its proposer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandResult(#[serde(with = "serde_bytes")] pub Vec<u8>);

openraft::declare_raft_types!(
    /// Types of Atlas's replicated logs. A snapshot is a file, so that neither building,
    /// sending nor installing one keeps a whole part of the state in memory.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        SnapshotData = tokio::fs::File,
);

/// Node id within one replicated log.
pub type RaftNodeId = u64;

/// A running replica.
pub type Raft = openraft::Raft<TypeConfig>;

/// The handler of a replica's committed commands.
pub trait Applier: Send + Sync + 'static {
    /// Applies the command at log `index` and returns its result. Every replica applies the
    /// same commands in the same order, so this must be deterministic.
    ///
    /// NOTE: the state machine records the last applied index after this returns. A crash in
    /// between makes the replica apply the command again after a restart, so an applier
    /// must treat an index it has seen as already applied.
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8>;

    /// Writes the applier's whole state to `out`, for a snapshot.
    fn snapshot(&self, out: &mut std::fs::File) -> Result<(), String>;

    /// Checks a snapshot made by [`Applier::snapshot`], which `input` contains from its
    /// current position, as far as possible without applying it. Leaves `input` at that
    /// position.
    fn check(&self, input: &mut std::fs::File) -> Result<(), String>;

    /// Replaces the applier's state with a snapshot made by [`Applier::snapshot`], which
    /// `input` contains from its current position. The state machine calls
    /// [`Applier::check`] first, so an error here means a failed write.
    ///
    /// NOTE: such a write may leave the state half replaced. The state machine then keeps its
    /// install marker, so the next open imports the snapshot again.
    fn restore(&self, input: &mut std::fs::File) -> Result<(), String>;
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Log entries, votes and log ids are plain data with string keys, so encoding cannot fail.
    rmp_serde::to_vec_named(value).expect("replication record serializes")
}

/// The sled database that contains a node's raft logs and their state machines, with the
/// group-commit flusher that makes their writes durable. The logs of a node share one flusher,
/// so appends to several logs at once share an fsync.
#[derive(Clone)]
pub struct LogDisk {
    db: sled::Db,
    flusher: Arc<Flusher>,
    /// Directory of the snapshot files, one subdirectory per log.
    snapshots: std::path::PathBuf,
}

impl LogDisk {
    /// Creates the log disk of `db` and `flusher`, which must be the flusher of `db`, with
    /// the snapshot files under `snapshots`.
    pub fn new(db: sled::Db, flusher: Arc<Flusher>, snapshots: std::path::PathBuf) -> Self {
        Self {
            db,
            flusher,
            snapshots,
        }
    }

    /// Creates the log disk of `store`'s database and flusher, shared with the store's own
    /// writes, with the snapshot files in the `snapshots` directory next to the database.
    pub fn of_store(store: &atlas_storage::Store) -> Self {
        Self::new(
            store.sled_db().clone(),
            store.flusher(),
            store.dir().join("snapshots"),
        )
    }

    /// Waits until every write made to the database before this call is on disk.
    ///
    /// NOTE: not sled's `flush_async`, which runs the flush on sled's own small thread pool:
    /// its threads then wait for buffer writes that sled queues on the same pool. With many
    /// logs flushing at once, every pool thread waits, the writes never run, and the node
    /// hangs. The flusher calls the blocking flush on a blocking thread of Tokio.
    async fn flush(&self) -> Result<(), atlas_storage::StorageError> {
        self.flusher.wait().await
    }
}

/// Wraps an error for openraft's storage errors.
fn any<E: Error + 'static>(error: E) -> openraft::AnyError {
    openraft::AnyError::new(&error)
}
