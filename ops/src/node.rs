//! Starting and stopping one node: storage, actors, gateway and metrics listener.

use crate::config::NodeConfig;
use crate::tls;
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use atlas_actors::{
    ActorMetrics, Directory, GroupSettings, GroupSupervisor, KeyTransparency, Keyring, NextKey,
    SupervisorArgs, SupervisorMsg,
};
use atlas_cluster::replication::{
    AppendObserver, DIRECTORY_LOG, LogSettings, RemoveError, ReplicaSettings, ReplicatedLogs,
    ReplicationCheck, node_identity,
};
use atlas_cluster::{
    Cluster, ClusterSettings, ForwardHandler, GroupOwners, Layout, MemberState, MemberView,
    MembershipObserver, NodeName, Presence, Router, ShardId, replicas, shard_of,
};
use atlas_gateway::auth::AuthSettings;
use atlas_gateway::{GatewayMetrics, GatewayState, SessionSettings, WriteGate};
use atlas_protocol::CloseCode;
use atlas_protocol::{GroupId, LogEntry};
use atlas_storage::{Change, NodeKey, Store};
use prometheus::{Encoder, Histogram, HistogramOpts, Registry, TextEncoder};
use ractor::{Actor, ActorRef};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// A running node.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub fingerprint: String,
    pub generated_cert: bool,
    store: Store,
    presence: Arc<Presence>,
    shutdown: watch::Sender<bool>,
    gateway: actix_web::dev::ServerHandle,
    metrics_server: actix_web::dev::ServerHandle,
    supervisor: ActorRef<SupervisorMsg>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    key_tasks: tokio::task::JoinHandle<()>,
    cluster: Option<Arc<Cluster>>,
    /// This node's replicas of the replicated logs and the tasks that watch the membership
    /// for them.
    replicated: Option<(Arc<ReplicatedLogs>, Vec<tokio::task::JoinHandle<()>>)>,
}

