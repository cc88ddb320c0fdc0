//! Raft messages over the cluster's ractor_cluster links (mutual TLS and the cookie).
//!
//! Every node runs one [`RaftEndpoint`] actor per replicated log, in the process group named
//! after the log and the node's raft id. A request to another replica is a remote call to
//! the endpoint in that replica's group, carrying the openraft request as MessagePack.

use super::state_machine::SnapshotCheck;
use super::{Command, CommandResult, RaftNodeId, TypeConfig, encode};
use crate::replication::Raft;
use openraft::BasicNode;
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, pg};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time a replica has to reply to one raft request.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Time a leader has to commit a proposed command.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Process group of the endpoint of `node` for the log named `log`.
fn group(log: &str, node: RaftNodeId) -> String {
    format!("atlas.raft.{log}.{node}")
}

/// Messages of a raft endpoint. They cross the network, so they serialize.
#[derive(RactorClusterMessage)]
pub(crate) enum RaftEndpointMsg {
    /// A MessagePack [`Request`]; the reply is a MessagePack [`Reply`].
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

#[derive(Serialize, Deserialize)]
pub(super) enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftNodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command proposed on another node, for the leader to write.
    Write(Command),
    /// A request of a leaving node to the leader to remove it from the voters, in the same
    /// change making `replacement`, a learner, a voter in its place, unless that would leave
    /// fewer than `keep` voters.
    Leave {
        node: RaftNodeId,
        replacement: Option<RaftNodeId>,
        keep: usize,
    },
    /// A request of the leader that left to a remaining voter to start an election at once.
    Elect,
    /// A notice of the leader that left to the remaining voters, so that whichever of them
    /// leads next does not make it a voter again while it shuts down.
    Departed(RaftNodeId),
    /// A request of a follower for the log index that a linearizable read must wait for.
    ReadIndex,
    /// A request of a node that has heard no leader of the log since it started, made
    /// before its first election, for whether the membership of the log here lists it.
    Member(RaftNodeId),
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<RaftNodeId>, RaftError<RaftNodeId>>),
    Vote(Result<VoteResponse<RaftNodeId>, RaftError<RaftNodeId>>),
    Snapshot(
        Result<InstallSnapshotResponse<RaftNodeId>, RaftError<RaftNodeId, InstallSnapshotError>>,
    ),
    /// The log index and result of a written command, or why it was not written.
    Write(Result<(u64, CommandResult), WriteRefused>),
    /// The reply to [`Request::Leave`], [`Request::Elect`] or [`Request::Departed`].
    Done(Result<(), String>),
    /// The reply to [`Request::ReadIndex`].
    ReadIndex(Result<u64, WriteRefused>),
    /// The request did not decode.
    Invalid(String),
    /// The request was refused for the reason given, and may be sent again.
    Refused(String),
    /// The reply to [`Request::Member`], `None` while the log has no members on this node.
    Member(Option<bool>),
}

/// Reason a leader did not write a forwarded command.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum WriteRefused {
    /// The node no longer leads; `leader` is the one it last heard of.
    NotLeader { leader: Option<RaftNodeId> },
    /// Writing failed, for example because the leader lost its majority.
    Failed(String),
    /// The request never left this node because it has no link to the leader, which is
    /// usually dead: nothing was written, so the request may follow the next leader. Made
    /// on the requesting node only.
    Unsent { leader: RaftNodeId },
}

/// The actor that hands raft requests from other nodes to the local replica.
pub(super) struct RaftEndpoint;

/// Arguments of [`RaftEndpoint`].
pub(super) struct EndpointArgs {
    pub log: String,
    pub node: RaftNodeId,
    pub raft: Raft,
    pub departures: Departures,
    pub contact: LeaderContact,
    pub check: SnapshotCheck,
}

/// The time this node last accepted an append from a leader of the log (entries, or an empty
/// one as a heartbeat). An append that a higher vote of this node rejects does not count.
#[derive(Clone, Default)]
pub(super) struct LeaderContact(Arc<Mutex<Option<Instant>>>);

impl LeaderContact {
    fn record(&self) {
        if let Ok(mut at) = self.0.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Returns whether a leader's append arrived since the replica started.
    pub(super) fn heard_since_start(&self) -> bool {
        self.0.lock().ok().is_some_and(|at| at.is_some())
    }

    /// Returns whether a leader's append arrived within the last `period`.
    pub(super) fn within(&self, period: Duration) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < period)
    }
}

