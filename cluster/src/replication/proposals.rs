//! The node's shared state on the cluster log: [`ClusterReplicator`] proposes changes from any
//! node, and [`SharedState`] applies committed ones to every node's store.

use super::transport::{WriteRefused, forward_write, read_index_from, read_index_here, write_here};
use super::{Applier, Command, CommandResult, Raft, RaftNodeId, encode};
use atlas_storage::{Barrier, Change, Outcome, Proposal, Refused, Replicator, StorageError, Store};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Time a node waits for its own replica to apply a change that the leader committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Attempts of a proposal while leadership moves.
const PROPOSE_ATTEMPTS: usize = 3;

/// Time a proposal or a read waits for an election to end.
const LEADER_WAIT: Duration = Duration::from_secs(2);

/// A change as the cluster log carries it.
#[derive(Serialize, Deserialize)]
struct Proposed {
    /// Raft id of the node that proposed it.
    origin: RaftNodeId,
    change: Change,
}

/// The result of applying a [`Proposed`] change, as the log returns it to the proposer.
type Applied = Result<Outcome, Refused>;

/// Called on every node but the proposer's for each change it applied.
pub type AppliedHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// Applies committed changes to this node's store.
pub struct SharedState {
    store: Store,
    node: RaftNodeId,
    /// The index of the last entry applied, written after each change, so that a change
    /// applied just before a crash is not applied twice.
    progress: sled::Tree,
    hook: OnceLock<AppliedHook>,
}

const PROGRESS_KEY: &[u8] = b"applied";

impl SharedState {
    pub fn new(store: Store, node: RaftNodeId, log: &str) -> Result<Self, StorageError> {
        let progress = store
            .sled_db()
            .open_tree(format!("raft.{log}.shared_progress"))?;
        Ok(Self {
            store,
            node,
            progress,
            hook: OnceLock::new(),
        })
    }

    /// Sets the function called for changes that other nodes proposed, once they are
    /// applied here. Changes applied before it is set are not reported.
    pub fn set_hook(&self, hook: AppliedHook) {
        if self.hook.set(hook).is_err() {
            tracing::warn!("the applied-change hook was set already; keeping the first");
        }
    }

    fn applied_before(&self, index: u64) -> bool {
        matches!(
            self.progress.get(PROGRESS_KEY),
            Ok(Some(raw)) if raw.as_ref() >= index.to_be_bytes().as_slice()
        )
    }
}

impl Applier for SharedState {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        if self.applied_before(index) {
            // Applied before a crash that kept the state machine from recording it. No proposer
            // waits for this result any more.
            let result: Applied = Err(Refused::Failed(format!(
                "entry {index} was applied before a restart"
            )));
            return encode(&result);
        }
        let result: Applied = match rmp_serde::from_slice::<Proposed>(command) {
            Ok(proposed) => {
                let result = self.store.apply(&proposed.change).map_err(|e| {
                    if !matches!(e, StorageError::Conflict(_)) {
                        tracing::debug!(index, change = proposed.change.name(), error = %e, "replicated change rejected");
                    }
                    Refused::from(e)
                });
                if result.is_ok()
                    && proposed.origin != self.node
                    && let Some(hook) = self.hook.get()
                {
                    hook(&proposed.change);
                }
                result
            }
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable entry in the cluster log; skipped");
                Err(Refused::Failed(format!("undecodable entry {index}: {e}")))
            }
        };
        if let Err(e) = self.progress.insert(PROGRESS_KEY, &index.to_be_bytes()) {
            tracing::error!(index, error = %e, "cannot record the applied index");
        }
        encode(&result)
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        self.store.export_shared().map_err(|e| e.to_string())
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        self.store
            .import_shared(snapshot)
            .map_err(|e| e.to_string())
    }
}

/// Proposes changes to the cluster log: on the leader directly, elsewhere through the
/// leader's endpoint. A proposal returns once its change is applied on this node too, so a
/// client that reads from this node next reads its own write.
pub struct ClusterReplicator {
    raft: Raft,
    node: RaftNodeId,
    log: String,
}

impl ClusterReplicator {
    pub fn new(raft: Raft, node: RaftNodeId, log: &str) -> Self {
        Self {
            raft,
            node,
            log: log.to_owned(),
        }
    }
}