/// Starts a node; must run inside an actix system.
pub async fn start(config: &NodeConfig) -> anyhow::Result<RunningNode> {
    // Read and bound before anything is written to the data directory, so that a wrong
    // certificate path or a taken port leaves no new data directory behind.
    let cluster_tls = cluster_tls(config)?;
    // A generated client certificate lives in the data directory, so only given files are
    // read here.
    let given_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(_), Some(_)) => Some(client_tls(config)?),
        _ => None,
    };
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}; pick another --listen", config.listen))?;
    let metrics_listener =
        std::net::TcpListener::bind(config.metrics_listen).with_context(|| {
            format!(
                "cannot listen for metrics on {}; pick another --metrics-listen",
                config.metrics_listen
            )
        })?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    // The storage error already names the path and the cause.
    let store = Store::open(&config.data_dir.join("storage"))?;

    let registry = Registry::new();
    let flush_latency = Histogram::with_opts(
        HistogramOpts::new(
            "atlas_storage_flush_seconds",
            "Duration of storage flushes (fsync)",
        )
        .buckets(vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
    )?;
    registry.register(Box::new(flush_latency.clone()))?;
    store.set_flush_observer(move |elapsed| flush_latency.observe(elapsed.as_secs_f64()));
    let actor_metrics = ActorMetrics::register(&registry)?;
    let gateway_metrics = GatewayMetrics::register(&registry)?;

    let secret = signing_key_secret(config, &store)?;
    let keyring = Arc::new(Keyring::open(
        store.clone(),
        &secret,
        Duration::from_secs(config.signing_key_grace_secs),
    )?);
    let kt = Arc::new(KeyTransparency::open(store.clone(), Arc::clone(&keyring))?);
    // This node's id in the replicated logs; a new data directory makes a new member.
    let raft_id = node_identity(store.sled_db(), DIRECTORY_LOG, &config.node_name)
        .context("cannot read or create this node's id in the replicated logs")?;
    // Known before the first heartbeat arrives, so that nodes of another cluster are ignored
    // from the start.
    let cluster_id = store.shard_log_start()?.map_or(0, |start| start.cluster);
    let cluster = match cluster_tls {
        Some(links) => {
            Some(start_cluster(config, &store, &registry, raft_id, cluster_id, links).await?)
        }
        None => None,
    };
    let replicated = match &cluster {
        Some(cluster) => {
            let observer = append_metrics(&registry)?;
            Some(
                start_replicated_logs(config, &store, Arc::clone(cluster), raft_id, observer)
                    .await?,
            )
        }
        None => None,
    };

    let presence = Arc::new(Presence::new());
    let settings = GroupSettings {
        idle_timeout: Duration::from_secs(config.group_idle_secs.max(1)),
        retention_ttl: Duration::from_secs(config.retention_days * 24 * 3600),
        ..GroupSettings::default()
    };
    let (supervisor, _) = Actor::spawn(
        None,
        GroupSupervisor,
        SupervisorArgs {
            store: store.clone(),
            keyring: Arc::clone(&keyring),
            deliver: presence.clone(),
            settings,
            metrics: actor_metrics,
        },
    )
    .await
    .context("cannot start the group supervisor")?;
    if let Some((logs, _)) = &replicated {
        // Entries that other nodes append reach the members connected here through the
        // group's actor on this node.
        let following = supervisor.clone();
        logs.set_hook(Arc::new(move |change| {
            let replicated = |group: &GroupId, entry: &LogEntry, welcomes: &[_]| {
                let _ = following.send_message(SupervisorMsg::Replicated {
                    group: group.clone(),
                    entry: entry.clone(),
                    welcomes: welcomes.to_vec(),
                });
            };
            match change {
                Change::Append {
                    group,
                    entry,
                    welcomes,
                    ..
                } => replicated(group, entry, welcomes),
                Change::AppendBatch { group, items } => {
                    for item in items {
                        replicated(group, &item.entry, &item.welcomes);
                    }
                }
                _ => {}
            }
        }));
        // Entries and Welcomes that a snapshot brought were not applied one by one, so
        // nothing pushed them. The newest entry of each such group goes out instead, with
        // the new Welcomes: a member whose cursor lies further back reads the gap with a
        // sync, as after any missed push.
        let supervisor = supervisor.clone();
        let stored = store.clone();
        logs.set_installed_hook(Arc::new(move |news| {
            for imported in news {
                let group = &imported.group;
                let seq = imported.newest_seq;
                match stored.entry(group, seq) {
                    Ok(Some(entry)) => {
                        let _ = supervisor.send_message(SupervisorMsg::Replicated {
                            group: group.clone(),
                            entry,
                            welcomes: imported.welcomes.clone(),
                        });
                    }
                    Ok(None) => {
                        tracing::debug!(group_id = %group, seq, "no stored entry to push after a snapshot install");
                    }
                    Err(e) => {
                        tracing::warn!(group_id = %group, seq, error = %e, "reading the newest entry of a group that a snapshot brought failed; its members get it at their next sync");
                    }
                }
            }
        }));
    }

    let (fingerprint, generated_cert, tls_config) = match given_tls {
        Some(loaded) => loaded,
        None => client_tls(config)?,
    };

    let port = listener.local_addr()?.port();
    let auth = atlas_gateway::auth::Auth::new(
        auth_settings(config, port)?,
        Arc::clone(&keyring),
        store.clone(),
    )?;

    // In a cluster, this node serves the sends and commits of the groups it owns for the
    // other nodes. The handler finds the gateway state once it exists.
    let serving: Arc<OnceLock<Arc<GatewayState>>> = Arc::default();
    let owners = match &cluster {
        Some(cluster) => {
            let serving = Arc::clone(&serving);
            let handler: ForwardHandler = Arc::new(move |bytes| {
                let state = serving.get().cloned();
                Box::pin(async move {
                    match state {
                        Some(state) => atlas_gateway::serve_forwarded(state, bytes).await,
                        None => not_serving_yet(),
                    }
                })
            });
            let (owners, _forwarder) =
                GroupOwners::start(Arc::clone(cluster), config.shards, handler)
                    .await
                    .context("cannot start the forwarder of group requests")?;
            if let Some((logs, _)) = &replicated {
                owners.follow_leaders(Arc::clone(logs));
            }
            Some(Arc::new(owners))
        }
        None => None,
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let state = Arc::new(GatewayState {
        store: store.clone(),
        directory: Directory::new(store.clone(), &config.server_name),
        kt: Arc::clone(&kt),
        router: Router::new(supervisor.clone()),
        presence: Arc::clone(&presence),
        metrics: gateway_metrics,
        settings: SessionSettings {
            server_name: config.server_name.clone(),
            queue_capacity: config.queue_capacity,
            queue_max_bytes: config.queue_max_bytes,
            max_unauthenticated: config.max_unauthenticated,
            open_registration: config.open_registration,
            ping_interval: config.ping_interval(),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs.max(2)),
            ..SessionSettings::default()
        },
        shutdown: shutdown_rx,
        unauthenticated: Arc::default(),
        auth: Some(Arc::new(auth)),
        write_gate: replicated.as_ref().map(|(logs, _)| {
            Arc::new(MajorityGate {
                logs: Arc::clone(logs),
                lease: Duration::from_millis(config.failure_timeout_ms),
            }) as Arc<dyn WriteGate>
        }),
        owners,
    });
    let _ = serving.set(Arc::clone(&state));
    let workers = if config.workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        config.workers
    };
    let (gateway, addr) = atlas_gateway::bind(state, listener, tls_config, workers)
        .with_context(|| format!("cannot serve TLS on {}", config.listen))?;
    let rotation = KeyRotation {
        keyring: Arc::clone(&keyring),
        publish: replicated.as_ref().map(|(logs, _)| KeyPublication {
            store: store.clone(),
            logs: Arc::clone(logs),
            node: config.node_name.clone(),
        }),
        abandoned: Arc::default(),
    };
    let admin = Admin {
        keyring: Arc::clone(&keyring),
        rotation: rotation.clone(),
        cluster: cluster.clone(),
        logs: replicated.as_ref().map(|(logs, _)| Arc::clone(logs)),
        node_name: config.node_name.clone(),
        shards: config.shards,
        replication: config.replication,
    };
    let (metrics_server, metrics_addr) = metrics_server(registry, admin, metrics_listener)
        .with_context(|| format!("cannot listen for metrics on {}", config.metrics_listen))?;
    let handles = (gateway.handle(), metrics_server.handle());
    let tasks = vec![tokio::spawn(gateway), tokio::spawn(metrics_server)];
    let abandoned = Arc::clone(&rotation.abandoned);
    let maintenance = key_maintenance(
        kt,
        rotation,
        store.clone(),
        Duration::from_secs(config.tree_head_interval_secs),
        Duration::from_secs(config.signing_key_rotation_secs),
        shutdown.subscribe(),
    );
    let publisher = replicated.as_ref().map(|(logs, _)| {
        publish_node_keys(
            Arc::clone(&keyring),
            Arc::clone(&abandoned),
            store.clone(),
            Arc::clone(logs),
            config.node_name.clone(),
            shutdown.subscribe(),
        )
    });
    let key_tasks = tokio::spawn(async move {
        match publisher {
            Some(publisher) => {
                tokio::join!(maintenance, publisher);
            }
            None => maintenance.await,
        }
    });
    tracing::info!(%addr, %metrics_addr, data_dir = %config.data_dir.display(), "node started");
    Ok(RunningNode {
        addr,
        metrics_addr,
        fingerprint,
        generated_cert,
        store,
        presence,
        shutdown,
        gateway: handles.0,
        metrics_server: handles.1,
        supervisor,
        tasks,
        key_tasks,
        cluster,
        replicated,
    })
}

