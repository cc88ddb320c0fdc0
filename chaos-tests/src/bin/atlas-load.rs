//! `atlas-load`: the load generator of the benchmarks in `docs/benchmarks.md`.
//!
//! Run from the workspace root after `cargo build --release -p atlas-ops -p atlas-chaos`:
//!
//! ```sh
//! target/release/atlas-load all --atlas-bin target/release/atlas
//! ```
//!
//! It starts a real Atlas node process and a baseline server: a minimal rustls + WebSocket
//! broadcast server that speaks the same frames with no storage, no MLS and no checks. It
//! drives both over TLS WebSocket with the same workload and prints the results as Markdown:
//! - saturation: every device keeps `--window` sends in flight for `--seconds`; acknowledged
//!   sends/s and pushes delivered/s;
//! - latency: every device sends at a fixed rate so the total is half the saturation rate;
//!   p50 and p99 from send to acknowledgement;
//! - idle: `--idle` logged-in connections that do nothing; resident memory per connection.
//!
//! Atlas devices are real MLS clients: groups are built with openmls through the SDK, and each
//! device pre-encrypts one application message that it then sends repeatedly under fresh
//! message ids (the server neither decrypts nor detects the repeat).

use atlas_chaos::NodeProcess;
use atlas_chaos::cluster::{ClusterFixture, agreed_leaders, group_leader, log_views};
use atlas_chaos::wait_until;
use atlas_client::{Client, RawConnection, ServerTrust};
use atlas_protocol::receipts::Receipt;
use atlas_protocol::{
    ClientBody, ClientMsgId, GroupId, PROTOCOL_VERSION, ServerBody, ServerFrame, login_transcript,
};
use clap::{Parser, Subcommand};
use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::RngCore;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// The generator shares the cores with the server it measures; a faster allocator leaves more
// of them to the server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "atlas-load", about = "Load generator for Atlas benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every workload against Atlas and the baseline and print a Markdown report.
    All(LoadArgs),
    /// Run the saturation and latency workloads against one node and then against a
    /// cluster, with each group's devices spread over the cluster's nodes; then kill the
    /// leader of a shard's log and time the first acknowledged send on its shards; then
    /// measure one node again.
    Cluster(ClusterArgs),
    /// Run the baseline server (used by `all` as a child process).
    BaselineServer,
}

#[derive(clap::Args, Clone)]
struct ClusterArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Number of nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Keep the cluster's directory, with each node's data and log, and print its path.
    #[arg(long)]
    keep_cluster_dir: bool,
    /// HTTP worker threads of each cluster node (`atlas node --workers`); 0 keeps the
    /// default, one per CPU. The one-node phases always use the default.
    #[arg(long, default_value_t = 0)]
    node_workers: usize,
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Path of the `atlas` binary.
    #[arg(long, default_value = "target/release/atlas")]
    atlas_bin: PathBuf,
    /// Number of devices, each with its own connection.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Devices per group.
    #[arg(long, default_value_t = 10)]
    group_size: usize,
    /// Duration of each measured phase, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sends each device keeps in flight during the saturation phase.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Idle connections for the memory phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Size of the plaintext of each message, in bytes.
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Skip the baseline server, the broadcast server without storage, MLS or checks that
    /// `all` compares Atlas with. `cluster` never starts it, and its one-node phase still runs.
    #[arg(long)]
    no_baseline: bool,
    /// Directory under which the node's data directory is created; it should be on the disk
    /// whose fsync the benchmark is meant to measure.
    #[arg(long, default_value = ".")]
    data_parent: PathBuf,
}

/// One loaded device: its connection, its group and the ciphertext it sends.
struct Device {
    conn: RawConnection,
    group: GroupId,
    payload: Vec<u8>,
}

/// A node that devices connect to.
#[derive(Clone)]
struct Target {
    url: String,
    trust: ServerTrust,
}

/// Results of one target.
#[derive(Default, Debug)]
struct Report {
    sends_per_sec: f64,
    deliveries_per_sec: f64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    half_rate: f64,
    idle_kib_per_conn: f64,
    idle_connections: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::All(args) => runtime.block_on(run_all(args)),
        Command::Cluster(args) => runtime.block_on(run_cluster(args)),
        Command::BaselineServer => runtime.block_on(baseline::serve()),
    }
}