impl Replicator for ClusterReplicator {
    fn propose(&self, change: Change) -> Proposal {
        let raft = self.raft.clone();
        let log = self.log.clone();
        // A group actor keeps the state its appends lead to in memory and needs no local
        // copy of them; readers on this node wait with a read barrier instead.
        let wait_here = !matches!(change, Change::AppendBatch { .. });
        let command = Command(encode(&Proposed {
            origin: self.node,
            change,
        }));
        Box::pin(async move {
            let (index, result) = write(&raft, &log, command).await?;
            if !wait_here {
                return decode_applied(index, &result);
            }
            raft.wait(Some(APPLY_WAIT))
                .applied_index_at_least(Some(index), "proposal applied on this node")
                .await
                .map_err(|e| {
                    StorageError::Unavailable(format!(
                        "entry {index} is committed but not applied on this node yet: {e}"
                    ))
                })?;
            decode_applied(index, &result)
        })
    }

    fn barrier(&self) -> Barrier {
        let raft = self.raft.clone();
        let log = self.log.clone();
        Box::pin(async move {
            let index = read_index(&raft, &log).await?;
            raft.wait(Some(APPLY_WAIT))
                .applied_index_at_least(Some(index), "read barrier")
                .await
                .map_err(|e| {
                    StorageError::Unavailable(format!(
                        "entry {index} is committed but not applied on this node yet: {e}"
                    ))
                })?;
            Ok(())
        })
    }
}

/// Returns the log index that a linearizable read must wait for, from the current leader.
async fn read_index(raft: &Raft, log: &str) -> Result<u64, StorageError> {
    let mut last = String::from("no leader known");
    for attempt in 0..PROPOSE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let read = match known_leader(raft).await {
            None => {
                last = format!("no leader known after {} s", LEADER_WAIT.as_secs());
                continue;
            }
            Some(leader) if leader == raft_id_of(raft) => read_index_here(raft).await,
            Some(leader) => read_index_from(log, leader).await,
        };
        match read {
            Ok(index) => return Ok(index),
            Err(WriteRefused::NotLeader { leader }) => {
                last = format!("leadership moved (new leader: {leader:?})");
            }
            Err(WriteRefused::Failed(detail)) => return Err(StorageError::Unavailable(detail)),
        }
    }
    Err(StorageError::Unavailable(last))
}

/// Decodes the result of applying entry `index`.
fn decode_applied(index: u64, result: &CommandResult) -> Result<Outcome, StorageError> {
    let applied: Applied = rmp_serde::from_slice(&result.0).map_err(|e| {
        StorageError::Replication(format!("undecodable result of entry {index}: {e}"))
    })?;
    applied.map_err(StorageError::from)
}

/// Writes `command` through the current leader, following leadership changes a few times.
async fn write(
    raft: &Raft,
    log: &str,
    command: Command,
) -> Result<(u64, CommandResult), StorageError> {
    let mut last = String::from("no leader known");
    for attempt in 0..PROPOSE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let written = match known_leader(raft).await {
            None => {
                last = format!("no leader known after {} s", LEADER_WAIT.as_secs());
                continue;
            }
            Some(leader) if leader == raft_id_of(raft) => write_here(raft, command.clone()).await,
            Some(leader) => forward_write(log, leader, command.clone()).await,
        };
        match written {
            Ok(done) => return Ok(done),
            Err(WriteRefused::NotLeader { leader }) => {
                last = format!("leadership moved (new leader: {leader:?})");
            }
            // The outcome of a failed write is unknown: it may still commit. The caller
            // decides whether to retry, which changes guarded by sequence numbers, client
            // message ids or account records make safe.
            Err(WriteRefused::Failed(detail)) => return Err(StorageError::Unavailable(detail)),
        }
    }
    Err(StorageError::Unavailable(last))
}

/// Returns the current leader, waiting up to [`LEADER_WAIT`] while an election runs.
async fn known_leader(raft: &Raft) -> Option<RaftNodeId> {
    if let Some(leader) = raft.current_leader().await {
        return Some(leader);
    }
    raft.wait(Some(LEADER_WAIT))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .ok()
        .and_then(|m| m.current_leader)
}

fn raft_id_of(raft: &Raft) -> RaftNodeId {
    raft.metrics().borrow().id
}