/// Nodes that left the log, with the time they left. The leader does not make them voters
/// again while they shut down (see [`LEAVE_HOLD`]).
pub(super) type Departures = Arc<Mutex<HashMap<RaftNodeId, Instant>>>;

/// Time after leaving during which a node is not made a voter again, even if it still
/// looks alive: long enough for it to stop and be marked dead.
pub(super) const LEAVE_HOLD: Duration = Duration::from_secs(15);

/// Returns the current voters of the log that `raft` runs.
pub(super) fn voters(raft: &Raft) -> BTreeSet<RaftNodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Removes `node` from the voters of the log that `raft`, its leader, runs, and makes
/// `replacement` a voter in the same change if it is a learner of the log, so that the log
/// keeps as many voters. Refuses when the log would keep fewer than `keep` voters: when
/// every node stops, each leaving would shrink the logs until losing one more node's data
/// left a log without a majority for good.
pub(super) async fn remove_voter(
    raft: &Raft,
    departures: &Departures,
    node: RaftNodeId,
    replacement: Option<RaftNodeId>,
    keep: usize,
) -> Result<(), String> {
    let voters = voters(raft);
    if !voters.contains(&node) {
        return Ok(());
    }
    let learner = replacement.filter(|r| {
        raft.metrics()
            .borrow()
            .membership_config
            .membership()
            .learner_ids()
            .any(|l| l == *r)
    });
    let mut rest: BTreeSet<RaftNodeId> = voters.into_iter().filter(|v| *v != node).collect();
    rest.extend(learner);
    if rest.len() < keep {
        return Err(format!(
            "the log would keep {} voters, fewer than the replication factor {keep}, so the \
             node stays a voter",
            rest.len()
        ));
    }
    if let Ok(mut departures) = departures.lock() {
        departures.insert(node, Instant::now());
    }
    raft.change_membership(rest, false)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl Actor for RaftEndpoint {
    type Msg = RaftEndpointMsg;
    type State = (
        Raft,
        Departures,
        Arc<str>,
        LeaderContact,
        Arc<SnapshotReceiver>,
    );
    type Arguments = EndpointArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EndpointArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        pg::join(group(&args.log, args.node), vec![myself.get_cell()]);
        Ok((
            args.raft,
            args.departures,
            Arc::from(args.log.as_str()),
            args.contact,
            Arc::new(SnapshotReceiver::new(args.check)),
        ))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        (raft, departures, log, contact, snapshots): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RaftEndpointMsg::Call(bytes, reply) = message;
        let (raft, departures, log) = (raft.clone(), Arc::clone(departures), Arc::clone(log));
        let contact = contact.clone();
        let snapshots = Arc::clone(snapshots);
        // Appends wait for an fsync; the actor keeps taking requests meanwhile.
        tokio::spawn(async move {
            let answer = match rmp_serde::from_slice::<Request>(&bytes) {
                Ok(Request::Append(request)) => {
                    let answer = raft.append_entries(request).await;
                    if let Ok(response) = &answer
                        && !matches!(response, AppendEntriesResponse::HigherVote(_))
                    {
                        contact.record();
                    }
                    Reply::Append(answer)
                }
                Ok(Request::Vote(request)) => {
                    let summary = format!("{request}");
                    let answer = raft.vote(request).await;
                    if let Ok(response) = &answer
                        && !response.vote_granted
                    {
                        tracing::info!(log = %log, request = %summary, vote = %response.vote, last = ?response.last_log_id, "vote request rejected");
                    }
                    Reply::Vote(answer)
                }
                Ok(Request::Member(node)) => Reply::Member(lists_node(&raft, node)),
                Ok(Request::Snapshot(request)) => {
                    match snapshots.receive(&raft, &log, request).await {
                        Ok(answer) => Reply::Snapshot(answer),
                        Err(reason) => Reply::Refused(reason),
                    }
                }
                Ok(Request::Write(command)) => Reply::Write(write_here(&raft, command).await),
                Ok(Request::Leave {
                    node,
                    replacement,
                    keep,
                }) => Reply::Done(remove_voter(&raft, &departures, node, replacement, keep).await),
                Ok(Request::ReadIndex) => Reply::ReadIndex(read_index_here(&raft).await),
                Ok(Request::Elect) => {
                    let metrics = raft.metrics().borrow().clone();
                    tracing::info!(log = %log, state = ?metrics.state, leader = ?metrics.current_leader, last = ?metrics.last_log_index, "starting an election on request");
                    Reply::Done(raft.trigger().elect().await.map_err(|e| e.to_string()))
                }
                Ok(Request::Departed(node)) => {
                    if let Ok(mut departures) = departures.lock() {
                        departures.insert(node, Instant::now());
                    }
                    Reply::Done(Ok(()))
                }
                Err(e) => Reply::Invalid(e.to_string()),
            };
            let _ = reply.send(encode(&answer));
        });
        Ok(())
    }
}

