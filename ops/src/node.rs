//! Starting and stopping one node: storage, actors, gateway and metrics listener.

use crate::config::NodeConfig;
use crate::tls;
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use atlas_actors::{
    ActorMetrics, Directory, GroupSettings, GroupSupervisor, SupervisorArgs, SupervisorMsg,
};
use atlas_cluster::{Presence, Router};
use atlas_gateway::{GatewayMetrics, GatewayState, SessionSettings};
use atlas_protocol::CloseCode;
use atlas_storage::Store;
use prometheus::{Encoder, Histogram, HistogramOpts, Registry, TextEncoder};
use ractor::{Actor, ActorRef};
use std::net::SocketAddr;
use std::sync::Arc;
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
}

/// Starts a node; must run inside an actix system.
pub async fn start(config: &NodeConfig) -> anyhow::Result<RunningNode> {
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
            deliver: presence.clone(),
            settings,
            metrics: actor_metrics,
        },
    )
    .await
    .context("cannot start the group supervisor")?;

    let identity = tls::load_identity(
        &config.data_dir,
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        &config.server_name,
    )?;
    let fingerprint = identity.fingerprint.clone();
    let generated_cert = identity.generated;
    let tls_config = tls::server_config(identity)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let state = Arc::new(GatewayState {
        store: store.clone(),
        directory: Directory::new(store.clone()),
        router: Router::new(supervisor.clone()),
        presence: Arc::clone(&presence),
        metrics: gateway_metrics,
        settings: SessionSettings {
            server_name: config.server_name.clone(),
            queue_capacity: config.queue_capacity,
            queue_max_bytes: config.queue_max_bytes,
            ping_interval: config.ping_interval(),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs.max(2)),
            ..SessionSettings::default()
        },
        shutdown: shutdown_rx,
    });
    let workers = if config.workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        config.workers
    };
    let (gateway, addr) = atlas_gateway::bind(state, config.listen, tls_config, workers)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let (metrics_server, metrics_addr) = metrics_server(registry, config.metrics_listen)
        .with_context(|| format!("cannot listen for metrics on {}", config.metrics_listen))?;
    let handles = (gateway.handle(), metrics_server.handle());
    let tasks = vec![tokio::spawn(gateway), tokio::spawn(metrics_server)];
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
    })
}

fn metrics_server(
    registry: Registry,
    listen: SocketAddr,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let registry = web::Data::new(registry);
    let server = HttpServer::new(move || {
        App::new().app_data(registry.clone()).route(
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
    .bind(listen)?;
    let addr = server.addrs().first().copied().ok_or_else(|| {
        std::io::Error::other(format!("metrics listener on {listen} reported no address"))
    })?;
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
        self.supervisor.stop(Some("node shutdown".into()));
        self.store
            .close()
            .await
            .context("final storage flush failed")?;
        tracing::info!("storage flushed, node stopped");
        Ok(())
    }
}
