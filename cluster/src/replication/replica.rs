//! One node's replica of a replicated log over the cluster links: its openraft instance, its
//! endpoint actor, and the task that makes live cluster members voters.

use super::transport::{
    ClusterNetwork, Departures, EndpointArgs, LEAVE_HOLD, LeaderContact, RaftEndpoint,
    RaftEndpointMsg, Request, ask, hold_writes, peer_lists, release_writes, remove_voter, voters,
    writes_settled,
};
use super::{Applier, LogDisk, Raft, RaftNodeId, SledLogStore, SledStateMachine};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use ractor::{Actor, ActorRef};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Raft id that earlier versions derived from a node's name: the first 8 bytes of its SHA-256.
fn name_based_id(name: &str) -> RaftNodeId {
    let digest = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes of a 32-byte digest"))
}

/// Returns this node's id in the replicated log named `log`, stored in its database: random on
/// the first start, so that a node that lost its data directory, or a second node started
/// under the same name, is a new member rather than an old voter with an empty log, which
/// raft cannot survive. A database that holds raft state from a version that derived the id
/// from the name keeps that id.
///
/// The database also records the node name of its first start, and a start under another
/// name fails: a copy of another node's data directory would otherwise join under that
/// node's id, and the cluster would count one member twice.
pub fn node_identity(db: &sled::Db, log: &str, name: &str) -> anyhow::Result<RaftNodeId> {
    let tree = db.open_tree(format!("raft-identity-{log}"))?;
    match tree.get(b"name")? {
        Some(stored) if stored.as_ref() != name.as_bytes() => {
            let stored = String::from_utf8_lossy(&stored);
            anyhow::bail!(
                "this data directory belongs to node {stored:?}, but this node is named \
                 {name:?}; give each node its own data directory, or start this one with \
                 --node-name {stored}"
            );
        }
        Some(_) => {}
        None => {
            tree.insert(b"name", name.as_bytes())?;
            tree.flush()?;
        }
    }
    if let Some(raw) = tree.get(b"id")? {
        let bytes = <[u8; 8]>::try_from(raw.as_ref())
            .map_err(|_| anyhow::anyhow!("stored raft id of log {log} is not 8 bytes"))?;
        return Ok(u64::from_be_bytes(bytes));
    }
    let earlier = db.open_tree(format!("raft-meta-{log}"))?;
    let id = if earlier.is_empty() {
        loop {
            let id = rand::random::<u64>();
            if id != 0 {
                break id;
            }
        }
    } else {
        name_based_id(name)
    };
    tree.insert(b"id", &id.to_be_bytes())?;
    tree.flush()?;
    Ok(id)
}

/// Settings of one node's replica of a replicated log.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Name of the log; its sled trees and process groups are named after it.
    pub log: String,
    pub node_name: String,
    /// This node's id in the log, from [`node_identity`].
    pub raft_id: RaftNodeId,
    pub heartbeat: Duration,
    /// Lower bound of the election timeout; the upper bound is twice this.
    pub election_timeout: Duration,
    /// Entries between two snapshots; the log keeps at most 1,000 entries older than the
    /// last snapshot.
    pub snapshot_every: u64,
}

/// A node's view of a replicated log, for status output.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub log: String,
    pub role: String,
    pub term: u64,
    /// Name of the current leader, as this node last heard.
    pub leader: Option<String>,
    pub voters: Vec<String>,
    /// Members that receive the log without voting.
    pub learners: Vec<String>,
    pub last_applied: Option<u64>,
    /// Index of the last entry in this node's latest snapshot.
    pub snapshot: Option<u64>,
    /// Index of the last entry this node removed from its log after a snapshot.
    pub purged: Option<u64>,
    /// The error that stopped this node's replica of the log, if one did. openraft 0.9
    /// stops a log until the node restarts on a storage error, such as a damaged snapshot
    /// from the leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// A running replica.
pub struct Replica {
    settings: ReplicaSettings,
    raft: Raft,
    endpoint: ActorRef<RaftEndpointMsg>,
    departures: Departures,
    announcer: tokio::task::JoinHandle<()>,
    /// When this node last heard from a leader of the log.
    contact: LeaderContact,
    /// Whether this node may start elections (see [`Replica::gate_elections`]).
    elections: AtomicBool,
    /// Whether this node counted a majority of the log's voters alive at the last
    /// [`Replica::gate_elections`]; true until the first.
    majority_alive: AtomicBool,
    /// Since when this node counts a majority of the voters alive: the start of the replica,
    /// or the last time the count rose back to a majority.
    majority_since: Mutex<Instant>,
    /// The term in which this node leads the log, and when it first saw itself lead in it.
    leading_since: Mutex<Option<(u64, Instant)>>,
    /// Tree in which this node records that it left the log (see [`Replica::gate_elections`]).
    identity: sled::Tree,
    /// Whether this node left the log and has not voted in it again since.
    left: AtomicBool,
    /// The last log index this node had when it left: a membership written after it that
    /// makes this node a voter again lifts the ban on elections.
    left_at: AtomicU64,
    /// Whether the others counted this node as a member of the log since it started (see
    /// [`Replica::gate_elections`]).
    member: Arc<MemberCheck>,
}