/// Returns whether the membership of the log that `raft` runs lists `node`, as a voter or
/// a learner, or `None` while the log has no members here.
fn lists_node(raft: &Raft, node: RaftNodeId) -> Option<bool> {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    membership.nodes().next()?;
    Some(membership.get_node(&node).is_some())
}

/// Requests from the endpoint of `peer` whether the membership of the log named `log` lists
/// `node` there. Returns `None` without a link, without a reply, or while the log has no
/// members there.
pub(super) async fn peer_lists(log: &str, peer: RaftNodeId, node: RaftNodeId) -> Option<bool> {
    match call_node(log, peer, &Request::Member(node), CALL_TIMEOUT).await {
        Ok(Reply::Member(listed)) => listed,
        _ => None,
    }
}

/// The snapshot that a replica is receiving from its leader, chunk by chunk.
struct Receiving {
    id: String,
    /// Offset of the next expected chunk.
    offset: u64,
    file: Box<tokio::fs::File>,
}

/// Receives snapshots for one replica. Unlike openraft's own receiver, it checks a whole
/// snapshot before it hands it to openraft, which stops the log on any failed install: a
/// damaged transfer is refused, and the leader sends the snapshot again.
pub(super) struct SnapshotReceiver {
    receiving: tokio::sync::Mutex<Option<Receiving>>,
    check: SnapshotCheck,
}

impl SnapshotReceiver {
    pub(super) fn new(check: SnapshotCheck) -> Self {
        Self {
            receiving: tokio::sync::Mutex::new(None),
            check,
        }
    }

