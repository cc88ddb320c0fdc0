//! Cluster membership over ractor_cluster: node-to-node links with mutual TLS and the cluster
//! cookie, joining through seeds, and failure detection by heartbeats.
//!
//! Each node runs a ractor_cluster `NodeServer` (TLS listener, cookie authentication,
//! `Isolated` connection mode) and one membership actor in the process group
//! [`MEMBERSHIP_GROUP`]. ractor_cluster shares process groups between connected nodes, so
//! each membership actor can message the others. Every heartbeat interval it sends them its name,
//! its cluster address and the members it considers alive, marks members it has not heard from within
//! the failure timeout as dead, and dials seeds and known members it is not hearing from,
//! with exponential backoff and jitter. A dead member that is heard again is alive again.
//!
//! Atlas runs the TLS side of the links itself (see [`crate::links`]), so that a peer must
//! declare the name its certificate was made for: ractor_cluster does not tie the two.

use crate::links::{NameCheck, PeerCertificates};
use ractor::{Actor, ActorProcessingErr, ActorRef, pg};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{
    IncomingEncryptionMode, NodeEventSubscription, NodeServer, NodeServerMessage,
    RactorClusterMessage,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Process group of the membership actors.
pub const MEMBERSHIP_GROUP: &str = "atlas.membership";

/// Maximum wait between two dials of an address that does not respond. The wait is also at
/// most the failure timeout, so a member that restarts is dialled again soon.
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(10);

/// Time a dial may take, TLS handshake included, before it is abandoned.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns how long a node without seeds and with an empty directory log waits for members
/// of an existing cluster to dial it before it starts a new cluster. The wait is longer than
/// the members take between two dials of a dead address: backoff, jitter and a hung dial.
pub fn bootstrap_wait(failure_timeout: Duration) -> Duration {
    2 * failure_timeout.min(MAX_DIAL_BACKOFF) + DIAL_TIMEOUT
}

/// How to run the cluster side of a node.
#[derive(Clone)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster.
    pub node_name: String,
    /// This node's id in the cluster's replicated logs, which changes with its data directory.
    pub raft_id: u64,
    /// Address other nodes dial to reach this node.
    pub advertise: SocketAddr,
    /// Nodes to join through.
    pub seeds: Vec<SocketAddr>,
    /// Shared secret every node of the cluster presents.
    pub cookie: String,
    /// TLS for incoming links; must require client certificates of the cluster CA.
    pub server_tls: Arc<rustls::ServerConfig>,
    /// TLS for outgoing links, with this node's certificate.
    pub client_tls: Arc<rustls::ClientConfig>,
    pub heartbeat_interval: Duration,
    pub failure_timeout: Duration,
    /// Whether this node's directory log has members (see [`Cluster::set_formed`]), sent in
    /// every heartbeat, so that a node without data learns it joins an existing cluster.
    pub formed: Arc<AtomicBool>,
    /// The id of this node's cluster once its shard logs started, 0 before (see
    /// [`Cluster::set_cluster_id`]). Heartbeats from a node of another cluster are ignored.
    pub cluster_id: Arc<AtomicU64>,
    /// Shard count and replication factor of this node, sent in every heartbeat.
    pub layout: Layout,
}

/// Shard count and replication factor of a node: every node of a cluster must have the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Layout {
    pub shards: u32,
    pub replication: u32,
}

/// State of a member as this node records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// This node.
    Local,
    /// Heard from within the failure timeout.
    Alive,
    /// Not heard from within the failure timeout.
    Dead,
    /// Learned from another member, never heard from directly.
    Unknown,
}

/// A member as the status endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub addr: String,
    /// The member's id in the replicated log; 0 until heard from directly.
    pub raft_id: u64,
    pub state: MemberState,
    /// Milliseconds since the last heartbeat from this member, if any.
    pub last_heard_ms: Option<u64>,
    /// Whether the member's directory log had members at its last heartbeat.
    pub formed: bool,
    /// The member's cluster id (0 before its shard logs started) and layout, from its last
    /// heartbeat.
    pub cluster_id: u64,
    pub layout: Layout,
}

/// The membership as last computed, shared with the status endpoint.
pub(crate) type MembershipView = Arc<RwLock<BTreeMap<String, MemberView>>>;

