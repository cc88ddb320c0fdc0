//! `atlas`: the Atlas node binary.
//!
//! - `atlas node` runs a node from defaults, a TOML file, `ATLAS_*` variables and flags.
//! - `atlas demo` runs a node and three clients through a scripted group chat and checks it.

// A binary crate: `pub` marks what a module offers to its siblings, nothing is exported.
#![allow(unreachable_pub)]

mod admin;
mod certs;
mod config;
mod demo;
mod node;
mod tls;

use clap::{Parser, Subcommand};
use std::time::{Duration, Instant};

// mimalloc instead of the system allocator: a profile of the saturation benchmark showed
// about 15% of the node's CPU time in glibc malloc and free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use config::{LogFormat, NodeFlags};

#[derive(Parser)]
#[command(
    name = "atlas",
    version,
    about = "Atlas end-to-end-encrypted group chat node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node(Box<NodeFlags>),
    /// Create a cluster CA or a node certificate.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print the cluster status of a running node: members, their state and the shard
    /// placement, as JSON from its admin endpoint.
    Status {
        /// The node's metrics and admin listener.
        #[arg(long, env = "ATLAS_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
        /// Print only the shard that carries this group (its id in hexadecimal, as
        /// `atlas-chat groups` lists it), with the shard's replicas and log.
        #[arg(long)]
        group: Option<String>,
    },
    /// Remove a node lost for good (its disk gone, or retired while down) from every
    /// replicated log, through the admin endpoint of a running member. Refused while the
    /// node is alive; a node that stops with SIGTERM leaves by itself.
    RemoveNode {
        /// Name of the node to remove.
        #[arg(value_parser = parse_node_name)]
        name: String,
        /// The metrics and admin listener of a running member.
        #[arg(long, env = "ATLAS_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
    },
    /// Make a stopped node the only voter of every replicated log, after the other voters
    /// were lost for good (their disks gone). Unsafe: writes that only the lost voters had
    /// are gone. Run it on the survivor whose logs reach furthest, start that node, then
    /// start the other nodes with empty data directories. Without --force, prints what it
    /// would change and changes nothing. Rejected while a peer that the node heard from
    /// still accepts connections at its cluster address.
    Recover {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The node's name, as it runs with --node-name.
        #[arg(long, default_value = "node-1")]
        node_name: String,
        /// Change the logs.
        #[arg(long)]
        force: bool,
        /// Do not dial the cluster addresses of the node's peers first. Only for addresses
        /// that now belong to other programs: a peer that still runs with its logs makes
        /// the recovered logs fork.
        #[arg(long)]
        skip_peer_check: bool,
    },
    /// Manage the signing keys of a running node through its admin endpoint.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a node on a free port with three demo clients and check the outcome.
    Demo {
        /// Print the node's logs too.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a new signing key; the old one stays in the JWKS for the grace period.
    Rotate {
        /// The node's metrics and admin listener.
        #[arg(long, env = "ATLAS_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
    },
    /// Print the node's published signing keys (JWKS).
    List {
        /// The node's metrics and admin listener.
        #[arg(long, env = "ATLAS_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a CA certificate and key (ca.pem, ca-key.pem).
    Ca {
        /// Directory for the CA files.
        #[arg(long, default_value = "atlas-ca")]
        dir: std::path::PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "Atlas cluster CA")]
        name: String,
    },
    /// Create a node certificate and key (NAME.pem, NAME-key.pem) signed by the CA.
    Node {
        /// Node name: the certificate's common name and first DNS name.
        name: String,
        /// Directory with ca.pem and ca-key.pem.
        #[arg(long, default_value = "atlas-ca")]
        ca_dir: std::path::PathBuf,
        /// Directory for the node files.
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
        /// DNS names or IP addresses of the node (repeatable). Given names replace the
        /// defaults, so repeat `localhost` and `127.0.0.1` to keep them.
        #[arg(long = "host", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        hosts: Vec<String>,
    },
}

