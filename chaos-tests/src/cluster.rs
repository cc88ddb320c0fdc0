//! Clusters of real node processes on 127.0.0.1 for tests and benchmarks: a cluster CA and
//! node certificates made with `atlas cert`, nodes joined through seeds, and readers of the
//! cluster status that nodes serve on their admin listener.

use crate::{NodeProcess, wait_until};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Cookie of the clusters that [`ClusterFixture`] starts.
pub const COOKIE: &str = "test-cluster-cookie";

/// A directory with a cluster CA, node certificates, node data and logs.
pub struct ClusterFixture {
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// Heartbeat interval and failure timeout in ms; the node's defaults when unset.
    timing: Option<(u64, u64)>,
    /// More flags for every node started next.
    extra: Vec<String>,
}

/// One node's settings, kept to restart it in place.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// Address of the cluster listener: 127.0.0.1, or the node's address in its network
    /// namespace (see [`crate::netns`]).
    pub host: IpAddr,
    /// Port of the cluster listener.
    pub port: u16,
    /// Cluster listeners of the seeds.
    pub seeds: Vec<SocketAddr>,
    pub ca_dir: PathBuf,
    pub cookie: String,
    /// Network namespace to run the node in, if any.
    pub namespace: Option<String>,
}

impl NodeSpec {
    /// Returns the address of the node's cluster listener, for other nodes' seeds.
    pub fn cluster_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

/// Returns the cluster listeners on 127.0.0.1 at `ports`.
pub fn loopback(ports: &[u16]) -> Vec<SocketAddr> {
    ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect()
}

/// A node's view of one replicated log, from `GET /admin/cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogView {
    pub role: String,
    pub leader: Option<String>,
    /// Voter names, sorted.
    pub voters: Vec<String>,
    /// Learner names, sorted.
    pub learners: Vec<String>,
    pub last_applied: Option<u64>,
    /// The term this node is in.
    pub term: Option<u64>,
    /// For a shard's log, the node's placement of the shard over the live members, sorted,
    /// when it has the full replication factor: then these are the voters the log should have.
    pub replicas: Option<Vec<String>>,
    /// For a shard's log with the full replication factor, the first node of its replica set:
    /// the leader that placement prefers.
    pub preferred: Option<String>,
}

/// Lowest port [`free_port`] hands out.
const FIRST_FIXED_PORT: u16 = 10_000;

