//! The replicated logs of one node: a log per shard for the groups of that shard, and one log
//! for the directory. Each runs its own raft instance over the same cluster links, with the
//! same voters, and elects its own leader, which owns the log's groups (see
//! [`crate::GroupOwners`]).

use super::proposals::LogHandle;
use super::{
    AppliedHook, ClusterReplicator, RaftNodeId, Replica, ReplicaSettings, ReplicaStatus,
    SharedState,
};
use crate::placement::{ShardId, shard_of};
use atlas_storage::{SharedPart, Store};
use std::sync::Arc;
use std::time::Duration;

/// Name of the directory's log. Earlier versions carried everything in it.
pub const DIRECTORY_LOG: &str = "cluster";

/// Returns the name of the log of `shard`.
pub fn shard_log(shard: ShardId) -> String {
    format!("shard-{}", shard.0)
}

/// Settings of a node's logs.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Settings that every log shares; each log replaces `log` with its own name.
    pub replica: ReplicaSettings,
    /// Number of shards, and so of group logs.
    pub shards: u32,
}

/// One log with the applier of its committed changes.
struct Log {
    replica: Arc<Replica>,
    state: Arc<SharedState>,
}

/// The node's replicas of the directory log and of every shard's log.
pub struct ReplicatedLogs {
    node: RaftNodeId,
    directory: Log,
    /// By shard number.
    shards: Vec<Log>,
}

impl ReplicatedLogs {
    /// Starts this node's replica of every log, each applying to `store`.
    pub async fn start(settings: LogSettings, store: &Store) -> anyhow::Result<Self> {
        let start = |log: String, part: SharedPart| {
            let settings = ReplicaSettings {
                log: log.clone(),
                ..settings.replica.clone()
            };
            async move {
                let state = Arc::new(SharedState::new(
                    store.clone(),
                    settings.raft_id,
                    &log,
                    part,
                )?);
                let replica = Replica::start(settings, store.sled_db(), state.clone())
                    .await
                    .map_err(|e| e.context(format!("cannot start the replicated log {log}")))?;
                anyhow::Ok(Log {
                    replica: Arc::new(replica),
                    state,
                })
            }
        };
        let directory = start(DIRECTORY_LOG.to_owned(), SharedPart::Directory).await?;
        let count = settings.shards;
        let mut shards = Vec::with_capacity(count as usize);
        for shard in 0..count {
            let part = SharedPart::Groups(Arc::new(move |group: &[u8]| {
                shard_of(group, count) == ShardId(shard)
            }));
            shards.push(start(shard_log(ShardId(shard)), part).await?);
        }
        Ok(Self {
            node: settings.replica.raft_id,
            directory,
            shards,
        })
    }

    fn all(&self) -> impl Iterator<Item = &Log> {
        std::iter::once(&self.directory).chain(&self.shards)
    }

    /// Returns the proposer of changes to these logs, for `Store::set_replicator`.
    pub fn replicator(&self) -> ClusterReplicator {
        let handle = |log: &Log| LogHandle {
            raft: log.replica.raft().clone(),
            name: log.replica.name().to_owned(),
        };
        ClusterReplicator::new(
            self.node,
            handle(&self.directory),
            self.shards.iter().map(handle).collect(),
        )
    }

    /// Sets the function called for changes that other nodes proposed, once applied here.
    pub fn set_hook(&self, hook: AppliedHook) {
        for log in self.all() {
            log.state.set_hook(Arc::clone(&hook));
        }
    }

    /// Makes live members voters of every log this node leads (see
    /// [`Replica::add_live_members`]). Returns the failures, by log.
    pub async fn add_live_members(&self, alive: &[(String, RaftNodeId)]) -> Vec<String> {
        let mut failures = Vec::new();
        // The logs change their members one after another: each change waits for a commit,
        // and a joining node catches up with one log at a time.
        for log in self.all() {
            if let Err(e) = log.replica.add_live_members(alive).await {
                failures.push(format!("log {}: {e:#}", log.replica.name()));
            }
        }
        failures
    }

    /// Lets this node start elections in a log only while it counts a majority of the log's
    /// voters alive (see [`Replica::gate_elections`]).
    pub fn gate_elections(&self, alive: &[(String, RaftNodeId)]) {
        let alive: std::collections::BTreeSet<RaftNodeId> =
            alive.iter().map(|(_, id)| *id).collect();
        for log in self.all() {
            log.replica.gate_elections(&alive);
        }
    }

    /// Returns whether this node is on the side of a majority of the directory log's voters
    /// (see [`Replica::in_majority`]). Every log has the same voters.
    pub fn in_majority(&self, lease: Duration) -> bool {
        self.directory.replica.in_majority(lease)
    }

    /// Returns the name of the leader of `shard`'s log as this node last heard.
    pub fn shard_leader(&self, shard: ShardId) -> Option<String> {
        self.shards.get(shard.0 as usize)?.replica.leader_name()
    }

    /// Returns this node's view of the directory log and of each shard's log.
    pub fn status(&self) -> (ReplicaStatus, Vec<ReplicaStatus>) {
        (
            self.directory.replica.status(),
            self.shards.iter().map(|log| log.replica.status()).collect(),
        )
    }

    /// Takes this node out of the voters of every log at once (see [`Replica::leave`]).
    /// Returns the failures, by log.
    pub async fn leave(&self) -> Vec<String> {
        let mut leaving = tokio::task::JoinSet::new();
        for log in self.all() {
            let replica = Arc::clone(&log.replica);
            leaving.spawn(async move {
                replica
                    .leave()
                    .await
                    .map_err(|e| format!("log {}: {e:#}", replica.name()))
            });
        }
        let mut failures = Vec::new();
        while let Some(left) = leaving.join_next().await {
            match left {
                Ok(Ok(())) => {}
                Ok(Err(failure)) => failures.push(failure),
                Err(e) => failures.push(format!("a task leaving a log failed: {e}")),
            }
        }
        failures
    }

    /// Stops every replica.
    pub async fn stop(&self) {
        for log in self.all() {
            log.replica.stop().await;
        }
    }
}
