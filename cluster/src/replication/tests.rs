use super::*;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, Config, StorageError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An applier that appends every command to a list, ignoring indexes it has seen.
#[derive(Default)]
struct ListApplier {
    applied: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl ListApplier {
    fn commands(&self) -> Vec<Vec<u8>> {
        let applied = self.applied.lock().unwrap();
        applied.iter().map(|(_, c)| c.clone()).collect()
    }
}

impl Applier for ListApplier {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        let mut applied = self.applied.lock().unwrap();
        if applied.last().is_none_or(|(last, _)| *last < index) {
            applied.push((index, command.to_vec()));
        }
        applied.len().to_be_bytes().to_vec()
    }

    fn snapshot(&self, out: &mut std::fs::File) -> Result<(), String> {
        let bytes = rmp_serde::to_vec(&*self.applied.lock().unwrap()).unwrap();
        std::io::Write::write_all(out, &bytes).map_err(|e| e.to_string())
    }

    fn check(&self, input: &mut std::fs::File) -> Result<(), String> {
        use std::io::Seek;
        let start = input.stream_position().map_err(|e| e.to_string())?;
        let parsed: Result<Vec<(u64, Vec<u8>)>, _> = rmp_serde::from_read(&mut *input);
        input
            .seek(std::io::SeekFrom::Start(start))
            .map_err(|e| e.to_string())?;
        parsed.map(|_| ()).map_err(|e| e.to_string())
    }

    fn restore(&self, input: &mut std::fs::File) -> Result<(), String> {
        let restored = rmp_serde::from_read(input).map_err(|e| e.to_string())?;
        *self.applied.lock().unwrap() = restored;
        Ok(())
    }
}

/// Opens a sled database in `dir` with its own flusher. Must run inside a Tokio runtime.
/// A replica stopped just before may still hold the database: its flusher task releases it
/// once it has seen the last handle dropped, so the open is retried for a while.
fn disk_in(dir: &std::path::Path) -> LogDisk {
    let mut attempts = 0;
    let db = loop {
        match sled::open(dir) {
            Ok(db) => break db,
            Err(e) if attempts < 100 => {
                attempts += 1;
                eprintln!("{} is still in use ({e}); retrying", dir.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    };
    LogDisk::new(db.clone(), Flusher::start(db), dir.join("snapshots"))
}

struct Builder;

impl StoreBuilder<TypeConfig, SledLogStore, SledStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLogStore, SledStateMachine), StorageError<RaftNodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_in(dir.path());
        let log = SledLogStore::open(&disk, "suite").unwrap();
        let machine =
            SledStateMachine::open(&disk, "suite", Arc::new(ListApplier::default())).unwrap();
        Ok((dir, log, machine))
    }
}

#[test]
fn storage_passes_openraft_suite() {
    Suite::test_all(Builder).unwrap();
}

/// Replicas of one process, reached by direct calls.
#[derive(Clone, Default)]
struct Network {
    replicas: Arc<Mutex<BTreeMap<RaftNodeId, Raft>>>,
}

impl Network {
    fn replica(&self, id: RaftNodeId) -> Option<Raft> {
        self.replicas.lock().unwrap().get(&id).cloned()
    }
}

struct Link {
    target: RaftNodeId,
    network: Network,
}

impl Link {
    fn replica<E: Error>(
        &self,
    ) -> Result<Raft, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>> {
        self.network.replica(self.target).ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other("replica is down")))
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: RaftNodeId, _node: &BasicNode) -> Link {
        Link {
            target,
            network: self.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        let target = self.target;
        self.replica()?
            .append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        let target = self.target;
        self.replica()?
            .install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        let target = self.target;
        self.replica()?
            .vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}

struct Replica {
    raft: Raft,
    applier: Arc<ListApplier>,
}

async fn start_replica(
    id: RaftNodeId,
    dir: &std::path::Path,
    network: &Network,
    applier: Arc<ListApplier>,
) -> Replica {
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Config::default()
    };
    let disk = disk_in(&dir.join(id.to_string()));
    let log = SledLogStore::open(&disk, "shard-0").unwrap();
    let machine = SledStateMachine::open(&disk, "shard-0", applier.clone()).unwrap();
    let raft = Raft::new(
        id,
        Arc::new(config.validate().unwrap()),
        network.clone(),
        log,
        machine,
    )
    .await
    .unwrap();
    network.replicas.lock().unwrap().insert(id, raft.clone());
    Replica { raft, applier }
}