/// Passkey and token settings, with the relying party defaulting to the server name and the
/// origin to `https://<server name>:<port>`.
fn auth_settings(config: &NodeConfig, port: u16) -> anyhow::Result<AuthSettings> {
    let rp_id = config
        .rp_id
        .clone()
        .unwrap_or_else(|| config.server_name.clone());
    let origin = config
        .rp_origin
        .clone()
        .unwrap_or_else(|| format!("https://{}:{port}", config.server_name));
    let rp_origin = url::Url::parse(&origin)
        .with_context(|| format!("rp_origin {origin:?} is not a URL; use https://host:port"))?;
    Ok(AuthSettings {
        rp_id,
        rp_origin,
        issuer: format!("https://{}", config.server_name),
        access_token_ttl: Duration::from_secs(config.access_token_ttl_secs),
        refresh_token_ttl: Duration::from_secs(config.refresh_token_ttl_secs),
        ceremony_ttl: Duration::from_secs(config.ceremony_ttl_secs),
        dpop_window: Duration::from_secs(config.dpop_window_secs),
        dpop_nonces: config.dpop_nonces,
        replay_cache_capacity: config.dpop_replay_capacity,
        max_ceremonies: 10_000,
        reauthentication_window: Duration::from_secs(config.reauthentication_window_secs),
    })
}

/// Returns the reply to a request forwarded before this node's gateway exists.
fn not_serving_yet() -> Vec<u8> {
    let body = atlas_protocol::ServerBody::Error {
        code: atlas_protocol::ErrorCode::Unavailable,
        message: "the node is still starting; retry".into(),
        epoch: None,
    };
    rmp_serde::to_vec_named(&body).expect("server body serializes")
}

/// Time a stopping node spends leaving the replicated logs.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns the interval of a log leader's heartbeats for an election timeout (its lower
/// bound): half of it, the longest that leaves followers a second heartbeat before they
/// elect. openraft 0.9 also gives every append this long to be stored on a follower, fsync
/// included, so a shorter interval makes appends time out and retry when disks are busy.
fn raft_heartbeat(election_timeout: Duration) -> Duration {
    (election_timeout / 2).max(Duration::from_millis(50))
}

/// Interval at which the leaders of the replicated logs make new live members voters.
const MEMBER_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Interval at which a node checks whether it counts a majority of the voters alive, and so
/// may start elections.
const ELECTION_GATE_INTERVAL: Duration = Duration::from_millis(200);

/// Registers the histograms of the replicated logs' appends (see
/// `atlas_cluster::replication::AppendTimes`) and returns the function that records them. With
/// the storage flush times, they show where a send's time goes between its group actor and
/// its commit.
fn append_metrics(registry: &Registry) -> prometheus::Result<AppendObserver> {
    let seconds = vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let wait = Histogram::with_opts(
        HistogramOpts::new(
            "atlas_replication_append_wait_seconds",
            "Time an append of group entries waited in its log's queue for the entry before it",
        )
        .buckets(seconds.clone()),
    )?;
    let write = Histogram::with_opts(
        HistogramOpts::new(
            "atlas_replication_append_write_seconds",
            "Time from proposing an entry of appends to its commit on a majority of the log's \
             voters and its apply on the leader (failed writes excluded)",
        )
        .buckets(seconds),
    )?;
    let size = Histogram::with_opts(
        HistogramOpts::new(
            "atlas_replication_appends_per_entry",
            "Number of appends written together in one entry of a replicated log",
        )
        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
    )?;
    let failed = prometheus::IntCounter::new(
        "atlas_replication_append_write_failures_total",
        "Entries of appends whose write failed",
    )?;
    registry.register(Box::new(wait.clone()))?;
    registry.register(Box::new(write.clone()))?;
    registry.register(Box::new(size.clone()))?;
    registry.register(Box::new(failed.clone()))?;
    Ok(Arc::new(move |times| {
        for waited in times.waits {
            wait.observe(waited.as_secs_f64());
        }
        size.observe(times.waits.len() as f64);
        if times.failed {
            failed.inc();
        } else {
            write.observe(times.write.as_secs_f64());
        }
    }))
}

/// Starts this node's replicas of the replicated logs, which carry every change to the shared
/// state (one log per shard, one for the directory), and makes the store write through them.
/// Two tasks follow the membership: one gates elections and starts the logs, the other
/// changes the members of the logs this node leads.
async fn start_replicated_logs(
    config: &NodeConfig,
    store: &Store,
    cluster: Arc<Cluster>,
    node: u64,
    append_observer: AppendObserver,
) -> anyhow::Result<(Arc<ReplicatedLogs>, Vec<tokio::task::JoinHandle<()>>)> {
    let election_timeout =
        Duration::from_millis(config.failure_timeout_ms / 3).max(Duration::from_millis(300));
    let settings = LogSettings {
        replica: ReplicaSettings {
            log: DIRECTORY_LOG.into(),
            node_name: config.node_name.clone(),
            raft_id: node,
            heartbeat: raft_heartbeat(election_timeout),
            election_timeout,
            // A snapshot copies the log's whole part of the shared state and stalls applying
            // while it is built, so the default takes one only after many entries.
            snapshot_every: config.log_snapshot_entries,
        },
        shards: config.shards,
        replication: config.replication as usize,
        start_alone_after: 2 * Duration::from_millis(config.failure_timeout_ms),
    };
    let logs = Arc::new(ReplicatedLogs::start(settings, store).await?);
    // Changes and reads fail at once while this node is cut off, instead of waiting for
    // openraft to give up with its own message.
    let gate = MajorityGate {
        logs: Arc::clone(&logs),
        lease: Duration::from_millis(config.failure_timeout_ms),
    };
    // A node removed while it was down gets no entries until a leader adds it back, so its
    // reads would wait for them in vain.
    let check: ReplicationCheck = Arc::new(move || {
        if gate.cut_off() {
            Some(CUT_OFF.to_owned())
        } else {
            gate.logs
                .awaiting_readmission()
                .then(|| NOT_READMITTED.to_owned())
        }
    });
    store.set_replicator(Arc::new(
        logs.replicator()
            .with_check(check)
            .with_append_observer(append_observer),
    ));
    let sync_logs = Arc::clone(&logs);
    let sync_cluster = Arc::clone(&cluster);
    // Membership changes wait for commits, so they run apart from the election gate, which
    // must follow the failure detector even while a change waits.
    let sync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(MEMBER_SYNC_INTERVAL);
        loop {
            tick.tick().await;
            let alive = alive_of(sync_cluster.members());
            for failure in sync_logs.add_live_members(&alive).await {
                tracing::warn!(error = %failure, "adding members to a replicated log failed; retrying");
            }
        }
    });
    let task_logs = Arc::clone(&logs);
    let failure_timeout = Duration::from_millis(config.failure_timeout_ms);
    let mut first_start = config
        .seeds
        .is_empty()
        .then(|| FirstStart::new(failure_timeout));
    let mut unformed = (!config.seeds.is_empty()).then(|| UnformedWatch::new(failure_timeout));
    let members_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ELECTION_GATE_INTERVAL);
        let mut cluster_id = 0;
        loop {
            tick.tick().await;
            let members = cluster.members();
            cluster.set_formed(task_logs.directory_formed());
            // The id never changes once the shard logs started.
            if cluster_id == 0 {
                cluster_id = task_logs.cluster_id();
                cluster.set_cluster_id(cluster_id);
            }
            if let Some(start) = &mut first_start
                && start.done(&task_logs, &members).await
            {
                first_start = None;
            }
            if let Some(watch) = &mut unformed {
                watch.check(task_logs.directory_formed(), &members);
            }
            let layout = layout_mismatch(&members);
            let alive = alive_of(members);
            task_logs.gate_elections(&alive);
            if let Err(e) = layout.and_then(|()| task_logs.check_layout()) {
                // Serving would send this node's group changes to other logs than its peers
                // use, or fight over the voters of the logs it leads.
                tracing::error!(error = %e, "stopping: the shard count or replication differs from the cluster's");
                eprintln!("atlas: {e}");
                std::process::exit(2);
            }
            if let Err(e) = task_logs.start_shard_logs_when_due().await {
                tracing::warn!(error = %e, "starting the shard logs failed; retrying");
            }
        }
    });
    Ok((logs, vec![members_task, sync_task]))
}