/// Counters of membership changes, for metrics.
pub trait MembershipObserver: Send + Sync + 'static {
    /// Called when a member becomes alive (`joined` or `rejoined`) or dead.
    fn changed(&self, event: &'static str, member: &str);

    /// Called when a member becomes alive, with the cluster address it announced, so that the
    /// node can keep the addresses of its peers (see `atlas recover`).
    fn alive_at(&self, _member: &str, _addr: &str) {}
}

/// Heartbeat payload, MessagePack-encoded.
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    name: String,
    addr: String,
    /// Members the sender considers alive, itself included, as (name, address).
    members: Vec<(String, String)>,
    /// The sender's id in the replicated log.
    #[serde(default)]
    raft_id: u64,
    /// Whether the sender's directory log has members.
    #[serde(default)]
    formed: bool,
    #[serde(default)]
    cluster_id: u64,
    #[serde(default)]
    layout: Layout,
}

/// Messages of the membership actor. They cross the network, so they serialize.
#[derive(RactorClusterMessage)]
pub enum MembershipMsg {
    /// A heartbeat from another node.
    Heartbeat(Vec<u8>),
    /// Periodic work: send heartbeats, detect failures, dial.
    Tick,
    /// Drop the named member if it is not alive (see [`Cluster::forget`]).
    Forget(String),
}

struct Member {
    addr: String,
    raft_id: u64,
    last_heard: Option<Instant>,
    alive: bool,
    formed: bool,
    cluster_id: u64,
    layout: Layout,
}

struct Dial {
    next: Instant,
    delay: Duration,
    in_flight: bool,
}

/// State of the membership actor.
struct MembershipState {
    settings: ClusterSettings,
    server: ActorRef<NodeServerMessage>,
    certificates: PeerCertificates,
    members: HashMap<String, Member>,
    dials: Arc<Mutex<HashMap<SocketAddr, Dial>>>,
    view: MembershipView,
    observer: Arc<dyn MembershipObserver>,
    /// Nodes of other clusters already reported, with their cluster id.
    foreign: HashSet<(String, u64)>,
    /// Start of the time in which this node, which has seeds, heard from no member, and the
    /// time of the last warning about it.
    alone: Option<(Instant, Instant)>,
}

/// Failure timeouts that a node with seeds may hear from no member before it warns, and
/// between warnings (30 s with the default timeout of 3 s).
const ALONE_WARNING_TIMEOUTS: u32 = 10;

struct Membership;

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipState;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: MembershipState,
    ) -> Result<Self::State, ActorProcessingErr> {
        pg::join(MEMBERSHIP_GROUP.to_owned(), vec![myself.get_cell()]);
        myself.send_interval(state.settings.heartbeat_interval, || MembershipMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MembershipMsg::Heartbeat(bytes) => match rmp_serde::from_slice::<Heartbeat>(&bytes) {
                Ok(heartbeat) => state.heard(heartbeat),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed cluster heartbeat"),
            },
            MembershipMsg::Tick => {
                state.send_heartbeats(&myself);
                state.detect_failures();
                state.warn_if_alone();
                state.dial();
            }
            MembershipMsg::Forget(name) => state.forget(&name),
        }
        state.publish();
        Ok(())
    }
}