async fn run_all(args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.group_size >= 2, "--group-size must be at least 2");
    anyhow::ensure!(
        args.devices.is_multiple_of(args.group_size),
        "--devices {} is not a multiple of --group-size {}",
        args.devices,
        args.group_size
    );
    let dir = scratch_dir()?;
    eprintln!("client state in {}", dir.path().display());
    // The node's data must be on a real disk: on tmpfs an fsync costs nothing.
    let node_dir = tempfile::Builder::new()
        .prefix("atlas-load-node")
        .tempdir_in(&args.data_parent)?;
    eprintln!("node data in {}", node_dir.path().display());

    eprintln!("== atlas: starting node {}", args.atlas_bin.display());
    let node = start_measured_node(&args.atlas_bin, node_dir.path())?;
    let trust = ServerTrust::fingerprint(&node.fingerprint)?;
    let target = Target {
        url: node.url(),
        trust: trust.clone(),
    };
    let devices = setup_atlas(&args, dir.path(), &[target]).await?;
    let atlas = measure(&args, devices, &node.url(), &trust, node.pid(), true).await?;
    // The flush histogram shows how much of the latency is fsync.
    match node.metrics() {
        Ok(text) => text
            .lines()
            .filter(|l| l.starts_with("atlas_storage_flush_seconds"))
            .for_each(|l| eprintln!("   {l}")),
        Err(e) => eprintln!("   cannot read the node's metrics: {e}"),
    }
    drop(node);

    let baseline = if args.no_baseline {
        None
    } else {
        eprintln!("== baseline: starting server");
        let server = baseline::Process::start()?;
        let trust = ServerTrust::fingerprint(&server.fingerprint)?;
        let devices = setup_baseline(&args, &server.url(), &trust).await?;
        Some(measure(&args, devices, &server.url(), &trust, server.pid(), false).await?)
    };
    print_report(&args, &atlas, baseline.as_ref());
    Ok(())
}

/// Creates a directory for client state, on tmpfs when available: client state files are fsync'd on
/// every change, and the benchmark measures the node, not the generator's disk.
fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    Ok(if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    })
}

/// Builds the MLS groups. Member `m` of group `g` connects to target `(g + m) % targets`, so
/// with several targets every group spans them.
async fn setup_atlas(
    args: &LoadArgs,
    dir: &Path,
    targets: &[Target],
) -> anyhow::Result<Vec<Device>> {
    let started = Instant::now();
    let groups = args.devices / args.group_size;
    let text = "x".repeat(args.message_bytes);
    let mut devices = Vec::with_capacity(args.devices);
    let mut done = 0usize;
    let mut tasks = futures_util::stream::iter((0..groups).map(|g| {
        let (dir, targets, text) = (dir.to_owned(), targets.to_vec(), text.clone());
        let size = args.group_size;
        async move { setup_group(g, size, &dir, &targets, &text).await }
    }))
    .buffer_unordered(8);
    while let Some(group) = tasks.next().await {
        devices.extend(group?);
        done += 1;
        if done.is_multiple_of(10) || done == groups {
            eprintln!(
                "   set up {done}/{groups} MLS groups ({:.0?})",
                started.elapsed()
            );
        }
    }
    Ok(devices)
}

async fn setup_group(
    index: usize,
    size: usize,
    dir: &Path,
    targets: &[Target],
    text: &str,
) -> anyhow::Result<Vec<Device>> {
    let mut clients = Vec::with_capacity(size);
    for member in 0..size {
        let account = format!("g{index}-m{member}");
        let node = (index + member) % targets.len();
        let mut client = Client::open(&dir.join(&account), &account)?;
        client
            .connect(&targets[node].url, &targets[node].trust)
            .await?;
        client.publish_key_packages(1).await?;
        clients.push(client);
    }
    let group = clients[0].create_group(&format!("load{index}")).await?;
    let others: Vec<String> = clients[1..]
        .iter()
        .map(|c| c.account().to_owned())
        .collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    clients[0].add_members(&group, &others).await?;
    let mut devices = Vec::with_capacity(size);
    for mut client in clients {
        client.sync().await?;
        let payload = client.encrypt(&group, text)?;
        let conn = client
            .take_connection()
            .ok_or_else(|| anyhow::anyhow!("client {} has no connection", client.account()))?;
        devices.push(Device {
            conn,
            group: group.clone(),
            payload,
        });
    }
    Ok(devices)
}