/// Returns the name and raft id of every live member in `members`, this node included.
/// Members with another layout than this node's are left out, because they stop once they
/// hear of the cluster (see [`layout_mismatch`]) and must not become voters before.
fn alive_of(members: Vec<MemberView>) -> Vec<(String, u64)> {
    let own = members
        .iter()
        .find(|m| m.state == MemberState::Local)
        .map(|m| m.layout);
    members
        .into_iter()
        .filter(|m| matches!(m.state, MemberState::Local | MemberState::Alive))
        .filter(|m| m.layout.shards == 0 || own.is_none_or(|own| own == m.layout))
        .map(|m| (m.name, m.raft_id))
        .collect()
}

/// Returns an error when a live member of a cluster whose shard logs started runs another
/// shard count or replication factor than this node: this node must not join it.
fn layout_mismatch(members: &[MemberView]) -> Result<(), String> {
    let Some(own) = members.iter().find(|m| m.state == MemberState::Local) else {
        return Ok(());
    };
    let other = members.iter().find(|m| {
        m.state == MemberState::Alive
            && m.cluster_id != 0
            && m.layout.shards != 0
            && m.layout != own.layout
    });
    match other {
        Some(m) => Err(format!(
            "this node runs {} shards with replication {}, but {} of the cluster runs {} shards \
             with replication {}; restart it with --shards {} --replication {} (ATLAS_SHARDS, \
             ATLAS_REPLICATION)",
            own.layout.shards,
            own.layout.replication,
            m.name,
            m.layout.shards,
            m.layout.replication,
            m.layout.shards,
            m.layout.replication
        )),
        None => Ok(()),
    }
}

/// The start of the directory log on a node without seeds: such a node starts a new cluster,
/// unless it lost its data and the members of its cluster reach it first.
struct FirstStart {
    started: tokio::time::Instant,
    wait: Duration,
    joining: bool,
}

impl FirstStart {
    fn new(failure_timeout: Duration) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            wait: atlas_cluster::bootstrap_wait(failure_timeout),
            joining: false,
        }
    }

    /// Starts the directory log alone when it is due. Returns whether nothing is left to do:
    /// the log has members, from this node's data or from the cluster that added this node.
    /// It is due at once when a node that is new too reached this one, or once `wait` has
    /// passed with no member of an existing cluster heard. Starting alone beside an existing
    /// cluster would accept writes that the cluster never receives.
    async fn done(&mut self, logs: &ReplicatedLogs, members: &[MemberView]) -> bool {
        if logs.directory_formed() {
            return true;
        }
        let peers: Vec<&MemberView> = members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .collect();
        if peers.iter().any(|m| m.formed) {
            if !self.joining {
                self.joining = true;
                tracing::warn!(
                    "this node has no replicated log yet but members of an existing cluster \
                     reached it; it waits for them to add it instead of starting a new cluster"
                );
            }
            return false;
        }
        if peers.is_empty() && self.started.elapsed() < self.wait {
            return false;
        }
        if let Err(e) = logs.start_directory_alone().await {
            tracing::warn!(error = %e, "starting the directory log failed; retrying");
            return false;
        }
        true
    }
}

/// Warns a node started with seeds while neither it nor any member it reaches has a
/// directory log. Only a node started without seeds starts a cluster, so such nodes wait for
/// one forever.
struct UnformedWatch {
    /// Time the node has waited so far, from when it first reached a member.
    since: Option<tokio::time::Instant>,
    /// Wait before the first warning: as long as a node without seeds waits before it
    /// starts a cluster.
    wait: Duration,
    last_warning: Option<tokio::time::Instant>,
}

/// Time between two warnings of [`UnformedWatch`].
const UNFORMED_WARNING_EVERY: Duration = Duration::from_secs(30);

impl UnformedWatch {
    fn new(failure_timeout: Duration) -> Self {
        Self {
            since: None,
            wait: atlas_cluster::bootstrap_wait(failure_timeout),
            last_warning: None,
        }
    }

    /// Checks the state after one membership round; `formed` is this node's directory log.
    fn check(&mut self, formed: bool, members: &[MemberView]) {
        let alive: Vec<&MemberView> = members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .collect();
        if formed || alive.is_empty() || alive.iter().any(|m| m.formed) {
            self.since = None;
            return;
        }
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < self.wait
            || self
                .last_warning
                .is_some_and(|at| at.elapsed() < UNFORMED_WARNING_EVERY)
        {
            return;
        }
        self.last_warning = Some(tokio::time::Instant::now());
        let names: Vec<&str> = alive.iter().map(|m| m.name.as_str()).collect();
        tracing::warn!(
            members = %names.join(","),
            waited_s = since.elapsed().as_secs(),
            "neither this node nor the members it reaches belong to a cluster yet, and all \
             were started with --seeds, so none starts one: start the first node of a new \
             cluster without --seeds"
        );
    }
}