impl MembershipState {
    fn heard(&mut self, heartbeat: Heartbeat) {
        if heartbeat.name == self.settings.node_name {
            return;
        }
        let own = self.settings.cluster_id.load(Ordering::Relaxed);
        if own != 0 && heartbeat.cluster_id != 0 && heartbeat.cluster_id != own {
            // Merging two clusters would mix two histories of the same logs.
            if self
                .foreign
                .insert((heartbeat.name.clone(), heartbeat.cluster_id))
            {
                tracing::error!(
                    member = %heartbeat.name,
                    addr = %heartbeat.addr,
                    cluster = heartbeat.cluster_id,
                    own_cluster = own,
                    "a node of another cluster reached this one; ignoring it. If it lost its \
                     data, stop it, empty its data directory and start it with --seeds"
                );
            }
            return;
        }
        let now = Instant::now();
        let member = self
            .members
            .entry(heartbeat.name.clone())
            .or_insert_with(|| Member {
                addr: heartbeat.addr.clone(),
                raft_id: heartbeat.raft_id,
                last_heard: None,
                alive: false,
                formed: false,
                cluster_id: 0,
                layout: Layout::default(),
            });
        if member.addr != heartbeat.addr {
            if member.alive {
                // Two nodes run under one name. Keep the member that was here first; a node
                // that moved to another address is accepted once its old address is dead.
                tracing::warn!(
                    member = %heartbeat.name,
                    known_addr = %member.addr,
                    other_addr = %heartbeat.addr,
                    "two nodes claim the same name; ignoring the second until the first is dead"
                );
                return;
            }
            member.addr = heartbeat.addr.clone();
        }
        if member.raft_id != heartbeat.raft_id {
            // The same node restarted with another data directory: a new incarnation.
            tracing::info!(member = %heartbeat.name, old = member.raft_id, new = heartbeat.raft_id, "cluster member has a new replicated log id");
            member.raft_id = heartbeat.raft_id;
        }
        let event = match (member.alive, member.last_heard) {
            (true, _) => None,
            (false, None) => Some("joined"),
            (false, Some(_)) => Some("rejoined"),
        };
        member.last_heard = Some(now);
        member.alive = true;
        member.formed = heartbeat.formed;
        member.cluster_id = heartbeat.cluster_id;
        member.layout = heartbeat.layout;
        if let Some(event) = event {
            tracing::info!(member = %heartbeat.name, addr = %heartbeat.addr, event, "cluster member alive");
            self.observer.changed(event, &heartbeat.name);
            self.observer.alive_at(&heartbeat.name, &heartbeat.addr);
        }
        if let Ok(addr) = heartbeat.addr.parse()
            && let Some(dial) = self
                .dials
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&addr)
        {
            dial.delay = self.settings.heartbeat_interval;
        }
        for (name, addr) in heartbeat.members {
            if name != self.settings.node_name && !self.members.contains_key(&name) {
                tracing::info!(member = %name, %addr, via = %heartbeat.name, "learned of a cluster member");
                self.members.insert(
                    name,
                    Member {
                        addr,
                        raft_id: 0,
                        last_heard: None,
                        alive: false,
                        formed: false,
                        cluster_id: 0,
                        layout: Layout::default(),
                    },
                );
            }
        }
    }

    fn send_heartbeats(&self, myself: &ActorRef<MembershipMsg>) {
        let mut members: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|(_, m)| m.alive)
            .map(|(name, m)| (name.clone(), m.addr.clone()))
            .collect();
        members.push((
            self.settings.node_name.clone(),
            self.settings.advertise.to_string(),
        ));
        let heartbeat = Heartbeat {
            name: self.settings.node_name.clone(),
            addr: self.settings.advertise.to_string(),
            members,
            raft_id: self.settings.raft_id,
            formed: self.settings.formed.load(Ordering::Relaxed),
            cluster_id: self.settings.cluster_id.load(Ordering::Relaxed),
            layout: self.settings.layout,
        };
        // Plain data with string keys: encoding into a Vec cannot fail.
        let bytes = rmp_serde::to_vec(&heartbeat).expect("heartbeat serializes");
        for cell in pg::get_members(&MEMBERSHIP_GROUP.to_owned()) {
            if cell.get_id() != myself.get_id()
                && let Err(e) = cell.send_message(MembershipMsg::Heartbeat(bytes.clone()))
            {
                tracing::debug!(error = %e, "sending a heartbeat failed");
            }
        }
    }

    fn detect_failures(&mut self) {
        let timeout = self.settings.failure_timeout;
        for (name, member) in &mut self.members {
            if member.alive && member.last_heard.is_none_or(|t| t.elapsed() > timeout) {
                member.alive = false;
                tracing::warn!(member = %name, addr = %member.addr, timeout_ms = timeout.as_millis() as u64, "cluster member unreachable, marked dead");
                self.observer.changed("dead", name);
            }
        }
    }

    /// Drops a member that is not alive: it leaves the member list and is dialled no more.
    /// Heartbeats list only the members their sender hears, so no peer brings it back. If
    /// the node starts again, it joins as any node does.
    fn forget(&mut self, name: &str) {
        if self.members.get(name).is_none_or(|member| member.alive) {
            if self.members.contains_key(name) {
                tracing::warn!(member = %name, "not forgetting a cluster member that is alive");
            }
            return;
        }
        let Some(member) = self.members.remove(name) else {
            return;
        };
        let shared_addr = self.members.values().any(|m| m.addr == member.addr);
        if let Ok(addr) = member.addr.parse::<SocketAddr>()
            && !shared_addr
            && !self.settings.seeds.contains(&addr)
        {
            self.dials
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&addr);
        }
        tracing::info!(member = %name, addr = %member.addr, "cluster member forgotten at an operator's request");
        self.observer.changed("removed", name);
    }

    /// Warns every [`ALONE_WARNING_TIMEOUTS`] failure timeouts while this node has seeds but
    /// hears from no member. The failed dials themselves are logged at the info level only.
    fn warn_if_alone(&mut self) {
        if self.settings.seeds.is_empty() || self.members.values().any(|m| m.alive) {
            self.alone = None;
            return;
        }
        let now = Instant::now();
        let (since, warned) = self.alone.get_or_insert((now, now));
        if now.duration_since(*warned) < self.settings.failure_timeout * ALONE_WARNING_TIMEOUTS {
            return;
        }
        *warned = now;
        let seeds: Vec<String> = self.settings.seeds.iter().map(|s| s.to_string()).collect();
        tracing::warn!(
            seeds = %seeds.join(","),
            alone_s = now.duration_since(*since).as_secs(),
            "no cluster member reachable yet, so this node has joined no cluster; check that \
             the seed addresses are right and that their nodes run with this cluster's CA and \
             cookie"
        );
    }

    /// Dials seeds and members this node is not hearing from. An address has at most one dial
    /// in flight, and its next dial waits out the backoff.
    fn dial(&self) {
        let mut targets: HashSet<SocketAddr> = self.settings.seeds.iter().copied().collect();
        let alive: HashSet<SocketAddr> = self
            .members
            .values()
            .filter(|m| m.alive)
            .filter_map(|m| m.addr.parse().ok())
            .collect();
        targets.extend(
            self.members
                .values()
                .filter(|m| !m.alive)
                .filter_map(|m| m.addr.parse::<SocketAddr>().ok()),
        );
        targets.retain(|a| !alive.contains(a) && *a != self.settings.advertise);
        // A dialled peer must present the certificate of the member last heard at its
        // address, and not that of a member heard elsewhere (see `links::dial`).
        let mut expected: HashMap<SocketAddr, (Option<Instant>, String)> = HashMap::new();
        for (name, member) in &self.members {
            let Ok(addr) = member.addr.parse() else {
                continue;
            };
            let latest = expected
                .get(&addr)
                .is_none_or(|(heard, _)| member.last_heard > *heard);
            if latest {
                expected.insert(addr, (member.last_heard, name.clone()));
            }
        }
        let mut live_names: HashSet<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.alive)
            .map(|(name, _)| name.clone())
            .collect();
        live_names.insert(self.settings.node_name.clone());
        let live_names = Arc::new(live_names);
        let now = Instant::now();
        let mut dials = self.dials.lock().unwrap_or_else(|p| p.into_inner());
        for addr in targets {
            let dial = dials.entry(addr).or_insert(Dial {
                next: now,
                delay: self.settings.heartbeat_interval,
                in_flight: false,
            });
            if dial.in_flight || dial.next > now {
                continue;
            }
            dial.in_flight = true;
            // Exponential backoff with up to 25% jitter, so restarted nodes do not dial in step.
            let jitter = dial.delay.mul_f64(rand::random::<f64>() * 0.25);
            dial.next = now + dial.delay + jitter;
            dial.delay = (dial.delay * 2).min(MAX_DIAL_BACKOFF.min(self.settings.failure_timeout));
            let server = self.server.clone();
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.settings.client_tls));
            let dials = Arc::clone(&self.dials);
            let certificates = self.certificates.clone();
            let peer = crate::links::DialedPeer {
                addr,
                expected: expected.get(&addr).map(|(_, name)| name.clone()),
                live_names: Arc::clone(&live_names),
            };
            tokio::spawn(async move {
                let result = tokio::time::timeout(
                    DIAL_TIMEOUT,
                    crate::links::dial(&server, &peer, connector, &certificates),
                )
                .await;
                match result {
                    Ok(Ok(())) => tracing::debug!(%addr, "cluster link opened"),
                    Ok(Err(crate::links::DialError::Refused(e))) => {
                        tracing::warn!(%addr, error = %e, "cluster peer refused before its session started; dialling it again later")
                    }
                    Ok(Err(crate::links::DialError::Failed(e))) => {
                        tracing::info!(%addr, error = %e, "cannot reach cluster peer, will retry")
                    }
                    Err(_) => {
                        tracing::info!(%addr, "cluster peer did not complete the handshake in time, will retry")
                    }
                }
                if let Some(dial) = dials
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&addr)
                {
                    dial.in_flight = false;
                }
            });
        }
    }

    fn publish(&self) {
        let mut view = BTreeMap::new();
        view.insert(
            self.settings.node_name.clone(),
            MemberView {
                name: self.settings.node_name.clone(),
                addr: self.settings.advertise.to_string(),
                raft_id: self.settings.raft_id,
                state: MemberState::Local,
                last_heard_ms: None,
                formed: self.settings.formed.load(Ordering::Relaxed),
                cluster_id: self.settings.cluster_id.load(Ordering::Relaxed),
                layout: self.settings.layout,
            },
        );
        for (name, member) in &self.members {
            let state = match (member.alive, member.last_heard) {
                (true, _) => MemberState::Alive,
                (false, Some(_)) => MemberState::Dead,
                (false, None) => MemberState::Unknown,
            };
            view.insert(
                name.clone(),
                MemberView {
                    name: name.clone(),
                    addr: member.addr.clone(),
                    raft_id: member.raft_id,
                    state,
                    last_heard_ms: member.last_heard.map(|t| t.elapsed().as_millis() as u64),
                    formed: member.formed,
                    cluster_id: member.cluster_id,
                    layout: member.layout,
                },
            );
        }
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

/// A running cluster side of a node.
pub struct Cluster {
    server: ActorRef<NodeServerMessage>,
    membership: ActorRef<MembershipMsg>,
    view: MembershipView,
    node_name: String,
    formed: Arc<AtomicBool>,
    cluster_id: Arc<AtomicU64>,
}

impl Cluster {
    /// Binds the listener for node-to-node links at `addr`. A node binds it before it
    /// writes anything, so that a taken port stops the start with nothing left behind.
    pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for cluster links on {addr}: {e}; pick another --cluster-listen"
            )
        })?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Starts the node server and the membership actor, taking links on `listener` (see
    /// [`Cluster::bind`]).
    pub async fn start(
        settings: ClusterSettings,
        listener: std::net::TcpListener,
        observer: Arc<dyn MembershipObserver>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        // ractor_cluster's own listener gets an unused loopback port and rejects every
        // client, because links arrive through `listener` (see `crate::links`).
        let unused = crate::links::reject_all_clients(&settings.server_tls)
            .map_err(|e| anyhow::anyhow!("cannot set up the internal cluster listener: {e}"))?;
        let unused = tokio_rustls::TlsAcceptor::from(unused);
        let node_server = NodeServer::new(
            0,
            settings.cookie.clone(),
            settings.node_name.clone(),
            settings.advertise.ip().to_string(),
            Some(IncomingEncryptionMode::Tls(unused)),
            // Transitive mode would dial learned peers without TLS; membership dials them.
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
        let (server, _) = Actor::spawn(None, node_server, ()).await?;
        let certificates = PeerCertificates::default();
        server.cast(NodeServerMessage::SubscribeToEvents {
            id: "atlas-session-log".into(),
            subscription: Box::new(SessionEvents {
                authenticated: Mutex::default(),
                certificates: certificates.clone(),
            }),
        })?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&settings.server_tls));
        tokio::spawn(crate::links::accept(
            listener,
            acceptor,
            server.clone(),
            certificates.clone(),
        ));
        let view: MembershipView = Arc::default();
        let node_name = settings.node_name.clone();
        let formed = Arc::clone(&settings.formed);
        let cluster_id = Arc::clone(&settings.cluster_id);
        let state = MembershipState {
            server: server.clone(),
            certificates,
            members: HashMap::new(),
            dials: Arc::default(),
            alone: None,
            view: Arc::clone(&view),
            observer,
            settings,
            foreign: HashSet::new(),
        };
        if state.settings.seeds.contains(&state.settings.advertise) {
            tracing::warn!(
                addr = %state.settings.advertise,
                "a seed is this node's own cluster address; it cannot join anyone through it"
            );
        }
        let (membership, _) = Actor::spawn(None, Membership, state).await?;
        tracing::info!(node = %node_name, "cluster membership started");
        Ok(Self {
            server,
            membership,
            view,
            node_name,
            formed,
            cluster_id,
        })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Records whether this node's directory log has members, for the next heartbeats.
    pub fn set_formed(&self, formed: bool) {
        self.formed.store(formed, Ordering::Relaxed);
    }

    /// Records the id of this node's cluster, once its shard logs started.
    pub fn set_cluster_id(&self, id: u64) {
        self.cluster_id.store(id, Ordering::Relaxed);
    }

    /// Returns the current membership, this node included.
    pub fn members(&self) -> Vec<MemberView> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Asks every reachable node, this one included, to drop `name` from its member list
    /// unless it hears from it. A node that is cut off now keeps listing it as dead.
    pub fn forget(&self, name: &str) {
        for cell in pg::get_members(&MEMBERSHIP_GROUP.to_owned()) {
            if let Err(e) = cell.send_message(MembershipMsg::Forget(name.to_owned())) {
                tracing::debug!(error = %e, "sending a request to forget a member failed");
            }
        }
    }

    /// Stops the membership actor and the node server.
    pub fn stop(&self) {
        self.membership.stop(Some("node shutdown".into()));
        self.server.stop(Some("node shutdown".into()));
    }
}