/// A replica's record, since it started, of whether the others count it as a member.
#[derive(Default)]
struct MemberCheck {
    /// A leader's append reached this node, or a majority of the voters listed it.
    confirmed: AtomicBool,
    /// A round of requests to the voters is under way.
    asking: AtomicBool,
    /// This node warned that a voter does not list it.
    warned: AtomicBool,
}

/// Pause after a round of requests to the voters that did not confirm this node as a
/// member, before the next round.
const MEMBER_CHECK_PAUSE: Duration = Duration::from_secs(1);

/// Key of the record that this node left the log, in its identity tree.
pub(super) const LEFT_KEY: &[u8] = b"left";

/// Time a leader keeps new writes waiting, at most, while it hands leadership over.
const HANDOVER_HOLD: Duration = Duration::from_secs(1);

/// Handovers a leader tries, at most, before it stops (see [`Replica::step_down`]).
const HANDOVER_ATTEMPTS: u32 = 3;

/// Time a leader waits, at most, for the voter taking over to have the whole log.
const HANDOVER_CATCH_UP: Duration = Duration::from_millis(500);

/// Time a removal of a lost node waits, at most, for a log to have a leader other than it.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// Time the leader waits after announcing a commit before it announces the next, so that
/// announcements under load cost at most this many heartbeats a second.
const ANNOUNCE_PAUSE: Duration = Duration::from_millis(2);

/// Sends followers the leader's commit index as soon as it moves. openraft 0.9 sends it with
/// the next append or heartbeat, which on an idle log comes a heartbeat interval later;
/// followers apply committed entries only then, and a client reading from a follower, or
/// waiting for a follower to apply its own write, would wait that long.
async fn announce_commits(raft: Raft) {
    let mut metrics = raft.metrics();
    let mut announced = None;
    while metrics.changed().await.is_ok() {
        let (leading, applied) = {
            let now = metrics.borrow();
            (now.state == ServerState::Leader, now.last_applied)
        };
        if !leading || applied == announced {
            continue;
        }
        announced = applied;
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
        tokio::time::sleep(ANNOUNCE_PAUSE).await;
    }
}