/// Refuses writes while this node is not on the side of a majority of the voters, so that a
/// partitioned minority cannot accept writes the majority never receives.
struct MajorityGate {
    logs: Arc<ReplicatedLogs>,
    /// Time a leader may go without a majority's acknowledgement before it counts as cut off.
    lease: Duration,
}

/// Reason given while [`MajorityGate::cut_off`] is true.
const CUT_OFF: &str = "this node cannot reach a majority of the cluster";

/// Reason given while [`ReplicatedLogs::awaiting_readmission`] is true.
const NOT_READMITTED: &str = "this node was removed from the cluster while it was down and \
                              waits for a leader to add it back, usually within 15 s";

impl MajorityGate {
    /// Returns whether this node is cut off from a majority of the directory log's voters.
    fn cut_off(&self) -> bool {
        !self.logs.in_majority(self.lease)
    }
}

impl WriteGate for MajorityGate {
    fn refusal(&self) -> Option<String> {
        self.cut_off()
            .then(|| format!("{CUT_OFF}, so it accepts no writes; retry later or on another node"))
    }
}

/// Loads or generates the certificate of the client listener, and returns its fingerprint,
/// whether it was generated, and the listener's TLS configuration.
fn client_tls(config: &NodeConfig) -> anyhow::Result<(String, bool, rustls::ServerConfig)> {
    let identity = tls::load_identity(
        &config.data_dir,
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        &config.server_name,
    )?;
    let fingerprint = identity.fingerprint.clone();
    let generated = identity.generated;
    Ok((fingerprint, generated, tls::server_config(identity)?))
}

/// Returns the cluster address and the loaded cluster certificates when a cluster listener
/// is configured.
fn cluster_tls(config: &NodeConfig) -> anyhow::Result<Option<ClusterLinks>> {
    let Some(listen) = config.cluster_listen else {
        return Ok(None);
    };
    // `NodeConfig::validate` checked that these are set with `cluster_listen`.
    let (Some(ca), Some(cert), Some(key)) = (
        &config.cluster_ca,
        &config.cluster_cert,
        &config.cluster_key,
    ) else {
        anyhow::bail!("cluster_listen needs cluster_ca, cluster_cert and cluster_key");
    };
    let tls = atlas_cluster::tls::load_for(&config.node_name, ca, cert, key)?;
    let listener = Cluster::bind(listen)?;
    Ok(Some(ClusterLinks {
        listen,
        listener,
        tls,
    }))
}

/// The cluster listener, bound, and the certificates of its links.
struct ClusterLinks {
    listen: SocketAddr,
    listener: std::net::TcpListener,
    tls: atlas_cluster::tls::ClusterTls,
}

/// Starts the cluster side on the listener of `links`.
async fn start_cluster(
    config: &NodeConfig,
    store: &Store,
    registry: &Registry,
    raft_id: u64,
    cluster_id: u64,
    links: ClusterLinks,
) -> anyhow::Result<Arc<Cluster>> {
    let ClusterLinks {
        listen,
        listener,
        tls,
    } = links;
    let Some(cookie) = &config.cluster_cookie else {
        anyhow::bail!("cluster_listen needs cluster_cookie");
    };
    let observer = Arc::new(MembershipMetrics::register(registry, store.clone())?);
    let settings = ClusterSettings {
        node_name: config.node_name.clone(),
        raft_id,
        advertise: config.cluster_advertise.unwrap_or(listen),
        seeds: config.seeds.clone(),
        cookie: cookie.0.clone(),
        server_tls: tls.server,
        client_tls: tls.client,
        heartbeat_interval: Duration::from_millis(config.heartbeat_ms),
        failure_timeout: Duration::from_millis(config.failure_timeout_ms),
        formed: Arc::default(),
        cluster_id: Arc::new(cluster_id.into()),
        layout: Layout {
            shards: config.shards,
            replication: config.replication,
        },
    };
    let cluster = Cluster::start(settings, listener, observer)
        .await
        .with_context(|| format!("cannot start the cluster listener on {listen}"))?;
    tracing::info!(node = %config.node_name, %listen, seeds = config.seeds.len(), "cluster listener started");
    Ok(Arc::new(cluster))
}

/// Membership changes as Prometheus counters, and the addresses of live peers kept in the
/// node's database for `atlas recover`.
struct MembershipMetrics {
    changes: prometheus::IntCounterVec,
    store: Store,
}

impl MembershipMetrics {
    fn register(registry: &Registry, store: Store) -> prometheus::Result<Self> {
        let changes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "atlas_cluster_membership_changes_total",
                "Cluster members that joined, rejoined or were marked dead",
            ),
            &["event"],
        )?;
        registry.register(Box::new(changes.clone()))?;
        Ok(Self { changes, store })
    }
}

impl MembershipObserver for MembershipMetrics {
    fn changed(&self, event: &'static str, _member: &str) {
        self.changes.with_label_values(&[event]).inc();
    }

    fn alive_at(&self, member: &str, addr: &str) {
        if let Err(e) = atlas_cluster::replication::record_peer(self.store.sled_db(), member, addr)
        {
            tracing::warn!(%member, %addr, error = %e, "recording the address of a cluster member failed, so `atlas recover` will not check it");
        }
    }
}

/// State the admin endpoints act on.
#[derive(Clone)]
struct Admin {
    keyring: Arc<Keyring>,
    rotation: KeyRotation,
    cluster: Option<Arc<Cluster>>,
    logs: Option<Arc<ReplicatedLogs>>,
    node_name: String,
    shards: u32,
    replication: u32,
}