async fn setup_baseline(
    args: &LoadArgs,
    url: &str,
    trust: &ServerTrust,
) -> anyhow::Result<Vec<Device>> {
    let mut devices = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let group = GroupId::new(format!("base{}", i / args.group_size).into_bytes())?;
        let conn = raw_login(url, trust, &format!("b{i}")).await?;
        // The baseline learns group membership from a sync request.
        conn.request(ClientBody::Sync {
            group: group.clone(),
            after: 0,
            limit: 1,
        })
        .await?;
        let mut payload = vec![0u8; args.message_bytes + 60];
        rand::thread_rng().fill_bytes(&mut payload);
        devices.push(Device {
            conn,
            group,
            payload,
        });
    }
    Ok(devices)
}

async fn raw_login(url: &str, trust: &ServerTrust, account: &str) -> anyhow::Result<RawConnection> {
    let (conn, challenge) = RawConnection::open(url, trust).await?;
    let ServerBody::Challenge {
        nonce, server_name, ..
    } = challenge
    else {
        anyhow::bail!("first frame from {url} was not a challenge");
    };
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let login = ClientBody::Login {
        account: account.to_owned(),
        device_key: key.verifying_key().to_bytes().to_vec(),
        signature: key
            .sign(&login_transcript(&server_name, &nonce, account))
            .to_bytes()
            .to_vec(),
    };
    match conn.request(login).await? {
        ServerBody::LoggedIn { .. } => Ok(conn),
        other => anyhow::bail!("login as {account} failed: {other:?}"),
    }
}

fn msg_id() -> ClientMsgId {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    ClientMsgId(id)
}

/// Waits up to 90 s until `node` reports every shard log led by its preferred node (the first
/// of its replica set), and returns whether it did.
async fn leaders_settle(node: &NodeProcess) -> bool {
    wait_until(Duration::from_secs(90), || {
        log_views(node).is_some_and(|views| {
            views
                .iter()
                .skip(1)
                .all(|v| v.preferred.is_some() && v.leader == v.preferred)
        })
    })
    .await
}

/// Maximum wait for the pushes of the saturation phase to end before the latency phase.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