    /// Takes one chunk of a snapshot and installs the snapshot after its last chunk. Fails
    /// with the reason when the chunk cannot be stored or the received snapshot is damaged.
    /// The leader then sends the chunk again, and after a few failures the whole snapshot.
    pub(super) async fn receive(
        &self,
        raft: &Raft,
        log: &str,
        request: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<
        Result<InstallSnapshotResponse<RaftNodeId>, RaftError<RaftNodeId, InstallSnapshotError>>,
        String,
    > {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let vote = match raft.with_raft_state(|state| *state.vote_ref()).await {
            Ok(vote) => vote,
            Err(fatal) => return Ok(Err(RaftError::Fatal(fatal))),
        };
        // A leader of an older term gets this node's vote back, as from openraft.
        if request.vote < vote {
            return Ok(Ok(InstallSnapshotResponse { vote }));
        }
        let id = request.meta.snapshot_id.clone();
        let mut receiving = self.receiving.lock().await;
        if receiving.as_ref().is_none_or(|r| r.id != id) {
            if request.offset != 0 {
                let expected = openraft::SnapshotSegmentId {
                    id: id.clone(),
                    offset: 0,
                };
                let got = openraft::SnapshotSegmentId {
                    id,
                    offset: request.offset,
                };
                let mismatch = openraft::error::SnapshotMismatch {
                    expect: expected,
                    got,
                };
                return Ok(Err(RaftError::APIError(
                    InstallSnapshotError::SnapshotMismatch(mismatch),
                )));
            }
            let file = match raft.begin_receiving_snapshot().await {
                Ok(file) => file,
                Err(e) => return Err(format!("cannot start receiving a snapshot: {e}")),
            };
            *receiving = Some(Receiving {
                id,
                offset: 0,
                file,
            });
        }
        let Some(current) = receiving.as_mut() else {
            return Err("no snapshot is being received".into());
        };
        if request.offset != current.offset {
            current
                .file
                .seek(std::io::SeekFrom::Start(request.offset))
                .await
                .map_err(|e| format!("cannot seek in the received snapshot: {e}"))?;
        }
        current
            .file
            .write_all(&request.data)
            .await
            .map_err(|e| format!("cannot write the received snapshot: {e}"))?;
        current.offset = request.offset + request.data.len() as u64;
        if !request.done {
            return Ok(Ok(InstallSnapshotResponse { vote }));
        }

        current
            .file
            .flush()
            .await
            .map_err(|e| format!("cannot write the received snapshot: {e}"))?;
        let mut file = current
            .file
            .try_clone()
            .await
            .map_err(|e| format!("cannot read the received snapshot: {e}"))?
            .into_std()
            .await;
        let meta = request.meta;
        let check = Arc::clone(&self.check);
        let checked = tokio::task::spawn_blocking(move || {
            let result = check(&meta, &mut file);
            (result, meta)
        })
        .await;
        let meta = match checked {
            Ok((Ok(()), meta)) => meta,
            Ok((Err(e), meta)) => {
                // The transfer stays open: a chunk sent again rewrites its part of the file.
                tracing::warn!(log, snapshot = %meta.snapshot_id, error = %e, "rejected a damaged snapshot from the leader, which sends it again");
                return Err(format!("the received snapshot is damaged: {e}"));
            }
            Err(e) => return Err(format!("checking the received snapshot failed: {e}")),
        };
        let Some(done) = receiving.take() else {
            return Err("no snapshot is being received".into());
        };
        let mut file = done.file;
        file.rewind()
            .await
            .map_err(|e| format!("cannot read the received snapshot: {e}"))?;
        let snapshot = openraft::Snapshot {
            meta,
            snapshot: file,
        };
        Ok(raft
            .install_full_snapshot(request.vote, snapshot)
            .await
            .map(|response| InstallSnapshotResponse {
                vote: response.vote,
            })
            .map_err(RaftError::Fatal))
    }
}

/// Writes of one log on one node: the end of a hold, while the leader hands leadership over,
/// and the writes that passed the hold and have not returned.
#[derive(Default)]
struct WriteGate {
    held_until: Option<Instant>,
    in_flight: usize,
}

/// The write gates, by log name and the node's raft id. Several nodes may run in one process
/// in tests, hence the raft id.
static WRITE_GATES: Mutex<Vec<(String, RaftNodeId, WriteGate)>> = Mutex::new(Vec::new());

/// Runs `change` on the gate of `log` on `node`, created if missing.
fn with_gate<T>(log: &str, node: RaftNodeId, change: impl FnOnce(&mut WriteGate) -> T) -> T {
    let mut gates = WRITE_GATES.lock().unwrap_or_else(|p| p.into_inner());
    let index = match gates.iter().position(|(l, n, _)| l == log && *n == node) {
        Some(index) => index,
        None => {
            gates.push((log.to_owned(), node, WriteGate::default()));
            gates.len() - 1
        }
    };
    change(&mut gates[index].2)
}

/// Holds the writes that reach this node's leader of `log` until `until` or until
/// [`release_writes`], so that a follower taking over leadership has the whole log.
pub(super) fn hold_writes(log: &str, node: RaftNodeId, until: Instant) {
    with_gate(log, node, |gate| gate.held_until = Some(until));
}

/// Ends a hold of [`hold_writes`].
pub(super) fn release_writes(log: &str, node: RaftNodeId) {
    with_gate(log, node, |gate| gate.held_until = None);
}

/// Waits until no write of `log` on `node` that passed the gate before a hold is still
/// running, or until `deadline`, and returns whether none is. A write that passed the gate
/// just before the hold may append its entry after the voter taking over caught up, and
/// that voter then loses the election for lack of that entry.
pub(super) async fn writes_settled(log: &str, node: RaftNodeId, deadline: Instant) -> bool {
    loop {
        if with_gate(log, node, |gate| gate.in_flight) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A write that passed the gate of its log; dropping it ends the write.
struct GatePass<'a> {
    log: &'a str,
    node: RaftNodeId,
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        with_gate(self.log, self.node, |gate| {
            gate.in_flight = gate.in_flight.saturating_sub(1);
        });
    }
}

/// Waits while writes to the log that `raft` runs are held on this node, then counts the
/// write as running until the returned pass is dropped.
async fn pass_gate(raft: &Raft) -> GatePass<'_> {
    let log = &raft.config().cluster_name;
    let node = raft.metrics().borrow().id;
    loop {
        let held_until = with_gate(log, node, |gate| match gate.held_until {
            Some(until) if until > Instant::now() => Some(until),
            _ => {
                gate.in_flight += 1;
                None
            }
        });
        match held_until {
            Some(until) => {
                tokio::time::sleep(Duration::from_millis(5).min(until - Instant::now())).await;
            }
            None => return GatePass { log, node },
        }
    }
}