impl Admin {
    /// Returns the cluster status: members and the shard placement over the live ones. With
    /// `group`, returns only the shard that carries the group, with its replicas and log.
    fn status(&self, group: Option<&GroupId>) -> serde_json::Value {
        let members = match &self.cluster {
            Some(cluster) => cluster.members(),
            None => vec![MemberView {
                name: self.node_name.clone(),
                addr: String::new(),
                raft_id: 0,
                state: MemberState::Local,
                last_heard_ms: None,
                formed: false,
                cluster_id: 0,
                layout: Layout {
                    shards: self.shards,
                    replication: self.replication,
                },
            }],
        };
        let live: Vec<NodeName> = members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Local | MemberState::Alive))
            .map(|m| NodeName(m.name.clone()))
            .collect();
        let (directory, shard_logs) = match &self.logs {
            Some(logs) => {
                let (directory, shards) = logs.status();
                (Some(directory), shards)
            }
            None => (None, Vec::new()),
        };
        let shard_view = |shard: u32| {
            let replicas = replicas(ShardId(shard), &live, self.replication as usize);
            serde_json::json!({
                "shard": shard,
                "replicas": replicas.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
                "log": shard_logs.get(shard as usize),
            })
        };
        if let Some(group) = group {
            return serde_json::json!({
                "node": self.node_name,
                "group": group.to_string(),
                "shard": shard_view(shard_of(group.as_bytes(), self.shards).0),
            });
        }
        let shards: Vec<serde_json::Value> = (0..self.shards).map(shard_view).collect();
        serde_json::json!({
            "node": self.node_name,
            "clustered": self.cluster.is_some(),
            "members": members,
            "replication": self.replication,
            "shards": shards,
            "replicated_log": directory,
        })
    }
}

impl Admin {
    /// Removes a node lost for good from every replicated log (see
    /// `ReplicatedLogs::remove_member`), and responds with the logs it was removed from.
    async fn remove_node(&self, name: &str) -> HttpResponse {
        let (Some(cluster), Some(logs)) = (&self.cluster, &self.logs) else {
            return HttpResponse::Conflict().body("this node does not run in a cluster\n");
        };
        // Checked before the name reaches a log line.
        if !crate::config::valid_node_name(name) {
            return HttpResponse::BadRequest().body(
                "invalid node name: a node name has 1 to 64 characters from a-z, A-Z, 0-9, '.', \
                 '_' and '-'\n",
            );
        }
        // Any member that sends heartbeats counts, whatever its layout.
        let alive: Vec<(String, u64)> = cluster
            .members()
            .into_iter()
            .filter(|m| matches!(m.state, MemberState::Local | MemberState::Alive))
            .map(|m| (m.name, m.raft_id))
            .collect();
        let listed = cluster.members().iter().any(|m| m.name == name);
        let removed = match logs.remove_member(name, &alive).await {
            // A node that never became a voter or a learner, such as one stopped for other
            // shard settings, is only in the member lists.
            Err(RemoveError::NotInLogs(_)) if listed => Ok(Vec::new()),
            other => other,
        };
        match removed {
            Ok(removed) => {
                tracing::warn!(node = %name, logs = removed.len(), "removed a node from the replicated logs and the member lists at an operator's request");
                cluster.forget(name);
                HttpResponse::Ok()
                    .json(serde_json::json!({ "node": name, "removed_from": removed }))
            }
            Err(e @ RemoveError::NotInLogs(_)) => HttpResponse::NotFound().body(format!("{e}\n")),
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "could not remove a node from the replicated logs");
                HttpResponse::Conflict().body(format!("{e}\n"))
            }
        }
    }
}

/// Returns the secret that seals the signing keys: from the configuration, or else from
/// `<data_dir>/signing-key-secret`, generated on first start.
fn signing_key_secret(config: &NodeConfig, store: &Store) -> anyhow::Result<[u8; 32]> {
    if let Some(secret) = config.parsed_signing_key_secret()? {
        return Ok(secret);
    }
    let path = config.data_dir.join("signing-key-secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .with_context(|| {
                    format!(
                        "{} does not hold 64 hex digits; restore it or set ATLAS_SIGNING_KEY_SECRET",
                        path.display()
                    )
                })?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new secret cannot open keys sealed under the old one: refuse rather than leave
            // a second, useless secret file behind.
            anyhow::ensure!(
                store.signing_keys()?.is_empty(),
                "{} is missing but the data directory holds signing keys sealed with it; \
                 restore the file or set ATLAS_SIGNING_KEY_SECRET to the secret they were \
                 sealed with",
                path.display()
            );
            let secret: [u8; 32] = rand::random();
            write_private_file(&path, hex::encode(secret).as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "generated a signing key secret inside the data directory; set \
                 ATLAS_SIGNING_KEY_SECRET to keep it elsewhere"
            );
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_private_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Interval between deletions of expired refresh tokens.
const REFRESH_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Signs a tree head every `head_interval` while the log grows, rotates the signing key once
/// it is older than `rotation`, and deletes expired refresh tokens every hour.
async fn key_maintenance(
    kt: Arc<KeyTransparency>,
    rotation: KeyRotation,
    store: Store,
    head_interval: Duration,
    rotation_age: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(head_interval);
    let mut last_prune = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = kt.head().await {
            tracing::error!(error = %e, "signing a tree head failed");
        }
        let keyring = kt.keyring();
        let age_ms = atlas_actors::now_ms().saturating_sub(keyring.current_created_ms());
        if u128::from(age_ms) >= rotation_age.as_millis()
            && let Err(e) = rotation.rotate().await
        {
            tracing::error!(error = %e, "scheduled signing key rotation failed; retrying at the next tree head interval");
        }
        if last_prune.elapsed() >= REFRESH_PRUNE_INTERVAL {
            last_prune = std::time::Instant::now();
            let store = store.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                store.prune_refresh_tokens(atlas_actors::now_ms())
            })
            .await;
            match pruned {
                Ok(Ok(count)) => tracing::debug!(count, "deleted expired refresh tokens"),
                Ok(Err(e)) => tracing::error!(error = %e, "deleting expired refresh tokens failed"),
                Err(e) => tracing::error!(error = %e, "refresh token cleanup task failed"),
            }
        }
    }
}