impl Replica {
    /// Opens the log's storage in `disk` and starts the replica and its endpoint.
    pub async fn start(
        settings: ReplicaSettings,
        disk: &LogDisk,
        applier: Arc<dyn Applier>,
    ) -> anyhow::Result<Self> {
        let id = settings.raft_id;
        let config = Config {
            cluster_name: settings.log.clone(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: settings.election_timeout.as_millis() as u64,
            election_timeout_max: 2 * settings.election_timeout.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.snapshot_every.min(1000),
            ..Config::default()
        }
        .validate()?;
        let log = SledLogStore::open(disk, &settings.log)?;
        let check = super::state_machine::snapshot_check(Arc::clone(&applier));
        let machine = SledStateMachine::open(disk, &settings.log, applier)?;
        let network = ClusterNetwork {
            log: settings.log.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, machine).await?;
        let departures = Departures::default();
        let contact = LeaderContact::default();
        let (endpoint, _) = Actor::spawn(
            None,
            RaftEndpoint,
            EndpointArgs {
                log: settings.log.clone(),
                node: id,
                raft: raft.clone(),
                departures: Arc::clone(&departures),
                contact: contact.clone(),
                check,
            },
        )
        .await?;
        let announcer = tokio::spawn(announce_commits(raft.clone()));
        let identity = disk
            .db
            .open_tree(format!("raft-identity-{}", settings.log))?;
        let left_at = identity
            .get(LEFT_KEY)?
            .map(|raw| <[u8; 8]>::try_from(raw.as_ref()).map(u64::from_be_bytes))
            .transpose()
            .map_err(|_| {
                anyhow::anyhow!(
                    "the record that this node left log {} is not 8 bytes",
                    settings.log
                )
            })?;
        let left = left_at.is_some();
        if left {
            raft.runtime_config().elect(false);
            tracing::info!(log = %settings.log, "this node left the log before it stopped; it starts no elections until it votes in the log again");
        }
        Ok(Self {
            settings,
            raft,
            endpoint,
            departures,
            announcer,
            contact,
            elections: AtomicBool::new(!left),
            majority_alive: AtomicBool::new(true),
            majority_since: Mutex::new(Instant::now()),
            leading_since: Mutex::new(None),
            identity,
            left: AtomicBool::new(left),
            left_at: AtomicU64::new(left_at.unwrap_or(0)),
            member: Arc::default(),
        })
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Returns whether the log has members: it was started here or on a node that added
    /// this one.
    pub fn formed(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some()
    }

    /// Starts the log with this node as its only member, unless it has members already.
    pub async fn start_alone(&self) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        let members = BTreeMap::from([(
            self.settings.raft_id,
            BasicNode::new(&self.settings.node_name),
        )]);
        self.raft.initialize(members).await?;
        tracing::info!(log = %self.settings.log, node = %self.settings.node_name, "replicated log started on this node alone");
        Ok(())
    }

    /// Returns the name of this node.
    pub fn node_name(&self) -> &str {
        &self.settings.node_name
    }

    /// Has the other voters elect a leader among themselves if this node leads the log, for
    /// a node that stops while it stays a voter (see [`Replica::leave`]).
    pub async fn stay_as_voter(&self) {
        let voters = voters(&self.raft);
        if self.raft.current_leader().await == Some(self.settings.raft_id) && voters.len() > 1 {
            self.step_down(&voters).await;
        }
    }

    /// Returns this node's id in the log.
    pub fn raft_id(&self) -> RaftNodeId {
        self.settings.raft_id
    }

    /// Returns the name of the log.
    pub fn name(&self) -> &str {
        &self.settings.log
    }

    /// Makes live members in `alive` (node name and raft id) voters, if this node leads the
    /// log. With `replica_set` (names and size), only the named members become voters, and
    /// the other live members learners, which keep a copy so reads through them stay local.
    /// Once every member of the set votes, voters outside it become learners, one per call,
    /// so a log moves to its new set only after the new replica caught up. Without
    /// `replica_set`, every live member becomes a voter. Members that are not alive stay
    /// voters until replaced: they may come back, and their votes count towards the majority
    /// as before. Learners that are not alive are removed. A voter of the same name with another id, an earlier incarnation that lost
    /// its data directory, is replaced.
    pub async fn add_live_members(
        &self,
        alive: &[(String, RaftNodeId)],
        replica_set: Option<(&[String], usize)>,
    ) -> anyhow::Result<()> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Ok(());
        }
        let voters: BTreeSet<RaftNodeId> =
            metrics.membership_config.membership().voter_ids().collect();
        let recently_left = |id: &RaftNodeId| {
            self.departures
                .lock()
                .is_ok_and(|d| d.get(id).is_some_and(|at| at.elapsed() < LEAVE_HOLD))
        };
        let membership = metrics.membership_config.membership().clone();
        let in_replica_set =
            |name: &str| replica_set.is_none_or(|(names, _)| names.iter().any(|n| n == name));
        for (name, id) in alive {
            let id = *id;
            if id == 0 || voters.contains(&id) || recently_left(&id) {
                continue;
            }
            if !in_replica_set(name) {
                if membership.get_node(&id).is_none() {
                    tracing::info!(log = %self.settings.log, node = %name, raft_id = id, "adding a learner to the replicated log");
                    self.raft
                        .add_learner(id, BasicNode::new(name), false)
                        .await?;
                    return Ok(());
                }
                continue;
            }
            tracing::info!(log = %self.settings.log, node = %name, raft_id = id, "adding a member to the replicated log");
            self.raft
                .add_learner(id, BasicNode::new(name), true)
                .await?;
            let mut next: BTreeSet<RaftNodeId> = voters
                .iter()
                .copied()
                .filter(|v| membership.get_node(v).is_none_or(|node| node.addr != *name))
                .collect();
            if next.len() < voters.len() {
                tracing::warn!(log = %self.settings.log, node = %name, "replacing an earlier incarnation of a member among the voters");
            }
            next.insert(id);
            self.raft.change_membership(next, false).await?;
            tracing::info!(log = %self.settings.log, node = %name, "member is now a voter");
            // One change at a time: the next call starts from the new membership.
            return Ok(());
        }
        // A learner that died gets no more entries; it becomes a learner again when it returns.
        let alive_ids: BTreeSet<RaftNodeId> = alive.iter().map(|(_, id)| *id).collect();
        let dead_learner = membership
            .nodes()
            .map(|(id, _)| *id)
            .find(|id| !voters.contains(id) && !alive_ids.contains(id));
        if let Some(id) = dead_learner {
            tracing::info!(log = %self.settings.log, raft_id = id, "removing a dead learner from the replicated log");
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await?;
            return Ok(());
        }
        let Some((names, replicas)) = replica_set else {
            return Ok(());
        };
        let name_of = |id: &RaftNodeId| membership.get_node(id).map(|node| node.addr.clone());
        let voter_names: Vec<String> = voters.iter().filter_map(name_of).collect();
        if voters.len() <= replicas || !names.iter().all(|n| voter_names.contains(n)) {
            return Ok(());
        }
        // This node steps out last, because the others leave without an election.
        let me = self.settings.raft_id;
        let Some(extra) = voters
            .iter()
            .copied()
            .filter(|v| name_of(v).is_none_or(|name| !names.contains(&name)))
            .min_by_key(|v| *v == me)
        else {
            return Ok(());
        };
        let next: BTreeSet<RaftNodeId> = voters.iter().copied().filter(|v| *v != extra).collect();
        tracing::info!(log = %self.settings.log, raft_id = extra, "moving the log's voter to its new replica set; it stays a learner");
        if extra == me {
            self.raft.change_membership(next.clone(), true).await?;
            self.hand_over(&next).await;
        } else {
            self.raft.change_membership(next, true).await?;
        }
        Ok(())
    }

    /// Notifies the remaining `voters` that this node, the leader, left them, and has them
    /// elect a new leader at once (see [`Replica::elect_among`]).
    async fn hand_over(&self, voters: &BTreeSet<RaftNodeId>) {
        let log = &self.settings.log;
        let me = self.settings.raft_id;
        let others: Vec<RaftNodeId> = voters.iter().copied().filter(|v| *v != me).collect();
        for next in &others {
            if let Err(e) = ask(log, *next, Request::Departed(me)).await {
                tracing::debug!(log = %log, error = %e, "a remaining voter did not take the notice of departure");
            }
        }
        self.elect_among(&others).await;
    }

    /// Has the voters `others` elect a leader among themselves at once, rather than after
    /// their lease on this node, the leader that goes away.
    ///
    /// A follower refuses votes while its lease on the last leader runs (the longest election
    /// timeout after the last heartbeat), unless it is a candidate itself. So every one of
    /// `others` but one becomes a candidate first, and then the one with the highest raft id.
    /// Votes of one term order by node id, so a candidate grants its vote to any candidate
    /// of a higher id, and some candidate wins within a round or two of requests. If no one
    /// wins (a lagging log, a lost message), the candidates elect as usual when their
    /// timeouts run out.
    ///
    /// NOTE: a replacement voter added in the same change may still count its lease on the
    /// leaver and reject votes; an attack on five nodes saw 1.3 to 4.5 s without a leader in
    /// 5 of about 60 handovers, against 0.2 to 0.3 s in the others.
    async fn elect_among(&self, others: &[RaftNodeId]) {
        let log = &self.settings.log;
        let mut others = others.to_vec();
        others.sort_unstable();
        let Some((last, first)) = others.split_last() else {
            return;
        };
        let candidates = first.iter().map(|next| ask(log, *next, Request::Elect));
        for (next, result) in first
            .iter()
            .zip(futures_util::future::join_all(candidates).await)
        {
            if let Err(e) = result {
                tracing::debug!(log = %log, raft_id = next, error = %e, "a remaining voter did not start an election");
            }
        }
        if let Err(e) = ask(log, *last, Request::Elect).await {
            tracing::debug!(log = %log, raft_id = last, error = %e, "the remaining voter meant to lead did not start an election");
        }
    }

    /// Makes the other voters elect a leader among themselves before this node, which leads
    /// the log but stays one of its voters, stops. New writes wait meanwhile, and the others
    /// get up to [`HANDOVER_CATCH_UP`] to receive every entry, so that any of them can win.
    /// A handover that no voter won is tried again, up to [`HANDOVER_ATTEMPTS`] times: once
    /// this node stops, the others wait out their election timeouts, and their elections
    /// without its vote took about 7 s in one benchmark run.
    async fn step_down(&self, voters: &BTreeSet<RaftNodeId>) {
        let log = &self.settings.log;
        let me = self.settings.raft_id;
        let others: Vec<RaftNodeId> = voters.iter().copied().filter(|v| *v != me).collect();
        for attempt in 1..=HANDOVER_ATTEMPTS {
            hold_writes(log, me, Instant::now() + HANDOVER_HOLD);
            // A lagging voter may still win with the others' votes, so the handover goes on.
            let caught_up = self.wait_until_caught_up(&others).await;

            // Past its lease, this node grants its own vote to one candidate, which makes a
            // majority of up to three voters: one election, with no rival candidates.
            // Otherwise (or with more voters) the others elect among themselves.
            let single = voters.len() <= 3 && self.leads_past_lease();
            match others.iter().max() {
                Some(target) if single => {
                    if let Err(e) = ask(log, *target, Request::Elect).await {
                        tracing::warn!(log = %log, raft_id = target, error = %e, "the voter meant to take over did not start an election");
                        self.elect_among(&others).await;
                    }
                }
                _ => self.elect_among(&others).await,
            }

            let moved = self.led_by_another().await;
            release_writes(log, me);
            if moved {
                tracing::info!(log = %log, attempt, "handed leadership to another voter before stopping");
                return;
            }
            let metrics = self.raft.metrics().borrow().clone();
            tracing::warn!(log = %log, attempt, single, caught_up, state = ?metrics.state, term = metrics.current_term, leader = ?metrics.current_leader, last = ?metrics.last_log_index, replication = ?metrics.replication, "no other voter took over the log's leadership");
        }
        tracing::warn!(log = %log, "stopping while no other voter leads the log; the others elect a leader once their election timeouts run out");
    }

    /// Hands leadership of the log to the voter `target`, if this node leads it, and returns
    /// whether leadership moved. Used to spread the shard logs' leaders over the nodes.
    ///
    /// openraft 0.9 has no leadership transfer; this one rests on its vote rules. A leader's
    /// lease on its own vote ends an election timeout after it was elected, and from then on
    /// it grants its vote to a candidate of a higher term whose log is at least as long as
    /// its own. So the leader keeps new writes waiting (for at most [`HANDOVER_HOLD`]), waits until
    /// `target` has every entry, and requests an election from it. With the target's own
    /// vote, the leader's makes a majority of up to 3 voters, so logs with more voters are
    /// left alone: their other followers refuse votes during their lease on the leader.
    /// Call it only once [`Replica::leads_past_lease`] says so.
    pub async fn transfer_leadership(&self, target: RaftNodeId) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let me = self.settings.raft_id;
        if metrics.state != ServerState::Leader || target == me {
            return false;
        }
        let voters: BTreeSet<RaftNodeId> =
            metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&target) || voters.len() > 3 {
            return false;
        }
        let log = &self.settings.log;
        hold_writes(log, me, Instant::now() + HANDOVER_HOLD);
        let caught_up = self.wait_until_caught_up(&[target]).await;
        let moved = caught_up
            && match ask(log, target, Request::Elect).await {
                Ok(()) => self.led_by_another().await,
                Err(e) => {
                    tracing::debug!(log = %log, raft_id = target, error = %e, "the voter meant to take over did not start an election");
                    false
                }
            };
        release_writes(log, me);
        moved
    }

    /// Waits until the writes that passed the hold before it have returned, then up to
    /// [`HANDOVER_CATCH_UP`] until each of `voters` has every entry of this node, the leader.
    /// Returns whether both happened. Call it once writes are held.
    async fn wait_until_caught_up(&self, voters: &[RaftNodeId]) -> bool {
        let (log, me) = (&self.settings.log, self.settings.raft_id);
        if !writes_settled(log, me, Instant::now() + HANDOVER_CATCH_UP).await {
            return false;
        }
        self.raft
            .wait(Some(HANDOVER_CATCH_UP))
            .metrics(
                |m| {
                    let replication = m.replication.as_ref();
                    voters.iter().all(|voter| {
                        replication
                            .and_then(|r| r.get(voter))
                            .is_some_and(|id| id.map(|id| id.index) == m.last_log_index)
                    })
                },
                "the voters taking over have every entry",
            )
            .await
            .is_ok()
    }

    /// Waits up to [`HANDOVER_HOLD`] until another node leads the log, and returns whether
    /// one does.
    async fn led_by_another(&self) -> bool {
        let me = self.settings.raft_id;
        self.raft
            .wait(Some(HANDOVER_HOLD))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "another voter leads",
            )
            .await
            .is_ok()
    }

    /// Returns whether this node has led the log for longer than the lease on its vote (the
    /// longest election timeout) with a margin, which [`Replica::transfer_leadership`] needs.
    /// The time counts from the first call that saw this node lead in the current term, so
    /// call it at regular intervals.
    pub fn leads_past_lease(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return false;
        }
        // The margin covers the time between the election and the first call after it.
        let settled = 3 * self.settings.election_timeout;
        let Ok(mut since) = self.leading_since.lock() else {
            return false;
        };
        match *since {
            Some((term, at)) if term == metrics.current_term => at.elapsed() >= settled,
            _ => {
                *since = Some((metrics.current_term, Instant::now()));
                false
            }
        }
    }

    /// Returns whether this node is on the side of a majority of the log's voters: it leads and a
    /// majority acknowledged it within `lease`, or it follows a known leader and counts a
    /// majority of the voters alive. A follower cut off with a minority starts no elections
    /// (see [`Replica::gate_elections`]) and keeps the leader it last heard of, so only the
    /// count of live voters shows that it is cut off.
    pub fn in_majority(&self, lease: Duration) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        match metrics.state {
            ServerState::Leader => metrics
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) <= lease.as_millis()),
            ServerState::Follower => {
                metrics.current_leader.is_some() && self.majority_alive.load(Ordering::Relaxed)
            }
            _ => false,
        }
    }

    /// Lets this node start elections only while it counts a majority of the log's voters
    /// alive, has heard from no leader for an election timeout, and `quiet` is false.
    /// `alive` contains the raft ids of the live members, and this node counts as alive.
    ///
    /// The election timeout also runs from when the node started, or last came back to a
    /// majority, so that a leader has that long to reach it first. Otherwise a node paused
    /// (or starved) before it heard the leader of a log would resume with its elections open,
    /// and openraft, whose timer has run out by then, would depose that leader at once. A
    /// log whose only voter is this node has no leader to wait for.
    ///
    /// A node cut off with a minority cannot win an election, but each one it tries raises
    /// its term. Once the partition heals, that higher term would depose the majority's
    /// leader, and with a log per shard such elections on every log flood the links.
    ///
    /// Elections stay closed while a leader is heard, so that a node that resumes after a
    /// pause (SIGSTOP, a stalled VM) finds them closed. openraft checks its own election
    /// timer first after a pause, and it has run out then. Without the closed gate, the
    /// node raised its term in every log before its failure detector saw the pause, and
    /// deposed healthy leaders. openraft 0.9 has no pre-vote. The caller passes `quiet` for
    /// a while after it saw such a pause, until the leaders' appends arrive again.
    ///
    /// A node that left the log (with SIGTERM) starts no elections either until a leader
    /// makes it a voter again. Restarted, it still has the membership from before it
    /// left, with itself as a voter, so each election it tried would raise its term. The
    /// leader that added it back would then meet that higher term and step down.
    ///
    /// Until a leader's append reaches it, a restarted node also starts no elections unless
    /// a majority of the voters list it as a member (see [`Replica::counted_as_member`]),
    /// because it may have been removed while it was down.
    pub fn gate_elections(&self, alive: &BTreeSet<RaftNodeId>, quiet: bool) {
        // Called every 200 ms for every log: it also starts the count of the leader's lease.
        self.leads_past_lease();
        let voters = voters(&self.raft);
        let me = self.settings.raft_id;
        let reachable = voters
            .iter()
            .filter(|v| **v == me || alive.contains(v))
            .count();
        let majority = voters.is_empty() || 2 * reachable > voters.len();
        if self.majority_alive.swap(majority, Ordering::Relaxed) != majority {
            if majority {
                if let Ok(mut since) = self.majority_since.lock() {
                    *since = Instant::now();
                }
                tracing::info!(log = %self.settings.log, "a majority of the voters is alive again; elections resume");
            } else {
                tracing::warn!(log = %self.settings.log, reachable, voters = voters.len(), "fewer than a majority of the voters are alive; this node starts no elections");
            }
        }
        if self.left.load(Ordering::Relaxed) && !self.voter_again() {
            return;
        }
        let timeout = self.settings.election_timeout;
        let leader_active = self.contact.within(timeout);
        let alone = voters.len() == 1 && voters.contains(&me);
        let settling = !alone
            && self
                .majority_since
                .lock()
                .is_ok_and(|since| since.elapsed() < timeout);
        let member = alone || !voters.contains(&me) || self.counted_as_member(&voters);
        let allowed = majority && !leader_active && !settling && !quiet && member;
        if self.elections.swap(allowed, Ordering::Relaxed) != allowed {
            self.raft.runtime_config().elect(allowed);
        }
    }

    /// Returns whether the others counted this node as a member of the log since it
    /// started (see [`Replica::member_confirmed`]). Until then it sends `voters` a request
    /// whether they list it, one round at a time.
    ///
    /// A node removed while it was down (`atlas remove-node`) still finds itself a voter in
    /// the membership it stored. openraft 0.9 has no pre-vote, so each election it started
    /// would raise its term, and the leader that adds it back would meet that higher term
    /// and step down.
    fn counted_as_member(&self, voters: &BTreeSet<RaftNodeId>) -> bool {
        if self.member_confirmed() {
            return true;
        }
        let check = &self.member;
        if check.asking.swap(true, Ordering::Relaxed) {
            return false;
        }
        let me = self.settings.raft_id;
        let log = self.settings.log.clone();
        let peers: Vec<(RaftNodeId, String)> = {
            let metrics = self.raft.metrics().borrow().clone();
            let membership = metrics.membership_config.membership();
            voters
                .iter()
                .filter(|v| **v != me)
                .map(|v| {
                    let name = membership.get_node(v).map(|n| n.addr.clone());
                    (*v, name.unwrap_or_else(|| v.to_string()))
                })
                .collect()
        };
        let count = voters.len();
        let check = Arc::clone(check);
        tokio::spawn(async move {
            let replies = futures_util::future::join_all(
                peers.iter().map(|(id, _)| peer_lists(&log, *id, me)),
            )
            .await;
            let listing = replies.iter().filter(|r| **r == Some(true)).count();
            if 2 * (listing + 1) > count {
                check.confirmed.store(true, Ordering::Relaxed);
                tracing::info!(log = %log, listing, "the other voters list this node as a member; its elections may start");
            } else {
                let not_listing: Vec<&str> = peers
                    .iter()
                    .zip(&replies)
                    .filter(|(_, r)| **r == Some(false))
                    .map(|((_, name), _)| name.as_str())
                    .collect();
                if !not_listing.is_empty() && !check.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(log = %log, voters = ?not_listing, "voters do not list this node as a member of the log (was it removed while it was down?); it starts no elections in the log until a leader adds it again");
                }
                tokio::time::sleep(MEMBER_CHECK_PAUSE).await;
            }
            check.asking.store(false, Ordering::Relaxed);
        });
        false
    }

    /// Returns whether the last [`Replica::gate_elections`] let this node start elections.
    #[cfg(test)]
    pub(crate) fn elections_open(&self) -> bool {
        self.elections.load(Ordering::Relaxed)
    }

    /// Returns whether this node, which left the log, is a voter again in a single (not
    /// joint) membership written after it left, and then clears the record that it left.
    /// The membership it had when it left, with itself as a voter, does not count.
    fn voter_again(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let me = self.settings.raft_id;
        let config = &metrics.membership_config;
        let written_after = config
            .log_id()
            .is_some_and(|id| id.index > self.left_at.load(Ordering::Relaxed));
        // The joint membership of this node's own removal may reach it after it recorded
        // its leave; it still lists the node as a voter. A re-admission ends in a single one.
        let single = config.membership().get_joint_config().len() == 1;
        if !written_after || !single || !config.membership().voter_ids().any(|v| v == me) {
            return false;
        }
        if let Err(e) = self.identity.remove(LEFT_KEY) {
            tracing::warn!(log = %self.settings.log, error = %e, "cannot clear the record that this node left the log; trying again");
            return false;
        }
        self.left.store(false, Ordering::Relaxed);
        tracing::info!(log = %self.settings.log, "this node votes in the log again; elections allowed");
        true
    }

    /// Returns whether a voter replied that it does not list this node as a member, and
    /// the others have not counted it as one since it started.
    pub fn not_listed(&self) -> bool {
        self.member.warned.load(Ordering::Relaxed) && !self.member_confirmed()
    }

    /// Returns whether the others counted this node as a member of the log since it
    /// started: a leader's append reached it, or a majority of the voters (itself included)
    /// listed it.
    pub(crate) fn member_confirmed(&self) -> bool {
        let confirmed = &self.member.confirmed;
        if !confirmed.load(Ordering::Relaxed) && self.contact.heard_since_start() {
            confirmed.store(true, Ordering::Relaxed);
        }
        confirmed.load(Ordering::Relaxed)
    }

    /// Returns whether this node left the log and has not voted in it again since.
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// Records that this node left the log, so that it starts no elections in it after a
    /// restart (see [`Replica::gate_elections`]). The node's final flush writes it.
    fn record_left(&self) {
        let metrics = self.raft.metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        self.left_at.store(last, Ordering::Relaxed);
        self.left.store(true, Ordering::Relaxed);
        self.elections.store(false, Ordering::Relaxed);
        self.raft.runtime_config().elect(false);
        if let Err(e) = self.identity.insert(LEFT_KEY, &last.to_be_bytes()) {
            tracing::warn!(log = %self.settings.log, error = %e, "cannot record that this node left the log; restarted, it may start elections in it");
        }
    }

    /// Returns the name of the log's leader as this node last heard of it, if any.
    pub fn leader_name(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|node| node.addr.clone())
    }

    /// Returns this node's view of the log.
    pub fn status(&self) -> ReplicaStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let name_of = |id: RaftNodeId| {
            membership
                .get_node(&id)
                .map_or_else(|| id.to_string(), |node| node.addr.clone())
        };
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ReplicaStatus {
            log: self.settings.log.clone(),
            role: role.into(),
            term: metrics.current_term,
            leader: metrics.current_leader.map(name_of),
            voters: membership.voter_ids().map(name_of).collect(),
            learners: membership.learner_ids().map(name_of).collect(),
            last_applied: metrics.last_applied.map(|id| id.index),
            snapshot: metrics.snapshot.map(|id| id.index),
            purged: metrics.purged.map(|id| id.index),
            stopped: metrics.running_state.err().map(|e| {
                format!("{e}; the log runs again on this node after a restart of the node")
            }),
        }
    }

    /// Takes this node out of the log's voters before it stops for good, so that the others
    /// no longer count on it for a majority. A leader removes itself and has the others
    /// elect at once; a follower sends the request to the leader. A leader that stays a voter (see below)
    /// still has the others elect a leader before it stops. `replacement`, a learner,
    /// becomes a voter in the same change. The node stays a voter when the log would keep
    /// fewer than `keep` voters. It becomes a voter again when it comes back after
    /// [`LEAVE_HOLD`].
    pub async fn leave(&self, replacement: Option<RaftNodeId>, keep: usize) -> anyhow::Result<()> {
        let id = self.settings.raft_id;
        let voters = voters(&self.raft);
        if !voters.contains(&id) || voters.len() == 1 {
            return Ok(());
        }
        let log = &self.settings.log;
        match self.raft.current_leader().await {
            Some(leader) if leader == id => {
                let removed =
                    remove_voter(&self.raft, &self.departures, id, replacement, keep).await;
                if let Err(e) = removed {
                    // Still a voter, but the log need not wait for this node's lease to end.
                    self.step_down(&voters).await;
                    anyhow::bail!(e);
                }
                // The voters after the change, the replacement among them: whichever of
                // them leads next must know not to add this node back while it stops.
                let mut remaining = super::transport::voters(&self.raft);
                remaining.extend(voters.iter().copied().filter(|v| *v != id));
                self.hand_over(&remaining).await;
            }
            Some(leader) => ask(
                log,
                leader,
                Request::Leave {
                    node: id,
                    replacement,
                    keep,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?,
            None => anyhow::bail!("the log has no leader to leave through"),
        }
        self.record_left();
        tracing::info!(log = %log, node = %self.settings.node_name, "left the replicated log");
        Ok(())
    }

    /// Removes every member named `name` (a node lost for good, under any of its raft ids)
    /// from the log through its leader, and returns how many were members. The caller makes
    /// sure the node is not alive: a live one would be added back. A learner is removed
    /// only when this node leads; elsewhere the leader removes dead learners by itself.
    pub async fn remove_member(&self, name: &str) -> anyhow::Result<usize> {
        let ids: Vec<RaftNodeId> = {
            let metrics = self.raft.metrics().borrow().clone();
            let membership = metrics.membership_config.membership();
            membership
                .nodes()
                .filter(|(_, node)| node.addr == name)
                .map(|(id, _)| *id)
                .collect()
        };
        let log = &self.settings.log;
        for id in &ids {
            anyhow::ensure!(
                *id != self.settings.raft_id,
                "log {log}: {name} is this node; stop it and ask another node"
            );
        }
        // The lost node may have led the log; the others elect a new leader meanwhile.
        let deadline = Instant::now() + REMOVE_WAIT;
        for id in &ids {
            loop {
                let attempt = match self.raft.current_leader().await {
                    Some(leader) if ids.contains(&leader) || leader == 0 => {
                        Err(format!("the log's last known leader is {name}"))
                    }
                    Some(leader) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match tokio::time::timeout(left, self.remove_through(leader, *id)).await {
                            Ok(done) => done,
                            Err(_) => Err(format!(
                                "the change did not commit within {} s, so the log may have \
                                 no majority; it may still take effect once it has one",
                                REMOVE_WAIT.as_secs()
                            )),
                        }
                    }
                    None => Err("the log has no leader".into()),
                };
                match attempt {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => anyhow::bail!(
                        "log {log}: {e}; try again once the log has a leader other than {name}"
                    ),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(ids.len())
    }

    /// Removes the member `id` through `leader`: a voter wherever this node is, a learner
    /// only if this node leads.
    async fn remove_through(&self, leader: RaftNodeId, id: RaftNodeId) -> Result<(), String> {
        if leader != self.settings.raft_id {
            let leave = Request::Leave {
                node: id,
                replacement: None,
                keep: 1,
            };
            return ask(&self.settings.log, leader, leave).await;
        }
        if voters(&self.raft).contains(&id) {
            return remove_voter(&self.raft, &self.departures, id, None, 1).await;
        }
        let learner = BTreeSet::from([id]);
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(learner), false)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Stops the replica and its endpoint.
    pub async fn stop(&self) {
        self.announcer.abort();
        self.endpoint.stop(Some("node shutdown".into()));
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(log = %self.settings.log, error = %e, "replicated log did not stop cleanly");
        }
    }
}