async fn wait_for_leader(replicas: &[&Raft], excluded: Option<RaftNodeId>) -> RaftNodeId {
    // Generous bounds: elections take well under a second, but CI machines may be loaded.
    for _ in 0..400 {
        for raft in replicas {
            if let Some(leader) = raft.metrics().borrow().current_leader
                && Some(leader) != excluded
            {
                return leader;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader elected within 20 s");
}

async fn wait_for_applied(applier: &ListApplier, count: usize) {
    for _ in 0..400 {
        if applier.commands().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "replica applied {} of {count} commands within 20 s",
        applier.commands().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_leader_loss() {
    let dir = tempfile::tempdir().unwrap();
    let network = Network::default();
    let mut replicas = BTreeMap::new();
    for id in 1..=3 {
        let replica = start_replica(id, dir.path(), &network, Arc::default()).await;
        replicas.insert(id, replica);
    }
    let members: BTreeMap<RaftNodeId, BasicNode> =
        (1..=3).map(|id| (id, BasicNode::default())).collect();
    replicas[&1].raft.initialize(members).await.unwrap();
    let rafts: Vec<&Raft> = replicas.values().map(|r| &r.raft).collect();
    let leader = wait_for_leader(&rafts, None).await;

    // Every committed command reaches every replica, in one order.
    for n in 0..5u8 {
        let result = replicas[&leader]
            .raft
            .client_write(Command(vec![n]))
            .await
            .unwrap();
        assert_eq!(result.data.0, (usize::from(n) + 1).to_be_bytes().to_vec());
    }
    let expected: Vec<Vec<u8>> = (0..5u8).map(|n| vec![n]).collect();
    for replica in replicas.values() {
        wait_for_applied(&replica.applier, 5).await;
        assert_eq!(replica.applier.commands(), expected);
    }

    // The leader goes away: the other two elect a new one and keep committing.
    let old = replicas.remove(&leader).unwrap();
    network.replicas.lock().unwrap().remove(&leader);
    old.raft.shutdown().await.unwrap();
    let kept_applier = old.applier.clone();
    drop(old);
    let rafts: Vec<&Raft> = replicas.values().map(|r| &r.raft).collect();
    let new_leader = wait_for_leader(&rafts, Some(leader)).await;
    assert_ne!(new_leader, leader);
    replicas[&new_leader]
        .raft
        .client_write(Command(vec![5]))
        .await
        .unwrap();

    // The old leader restarts from its sled files, rejoins and catches up. The test keeps its
    // applier state, as a node's storage would.
    let restarted = start_replica(leader, dir.path(), &network, kept_applier.clone()).await;
    wait_for_applied(&kept_applier, 6).await;
    let mut all = expected.clone();
    all.push(vec![5]);
    assert_eq!(kept_applier.commands(), all);
    let members: BTreeSet<RaftNodeId> = restarted
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(members, BTreeSet::from([1, 2, 3]));
    restarted.raft.shutdown().await.unwrap();
    for replica in replicas.values() {
        replica.raft.shutdown().await.unwrap();
    }
}

/// Sends `data`, the file of a snapshot under `meta`, to `receiver` in chunks of 100 bytes.
/// Fails with the reason of the first rejected chunk.
async fn send_snapshot(
    receiver: &transport::SnapshotReceiver,
    target: &Raft,
    vote: openraft::Vote<RaftNodeId>,
    meta: &openraft::SnapshotMeta<RaftNodeId, BasicNode>,
    data: &[u8],
) -> Result<(), String> {
    let chunks: Vec<&[u8]> = data.chunks(100).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let request = InstallSnapshotRequest {
            vote,
            meta: meta.clone(),
            offset: (i * 100) as u64,
            data: chunk.to_vec(),
            done: i + 1 == chunks.len(),
        };
        match receiver.receive(target, "shard-0", request).await? {
            Ok(_) => {}
            Err(e) => return Err(format!("openraft rejected chunk {i}: {e}")),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshot_is_refused_and_log_keeps_running() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let network = Network::default();
    let leader = start_replica(1, dir.path(), &network, Arc::default()).await;
    let members = BTreeMap::from([(1, BasicNode::default())]);
    leader.raft.initialize(members).await.unwrap();
    wait_for_leader(&[&leader.raft], None).await;
    for n in 0..5u8 {
        leader.raft.client_write(Command(vec![n])).await.unwrap();
    }
    leader.raft.trigger().snapshot().await.unwrap();
    let mut snapshot = None;
    for _ in 0..200 {
        snapshot = leader.raft.get_snapshot().await.unwrap();
        if snapshot.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut snapshot = snapshot.expect("the leader built no snapshot");
    let mut data = Vec::new();
    snapshot.snapshot.read_to_end(&mut data).await.unwrap();
    let vote = leader.raft.metrics().borrow().vote;

    // A replica outside the leader's network receives the snapshot through the endpoint's
    // receiver, first with one byte flipped on the way.
    let applier = Arc::new(ListApplier::default());
    let target = start_replica(2, dir.path(), &Network::default(), applier.clone()).await;
    let receiver = transport::SnapshotReceiver::new(state_machine::snapshot_check(applier.clone()));
    let mut damaged = data.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    let error = send_snapshot(&receiver, &target.raft, vote, &snapshot.meta, &damaged)
        .await
        .unwrap_err();
    assert!(error.contains("damaged"), "{error}");
    assert!(applier.commands().is_empty());
    assert!(target.raft.metrics().borrow().running_state.is_ok());

    // Sent again whole, it installs, and the log still runs.
    send_snapshot(&receiver, &target.raft, vote, &snapshot.meta, &data)
        .await
        .unwrap();
    let expected: Vec<Vec<u8>> = (0..5u8).map(|n| vec![n]).collect();
    assert_eq!(applier.commands(), expected);
    // The metrics follow the install a moment later.
    let mut metrics = target.raft.metrics().borrow().clone();
    for _ in 0..200 {
        if metrics.snapshot == snapshot.meta.last_log_id {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = target.raft.metrics().borrow().clone();
    }
    assert!(metrics.running_state.is_ok(), "{:?}", metrics.running_state);
    assert_eq!(metrics.snapshot, snapshot.meta.last_log_id);
    target.raft.shutdown().await.unwrap();
    leader.raft.shutdown().await.unwrap();
}

/// Starts replica `id` of `log` with its database in `dir` (new or kept from an earlier start)
/// and its raft endpoint actor, with a 100 ms heartbeat and a 300 ms election timeout.
async fn start_endpoint_replica(
    dir: &std::path::Path,
    log: &str,
    id: RaftNodeId,
    applier: Arc<ListApplier>,
) -> super::Replica {
    let settings = ReplicaSettings {
        log: log.into(),
        node_name: format!("node-{id}"),
        raft_id: id,
        heartbeat: Duration::from_millis(100),
        election_timeout: Duration::from_millis(300),
        snapshot_every: 10_000,
    };
    let disk = disk_in(&dir.join(id.to_string()));
    super::Replica::start(settings, &disk, applier)
        .await
        .unwrap()
}

/// Starts three [`super::Replica`]s of one log in this process, each with its own sled
/// database and raft endpoint actor. Their calls go through ractor's process groups, as
/// between nodes, only without the network.
async fn start_endpoint_replicas(
    dir: &std::path::Path,
    log: &str,
) -> BTreeMap<RaftNodeId, (super::Replica, Arc<ListApplier>)> {
    let mut replicas = BTreeMap::new();
    for id in 1..=3u64 {
        let applier = Arc::new(ListApplier::default());
        let replica = start_endpoint_replica(dir, log, id, applier.clone()).await;
        replicas.insert(id, (replica, applier));
    }
    let members: BTreeMap<RaftNodeId, BasicNode> = (1..=3u64)
        .map(|id| (id, BasicNode::new(format!("node-{id}"))))
        .collect();
    replicas[&1].0.raft().initialize(members).await.unwrap();
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_hands_leadership_to_a_chosen_voter() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_endpoint_replicas(dir.path(), "handover-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let (old, _) = &replicas[&leader];
    for n in 0..3u8 {
        old.raft().client_write(Command(vec![n])).await.unwrap();
    }

    // The handover needs the leader's lease on its own vote to have ended.
    let mut settled = false;
    for _ in 0..100 {
        if old.leads_past_lease() {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "node {leader} never led past its lease");

    // The lowest id other than the leader's: the order of ids does not pick the winner.
    let target = (1..=3u64).find(|id| *id != leader).unwrap();
    assert!(
        old.transfer_leadership(target).await,
        "leadership did not move from {leader} to {target}"
    );
    for (id, (replica, _)) in &replicas {
        let mut agreed = false;
        for _ in 0..100 {
            if replica.raft().metrics().borrow().current_leader == Some(target) {
                agreed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(agreed, "node {id} does not follow {target}");
    }

    // The new leader writes after the old one's entries, and every replica has one order.
    replicas[&target]
        .0
        .raft()
        .client_write(Command(vec![3]))
        .await
        .unwrap();
    let expected: Vec<Vec<u8>> = (0..4u8).map(|n| vec![n]).collect();
    for (_, applier) in replicas.values() {
        wait_for_applied(applier, 4).await;
        assert_eq!(applier.commands(), expected);
    }
    // A node that does not lead hands nothing over.
    assert!(!old.transfer_leadership(leader).await);
    stop_replicas(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_gate_closed_while_leader_heard() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_endpoint_replicas(dir.path(), "gate-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let everyone = BTreeSet::from([1, 2, 3]);
    let followers: Vec<RaftNodeId> = replicas
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();

    // Heartbeats arrive every 100 ms, well within the 300 ms election timeout.
    for _ in 0..5 {
        for id in &followers {
            replicas[id].0.gate_elections(&everyone, false);
            assert!(!replicas[id].0.elections_open(), "node {id} hears {leader}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Without the leader, the gate opens after an election timeout, and a follower wins.
    replicas[&leader].0.stop().await;
    let mut opened = false;
    for _ in 0..40 {
        replicas[&followers[0]].0.gate_elections(&everyone, false);
        replicas[&followers[1]].0.gate_elections(&everyone, false);
        if replicas[&followers[0]].0.elections_open() {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(opened, "the gate of node {} stayed closed", followers[0]);

    // Quiet after a pause closes it again, whatever the leader does.
    replicas[&followers[0]].0.gate_elections(&everyone, true);
    assert!(!replicas[&followers[0]].0.elections_open());
    for id in &followers {
        replicas[id].0.gate_elections(&everyone, false);
    }
    let rest: Vec<&Raft> = followers.iter().map(|id| replicas[id].0.raft()).collect();
    let next = wait_for_leader(&rest, Some(leader)).await;
    assert_ne!(next, leader);
    for id in &followers {
        replicas[id].0.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_voter_gives_leaders_an_election_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_endpoint_replicas(dir.path(), "settle-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let follower = (1..=3u64).find(|id| *id != leader).unwrap();
    let other = (1..=3u64)
        .find(|id| *id != leader && *id != follower)
        .unwrap();

    // The follower restarts while no leader runs, so no append can reach it: only the time
    // since its start keeps its elections closed. The other follower, which starts none,
    // lists it as a member in its reply.
    let (gone, _) = replicas.remove(&follower).unwrap();
    gone.stop().await;
    drop(gone);
    replicas[&other].0.raft().runtime_config().elect(false);
    replicas[&leader].0.stop().await;
    let applier = Arc::new(ListApplier::default());
    let back = start_endpoint_replica(dir.path(), "settle-test", follower, applier).await;
    let everyone = BTreeSet::from([1, 2, 3]);
    back.gate_elections(&everyone, false);
    assert!(
        !back.elections_open(),
        "elections open right after the start, before any leader could be heard"
    );

    // Once an election timeout has passed with no leader heard, they open.
    let mut opened = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        back.gate_elections(&everyone, false);
        if back.elections_open() {
            opened = true;
            break;
        }
    }
    assert!(opened, "elections stayed closed with no leader to hear");
    back.stop().await;
    replicas[&other].0.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_voter_restarted_starts_no_elections() {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_endpoint_replicas(dir.path(), "removed-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let removed = (1..=3u64).find(|id| *id != leader).unwrap();
    let (gone, _) = replicas.remove(&removed).unwrap();
    gone.stop().await;
    drop(gone);

    // While it is down, the others drop it from the log, as `atlas remove-node` does.
    let rest: BTreeSet<RaftNodeId> = replicas.keys().copied().collect();
    let (leading, _) = &replicas[&leader];
    leading
        .raft()
        .change_membership(rest.clone(), false)
        .await
        .unwrap();
    leading.raft().client_write(Command(vec![0])).await.unwrap();
    let term = leading.raft().metrics().borrow().current_term;

    // Restarted from its database, it still finds itself a voter, and every member looks
    // alive. Over ten of its election timeouts its term stays where it was.
    let applier = Arc::new(ListApplier::default());
    let back = start_endpoint_replica(dir.path(), "removed-test", removed, applier.clone()).await;
    let everyone = BTreeSet::from([1, 2, 3]);
    for _ in 0..20 {
        back.gate_elections(&everyone, false);
        assert!(!back.elections_open(), "node {removed} may start elections");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let own_term = back.raft().metrics().borrow().current_term;
    assert!(
        own_term <= term,
        "term {own_term} after the restart, {term} before"
    );
    assert!(
        back.not_listed(),
        "node {removed} missed the voters' answer"
    );

    // Added back by the leader, it follows without deposing it, and may elect again.
    add_voter_again(leading, removed).await;
    wait_for_applied(&applier, 1).await;
    assert_eq!(applier.commands(), [vec![0]]);
    let metrics = leading.raft().metrics().borrow().clone();
    assert_eq!(
        (metrics.current_leader, metrics.current_term),
        (Some(leader), term)
    );
    let mut open = false;
    for _ in 0..40 {
        back.gate_elections(&everyone, false);
        if back.member_confirmed() {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open, "node {removed} never counted itself a member again");
    assert!(!back.not_listed());
    back.stop().await;
    stop_replicas(&replicas).await;
}

/// Makes node `id` a voter of the log that `leading` leads, with nodes 1 to 3 as its voters:
/// first a learner that catches up, then a voter.
async fn add_voter_again(leading: &super::Replica, id: RaftNodeId) {
    let node = BasicNode::new(format!("node-{id}"));
    leading.raft().add_learner(id, node, true).await.unwrap();
    leading
        .raft()
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .unwrap();
}

/// Stops every replica of `replicas` and its endpoint.
async fn stop_replicas(replicas: &BTreeMap<RaftNodeId, (super::Replica, Arc<ListApplier>)>) {
    for (replica, _) in replicas.values() {
        replica.stop().await;
    }
}

/// Waits until a node other than `leader` leads, and returns it with its voters.
async fn next_leader(
    replicas: &BTreeMap<RaftNodeId, (super::Replica, Arc<ListApplier>)>,
    leader: RaftNodeId,
) -> (RaftNodeId, BTreeSet<RaftNodeId>) {
    let rest: Vec<&Raft> = replicas
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, (r, _))| r.raft())
        .collect();
    let next = wait_for_leader(&rest, Some(leader)).await;
    assert_ne!(next, leader);
    let metrics = replicas[&next].0.raft().metrics().borrow().clone();
    let voters = metrics.membership_config.membership().voter_ids().collect();
    (next, voters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_leader_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_endpoint_replicas(dir.path(), "leave-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let (old, _) = &replicas[&leader];
    old.raft().client_write(Command(vec![0])).await.unwrap();

    old.leave(None, 1).await.unwrap();
    let (next, voters) = next_leader(&replicas, leader).await;
    assert!(!voters.contains(&leader), "{voters:?}");
    replicas[&next]
        .0
        .raft()
        .client_write(Command(vec![1]))
        .await
        .unwrap();
    for (id, (_, applier)) in &replicas {
        if *id != leader {
            wait_for_applied(applier, 2).await;
            assert_eq!(applier.commands(), [vec![0], vec![1]]);
        }
    }
    stop_replicas(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_kept_as_voter_hands_over() {
    kept_voter_hands_over("floor-test", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_leader_kept_as_voter_hands_over() {
    kept_voter_hands_over("settled-floor-test", true).await;
}

/// A leader that must stay a voter leaves: another voter takes over. With `settled`, the
/// leader has led past its lease first, so one candidate wins with its vote; otherwise the
/// others elect among themselves.
async fn kept_voter_hands_over(log: &str, settled: bool) {
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_endpoint_replicas(dir.path(), log).await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let (old, _) = &replicas[&leader];
    old.raft().client_write(Command(vec![0])).await.unwrap();
    let mut past_lease = old.leads_past_lease();
    for _ in 0..100 {
        if !settled || past_lease {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        past_lease = old.leads_past_lease();
    }
    assert_eq!(
        past_lease, settled,
        "node {leader} led past its lease: {past_lease}"
    );

    // Three voters must stay, so the leader cannot leave, but another voter takes over.
    let refused = old.leave(None, 3).await.unwrap_err();
    assert!(refused.to_string().contains("stays a voter"), "{refused:#}");
    let (next, voters) = next_leader(&replicas, leader).await;
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    replicas[&next]
        .0
        .raft()
        .client_write(Command(vec![1]))
        .await
        .unwrap();
    for (_, applier) in replicas.values() {
        wait_for_applied(applier, 2).await;
        assert_eq!(applier.commands(), [vec![0], vec![1]]);
    }
    stop_replicas(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_leaver_starts_no_elections() {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_endpoint_replicas(dir.path(), "left-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let leaver = (1..=3u64).find(|id| *id != leader).unwrap();
    replicas[&leader]
        .0
        .raft()
        .client_write(Command(vec![0]))
        .await
        .unwrap();

    // The follower leaves and stops, then restarts from its database, which still has
    // the membership from before it left, with itself as a voter.
    let (gone, _) = replicas.remove(&leaver).unwrap();
    gone.leave(None, 1).await.unwrap();
    gone.stop().await;
    drop(gone);
    let term = replicas[&leader].0.raft().metrics().borrow().current_term;
    let applier = Arc::new(ListApplier::default());
    let back = start_endpoint_replica(dir.path(), "left-test", leaver, applier).await;
    // Every member looks alive, which alone would let it elect. Over ten of its election
    // timeouts its term stays where it was.
    let everyone = BTreeSet::from([1, 2, 3]);
    for _ in 0..20 {
        back.gate_elections(&everyone, false);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let own_term = back.raft().metrics().borrow().current_term;
    assert!(
        own_term <= term,
        "term {own_term} after the restart, {term} before"
    );

    // The leader makes it a voter again, as add_live_members does 15 s after the leave. The
    // leader keeps leading, and the node may elect again.
    let (leading, _) = &replicas[&leader];
    add_voter_again(leading, leaver).await;
    let metrics = leading.raft().metrics().borrow().clone();
    assert_eq!(metrics.current_leader, Some(leader));
    assert_eq!(metrics.current_term, term);
    let voters: BTreeSet<RaftNodeId> = metrics.membership_config.membership().voter_ids().collect();
    assert!(voters.contains(&leaver), "{voters:?}");
    let mut again = false;
    for _ in 0..100 {
        back.gate_elections(&everyone, false);
        if !back.has_left() {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again, "the node never counted itself a voter again");
    back.stop().await;
    stop_replicas(&replicas).await;
}

/// Returns an append of no entries to group `group`, for a [`ClusterReplicator`] over
/// replicas whose list applier stores it as any other command.
fn empty_append(group: &str) -> atlas_storage::Change {
    atlas_storage::Change::AppendBatch {
        group: atlas_protocol::GroupId::new(group.as_bytes().to_vec()).unwrap(),
        items: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_observer_reports_failed_writes() {
    use atlas_storage::Replicator;

    let dir = tempfile::tempdir().unwrap();
    let mut replicas = start_endpoint_replicas(dir.path(), "observer-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let log = LogHandle {
        raft: replicas[&leader].0.raft().clone(),
        name: "observer-test".into(),
    };
    // Each report as (appends in the entry, whether its write failed).
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    let observer: AppendObserver = Arc::new(move |times: &AppendTimes<'_>| {
        seen.lock().unwrap().push((times.waits.len(), times.failed));
    });
    let replicator = ClusterReplicator::new(leader, log, Vec::new()).with_append_observer(observer);

    // The list applier's results are no append outcomes, so the proposal itself fails to
    // decode them: only the write's report matters here.
    let _ = replicator.propose(empty_append("committed")).await;
    assert_eq!(*reports.lock().unwrap(), [(1, false)]);

    // With both followers stopped the leader cannot commit, and the write times out.
    let followers: Vec<RaftNodeId> = replicas
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    for id in followers {
        let (follower, _) = replicas.remove(&id).unwrap();
        follower.stop().await;
    }
    let timed_out = replicator.propose(empty_append("uncommitted")).await;
    assert!(
        matches!(&timed_out, Err(atlas_storage::StorageError::Unavailable(detail)) if detail.contains("not committed")),
        "{timed_out:?}"
    );
    assert_eq!(*reports.lock().unwrap(), [(1, false), (1, true)]);
    stop_replicas(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_replica_says_so_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = start_endpoint_replicas(dir.path(), "stopped-test").await;
    let rafts: Vec<&Raft> = replicas.values().map(|(r, _)| r.raft()).collect();
    let leader = wait_for_leader(&rafts, None).await;
    let follower = (1..=3u64).find(|id| *id != leader).unwrap();
    assert_eq!(replicas[&follower].0.status().stopped, None);

    replicas[&follower].0.stop().await;
    let status = replicas[&follower].0.status();
    assert_eq!(status.role, "shutdown");
    let reason = status.stopped.unwrap_or_default();
    assert!(reason.contains("restart"), "{reason:?}");
    assert_eq!(replicas[&leader].0.status().stopped, None);
    stop_replicas(&replicas).await;
}
