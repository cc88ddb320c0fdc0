//! The replicated logs of one node: a log per shard for the groups of that shard, and one log
//! for the directory. Each runs its own raft instance over the same cluster links, with its
//! own voters, and elects its own leader, which owns the log's groups (see
//! [`crate::GroupOwners`]). Every live member votes in the directory log, and a shard's
//! replica set in the shard's log.
//!
//! The node started without seeds starts the directory log alone. The shard logs start later,
//! once with the voters that the directory log records in [`Change::StartShardLogs`]. The
//! first node of each shard's rendezvous order among those voters starts the shard's log and
//! wins its first election, so the leaders spread over the nodes as placement does. The
//! other voters receive the log from it, and start it themselves with the same members only
//! if it does not reach them in time. openraft 0.9 cannot move a leader later.

use super::proposals::LogHandle;
use super::{
    AppliedHook, ClusterReplicator, InstalledHook, LogDisk, RaftNodeId, Replica, ReplicaSettings,
    ReplicaStatus, SharedState,
};
use crate::placement::{NodeName, ShardId, replicas, shard_of};
use atlas_storage::{Change, ShardLogStart, SharedPart, StorageError, Store};
use openraft::{BasicNode, ServerState};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the directory's log. Earlier versions carried everything in it.
pub const DIRECTORY_LOG: &str = "cluster";

/// Returns the name of the log of `shard`.
pub fn shard_log(shard: ShardId) -> String {
    format!("shard-{}", shard.0)
}

/// Time one log's membership change may take before the next log's turn. A change that
/// cannot commit, because the log lost its majority, would otherwise hold up every other log.
const MEMBER_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a node's logs.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Settings that every log shares; each log replaces `log` with its own name.
    pub replica: ReplicaSettings,
    /// Number of shards, and so of group logs.
    pub shards: u32,
    /// Voters of each shard log, the first ones in the shard's rendezvous order among the
    /// live members. The shard logs start once the directory log has this many voters.
    pub replication: usize,
    /// Time after which the directory log's leader starts the shard logs with the voters it
    /// has, however few.
    pub start_alone_after: Duration,
}

/// One log with the applier of its committed changes.
struct Log {
    replica: Arc<Replica>,
    state: Arc<SharedState>,
}

/// Why [`ReplicatedLogs::remove_member`] removed nothing, or not everything.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{0} is alive; stop it first, or let it leave with SIGTERM")]
    Alive(String),
    #[error("no log has a member named {0}; `atlas status` lists the members")]
    NotInLogs(String),
    #[error("{error} (removed so far from: {removed:?})")]
    Failed { error: String, removed: Vec<String> },
}

/// The node's replicas of the directory log and of every shard's log.
pub struct ReplicatedLogs {
    node: RaftNodeId,
    directory: Log,
    /// By shard number.
    shards: Vec<Log>,
    store: Store,
    started: Instant,
    replication: usize,
    start_alone_after: Duration,
    /// Turn counter of [`ReplicatedLogs::balance_leaders`].
    balance_turn: AtomicU32,
    /// The last call of [`ReplicatedLogs::gate_elections`], and the end of the quiet time
    /// after a pause it saw.
    gate_runs: Mutex<(Option<Instant>, Option<Instant>)>,
    /// The upper bound of the election timeout: the quiet time after a pause.
    quiet_after_pause: Duration,
}

/// A gap between two calls of [`ReplicatedLogs::gate_elections`] longer than this means
/// that the node did not run meanwhile (SIGSTOP, a stalled VM or a starved process). The
/// calls come every 200 ms.
const PAUSE_GAP: Duration = Duration::from_secs(1);