/// Tracks which node sessions authenticated, to log those that closed before, and stops
/// those whose peer declares a name other than its certificate's.
struct SessionEvents {
    authenticated: Mutex<HashSet<ractor::ActorId>>,
    certificates: PeerCertificates,
}

impl NodeEventSubscription for SessionEvents {
    fn node_session_opened(&self, session: ractor_cluster::node::NodeServerSessionInformation) {
        tracing::debug!(peer = %session.peer_addr, "cluster session opened");
    }

    fn node_session_disconnected(
        &self,
        session: ractor_cluster::node::NodeServerSessionInformation,
    ) {
        self.certificates.forget(&session.peer_addr);
        let id = session.actor.get_id();
        let was_authenticated = self
            .authenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if was_authenticated {
            tracing::info!(peer = %session.peer_addr, "cluster session closed");
        } else {
            tracing::warn!(
                peer = %session.peer_addr,
                "cluster session closed before authenticating: a second link to a peer that \
                 ractor_cluster dropped (common for a while after a pause or a partition ends), \
                 a wrong cookie, a failed TLS handshake on the peer's side, or a name other \
                 than its certificate's; the log line above gives the reason, and only a \
                 peer that never becomes a member points to a wrong cookie"
            );
        }
    }

    fn node_session_authenticated(
        &self,
        session: ractor_cluster::node::NodeServerSessionInformation,
    ) {
        let declared = session
            .peer_name
            .as_ref()
            .map_or("", |name| name.name.as_str());
        match self.certificates.check(&session.peer_addr, declared) {
            NameCheck::Matches => {
                self.authenticated
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(session.actor.get_id());
            }
            NameCheck::Differs {
                declared,
                certificate,
            } => {
                tracing::error!(
                    peer = %session.peer_addr,
                    declared = %declared,
                    certificate = %certificate,
                    "cluster peer refused: it declares a node name other than the one its \
                     certificate was made for; give each node the certificate of its own name \
                     (`atlas cert node NAME`)"
                );
                session.actor.stop(Some("name_not_in_certificate".into()));
            }
            NameCheck::Unknown => {
                tracing::error!(peer = %session.peer_addr, declared = %declared, "cluster peer refused: its link did not come through the node's TLS listener");
                session.actor.stop(Some("no_certificate".into()));
            }
        }
    }
}