/// Writes `command` on this node, which must lead the log. While the leader hands
/// leadership over, the write waits; then it either goes through here or is refused with
/// the new leader's id.
pub(super) async fn write_here(
    raft: &Raft,
    command: Command,
) -> Result<(u64, CommandResult), WriteRefused> {
    let pass = pass_gate(raft).await;
    let written = tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(command)).await;
    drop(pass);
    match written {
        Ok(Ok(response)) => Ok((response.log_id.index, response.data)),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
            Err(WriteRefused::NotLeader {
                leader: forward.leader_id,
            })
        }
        Ok(Err(e)) => Err(WriteRefused::Failed(e.to_string())),
        Err(_) => Err(WriteRefused::Failed(format!(
            "not committed within {} s",
            WRITE_TIMEOUT.as_secs()
        ))),
    }
}

/// Returns the index a linearizable read must wait for, after confirming with a majority
/// that this node still leads the log.
pub(super) async fn read_index_here(raft: &Raft) -> Result<u64, WriteRefused> {
    match tokio::time::timeout(WRITE_TIMEOUT, raft.get_read_log_id()).await {
        Ok(Ok((read, _applied))) => Ok(read.map_or(0, |id| id.index)),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
            Err(WriteRefused::NotLeader {
                leader: forward.leader_id,
            })
        }
        Ok(Err(e)) => Err(WriteRefused::Failed(e.to_string())),
        Err(_) => Err(WriteRefused::Failed(format!(
            "leadership not confirmed within {} s",
            WRITE_TIMEOUT.as_secs()
        ))),
    }
}

/// Asks the leader `leader` for the index a linearizable read must wait for.
pub(super) async fn read_index_from(log: &str, leader: RaftNodeId) -> Result<u64, WriteRefused> {
    if !linked(log, leader) {
        return Err(WriteRefused::Unsent { leader });
    }
    match call_endpoint(log, leader, &Request::ReadIndex).await {
        Ok(Reply::ReadIndex(result)) => result,
        Ok(_) => Err(WriteRefused::Failed(
            "wrong reply to a read index request".into(),
        )),
        Err(e) => Err(WriteRefused::Failed(e)),
    }
}

/// Returns whether this node has a link to the endpoint of `node` in the log named `log`.
fn linked(log: &str, node: RaftNodeId) -> bool {
    !pg::get_members(&group(log, node)).is_empty()
}