impl ReplicatedLogs {
    /// Starts this node's replica of every log, each applying to `store`.
    pub async fn start(settings: LogSettings, store: &Store) -> anyhow::Result<Self> {
        let disk = LogDisk::of_store(store);
        let disk = &disk;
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
                let replica = Replica::start(settings, disk, state.clone())
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
            let part = SharedPart::Shard(Arc::new(move |key: &[u8]| {
                shard_of(key, count) == ShardId(shard)
            }));
            shards.push(start(shard_log(ShardId(shard)), part).await?);
        }
        let node = settings.replica.raft_id;
        let rafts: Vec<super::Raft> = shards.iter().map(|l| l.replica.raft().clone()).collect();
        let fallback = settings.start_alone_after;
        directory
            .state
            .set_start_hook(Arc::new(move |start: &ShardLogStart| {
                // A node configured with another shard count must not start logs that the
                // others do not run; the members task stops it (see `check_layout`).
                let runs = u32::try_from(rafts.len()).ok() == Some(start.shards);
                if runs && start.voters.iter().any(|(id, _)| *id == node) {
                    tokio::spawn(start_shard_logs(
                        rafts.clone(),
                        node,
                        start.voters.clone(),
                        fallback,
                    ));
                }
            }));
        Ok(Self {
            node,
            directory,
            shards,
            store: store.clone(),
            started: Instant::now(),
            replication: settings.replication.max(1),
            start_alone_after: settings.start_alone_after,
            balance_turn: AtomicU32::new(0),
            gate_runs: Mutex::new((None, None)),
            quiet_after_pause: 2 * settings.replica.election_timeout,
        })
    }

    /// Records in the directory log, if this node leads it, that the shard logs start with
    /// the directory log's voters: once it has `replication` voters, or after
    /// `start_alone_after` with the voters it has. Does nothing once they started.
    pub async fn start_shard_logs_when_due(&self) -> Result<(), StorageError> {
        let metrics = self.directory.replica.raft().metrics().borrow().clone();
        if metrics.state != ServerState::Leader || self.store.shard_log_start()?.is_some() {
            return Ok(());
        }
        // Shard logs that run already were started by an earlier version, alone.
        for log in &self.shards {
            if log.replica.raft().is_initialized().await.unwrap_or(true) {
                return Ok(());
            }
        }
        let membership = metrics.membership_config.membership();
        let voters: Vec<(RaftNodeId, String)> = membership
            .voter_ids()
            .map(|id| {
                let name = membership
                    .get_node(&id)
                    .map_or_else(|| id.to_string(), |node| node.addr.clone());
                (id, name)
            })
            .collect();
        if voters.len() < self.replication && self.started.elapsed() < self.start_alone_after {
            return Ok(());
        }
        tracing::info!(voters = voters.len(), "starting the shard logs");
        let start = ShardLogStart {
            shards: self.shard_count(),
            voters,
            replication: u32::try_from(self.replication).unwrap_or(u32::MAX),
            cluster: rand::random::<u64>().max(1),
        };
        match self.store.write(Change::StartShardLogs(start)).await {
            Ok(_) | Err(StorageError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// Returns an error when the cluster's shard logs started with another number of shards
    /// or another replication factor than this node runs with. With other shards a node maps
    /// groups to other logs than its peers do. With another factor, as the leader of a shard's
    /// log it would change the log's voters to a set of another size, and its peers would
    /// change them back. Such a node must not serve; the caller stops it.
    ///
    /// NOTE: a node learns the cluster's count only once it has the directory log's record,
    /// a moment after it joins; requests it serves before that may go to the wrong log.
    pub fn check_layout(&self) -> Result<(), String> {
        let replication = u32::try_from(self.replication).unwrap_or(u32::MAX);
        match self.store.shard_log_start() {
            Ok(Some(start)) if start.shards != self.shard_count() => Err(format!(
                "this node runs {} shards but the cluster's shard logs started with {}; restart \
                 it with --shards {} (ATLAS_SHARDS)",
                self.shard_count(),
                start.shards,
                start.shards
            )),
            Ok(Some(start)) if start.replication != 0 && start.replication != replication => {
                Err(format!(
                    "this node runs with replication {replication} but the cluster's shard logs \
                     started with {}; restart it with --replication {} (ATLAS_REPLICATION)",
                    start.replication, start.replication
                ))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's shard count; checking again later");
                Ok(())
            }
        }
    }

    fn all(&self) -> impl Iterator<Item = &Log> {
        std::iter::once(&self.directory).chain(&self.shards)
    }

    /// Returns every log with its shard: the directory's first, without one.
    fn by_shard(&self) -> impl Iterator<Item = (Option<ShardId>, &Log)> {
        let shards = (0u32..).map(|shard| Some(ShardId(shard)));
        std::iter::once(None).chain(shards).zip(self.all())
    }

    /// Returns the names of `shard`'s replica set among the `live` members.
    fn replica_set(&self, shard: ShardId, live: &[NodeName]) -> Vec<String> {
        replicas(shard, live, self.replication)
            .into_iter()
            .map(|name| name.0)
            .collect()
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

    /// Sets the function called after a snapshot from a leader brought entries or Welcomes of
    /// groups here.
    pub fn set_installed_hook(&self, hook: InstalledHook) {
        for log in self.all() {
            log.state.set_installed_hook(Arc::clone(&hook));
        }
    }

    /// Makes live members voters of every log this node leads (see
    /// [`Replica::add_live_members`]): every one of the directory's, and of each shard's the
    /// `replication` first in the shard's rendezvous order among the live members, with the
    /// others as learners. Then, if every change went through, hands the leadership of at
    /// most one shard log to its preferred leader (see [`ReplicatedLogs::balance_leaders`]).
    /// Returns the failures, by log.
    pub async fn add_live_members(&self, alive: &[(String, RaftNodeId)]) -> Vec<String> {
        let mut failures = Vec::new();
        let live: Vec<NodeName> = alive
            .iter()
            .map(|(name, _)| NodeName(name.clone()))
            .collect();
        // The logs change their members one after another: each change waits for a commit,
        // and a joining node catches up with one log at a time.
        for (shard, log) in self.by_shard() {
            let replica_set = shard.map(|shard| self.replica_set(shard, &live));
            let replica_set = replica_set
                .as_deref()
                .map(|names| (names, self.replication));
            let change = log.replica.add_live_members(alive, replica_set);
            match tokio::time::timeout(MEMBER_CHANGE_TIMEOUT, change).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("log {}: {e:#}", log.replica.name())),
                Err(_) => failures.push(format!(
                    "log {}: the membership change did not finish within {} s; it goes on \
                     in the log and is checked again",
                    log.replica.name(),
                    MEMBER_CHANGE_TIMEOUT.as_secs()
                )),
            }
        }
        if failures.is_empty() {
            self.balance_leaders(alive, &live).await;
        }
        failures
    }

    /// Hands the leadership of one shard log that this node should not lead to the log's
    /// preferred leader: the first node of its replica set (see
    /// [`Replica::transfer_leadership`]). So the leaders spread over the nodes as placement
    /// does. Logs this node has led for less than the lease on its vote wait for a later
    /// round. The logs take turns, so that one whose handover keeps failing does not hold up
    /// the others.
    async fn balance_leaders(&self, alive: &[(String, RaftNodeId)], live: &[NodeName]) {
        let mut candidates = Vec::new();
        for (shard, log) in self.by_shard() {
            let Some(shard) = shard else { continue };
            // Every log this node leads is asked, so that each starts counting its lease.
            if !log.replica.leads_past_lease() {
                continue;
            }
            let replica_set = self.replica_set(shard, live);
            // Until the log's voters are its replica set, membership changes come first.
            if !same_names(&log.replica.status().voters, &replica_set) {
                continue;
            }
            let preferred = replica_set.into_iter().next();
            let target = preferred.and_then(|name| {
                let (_, id) = alive.iter().find(|(n, _)| *n == name)?;
                (*id != self.node).then_some((shard, name, *id))
            });
            if let Some(target) = target {
                candidates.push((log, target));
            }
        }
        let turn = self.balance_turn.fetch_add(1, Ordering::Relaxed);
        let Some((log, (shard, name, id))) = candidates
            .iter()
            .min_by_key(|(_, (shard, _, _))| shard.0.wrapping_sub(turn))
        else {
            return;
        };
        if log.replica.transfer_leadership(*id).await {
            tracing::info!(shard = shard.0, to = %name, "handed leadership of the shard's log to its preferred leader");
        } else {
            tracing::debug!(shard = shard.0, to = %name, "the preferred leader of the shard's log did not take over; trying again later");
        }
    }

    /// Removes the node named `name`, which an operator declares lost for good, from every
    /// log, and returns the logs it was a member of. Refused while the node is alive
    /// (in `alive`), since the leaders would add it back. The directory log keeps a dead
    /// member as a voter until it returns, so without this a lost node keeps counting
    /// towards the directory's majority. Shard logs replace dead voters by themselves.
    pub async fn remove_member(
        &self,
        name: &str,
        alive: &[(String, RaftNodeId)],
    ) -> Result<Vec<String>, RemoveError> {
        if alive.iter().any(|(n, _)| n == name) {
            return Err(RemoveError::Alive(name.to_owned()));
        }
        let known = self.all().any(|log| {
            let status = log.replica.status();
            status
                .voters
                .iter()
                .chain(&status.learners)
                .any(|n| n == name)
        });
        if !known {
            return Err(RemoveError::NotInLogs(name.to_owned()));
        }
        let mut removed = Vec::new();
        for log in self.all() {
            match log.replica.remove_member(name).await {
                Ok(0) => {}
                Ok(_) => removed.push(log.replica.name().to_owned()),
                Err(e) => {
                    return Err(RemoveError::Failed {
                        error: format!("{e:#}"),
                        removed,
                    });
                }
            }
        }
        Ok(removed)
    }

    /// Lets this node start elections in a log only while it counts a majority of the log's
    /// voters alive and hears no leader (see [`Replica::gate_elections`]). Call it every
    /// 200 ms. After a gap of more than [`PAUSE_GAP`] between two calls, elections stay
    /// closed for the upper bound of the election timeout. The failure detector and the
    /// times of the leaders' last appends are stale after a pause, and by then the leaders'
    /// appends have arrived again.
    pub fn gate_elections(&self, alive: &[(String, RaftNodeId)]) {
        let alive: std::collections::BTreeSet<RaftNodeId> =
            alive.iter().map(|(_, id)| *id).collect();
        let now = Instant::now();
        let quiet = match self.gate_runs.lock() {
            Ok(mut runs) => {
                let (last, quiet_until) = &mut *runs;
                if let Some(gap) = last.map(|at| now.saturating_duration_since(at))
                    && gap > PAUSE_GAP
                {
                    tracing::warn!(
                        gap_ms = gap.as_millis() as u64,
                        "this node did not run for a while (paused or starved); it starts no \
                         elections until it has heard from the leaders again"
                    );
                    *quiet_until = Some(now + self.quiet_after_pause);
                }
                *last = Some(now);
                quiet_until.is_some_and(|until| now < until)
            }
            Err(_) => false,
        };
        for log in self.all() {
            log.replica.gate_elections(&alive, quiet);
        }
    }

    /// Returns the id of the cluster that this node's shard logs started in, 0 before they
    /// started or when the record has none.
    pub fn cluster_id(&self) -> u64 {
        match self.store.shard_log_start() {
            Ok(start) => start.map_or(0, |s| s.cluster),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's id; checking again later");
                0
            }
        }
    }

    /// Returns whether the directory log has members (see [`Replica::formed`]).
    pub fn directory_formed(&self) -> bool {
        self.directory.replica.formed()
    }

    /// Starts the directory log with this node as its only member, unless it has members.
    /// The shard logs follow (see [`Self::start_shard_logs_when_due`]).
    pub async fn start_directory_alone(&self) -> anyhow::Result<()> {
        self.directory.replica.start_alone().await
    }

    /// Returns whether this node is on the side of a majority of the directory log's voters
    /// (see [`Replica::in_majority`]). Every live member votes in the directory log.
    pub fn in_majority(&self, lease: Duration) -> bool {
        self.directory.replica.in_majority(lease)
    }

    /// Returns whether a voter of the directory log replied that it does not list this node
    /// (see [`Replica::not_listed`]). Such a node was removed while it was down, and waits
    /// for a leader to add it back.
    pub fn awaiting_readmission(&self) -> bool {
        self.directory.replica.not_listed()
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

    /// Takes this node out of the voters of every log at once (see [`Replica::leave`]). In
    /// each shard's log the next node of the shard's order among the other members in `alive`
    /// becomes a voter in its place. No log is left with fewer than `replication` voters.
    /// Returns the failures, by log.
    pub async fn leave(&self, alive: &[(String, RaftNodeId)]) -> Vec<String> {
        let me = self.directory.replica.raft_id();
        let others: Vec<NodeName> = alive
            .iter()
            .filter(|(_, id)| *id != me)
            .map(|(name, _)| NodeName(name.clone()))
            .collect();
        let mut leaving = tokio::task::JoinSet::new();
        let mut staying = Vec::new();
        for (shard, log) in self.by_shard() {
            // A shard's log takes the next node of the shard's order without this one.
            let status = log.replica.status();
            let replacement = shard.and_then(|shard| {
                let name = self
                    .replica_set(shard, &others)
                    .into_iter()
                    .find(|name| !status.voters.contains(name))?;
                alive.iter().find(|(n, _)| *n == name).cloned()
            });
            let replica = Arc::clone(&log.replica);
            let keep = self.replication;
            // The leader refuses a leave that would keep fewer than `keep` voters, and takes
            // a replacement only if it is a learner already (see `Replica::leave`). This
            // node's view of the log decides that up front, so in such a log the node only
            // hands leadership over.
            let learner = replacement
                .as_ref()
                .is_some_and(|(name, _)| status.learners.contains(name));
            let voting = status.voters.iter().any(|v| v == replica.node_name());
            let remaining = status.voters.len().saturating_sub(1) + usize::from(learner);
            if voting && status.voters.len() > 1 && remaining < keep {
                staying.push(replica.name().to_owned());
                leaving.spawn(async move {
                    replica.stay_as_voter().await;
                    Ok(())
                });
                continue;
            }
            let replacement = replacement.map(|(_, id)| id);
            leaving.spawn(async move {
                replica
                    .leave(replacement, keep)
                    .await
                    .map_err(|e| format!("log {}: {e:#}", replica.name()))
            });
        }
        if !staying.is_empty() {
            tracing::info!(logs = ?staying, replication = self.replication, "this node stays a voter of the logs that would keep fewer voters than the replication factor; their other voters count it as failed");
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

/// Starts the shard logs that this node is the first of in rendezvous order among `voters`,
/// with `voters` as their members, and after `fallback` every other shard log that has not
/// reached this node by then. Every voter starts a log with the same members, so whichever
/// starts it, its first entry is the same.
async fn start_shard_logs(
    rafts: Vec<super::Raft>,
    node: RaftNodeId,
    voters: Vec<(RaftNodeId, String)>,
    fallback: Duration,
) {
    let members: BTreeMap<RaftNodeId, BasicNode> = voters
        .iter()
        .map(|(id, name)| (*id, BasicNode::new(name)))
        .collect();
    let names: Vec<NodeName> = voters
        .iter()
        .map(|(_, name)| NodeName(name.clone()))
        .collect();
    let my_name = voters
        .iter()
        .find(|(id, _)| *id == node)
        .map(|(_, name)| name);
    let count = u32::try_from(rafts.len()).unwrap_or(u32::MAX);
    let (mine, others): (Vec<_>, Vec<_>) = rafts.into_iter().enumerate().partition(|(shard, _)| {
        let shard = ShardId(u32::try_from(*shard).unwrap_or(count));
        replicas(shard, &names, 1).first().map(|n| &n.0) == my_name
    });
    for (_, raft) in mine {
        start_shard_log(&raft, &members).await;
    }
    tokio::time::sleep(fallback).await;
    for (shard, raft) in others {
        if start_shard_log(&raft, &members).await {
            tracing::warn!(
                shard,
                "a shard log had not reached this node from its first node; started it here"
            );
        }
    }
}

/// Starts one shard log with `members` unless it runs on this node already; returns whether
/// it started it.
async fn start_shard_log(raft: &super::Raft, members: &BTreeMap<RaftNodeId, BasicNode>) -> bool {
    match raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) => return false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read whether a shard log runs; not starting it");
            return false;
        }
    }
    match raft.initialize(members.clone()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "starting a shard log failed");
            false
        }
    }
}

/// Returns whether two lists hold the same names, in any order.
fn same_names(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}