async fn measure(
    args: &LoadArgs,
    mut devices: Vec<Device>,
    url: &str,
    trust: &ServerTrust,
    pid: u32,
    atlas: bool,
) -> anyhow::Result<Report> {
    let deliveries = Arc::new(AtomicU64::new(0));
    for device in &mut devices {
        let mut pushes = device.conn.take_pushes();
        let deliveries = Arc::clone(&deliveries);
        tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                if matches!(push, ServerBody::Push { .. }) {
                    deliveries.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let devices: Vec<Arc<Device>> = devices.into_iter().map(Arc::new).collect();
    let mut report = Report::default();

    eprintln!(
        "   saturation: {} devices, window {}, {} s",
        devices.len(),
        args.window,
        args.seconds
    );
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let before = deliveries.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for device in &devices {
        let (device, acked, errors) = (Arc::clone(device), Arc::clone(&acked), Arc::clone(&errors));
        let window = args.window;
        tasks.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < window && Instant::now() < deadline {
                    in_flight.push(send_once(&device));
                }
                match in_flight.next().await {
                    Some(Ok(_)) => acked.fetch_add(1, Ordering::Relaxed),
                    Some(Err(_)) => errors.fetch_add(1, Ordering::Relaxed),
                    None => break,
                };
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Pushes of the last acknowledged sends may still be in flight; wait for them briefly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.sends_per_sec = acked.load(Ordering::Relaxed) as f64 / elapsed;
    report.deliveries_per_sec = (deliveries.load(Ordering::Relaxed) - before) as f64 / elapsed;
    report.errors = errors.load(Ordering::Relaxed);
    eprintln!(
        "   {:.0} sends/s, {:.0} deliveries/s, {} errors",
        report.sends_per_sec, report.deliveries_per_sec, report.errors
    );

    // The latency phase starts from a quiet node: pushes of the saturation phase that are
    // still queued (on a cluster, followers applying its entries) would delay its sends.
    let drain = Instant::now();
    let mut seen = deliveries.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) && drain.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = deliveries.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        }
    }
    eprintln!(
        "   pushes settled {:.1} s after the saturation phase",
        drain.elapsed().as_secs_f64()
    );

    report.half_rate = report.sends_per_sec / 2.0;
    let per_device = report.half_rate / devices.len() as f64;
    eprintln!(
        "   latency at {:.0} sends/s ({per_device:.2}/s per device)",
        report.half_rate
    );
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let (device, latencies, errors) = (
            Arc::clone(device),
            Arc::clone(&latencies),
            Arc::clone(&errors),
        );
        let period = Duration::from_secs_f64(1.0 / per_device.max(0.01));
        // Spread the first sends over one period so devices do not fire in lockstep.
        let offset = period.mul_f64(i as f64 / devices.len() as f64);
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            let mut pending = FuturesUnordered::new();
            loop {
                tokio::select! {
                    _ = ticker.tick(), if Instant::now() < deadline => {
                        let device = Arc::clone(&device);
                        pending.push(async move {
                            let sent = Instant::now();
                            send_once(&device).await.map(|_| sent.elapsed())
                        });
                    }
                    Some(result) = pending.next() => match result {
                        Ok(latency) => latencies.lock().unwrap_or_else(|p| p.into_inner()).push(latency),
                        Err(_) => { errors.fetch_add(1, Ordering::Relaxed); }
                    },
                    else => break,
                }
                if Instant::now() >= deadline && pending.is_empty() {
                    break;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    report.p50_ms = pick(0.50);
    report.p99_ms = pick(0.99);
    eprintln!(
        "   p50 {:.2} ms, p99 {:.2} ms over {} sends",
        report.p50_ms,
        report.p99_ms,
        latencies.len()
    );
    drop(devices);

    if args.idle > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = rss_kib(pid)?;
        eprintln!("   idle: opening {} connections", args.idle);
        let mut idle = Vec::with_capacity(args.idle);
        let mut opening = futures_util::stream::iter((0..args.idle).map(|i| {
            let (url, trust) = (url.to_owned(), trust.clone());
            let account = if atlas {
                format!("idle{i}")
            } else {
                format!("bi{i}")
            };
            async move { raw_login(&url, &trust, &account).await }
        }))
        .buffer_unordered(64);
        while let Some(conn) = opening.next().await {
            idle.push(conn?);
            if idle.len().is_multiple_of(2000) {
                eprintln!("   {} idle connections open", idle.len());
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = rss_kib(pid)?;
        report.idle_connections = idle.len();
        report.idle_kib_per_conn =
            (rss_after.saturating_sub(rss_before)) as f64 / idle.len() as f64;
        eprintln!(
            "   RSS {rss_before} KiB -> {rss_after} KiB: {:.1} KiB per idle connection",
            report.idle_kib_per_conn
        );
    }
    Ok(report)
}

/// Measures one node and then a cluster of `--nodes` nodes with the same workload, then the
/// time from a SIGKILL of a shard log's leader to the first acknowledged send on its shards,
/// then one node again.
async fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    let load = LoadArgs {
        idle: 0,
        ..args.load.clone()
    };
    anyhow::ensure!(
        load.devices.is_multiple_of(load.group_size),
        "--devices {} is not a multiple of --group-size {}",
        load.devices,
        load.group_size
    );

    eprintln!("== one node: starting {}", load.atlas_bin.display());
    let single = measure_one_node(&load).await?;

    eprintln!("== cluster: starting {} nodes", args.nodes);
    let mut fixture = ClusterFixture::new(&load.atlas_bin, Some(&load.data_parent))?;
    if args.node_workers > 0 {
        let workers = args.node_workers.to_string();
        fixture = fixture.with_flags(&["--workers", &workers]);
        eprintln!("   each node runs {workers} HTTP worker threads");
    }
    if args.keep_cluster_dir {
        eprintln!(
            "   the cluster's directory stays after the run: {}",
            fixture.keep().display()
        );
    }
    let (specs, mut nodes) = fixture
        .start_cluster(args.nodes, Duration::from_secs(60))
        .await?;
    let names: Vec<String> = nodes.keys().cloned().collect();
    let targets = nodes
        .values()
        .map(|node| {
            Ok(Target {
                url: node.url(),
                trust: ServerTrust::fingerprint(&node.fingerprint)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dir = scratch_dir()?;
    let devices = setup_atlas(&load, dir.path(), &targets).await?;
    let first = nodes.values().next().expect("the cluster has nodes");
    // A node hands the logs that placement gives another node to it a few seconds after they
    // formed, and each handover keeps that log's writes waiting for up to 1.5 s. The
    // measurement starts once that is over, with the leaders spread as placement spreads them.
    let since = Instant::now();
    anyhow::ensure!(
        leaders_settle(first).await,
        "some shard log is not led by its preferred node 90 s after the cluster formed"
    );
    eprintln!(
        "   every shard log led by its preferred node ({:.1} s of waiting after the setup)",
        since.elapsed().as_secs_f64()
    );
    let (url, trust, pid) = (first.url(), targets[0].trust.clone(), first.pid());
    let cluster = measure(&load, devices, &url, &trust, pid, true).await?;

    let probes = probe_devices(&load, dir.path(), &targets, &names).await?;

    eprintln!("== graceful leave: SIGTERM to the leader of a shard's log");
    let (leader, probe) = probes_of_a_leader(&nodes, &names, &probes, &[])?;
    let node = nodes
        .remove(&leader)
        .ok_or_else(|| anyhow::anyhow!("leader {leader} is not one of the nodes"))?;
    let leave = measure_leave(node, &probe).await?;
    eprintln!(
        "   longest wait for an acknowledgement while {leader} left: {:.2} s ({} sends \
         failed, {} acknowledged)",
        leave.longest_gap.as_secs_f64(),
        leave.failed,
        leave.acknowledged
    );
    for (at, error) in &leave.failures {
        eprintln!(
            "   send failed {:.2} s after the SIGTERM: {error}",
            at.as_secs_f64()
        );
    }
    let spec = specs
        .iter()
        .find(|s| s.name == leader)
        .ok_or_else(|| anyhow::anyhow!("no spec for {leader}"))?;
    // The restarted node writes a new log; the leaving node's log stays beside it.
    let log = fixture.path(&format!("{leader}.log"));
    std::fs::rename(&log, log.with_extension("leave.log"))?;
    nodes.insert(leader.clone(), fixture.start(spec)?);
    eprintln!("   {leader} restarted; waiting until it votes in every log again");
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let voters: Vec<&str> = names.iter().map(String::as_str).collect();
    let rejoined = wait_until(Duration::from_secs(90), || {
        agreed_leaders(&everyone, &voters).is_some()
    })
    .await;
    anyhow::ensure!(
        rejoined,
        "{leader} did not vote in every log within 90 s of its restart"
    );
    // Leadership of the shards that placement gives the restarted node moves back to it.
    // The kill below starts once that is over, from the same state as before the leave.
    let since = Instant::now();
    anyhow::ensure!(
        leaders_settle(everyone[0]).await,
        "some shard log is not led by its preferred node 90 s after {leader} rejoined"
    );
    eprintln!(
        "   every shard log led by its preferred node {:.1} s after {leader} voted again",
        since.elapsed().as_secs_f64()
    );
    // The probes homed on the node that left lost their connections.
    let left = leader;

    eprintln!("== failover: SIGKILL of the leader of a shard's log");
    let (leader, probe) = probes_of_a_leader(&nodes, &names, &probes, &[left.as_str()])?;
    nodes
        .remove(&leader)
        .ok_or_else(|| anyhow::anyhow!("leader {leader} is not one of the nodes"))?
        .kill9()?;
    let killed = Instant::now();
    let failover = loop {
        if killed.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("no send was acknowledged within 60 s of killing {leader}");
        }
        let mut acknowledged = false;
        for device in &probe {
            if send_once(device).await.is_ok() {
                acknowledged = true;
                break;
            }
        }
        if acknowledged {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "   first acknowledged send {:.2} s after killing {leader}",
        failover.as_secs_f64()
    );
    drop(nodes);
    drop(fixture);

    // The machine's speed drifts between minutes, so one node is measured again after the
    // cluster, and the ratios compare the cluster with the mean of both one-node runs.
    eprintln!("== one node again, after the cluster");
    let single_after = measure_one_node(&load).await?;
    let singles = [&single, &single_after];
    print_cluster_report(&load, args.nodes, &singles, &cluster, &leave, failover);
    Ok(())
}

/// Starts one node with its data under `--data-parent`, loads it with the devices of `load`
/// and measures it; the node stops when the measurement ends.
async fn measure_one_node(load: &LoadArgs) -> anyhow::Result<Report> {
    let dir = scratch_dir()?;
    let node_dir = tempfile::Builder::new()
        .prefix("atlas-load-node")
        .tempdir_in(&load.data_parent)?;
    let node = start_measured_node(&load.atlas_bin, node_dir.path())?;
    let target = Target {
        url: node.url(),
        trust: ServerTrust::fingerprint(&node.fingerprint)?,
    };
    let devices = setup_atlas(load, dir.path(), std::slice::from_ref(&target)).await?;
    measure(load, devices, &target.url, &target.trust, node.pid(), true).await
}

/// Picks a node that leads the shard of a probe group homed on another node, and returns
/// its name with the probe devices of every such group. Probes homed on a node in `skip`
/// are left out.
fn probes_of_a_leader<'p>(
    nodes: &BTreeMap<String, NodeProcess>,
    names: &[String],
    probes: &'p [(String, Vec<Device>)],
    skip: &[&str],
) -> anyhow::Result<(String, Vec<&'p Device>)> {
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let voters: Vec<&str> = names.iter().map(String::as_str).collect();
    let usable = || {
        probes
            .iter()
            .filter(|(home, _)| !skip.contains(&home.as_str()))
    };
    let mut leaders = Vec::new();
    for (home, devices) in usable() {
        let group = devices[0].group.as_bytes();
        let leader = group_leader(&everyone, &voters, group).ok_or_else(|| {
            anyhow::anyhow!("the nodes do not agree on the leader of a probe group's shard")
        })?;
        leaders.push((home, leader));
    }
    let Some(leader) = leaders
        .iter()
        .find(|(home, leader)| *home != leader)
        .map(|(_, leader)| leader.clone())
    else {
        anyhow::bail!("every probe group's shard is led by the probe's own node; run again");
    };
    let probe: Vec<&Device> = usable()
        .zip(&leaders)
        .filter(|(_, (home, shard_leader))| **home != leader && *shard_leader == leader)
        .flat_map(|((_, devices), _)| devices)
        .collect();
    eprintln!(
        "   {} probe groups on the other nodes belong to shards that {leader} leads",
        probe.len() / 2
    );
    Ok((leader, probe))
}

/// The probes' record of a graceful leave of a node.
struct Leave {
    /// Maximum time between two acknowledged sends, counted from the SIGTERM.
    longest_gap: Duration,
    failed: u64,
    acknowledged: u64,
    /// The first failed sends: time since the SIGTERM and the error.
    failures: Vec<(Duration, String)>,
}

/// Sends SIGTERM to `node` and keeps sending from the probes, one send at a time, until the
/// node has exited and 2 s more have passed with a send acknowledged after the exit.
async fn measure_leave(node: NodeProcess, probe: &[&Device]) -> anyhow::Result<Leave> {
    anyhow::ensure!(!probe.is_empty(), "no probe group to send from");
    let started = Instant::now();
    let mut stopping = tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(60)));
    let mut exited_at = None;
    let mut last_ack = started;
    let mut leave = Leave {
        longest_gap: Duration::ZERO,
        failed: 0,
        acknowledged: 0,
        failures: Vec::new(),
    };
    for device in probe.iter().cycle() {
        if started.elapsed() > Duration::from_secs(90) {
            anyhow::bail!("the leave took longer than 90 s");
        }
        if exited_at.is_none() && stopping.is_finished() {
            let status = (&mut stopping).await??;
            anyhow::ensure!(status.success(), "the leaving node exited with {status}");
            exited_at = Some(Instant::now());
        }
        let sent = send_once(device).await;
        if sent.is_ok() {
            let now = Instant::now();
            leave.longest_gap = leave.longest_gap.max(now - last_ack);
            last_ack = now;
            leave.acknowledged += 1;
        } else {
            if let Err(e) = sent
                && leave.failures.len() < 5
            {
                leave.failures.push((started.elapsed(), format!("{e:#}")));
            }
            leave.failed += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if exited_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2) && last_ack > at) {
            return Ok(leave);
        }
    }
    unreachable!("the probe list is not empty, so the loop ends only by returning")
}

/// Creates two two-member groups per node, with both members on that node, for sending
/// after a shard leader is killed. Returns each group's devices with its node's name.
async fn probe_devices(
    args: &LoadArgs,
    dir: &Path,
    targets: &[Target],
    names: &[String],
) -> anyhow::Result<Vec<(String, Vec<Device>)>> {
    let mut probes = Vec::new();
    let text = "x".repeat(args.message_bytes);
    for (index, name) in names.iter().enumerate() {
        let target = std::slice::from_ref(&targets[index]);
        for copy in 0..2 {
            let devices = setup_group(10_000 + 2 * index + copy, 2, dir, target, &text).await?;
            probes.push((name.clone(), devices));
        }
    }
    Ok(probes)
}

/// Prints the cluster's figures against those of one node, measured before and after the
/// cluster (`singles`). The ratio column divides by the mean of the one-node runs.
fn print_cluster_report(
    args: &LoadArgs,
    nodes: usize,
    singles: &[&Report; 2],
    cluster: &Report,
    leave: &Leave,
    failover: Duration,
) {
    println!(
        "Workload: {} devices in groups of {}, {} B plaintext, window {}, {} s per phase; in \
         the cluster the members of each group are spread over {nodes} nodes.\n",
        args.devices, args.group_size, args.message_bytes, args.window, args.seconds
    );
    println!(
        "| metric | one node, before | one node, after | {nodes} nodes | {nodes} nodes / mean of \
         one node |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let row = |name: &str, value: fn(&Report) -> f64, unit: &str| {
        let cell = |value: f64| format!("{value:.1} {unit}").trim_end().to_owned();
        let [before, after] = singles.map(value);
        let many = value(cluster);
        println!(
            "| {name} | {} | {} | {} | {:.2} |",
            cell(before),
            cell(after),
            cell(many),
            many / ((before + after) / 2.0)
        );
    };
    row(
        "acknowledged sends/s at saturation",
        |r| r.sends_per_sec,
        "",
    );
    row("deliveries/s at saturation", |r| r.deliveries_per_sec, "");
    row("p50 send-to-ack at half load", |r| r.p50_ms, "ms");
    row("p99 send-to-ack at half load", |r| r.p99_ms, "ms");
    println!(
        "\nErrors: {} and {} on one node, {} in the cluster. First acknowledged send after \
         SIGKILL of the leader: {:.2} s.",
        singles[0].errors,
        singles[1].errors,
        cluster.errors,
        failover.as_secs_f64()
    );
    println!(
        "Graceful leave (SIGTERM) of a shard leader: longest wait for an acknowledgement {:.2} \
         s, {} failed sends.",
        leave.longest_gap.as_secs_f64(),
        leave.failed
    );
}

async fn send_once(device: &Device) -> anyhow::Result<()> {
    let body = ClientBody::Send {
        group: device.group.clone(),
        msg_id: msg_id(),
        message: device.payload.clone(),
    };
    match device.conn.request(body).await? {
        ServerBody::Accepted(_) => Ok(()),
        other => anyhow::bail!("unexpected response {other:?}"),
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))
}

fn print_report(args: &LoadArgs, atlas: &Report, baseline: Option<&Report>) {
    println!(
        "Workload: {} devices in groups of {}, {} B plaintext, window {}, {} s per phase, {} idle connections.\n",
        args.devices, args.group_size, args.message_bytes, args.window, args.seconds, args.idle
    );
    println!("| metric | Atlas | baseline | Atlas / baseline |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, a: f64, b: Option<f64>, unit: &str| {
        let (b_text, ratio) = match b {
            Some(b) => (format!("{b:.1} {unit}"), format!("{:.2}", a / b)),
            None => ("-".into(), "-".into()),
        };
        println!("| {name} | {a:.1} {unit} | {b_text} | {ratio} |");
    };
    row(
        "acknowledged sends/s at saturation",
        atlas.sends_per_sec,
        baseline.map(|b| b.sends_per_sec),
        "",
    );
    row(
        "deliveries/s at saturation",
        atlas.deliveries_per_sec,
        baseline.map(|b| b.deliveries_per_sec),
        "",
    );
    row(
        "p50 send-to-ack at half load",
        atlas.p50_ms,
        baseline.map(|b| b.p50_ms),
        "ms",
    );
    row(
        "p99 send-to-ack at half load",
        atlas.p99_ms,
        baseline.map(|b| b.p99_ms),
        "ms",
    );
    row(
        "resident memory per idle connection",
        atlas.idle_kib_per_conn,
        baseline.map(|b| b.idle_kib_per_conn),
        "KiB",
    );
    println!(
        "\nHalf load: Atlas {:.0} sends/s{}. Errors: Atlas {}{}.",
        atlas.half_rate,
        baseline
            .map(|b| format!(", baseline {:.0} sends/s", b.half_rate))
            .unwrap_or_default(),
        atlas.errors,
        baseline
            .map(|b| format!(", baseline {}", b.errors))
            .unwrap_or_default(),
    );
}

/// The do-nothing baseline: TLS 1.3 (rustls), WebSocket (tungstenite), MessagePack frames, an
/// acknowledgement per send and a broadcast to the group's other connections. No login check,
/// no MLS, no storage, no ordering guarantees beyond one lock per group.
mod baseline {
    use super::*;
    use atlas_protocol::{Accepted, DeviceId, EntryKind, LogEntry, decode_client, encode_server};
    use futures_util::SinkExt;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message;

    type Groups = Arc<Mutex<HashMap<GroupId, (u64, Vec<(u64, mpsc::Sender<Message>)>)>>>;

    pub(super) struct Process {
        child: Child,
        port: u16,
        pub(super) fingerprint: String,
    }

    impl Process {
        pub(super) fn start() -> anyhow::Result<Self> {
            let mut child = Command::new(std::env::current_exe()?)
                .arg("baseline-server")
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
            let mut lines = BufReader::new(stdout).lines();
            let port = lines
                .next()
                .ok_or_else(|| anyhow::anyhow!("baseline exited"))??;
            let fingerprint = lines
                .next()
                .ok_or_else(|| anyhow::anyhow!("baseline exited"))??;
            Ok(Self {
                child,
                port: port.trim().parse()?,
                fingerprint: fingerprint.trim().to_owned(),
            })
        }

        pub(super) fn url(&self) -> String {
            format!("wss://localhost:{}/v1/ws", self.port)
        }

        pub(super) fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub(super) async fn serve() -> anyhow::Result<()> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?.port());
        println!("{}", atlas_client::fingerprint_hex(der.as_ref()));
        let groups: Groups = Arc::default();
        let next_conn = Arc::new(AtomicU64::new(0));
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let (acceptor, groups) = (acceptor.clone(), Arc::clone(&groups));
            let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                connection(ws, groups, conn_id).await;
            });
        }
    }

    fn frame(id: u64, body: ServerBody) -> Message {
        Message::Binary(
            encode_server(&ServerFrame {
                v: PROTOCOL_VERSION,
                id,
                body,
            })
            .into(),
        )
    }

    async fn connection<S>(ws: tokio_tungstenite::WebSocketStream<S>, groups: Groups, conn_id: u64)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Message>(1024);
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let challenge = ServerBody::Challenge {
            nonce: vec![0; 32],
            server_name: "localhost".into(),
            max_frame_bytes: atlas_protocol::MAX_FRAME_BYTES as u32,
        };
        let _ = tx.send(frame(0, challenge)).await;
        let device = DeviceId::from_bytes(
            conn_id
                .to_be_bytes()
                .repeat(2)
                .try_into()
                .unwrap_or([0; 16]),
        );
        while let Some(Ok(message)) = stream.next().await {
            let Message::Binary(bytes) = message else {
                continue;
            };
            let Ok(request) = decode_client(&bytes) else {
                continue;
            };
            let body = match request.body {
                ClientBody::Login { account, .. } => ServerBody::LoggedIn {
                    device,
                    account,
                    registered: true,
                },
                ClientBody::Sync { group, .. } => {
                    let mut groups = groups.lock().unwrap_or_else(|p| p.into_inner());
                    groups
                        .entry(group.clone())
                        .or_default()
                        .1
                        .push((conn_id, tx.clone()));
                    ServerBody::Entries {
                        group,
                        entries: Vec::new(),
                        head: 0,
                        first_available: 1,
                    }
                }
                ClientBody::Send {
                    group,
                    msg_id,
                    message,
                } => {
                    let mut groups = groups.lock().unwrap_or_else(|p| p.into_inner());
                    let (seq, members) = groups.entry(group.clone()).or_default();
                    *seq += 1;
                    let entry = LogEntry {
                        seq: *seq,
                        kind: EntryKind::Application,
                        epoch: 1,
                        sender: device,
                        msg_id,
                        accepted_at_ms: 0,
                        payload: message,
                    };
                    let push = frame(
                        0,
                        ServerBody::Push {
                            group: group.clone(),
                            entry,
                        },
                    );
                    for (member, queue) in members.iter() {
                        if *member != conn_id {
                            let _ = queue.try_send(push.clone());
                        }
                    }
                    ServerBody::Accepted(Accepted {
                        group,
                        seq: *seq,
                        epoch: 1,
                        accepted_at_ms: 0,
                        duplicate: false,
                        // The baseline signs nothing; the generator does not check receipts.
                        receipt: Receipt {
                            signature_input: String::new(),
                            signature: String::new(),
                        },
                    })
                }
                _ => ServerBody::Pong,
            };
            if tx.send(frame(request.id, body)).await.is_err() {
                break;
            }
        }
    }
}

/// Starts the single node to measure, with its config file and data directory under `dir`.
/// Its settings are the defaults except the DPoP replay cache. One client network may hold a
/// tenth of that cache, and every generated connection comes from 127.0.0.1, so the cache is
/// made large enough for the 11,000 logins of a run to fit in that tenth.
fn start_measured_node(binary: &Path, dir: &Path) -> anyhow::Result<NodeProcess> {
    let config = dir.join("load-node.toml");
    std::fs::write(&config, "dpop_replay_capacity = 1000000\n")?;
    let config = config.display().to_string();
    NodeProcess::start(binary, &dir.join("node"), &["--config", &config])
}