/// Parses a group id in the hexadecimal form that `atlas-chat groups` and the logs print.
pub(crate) fn parse_group_id(text: &str) -> Result<GroupId, String> {
    const HINT: &str = "use an id that `atlas-chat groups` lists";
    GroupId::from_hex(text).map_err(|e| match e {
        // The length error comes first, so a long id is not quoted back.
        atlas_protocol::IdError::GroupIdLength(_) => {
            format!(
                "invalid group id of {} characters: {e}; {HINT}\n",
                text.len()
            )
        }
        _ => format!(
            "invalid group id {text:?}: expected hexadecimal digits, two per byte; {HINT}\n"
        ),
    })
}

/// Rotation of the node's signing key, which in a cluster publishes the new key first.
#[derive(Clone)]
struct KeyRotation {
    keyring: Arc<Keyring>,
    /// Directory to publish the new key to; `None` on a node that runs alone.
    publish: Option<KeyPublication>,
    /// Key ids of rotations whose publication failed. Such a write may still commit, so
    /// [`publish_node_keys`] withdraws these keys if the directory lists them.
    abandoned: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// The directory that a cluster node publishes its signing keys to.
#[derive(Clone)]
struct KeyPublication {
    store: Store,
    logs: Arc<ReplicatedLogs>,
    node: String,
}

impl KeyRotation {
    /// Replaces the current signing key with a new one and returns its key id. In a cluster
    /// whose directory log has formed, the new public key is committed to the directory
    /// before it signs anything, so a receipt it signs verifies against any node's JWKS
    /// fetched afterwards. If that write fails, the current key stays in use.
    async fn rotate(&self) -> Result<String, RotationError> {
        let next = NextKey::generate();
        if let Some(publish) = &self.publish
            && publish.logs.directory_formed()
        {
            let change = Change::PublishNodeKeys {
                node: publish.node.clone(),
                keys: vec![next.published()],
            };
            if let Err(e) = publish.store.write(change).await {
                self.abandoned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(next.kid().to_owned());
                return Err(RotationError::Unpublished(format!(
                    "publishing the new signing key {} to the cluster did not complete, so the \
                     current key stays in use: {e}. If the write took effect after all, the \
                     node withdraws that key from the JWKS within a second. Retry the rotation \
                     in a few seconds",
                    next.kid()
                )));
            }
        }
        self.keyring.rotate_to(next).map_err(RotationError::Keyring)
    }
}

/// Failure of [`KeyRotation::rotate`].
#[derive(Debug)]
enum RotationError {
    /// The new key could not be published to the cluster; the node may retry later.
    Unpublished(String),
    /// The keyring could not store the new key.
    Keyring(atlas_actors::KeyringError),
}

impl std::fmt::Display for RotationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unpublished(message) => f.write_str(message),
            Self::Keyring(e) => write!(f, "storing the new signing key failed: {e}"),
        }
    }
}

/// Time between two checks that the directory contains this node's current signing keys. It
/// bounds how long after its first start, or after its directory log formed, a node's
/// receipts fail against the other nodes' JWKS. A rotation publishes its key itself (see
/// [`KeyRotation::rotate`]). Each check reads one local record.
const KEY_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps this node's public signing keys in the directory, which every node of the cluster
/// replicates, so that each node's JWKS lists them: receipts and tree heads that this node
/// signs then verify against the JWKS of any node. Checks every [`KEY_PUBLISH_INTERVAL`] and
/// writes only what [`node_key_changes`] finds: keys missing or different (a first start, a
/// start after the data directory was lost, a rotation) and keys to withdraw.
async fn publish_node_keys(
    keyring: Arc<Keyring>,
    abandoned: Arc<std::sync::Mutex<HashSet<String>>>,
    store: Store,
    logs: Arc<ReplicatedLogs>,
    node: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(KEY_PUBLISH_INTERVAL);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A node that has not joined the directory log yet cannot write to it.
        if !logs.directory_formed() {
            continue;
        }
        let stored = match store.node_keys() {
            Ok(nodes) => nodes
                .into_iter()
                .find(|(name, _)| *name == node)
                .map(|(_, keys)| keys)
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the signing keys this node published failed; checking again in 1 s");
                continue;
            }
        };
        let changes = {
            let abandoned = abandoned.lock().unwrap_or_else(|p| p.into_inner());
            node_key_changes(
                &keyring.published(),
                &stored,
                &abandoned,
                atlas_actors::now_ms(),
                keyring.grace(),
            )
        };
        if changes.is_empty() {
            continue;
        }
        let kids: Vec<String> = changes.iter().map(|k| k.kid.clone()).collect();
        let change = Change::PublishNodeKeys {
            node: node.clone(),
            keys: changes,
        };
        match store.write(change).await {
            Ok(_) => {
                failing = false;
                tracing::info!(?kids, "published this node's signing keys to the cluster");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "publishing this node's signing keys to the cluster failed; the other nodes' JWKS lack them until a retry, every second, succeeds");
                }
                failing = true;
            }
        }
    }
}

/// Returns the published keys of this node that the directory must change, given the keys
/// the keyring publishes (`in_keyring`) and those the directory lists for the node (`stored`):
/// - a key of the keyring that the directory lacks, or lists with another end of validity;
/// - a stored key that the keyring does not hold and that has no end. A key of an
///   `abandoned` rotation never signed anything, so it ends `now`. Any other (a key of the
///   node before it lost its data directory) ends after the `grace` period, as a retired
///   key does.
fn node_key_changes(
    in_keyring: &[NodeKey],
    stored: &[NodeKey],
    abandoned: &HashSet<String>,
    now: u64,
    grace: Duration,
) -> Vec<NodeKey> {
    let mut changes: Vec<NodeKey> = in_keyring
        .iter()
        .filter(|key| !stored.contains(key))
        .cloned()
        .collect();
    for old in stored {
        if old.until_ms.is_some() || in_keyring.iter().any(|key| key.kid == old.kid) {
            continue;
        }
        let until = if abandoned.contains(&old.kid) {
            now
        } else {
            now.saturating_add(grace.as_millis() as u64)
        };
        changes.push(NodeKey {
            until_ms: Some(until),
            ..old.clone()
        });
    }
    changes
}