/// Returns a port that was free on 127.0.0.1 a moment ago, for a node to bind later.
///
/// The port comes from below the kernel's ephemeral range (`ip_local_port_range`) when that
/// range leaves room. The kernel takes the ports of outgoing connections and of `bind(0)`
/// from that range only. So another test's connection cannot take the port between this
/// check and the node's bind. Ports handed out in this process repeat only after the range
/// wraps; the start is random, so that processes running at once rarely meet.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    let end = ephemeral_start().unwrap_or(0);
    if end > FIRST_FIXED_PORT + 1_000 {
        let span = u32::from(end - FIRST_FIXED_PORT);
        let start = rand::random::<u32>() % span;
        let _ = NEXT.compare_exchange(
            u32::MAX,
            start,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
        for _ in 0..span {
            let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
            let port = FIRST_FIXED_PORT + offset as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on 127.0.0.1")
}

/// Keeps the cluster directory (node logs, data) of a test that panics, prints its path, and
/// prints the end of each node's log, because a CI run keeps only its output.
impl Drop for ClusterFixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.dir.disable_cleanup(true);
        eprintln!(
            "the cluster directory stays for inspection: {}",
            self.dir.path().display()
        );
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!("--- last {} lines of {}", tail.len(), log.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// Lines of each node's log that a failed test prints.
const LOG_TAIL_ON_FAILURE: usize = 60;

/// Returns the first port of the kernel's ephemeral range, read from Linux's `/proc`.
fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

impl ClusterFixture {
    /// Creates the directory under `parent` (the system's temporary directory when `None`)
    /// and a cluster CA in it, with `binary` as the `atlas` program.
    pub fn new(binary: &Path, parent: Option<&Path>) -> anyhow::Result<Self> {
        let builder = tempfile::Builder::new().prefix("atlas-cluster").clone();
        let dir = match parent {
            Some(parent) => builder.tempdir_in(parent)?,
            None => builder.tempdir()?,
        };
        let fixture = Self {
            binary: binary.to_owned(),
            dir,
            timing: None,
            extra: Vec::new(),
        };
        let ca = fixture.path("ca");
        fixture.run(&["cert", "ca", "--dir", &ca.display().to_string()])?;
        Ok(fixture)
    }

    /// Sets the heartbeat interval and failure timeout, in ms, of the nodes started next.
    pub fn with_timing(mut self, heartbeat_ms: u64, failure_timeout_ms: u64) -> Self {
        self.timing = Some((heartbeat_ms, failure_timeout_ms));
        self
    }

    /// Adds `flags` to the command line of the nodes started next.
    pub fn with_flags(mut self, flags: &[&str]) -> Self {
        self.extra.extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }

    /// Keeps the directory (node logs and data) after the fixture is dropped, and returns
    /// its path.
    pub fn keep(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_owned()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the `atlas` program with `args` and fails with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(&self.binary).args(args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "atlas {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// Creates a node certificate named `name` from the CA in `ca_dir`, in `certs/`.
    pub fn certificate(&self, name: &str, ca_dir: &Path) -> anyhow::Result<()> {
        self.certificate_for(name, ca_dir, &[])
    }

    /// Creates a node certificate like [`ClusterFixture::certificate`], valid for `hosts`
    /// (DNS names or IP addresses) instead of the default localhost and 127.0.0.1.
    fn certificate_for(&self, name: &str, ca_dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
        let out = self.path("certs");
        std::fs::create_dir_all(&out)?;
        let (ca_dir, out) = (ca_dir.display().to_string(), out.display().to_string());
        let mut args = vec!["cert", "node", name, "--ca-dir", &ca_dir, "--out", &out];
        for host in hosts {
            args.extend(["--host", host.as_str()]);
        }
        self.run(&args)
    }

    /// Creates the certificate of a node named `name` that joins through `seeds` (cluster
    /// ports), and returns its settings with a free cluster port.
    pub fn spec(&self, name: &str, seeds: &[u16]) -> anyhow::Result<NodeSpec> {
        self.certificate(name, &self.path("ca"))?;
        Ok(NodeSpec {
            name: name.into(),
            host: IpAddr::from([127, 0, 0, 1]),
            port: free_port(),
            seeds: loopback(seeds),
            ca_dir: self.path("ca"),
            cookie: COOKIE.into(),
            namespace: None,
        })
    }

    /// Creates the certificate of a node named `name` that runs in `network` (its own
    /// namespace and address) and joins through `seeds`, and returns its settings. Nodes in
    /// separate namespaces may share a port number; each uses 7000.
    pub fn spec_in(
        &self,
        network: &crate::netns::Network,
        name: &str,
        seeds: &[&NodeSpec],
    ) -> anyhow::Result<NodeSpec> {
        let host = network.address(name)?;
        let hosts = [host.to_string(), "localhost".into(), "127.0.0.1".into()];
        self.certificate_for(name, &self.path("ca"), &hosts)?;
        Ok(NodeSpec {
            name: name.into(),
            host,
            port: 7000,
            seeds: seeds.iter().map(|s| s.cluster_addr()).collect(),
            ca_dir: self.path("ca"),
            cookie: COOKIE.into(),
            namespace: Some(network.namespace(name)?),
        })
    }

    /// Returns the cluster flags of `spec`, for `atlas node`.
    pub fn cluster_flags(&self, spec: &NodeSpec) -> Vec<String> {
        let certs = self.path("certs");
        let mut args = vec![
            "--node-name".to_owned(),
            spec.name.clone(),
            "--cluster-listen".into(),
            spec.cluster_addr().to_string(),
            "--cluster-cookie".into(),
            spec.cookie.clone(),
            "--cluster-ca".into(),
            spec.ca_dir.join("ca.pem").display().to_string(),
            "--cluster-cert".into(),
            certs
                .join(format!("{}.pem", spec.name))
                .display()
                .to_string(),
            "--cluster-key".into(),
            certs
                .join(format!("{}-key.pem", spec.name))
                .display()
                .to_string(),
        ];
        if let Some((heartbeat, failure)) = self.timing {
            args.extend([
                "--heartbeat-ms".into(),
                heartbeat.to_string(),
                "--failure-timeout-ms".into(),
                failure.to_string(),
            ]);
        }
        args.extend(self.extra.iter().cloned());
        if !spec.seeds.is_empty() {
            let seeds: Vec<String> = spec.seeds.iter().map(ToString::to_string).collect();
            args.extend(["--seeds".into(), seeds.join(",")]);
        }
        args
    }

    /// Starts (or restarts in place) the node of `spec`, with its data in `<name>/` and its
    /// log in `<name>.log`.
    pub fn start(&self, spec: &NodeSpec) -> anyhow::Result<NodeProcess> {
        let args = self.cluster_flags(spec);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.path(&format!("{}.log", spec.name));
        match &spec.namespace {
            Some(namespace) => NodeProcess::start_logged_in(
                namespace,
                &self.binary,
                &self.path(&spec.name),
                &args,
                &log,
            ),
            None => NodeProcess::start_logged(&self.binary, &self.path(&spec.name), &args, &log),
        }
    }

    /// Returns the log a node wrote so far (empty if none).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts `count` nodes named node-a, node-b, ..., the first alone and the others with it
    /// as seed, and waits up to `timeout` until all list each other as voters of every
    /// replicated log and agree on each log's leader.
    pub async fn start_cluster(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<(Vec<NodeSpec>, BTreeMap<String, NodeProcess>)> {
        anyhow::ensure!((1..=26).contains(&count), "{count} nodes: use 1 to 26");
        let mut specs: Vec<NodeSpec> = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("node-{}", char::from(b'a' + i as u8));
            let seeds: Vec<u16> = specs.first().map(|s| s.port).into_iter().collect();
            specs.push(self.spec(&name, &seeds)?);
        }
        let mut nodes = BTreeMap::new();
        for spec in &specs {
            nodes.insert(spec.name.clone(), self.start(spec)?);
        }
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let everyone: Vec<&NodeProcess> = nodes.values().collect();
        let formed = wait_until(timeout, || agreed_leaders(&everyone, &names).is_some()).await;
        anyhow::ensure!(
            formed,
            "the replicated logs did not form within {timeout:?}: {:?}",
            everyone.iter().map(|n| log_view(n)).collect::<Vec<_>>()
        );
        Ok((specs, nodes))
    }
}

/// Returns the strings of a JSON array, sorted.
fn sorted_names(list: &serde_json::Value) -> Option<Vec<String>> {
    let mut names: Vec<String> = list
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    names.sort();
    Some(names)
}

fn parse_view(log: &serde_json::Value, replicas: Option<&serde_json::Value>) -> Option<LogView> {
    Some(LogView {
        role: log["role"].as_str()?.to_owned(),
        leader: log["leader"].as_str().map(str::to_owned),
        voters: sorted_names(&log["voters"])?,
        learners: sorted_names(&log["learners"])?,
        last_applied: log["last_applied"].as_u64(),
        term: log["term"].as_u64(),
        replicas: replicas.and_then(sorted_names),
        preferred: replicas
            .and_then(|r| r.get(0))
            .and_then(|first| first.as_str().map(str::to_owned)),
    })
}

/// Reads a node's view of its replicated logs: the directory's first, then each shard's in
/// shard order. `None` while the node does not serve them.
pub fn log_views(node: &NodeProcess) -> Option<Vec<LogView>> {
    let body = node.admin_get("/admin/cluster").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let replication = status["replication"].as_u64()?;
    let mut views = vec![parse_view(&status["replicated_log"], None)?];
    for shard in status["shards"].as_array()? {
        // With fewer live members than the factor, dead voters stay: no placement to compare.
        let full = shard["replicas"]
            .as_array()
            .is_some_and(|r| r.len() as u64 == replication);
        views.push(parse_view(
            &shard["log"],
            full.then_some(&shard["replicas"]),
        )?);
    }
    Some(views)
}

/// Reads a node's view of the directory's log; `None` while the node does not serve it.
pub fn log_view(node: &NodeProcess) -> Option<LogView> {
    log_views(node)?.into_iter().next()
}

/// Returns the leader of log `index` (0 for the directory, 1 + n for shard n) that every
/// view agrees on, if every view lists exactly the voters it should. These are the shard's
/// placement for a shard log with a full replica set, and `voters` (sorted names) otherwise.
fn agreed_on(views: &[Option<Vec<LogView>>], index: usize, voters: &[&str]) -> Option<String> {
    let view_of = |node: &Option<Vec<LogView>>| node.as_ref().and_then(|v| v.get(index).cloned());
    let leader = view_of(views.first()?)?.leader?;
    views
        .iter()
        .all(|node| {
            view_of(node).is_some_and(|v| {
                let expected: Vec<&str> = match &v.replicas {
                    Some(replicas) => replicas.iter().map(String::as_str).collect(),
                    None => voters.to_vec(),
                };
                v.leader.as_deref() == Some(leader.as_str())
                    && v.voters.iter().map(String::as_str).eq(expected)
            })
        })
        .then_some(leader)
}

/// Returns the leader of the directory's log that every node in `nodes` agrees on, if they
/// agree and all list exactly `voters` (sorted names) as voters.
pub fn agreed_leader(nodes: &[&NodeProcess], voters: &[&str]) -> Option<String> {
    let views: Vec<Option<Vec<LogView>>> = nodes.iter().map(|n| log_views(n)).collect();
    agreed_on(&views, 0, voters)
}

/// Returns the leader of every log (the directory's first, then each shard's), if every node
/// in `nodes` agrees on each and lists the voters it should (see `agreed_on`).
pub fn agreed_leaders(nodes: &[&NodeProcess], voters: &[&str]) -> Option<Vec<String>> {
    let views: Vec<Option<Vec<LogView>>> = nodes.iter().map(|n| log_views(n)).collect();
    let count = views.first()?.as_ref()?.len();
    (0..count).map(|i| agreed_on(&views, i, voters)).collect()
}

/// Returns the leader of the log of the shard of the group with id `group`, if every node in
/// `nodes` agrees on it and lists the voters it should (see `agreed_on`).
pub fn group_leader(nodes: &[&NodeProcess], voters: &[&str], group: &[u8]) -> Option<String> {
    let views: Vec<Option<Vec<LogView>>> = nodes.iter().map(|n| log_views(n)).collect();
    let shards = u32::try_from(views.first()?.as_ref()?.len().checked_sub(1)?).ok()?;
    let shard = atlas_cluster::shard_of(group, shards);
    agreed_on(&views, 1 + shard.0 as usize, voters)
}

/// Returns whether every node in `nodes` applied the same entries of every log.
pub fn logs_caught_up(nodes: &[&NodeProcess]) -> bool {
    let applied: Vec<Option<Vec<Option<u64>>>> = nodes
        .iter()
        .map(|n| log_views(n).map(|views| views.iter().map(|v| v.last_applied).collect()))
        .collect();
    applied
        .first()
        .is_some_and(|first| first.is_some() && applied.iter().all(|other| other == first))
}
