//! The state machine side of a replicated log: hands committed commands to the [`Applier`],
//! and keeps in sled the last applied log id, the membership and the latest snapshot.

use super::{Applier, CommandResult, LogDisk, RaftNodeId, TypeConfig, any, encode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::Arc;

const APPLIED_KEY: &[u8] = b"applied";
const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// Progress of the state machine, written after every applied batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<RaftNodeId>>,
    membership: StoredMembership<RaftNodeId, BasicNode>,
}

/// The latest snapshot with its metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftNodeId, BasicNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// State machine of one replicated log.
pub struct SledStateMachine {
    tree: sled::Tree,
    disk: LogDisk,
    applier: Arc<dyn Applier>,
    applied: Applied,
    /// Snapshots built by this replica so far, for unique snapshot ids.
    built: u64,
}

impl SledStateMachine {
    /// Opens the state machine of the log named `name` in `db`, whose commands go to
    /// `applier`. A stored snapshot is not given to the applier again: it must keep its own
    /// state across restarts, up to the last applied index.
    pub fn open(disk: &LogDisk, name: &str, applier: Arc<dyn Applier>) -> sled::Result<Self> {
        let tree = disk.db.open_tree(format!("raft-sm-{name}"))?;
        let applied = match tree.get(APPLIED_KEY)? {
            Some(raw) => rmp_serde::from_slice(&raw).map_err(|e| {
                sled::Error::Unsupported(format!("state machine record of {name}: {e}"))
            })?,
            None => Applied::default(),
        };
        Ok(Self {
            tree,
            disk: disk.clone(),
            applier,
            applied,
            built: 0,
        })
    }

    fn record_applied(&self) -> Result<(), StorageError<RaftNodeId>> {
        self.tree
            .insert(APPLIED_KEY, encode(&self.applied))
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        Ok(())
    }

    async fn persist_applied(&self) -> Result<(), StorageError<RaftNodeId>> {
        self.tree
            .insert(APPLIED_KEY, encode(&self.applied))
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        self.disk
            .flush()
            .await
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        Ok(())
    }

    async fn store_snapshot(
        &self,
        snapshot: &StoredSnapshot,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let signature = Some(snapshot.meta.signature());
        self.tree
            .insert(SNAPSHOT_KEY, encode(snapshot))
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), any(e)))?;
        self.disk
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature, any(e)))?;
        Ok(())
    }
}

/// Builds a snapshot from state captured when the builder was made, so that commands applied
/// while it runs cannot leak into a snapshot that claims an earlier index.
pub struct SnapshotBuilder {
    tree: sled::Tree,
    disk: LogDisk,
    snapshot: StoredSnapshot,
    /// Reason the applier could not serialize its state, if it failed.
    failure: Option<String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftNodeId>> {
        let signature = Some(self.snapshot.meta.signature());
        if let Some(failure) = &self.failure {
            return Err(StorageIOError::write_snapshot(
                signature,
                any(std::io::Error::other(failure.clone())),
            )
            .into());
        }
        self.tree
            .insert(SNAPSHOT_KEY, encode(&self.snapshot))
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), any(e)))?;
        self.disk
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature, any(e)))?;
        Ok(Snapshot {
            meta: self.snapshot.meta.clone(),
            snapshot: Box::new(Cursor::new(self.snapshot.data.clone())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<RaftNodeId>>,
            StoredMembership<RaftNodeId, BasicNode>,
        ),
        StorageError<RaftNodeId>,
    > {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<RaftNodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::default(),
                EntryPayload::Normal(command) => {
                    CommandResult(self.applier.apply(entry.log_id.index, &command.0))
                }
                EntryPayload::Membership(membership) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandResult::default()
                }
            };
            results.push(result);
        }
        // No fsync here: the entries are durable in the log already. sled recovers a prefix of
        // its writes after a crash, so the applied state it recovers matches the changes it
        // recovers, and openraft applies the rest again from the log. The next log append,
        // or a snapshot, flushes the whole database.
        self.record_applied()?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.built += 1;
        let last = self.applied.last_applied;
        let snapshot_id = match last {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.built),
            None => format!("none-{}", self.built),
        };
        let (data, failure) = match self.applier.snapshot() {
            Ok(data) => (data, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        SnapshotBuilder {
            tree: self.tree.clone(),
            disk: self.disk.clone(),
            failure,
            snapshot: StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: self.applied.membership.clone(),
                    snapshot_id,
                },
                data,
            },
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<RaftNodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let data = snapshot.into_inner();
        self.applier.restore(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), any(std::io::Error::other(e)))
        })?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.store_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        self.persist_applied().await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftNodeId>> {
        let Some(raw) = self
            .tree
            .get(SNAPSHOT_KEY)
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            rmp_serde::from_slice(&raw).map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