/// Serves `/metrics` and, for operators on the same host, the admin endpoints
/// `GET /admin/cluster`, `POST /admin/cluster/remove/{name}`, `GET /admin/jwks` and
/// `POST /admin/keys/rotate`.
fn metrics_server(
    registry: Registry,
    admin: Admin,
    listener: std::net::TcpListener,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let registry = web::Data::new(registry);
    let keyring = web::Data::from(Arc::clone(&admin.keyring));
    let admin = web::Data::new(admin);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(registry.clone())
            .app_data(keyring.clone())
            .app_data(admin.clone())
            .route(
                "/admin/cluster",
                web::get().to(|admin: web::Data<Admin>| async move {
                    HttpResponse::Ok().json(admin.status(None))
                }),
            )
            .route(
                "/admin/cluster/group/{id}",
                web::get().to(
                    |admin: web::Data<Admin>, id: web::Path<String>| async move {
                        match parse_group_id(&id) {
                            Ok(group) => HttpResponse::Ok().json(admin.status(Some(&group))),
                            Err(message) => HttpResponse::BadRequest().body(message),
                        }
                    },
                ),
            )
            .route(
                "/admin/cluster/remove/{name}",
                web::post().to(
                    |admin: web::Data<Admin>, name: web::Path<String>| async move {
                        admin.remove_node(&name).await
                    },
                ),
            )
            .route(
                "/admin/jwks",
                web::get().to(|keyring: web::Data<Keyring>| async move {
                    HttpResponse::Ok().json(keyring.jwks())
                }),
            )
            .route(
                "/admin/keys/rotate",
                web::post().to(|admin: web::Data<Admin>| async move {
                    match admin.rotation.rotate().await {
                        Ok(kid) => HttpResponse::Ok().json(serde_json::json!({ "kid": kid })),
                        Err(e) => {
                            tracing::error!(error = %e, "signing key rotation failed");
                            match e {
                                RotationError::Unpublished(_) => {
                                    HttpResponse::ServiceUnavailable().body(e.to_string())
                                }
                                RotationError::Keyring(_) => {
                                    HttpResponse::InternalServerError().body(e.to_string())
                                }
                            }
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                web::get().to(|registry: web::Data<Registry>| async move {
                    let mut body = Vec::new();
                    match TextEncoder::new().encode(&registry.gather(), &mut body) {
                        Ok(()) => HttpResponse::Ok()
                            .content_type("text/plain; version=0.0.4")
                            .body(body),
                        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
                    }
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("the metrics listener reported no address"))?;
    Ok((server.run(), addr))
}

impl RunningNode {
    /// Stops accepting connections, closes sessions with "going away", flushes storage.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!(online = self.presence.online(), "shutting down");
        let _ = self.shutdown.send(true);
        self.presence.close_all(CloseCode::GoingAway);
        self.gateway.stop(true).await;
        self.metrics_server.stop(true).await;
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.key_tasks.await;
        if let Some((logs, tasks)) = &self.replicated {
            for task in tasks {
                task.abort();
            }
            // Sessions are closed, so this node's clients have moved to other nodes; the
            // cluster stops counting on this one.
            let alive = self
                .cluster
                .as_ref()
                .map(|cluster| alive_of(cluster.members()))
                .unwrap_or_default();
            match tokio::time::timeout(LEAVE_TIMEOUT, logs.leave(&alive)).await {
                Ok(failures) => {
                    for failure in failures {
                        tracing::warn!(error = %failure, "could not leave a replicated log; its other voters count this node as failed");
                    }
                }
                Err(_) => tracing::warn!(
                    "leaving the replicated logs timed out; their other voters count this node as failed"
                ),
            }
            logs.stop().await;
        }
        if let Some(cluster) = &self.cluster {
            cluster.stop();
        }
        self.supervisor.stop(Some("node shutdown".into()));
        self.store
            .close()
            .await
            .context("final storage flush failed")?;
        tracing::info!("storage flushed, node stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_cluster::replication::AppendTimes;

    fn key(kid: &str, until_ms: Option<u64>) -> NodeKey {
        NodeKey {
            kid: kid.to_owned(),
            public: [kid.len() as u8; 32],
            until_ms,
        }
    }

    const NOW: u64 = 1_000_000;
    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn key_changes_publish_missing_and_changed_keys() {
        let none = HashSet::new();
        let in_keyring = [key("current", None), key("retired", Some(NOW + 5))];
        assert!(node_key_changes(&in_keyring, &in_keyring, &none, NOW, GRACE).is_empty());

        let stored = [key("retired", None)];
        let changes = node_key_changes(&in_keyring, &stored, &none, NOW, GRACE);
        assert_eq!(changes, in_keyring.to_vec());
    }

    #[test]
    fn key_changes_withdraw_keys_not_in_keyring() {
        let in_keyring = [key("current", None)];
        let stored = [
            key("current", None),
            key("abandoned", None),
            key("earlier", None),
            key("ended", Some(NOW - 1)),
        ];
        let abandoned = HashSet::from(["abandoned".to_owned()]);
        let changes = node_key_changes(&in_keyring, &stored, &abandoned, NOW, GRACE);
        let grace_end = NOW + GRACE.as_millis() as u64;
        assert_eq!(
            changes,
            vec![key("abandoned", Some(NOW)), key("earlier", Some(grace_end))]
        );
    }

    /// Returns the value of sample `name` in the text exposition of `registry`.
    fn sample(registry: &Registry, name: &str) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
            .to_owned()
    }

    #[test]
    fn append_metrics_count_failed_writes_apart() {
        let registry = Registry::new();
        let observe = append_metrics(&registry).unwrap();
        let waits = [Duration::from_millis(3), Duration::from_millis(4)];
        observe(&AppendTimes {
            waits: &waits,
            write: Duration::from_millis(40),
            failed: false,
        });
        observe(&AppendTimes {
            waits: &waits[..1],
            write: Duration::from_secs(5),
            failed: true,
        });

        let count = |name| sample(&registry, name);
        assert_eq!(count("atlas_replication_append_wait_seconds_count"), "3");
        assert_eq!(count("atlas_replication_appends_per_entry_count"), "2");
        assert_eq!(count("atlas_replication_append_write_seconds_count"), "1");
        assert_eq!(count("atlas_replication_append_write_failures_total"), "1");
    }
}