/// Sends `request` to the endpoint of `node` in the log named `log`, and decodes the reply
/// that arrives within `timeout`.
async fn call_node(
    log: &str,
    node: RaftNodeId,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, String> {
    let Some(endpoint) = pg::get_members(&group(log, node)).into_iter().next() else {
        return Err(format!("no link to raft node {node} of log {log}"));
    };
    let bytes = encode(request);
    let answer = ractor::rpc::call(
        &endpoint,
        |port| RaftEndpointMsg::Call(bytes, port),
        Some(timeout),
    )
    .await
    .map_err(|e| format!("raft call to node {node} failed: {e}"))?;
    match answer {
        ractor::rpc::CallResult::Success(raw) => rmp_serde::from_slice(&raw)
            .map_err(|e| format!("undecodable reply from raft node {node}: {e}")),
        ractor::rpc::CallResult::Timeout => Err(format!(
            "raft node {node} did not answer within {} ms",
            timeout.as_millis()
        )),
        ractor::rpc::CallResult::SenderError => {
            Err(format!("raft node {node} dropped the request"))
        }
    }
}

/// Sends a request that may wait for a commit to the endpoint of `node`.
async fn call_endpoint(log: &str, node: RaftNodeId, request: &Request) -> Result<Reply, String> {
    call_node(log, node, request, WRITE_TIMEOUT + CALL_TIMEOUT).await
}

/// Sends a [`Request::Leave`], [`Request::Elect`] or [`Request::Departed`] to the endpoint
/// of `node`.
pub(super) async fn ask(log: &str, node: RaftNodeId, request: Request) -> Result<(), String> {
    match call_endpoint(log, node, &request).await? {
        Reply::Done(result) => result,
        _ => Err(format!("wrong reply from raft node {node}")),
    }
}

/// Sends `command` to the endpoint of `leader` to be written there.
pub(super) async fn forward_write(
    log: &str,
    leader: RaftNodeId,
    command: Command,
) -> Result<(u64, CommandResult), WriteRefused> {
    if !linked(log, leader) {
        return Err(WriteRefused::Unsent { leader });
    }
    match call_endpoint(log, leader, &Request::Write(command)).await {
        Ok(Reply::Write(result)) => result,
        Ok(_) => Err(WriteRefused::Failed("wrong reply to a write".into())),
        Err(e) => Err(WriteRefused::Failed(format!(
            "forwarding to the leader failed: {e}"
        ))),
    }
}

/// Creates connections to the endpoints of other replicas of the log named `log`.
#[derive(Clone)]
pub(super) struct ClusterNetwork {
    pub log: String,
}

/// A connection to one replica.
pub(super) struct ClusterLink {
    log: String,
    target: RaftNodeId,
}

impl RaftNetworkFactory<TypeConfig> for ClusterNetwork {
    type Network = ClusterLink;

    async fn new_client(&mut self, target: RaftNodeId, _node: &BasicNode) -> ClusterLink {
        ClusterLink {
            log: self.log.clone(),
            target,
        }
    }
}

fn unreachable<E: std::error::Error>(detail: String) -> RPCError<RaftNodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(detail)))
}

impl ClusterLink {
    /// Sends `request` to the target's endpoint and decodes its reply.
    async fn call<E: std::error::Error>(
        &self,
        request: &Request,
    ) -> Result<Reply, RPCError<RaftNodeId, BasicNode, E>> {
        call_node(&self.log, self.target, request, CALL_TIMEOUT)
            .await
            .map_err(unreachable)
    }
}

fn invalid<E: std::error::Error>(detail: String) -> RPCError<RaftNodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(detail)))
}

/// First pause of a leader's replication to a replica it could not reach.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Maximum pause between attempts to replicate to a replica that stays unreachable.
const LAST_BACKOFF: Duration = Duration::from_secs(4);

impl RaftNetwork<TypeConfig> for ClusterLink {
    /// Returns the pauses between attempts to reach a replica that did not reply: 0.5 s, then twice as
    /// long each time up to 4 s. openraft's default retries every 0.5 s for as long as the
    /// replica is down, logging a warning and an error each time, in every log it votes in;
    /// a dead member of the directory log stays a voter until it returns.
    fn backoff(&self) -> openraft::network::Backoff {
        let pauses = (0u32..).map(|attempt| {
            FIRST_BACKOFF
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(LAST_BACKOFF)
        });
        openraft::network::Backoff::new(pauses)
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        match self.call(&Request::Append(rpc)).await? {
            Reply::Append(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to append_entries".into())),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        match self.call(&Request::Snapshot(rpc)).await? {
            Reply::Snapshot(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) | Reply::Refused(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to install_snapshot".into())),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        match self.call(&Request::Vote(rpc)).await? {
            Reply::Vote(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to vote".into())),
        }
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;

    #[tokio::test]
    async fn handover_waits_for_writes_past_the_gate() {
        let (log, node) = ("gate-test", 7);
        // A write passed the gate just before the hold, as `pass_gate` counts it.
        with_gate(log, node, |gate| gate.in_flight += 1);
        let pass = GatePass { log, node };
        hold_writes(log, node, Instant::now() + Duration::from_secs(60));

        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!writes_settled(log, node, soon).await, "a write still runs");
        drop(pass);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(writes_settled(log, node, soon).await, "no write runs");

        // The hold lasts until it is released.
        assert!(with_gate(log, node, |gate| gate.held_until.is_some()));
        release_writes(log, node);
        assert_eq!(with_gate(log, node, |gate| gate.held_until), None);
    }
}