/// Writes a response body to stdout. A reader that closed the pipe early (`| head`) is not
/// an error.
fn print_body(body: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{body}");
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node(flags) => run_node(*flags),
        Command::Cert(CertCommand::Ca { dir, name }) => certs::create_ca(&dir, &name).map(|()| {
            println!(
                "wrote {} and {}",
                dir.join("ca.pem").display(),
                dir.join("ca-key.pem").display()
            );
        }),
        Command::Cert(CertCommand::Node {
            name,
            ca_dir,
            out,
            hosts,
        }) => certs::create_node(&ca_dir, &out, &name, &hosts).map(|()| {
            println!(
                "wrote {} and {}",
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}-key.pem")).display()
            );
        }),
        Command::Status { admin, group } => {
            let path = match group.as_deref().map(node::parse_group_id) {
                Some(Ok(group)) => Ok(format!("/admin/cluster/group/{group}")),
                Some(Err(message)) => Err(anyhow::anyhow!("{}", message.trim_end())),
                None => Ok("/admin/cluster".to_owned()),
            };
            path.and_then(|path| admin::request(admin, "GET", &path))
                .map(|body| print_body(&body))
        }
        Command::RemoveNode { name, admin } => {
            let path = format!("/admin/cluster/remove/{name}");
            admin::request(admin, "POST", &path).map(|body| print_body(&body))
        }
        Command::Keys(KeysCommand::Rotate { admin }) => {
            admin::request(admin, "POST", "/admin/keys/rotate").map(|body| print_body(&body))
        }
        Command::Keys(KeysCommand::List { admin }) => {
            admin::request(admin, "GET", "/admin/jwks").map(|body| print_body(&body))
        }
        Command::Recover {
            data_dir,
            node_name,
            force,
            skip_peer_check,
        } => block_on(recover(data_dir, node_name, force, !skip_peer_check)),
        Command::Demo { verbose } => {
            init_tracing(if verbose { "info" } else { "warn" }, LogFormat::Text);
            block_on(demo::run())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atlas: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_node(flags: NodeFlags) -> anyhow::Result<()> {
    let config = flags.resolve()?;
    init_tracing("info", config.log_format);
    block_on(async move {
        let node = node::start(&config).await?;
        println!("atlas node listening on wss://{}/v1/ws", node.addr);
        // DPoP proofs must name the node's server name, whatever address it listens on.
        println!(
            "clients connect to wss://{}:{}/v1/ws",
            config.server_name,
            node.addr.port()
        );
        println!("metrics on http://{}/metrics", node.metrics_addr);
        println!(
            "certificate sha256 fingerprint: {}{}",
            node.fingerprint,
            if node.generated_cert {
                " (development certificate generated now)"
            } else {
                ""
            }
        );
        wait_for_signal().await?;
        node.shutdown().await
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
    Ok(())
}

/// Runs `atlas recover` (see [`Command::Recover`]).
async fn recover(
    data_dir: std::path::PathBuf,
    name: String,
    force: bool,
    check_peers: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        data_dir.is_dir(),
        "--data-dir {} {}: pass the data directory of a stopped node",
        data_dir.display(),
        if data_dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        }
    );
    // The node keeps its database under `storage`, as `atlas node` opens it.
    let storage = data_dir.join("storage");
    anyhow::ensure!(
        storage.join("db").is_file(),
        "{} contains no node database (no storage/db): pass the --data-dir of a node",
        data_dir.display()
    );
    let store = atlas_storage::Store::open(&storage)
        .map_err(|e| anyhow::anyhow!("{e}; if the node runs, stop the node first"))?;

    // The name is checked before any peer is dialled, so a wrong name is reported as such.
    if let Err(e) = atlas_cluster::replication::recovery_identity(store.sled_db(), &name) {
        store.close().await?;
        return Err(e);
    }
    if check_peers {
        let peers = atlas_cluster::replication::known_peers(store.sled_db())?;
        let live = live_peers(&name, &peers).await;
        if !live.is_empty() {
            let list = live.join(", ");
            if force {
                store.close().await?;
                anyhow::bail!(
                    "recovery rejected: peers still accept connections at their cluster \
                     addresses: {list}. A peer that still runs with its logs would fork every \
                     log it votes in: stop each such peer for good, or empty its data \
                     directory before it starts again. If an address now belongs to another \
                     program, pass --skip-peer-check"
                );
            }
            println!(
                "warning: peers still accept connections at their cluster addresses: {list}; \
                 --force would reject the recovery"
            );
        }
    }

    let db = store.sled_db().clone();
    let recovered = tokio::task::spawn_blocking(move || {
        atlas_cluster::replication::make_sole_voter(&db, &name, force)
    })
    .await??;
    store.close().await?;

    if recovered.is_empty() {
        println!(
            "no replicated log in {}: nothing to change",
            data_dir.display()
        );
        return Ok(());
    }
    for log in &recovered {
        if !log.changed {
            println!("log {}: this node is the only voter already", log.log);
            continue;
        }
        println!(
            "log {}: {} voters before; {} the only voter with entry {} of term {}",
            log.log,
            log.voters_before.len(),
            if force {
                "this node is now"
            } else {
                "this node would be"
            },
            log.index,
            log.term
        );
    }

    if force {
        println!(
            "start this node now, then the other nodes with empty data directories; its leaders \
             make them voters again"
        );
    } else {
        println!("nothing changed: run again with --force to change the logs");
    }
    Ok(())
}

/// Time to wait for a peer's cluster listener to accept a connection.
const PEER_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials the cluster address of every peer in `peers` (name, address) other than `own`, all at
/// once, and returns the peers that accepted, as "NAME at ADDRESS". Prints the peers it
/// dialled, and those whose address cannot be read.
async fn live_peers(own: &str, peers: &[(String, String)]) -> Vec<String> {
    let others: Vec<&(String, String)> = peers.iter().filter(|(name, _)| name != own).collect();
    if others.is_empty() {
        println!("no peer address recorded: no peer to check");
        return Vec::new();
    }
    let mut dials = tokio::task::JoinSet::new();
    for (name, addr) in &others {
        let socket = match addr.parse::<std::net::SocketAddr>() {
            Ok(socket) => socket,
            Err(e) => {
                println!(
                    "peer {name}: recorded address {addr:?} is not host:port ({e}); not checked"
                );
                continue;
            }
        };
        let label = format!("{name} at {addr}");
        dials.spawn(async move {
            let dial = tokio::net::TcpStream::connect(socket);
            let accepted = matches!(
                tokio::time::timeout(PEER_DIAL_TIMEOUT, dial).await,
                Ok(Ok(_))
            );
            accepted.then_some(label)
        });
    }
    let mut live: Vec<String> = dials.join_all().await.into_iter().flatten().collect();
    live.sort();
    println!(
        "dialled {} peer(s) at their cluster addresses: {} accepted",
        others.len(),
        live.len()
    );
    live
}

/// Runs `future` in an actix system on a multi-threaded Tokio runtime: actors and storage use
/// that runtime, HTTP workers run their own threads.
fn block_on<F: Future<Output = anyhow::Result<()>>>(future: F) -> anyhow::Result<()> {
    actix_web::rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            // Without a runtime nothing can run, and the panic message gives the cause.
            .expect("cannot build the Tokio runtime")
    })
    .block_on(future)
}

fn init_tracing(default_level: &str, format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATLAS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour codes only on a terminal, so log files and pipes stay plain text.
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    // The limit passes on the env filter's level, so that `tracing` and `log` reject events
    // below it before any filter runs.
    let limit = openraft_log_limit(filter.max_level_hint());
    tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(limit))
        .init();
}

/// Interval in which each line of openraft is written at most once.
const OPENRAFT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets each event of openraft through at most once per [`OPENRAFT_LOG_INTERVAL`], by its
/// place in openraft's source. While a voter is down, every log it votes in retries its
/// replication to it and writes a warning and an error each time, and every read barrier
/// logs an error for it (with 17 logs on three nodes, dozens a second). Elections log
/// several lines per vote. The membership log already says which node is down.
/// `max_level` is the most verbose level that the filters after it let through.
fn openraft_log_limit<S>(
    max_level: Option<tracing::level_filters::LevelFilter>,
) -> impl tracing_subscriber::layer::Filter<S> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tracing::callsite::Identifier;
    use tracing::subscriber::Interest;
    let last: Mutex<HashMap<Identifier, Instant>> = Mutex::new(HashMap::new());
    let limited =
        |meta: &tracing::Metadata<'_>| meta.is_event() && meta.target().starts_with("openraft");
    tracing_subscriber::filter::DynFilterFn::new(move |meta, _| {
        if !limited(meta) {
            return true;
        }
        let Ok(mut last) = last.lock() else {
            return true;
        };
        let now = Instant::now();
        match last.get(&meta.callsite()) {
            Some(at) if now.duration_since(*at) < OPENRAFT_LOG_INTERVAL => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    })
    .with_callsite_filter(move |meta| {
        if limited(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    })
    .with_max_level_hint(max_level.unwrap_or(tracing::level_filters::LevelFilter::TRACE))
}

/// Checks a node name given on the command line: 1 to 64 characters from a-z, A-Z, 0-9,
/// '.', '_' and '-', as `atlas node --node-name` requires.
fn parse_node_name(text: &str) -> Result<String, String> {
    if config::valid_node_name(text) {
        Ok(text.to_owned())
    } else {
        Err("a node name has 1 to 64 characters from a-z, A-Z, 0-9, '.', '_' and '-'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_checked() {
        assert_eq!(parse_node_name("node-3").as_deref(), Ok("node-3"));
        let long = "n".repeat(65);
        for bad in ["", "../admin", "node 3", long.as_str()] {
            let error = parse_node_name(bad).unwrap_err();
            assert!(error.contains("1 to 64 characters"), "{bad:?}: {error}");
        }
    }

    /// Events below the filter's level must be rejected by the cheap level checks of `tracing`
    /// and `log`, before any filter runs: sled, rustls and openraft emit many of them.
    #[test]
    fn tracing_sets_global_max_levels() {
        let expected = tracing_subscriber::EnvFilter::try_from_env("ATLAS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
            .max_level_hint()
            .expect("an env filter without span directives has a level");
        init_tracing("info", LogFormat::Text);
        assert_eq!(tracing::level_filters::LevelFilter::current(), expected);
        let expected_log = match expected.into_level() {
            None => log::LevelFilter::Off,
            Some(tracing::Level::ERROR) => log::LevelFilter::Error,
            Some(tracing::Level::WARN) => log::LevelFilter::Warn,
            Some(tracing::Level::INFO) => log::LevelFilter::Info,
            Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
            Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
        };
        assert_eq!(log::max_level(), expected_log);
    }
}
