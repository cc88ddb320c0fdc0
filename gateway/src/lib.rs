//! The Atlas gateway: an actix-web server on rustls (TLS 1.3 only) that carries device
//! sessions over WebSocket (actix-ws) at `/v1/ws`.
//!
//! Each connection gets a fresh login nonce, must log in with its device key before anything
//! else, then exchanges MessagePack frames (see `atlas-protocol`). Group requests go through the
//! [`atlas_cluster::Router`]; pushes arrive through the connection's bounded queue registered in
//! [`atlas_cluster::Presence`].

pub mod auth;
mod forward;
mod keys;
mod metrics;
mod session;

pub use forward::serve_forwarded;
pub use metrics::GatewayMetrics;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use atlas_actors::{Directory, KeyTransparency};
use atlas_cluster::{Presence, Router};
use atlas_storage::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Settings of the WebSocket sessions.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Host name clients connect to; part of the signed login transcript.
    pub server_name: String,
    /// Capacity of each connection's outbound queue, in frames.
    pub queue_capacity: usize,
    /// Capacity of each connection's outbound queue, in bytes of encoded frames.
    pub queue_max_bytes: usize,
    /// Time a client has to log in after connecting.
    pub login_timeout: Duration,
    /// Interval between WebSocket pings.
    pub ping_interval: Duration,
    /// A connection that has sent nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// Consecutive invalid frames after which the connection is closed.
    pub max_invalid_frames: u32,
    /// Requests a connection may have in flight before the server stops reading from it.
    pub max_in_flight: usize,
    /// Connections that may wait to log in at the same time; more are closed with 1013.
    pub max_unauthenticated: usize,
    /// Whether a login with an unknown key registers it under an unused account name. Off,
    /// devices must be enrolled first (passkey token or a current device).
    pub open_registration: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            queue_capacity: 1024,
            queue_max_bytes: 8 * 1024 * 1024,
            login_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_invalid_frames: 16,
            max_in_flight: 256,
            max_unauthenticated: 1024,
            open_registration: false,
        }
    }
}

/// Decides whether this node may accept writes now.
pub trait WriteGate: Send + Sync {
    /// Returns why writes are refused, or `None` when they are accepted.
    fn refusal(&self) -> Option<String>;
}

/// Everything a session needs, shared by all connections.
pub struct GatewayState {
    pub store: Store,
    pub directory: Directory,
    pub kt: Arc<KeyTransparency>,
    pub router: Router,
    pub presence: Arc<Presence>,
    pub metrics: GatewayMetrics,
    pub settings: SessionSettings,
    /// Flips to true when the node shuts down; sessions then close with "going away".
    pub shutdown: watch::Receiver<bool>,
    /// Connections that have not logged in yet.
    pub unauthenticated: Arc<std::sync::atomic::AtomicUsize>,
    /// Passkey accounts, tokens and DPoP checks.
    pub auth: Option<Arc<auth::Auth>>,
    /// Refuses writes while the node is cut off from a majority of the cluster.
    pub write_gate: Option<Arc<dyn WriteGate>>,
    /// Owners of groups in a cluster, which validate their sends and commits.
    pub owners: Option<Arc<atlas_cluster::GroupOwners>>,
}

/// Binds the TLS listener and returns the server (not yet awaited) and its bound address.
pub fn bind(
    state: Arc<GatewayState>,
    listener: std::net::TcpListener,
    tls: rustls::ServerConfig,
    workers: usize,
) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let data = web::Data::from(state);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(count_auth_rejections))
            .wrap(security_headers())
            .app_data(data.clone())
            .route("/v1/ws", web::get().to(websocket))
            .route("/.well-known/jwks.json", web::get().to(jwks))
            .configure(auth::routes::configure)
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok") }),
            )
            .default_service(web::to(not_found))
    })
    .workers(workers)
    // Responses are small frames: without this, Nagle's algorithm delays them until the
    // client's delayed ACK, about 40 ms on Linux.
    .tcp_nodelay(true)
    // Sessions are closed by the node's own shutdown signal; actix only waits this long after.
    .shutdown_timeout(5)
    .disable_signals()
    .listen_rustls_0_23(listener, tls)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("the TLS listener reported no address"))?;
    Ok((server.run(), addr))
}

/// Headers on every response: HTTPS only for a year, no MIME sniffing, no framing, no use by
/// other origins, and no referrer.
fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add(("Strict-Transport-Security", "max-age=31536000"))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Cross-Origin-Resource-Policy", "same-origin"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
        .add(("Referrer-Policy", "no-referrer"))
        // Responses that may be cached set their own Cache-Control (the JWKS does).
        .add(("Cache-Control", "no-store"))
}

/// Counts responses that carry an [`auth::AuthError`], by its code, and logs them with the
/// path and the client address, at most [`REJECTION_LOG_LINES`] lines per minute.
async fn count_auth_rejections(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> actix_web::Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>> {
    let state = req.app_data::<web::Data<GatewayState>>().cloned();
    let response = next.call(req).await?;
    if let (Some(state), Some(error)) = (state, response.response().error())
        && let Some(auth_error) = error.as_error::<auth::AuthError>()
    {
        let code = auth_error.code();
        state
            .metrics
            .auth_rejections
            .with_label_values(&[code])
            .inc();
        if let Some(suppressed) = REJECTION_LOG.admit() {
            // Error texts name values such as URIs and account names, with control
            // characters replaced, never tokens or proofs.
            tracing::info!(
                code,
                path = response.request().path(),
                peer = ?response.request().peer_addr(),
                suppressed,
                error = %auth_error,
                "account request rejected"
            );
        }
    }
    Ok(response)
}

/// Lines [`count_auth_rejections`] logs per minute; `atlas_auth_rejections_total` counts all.
const REJECTION_LOG_LINES: u64 = 60;

static REJECTION_LOG: LogBudget = LogBudget::new(REJECTION_LOG_LINES);

/// A budget of log lines per minute.
struct LogBudget {
    per_minute: u64,
    /// Minute of the current budget, since the Unix epoch.
    minute: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    const fn new(per_minute: u64) -> Self {
        Self {
            per_minute,
            minute: std::sync::atomic::AtomicU64::new(0),
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes one line from the budget. Returns the number of lines suppressed in the previous
    /// minute when a line may be logged, `None` when it may not.
    fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let minute = atlas_actors::now_ms() / 60_000;
        let mut suppressed = 0;
        if self.minute.swap(minute, Relaxed) != minute {
            suppressed = self.used.swap(0, Relaxed).saturating_sub(self.per_minute);
        }
        (self.used.fetch_add(1, Relaxed) < self.per_minute).then_some(suppressed)
    }
}

/// Returns 404 for a path and method the gateway does not serve, in the JSON error form of
/// the account endpoints.
async fn not_found(req: HttpRequest) -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({
        "error": "not_found",
        "error_description": format!(
            "{} {} is not served here; see docs/accounts.md and docs/protocol.md",
            req.method(),
            atlas_protocol::dpop::printable(req.path())
        ),
    }))
}

/// Serves the signing keys. Caches may keep the set for five minutes: a rotated key stays
/// published for the grace period, so verifiers find it in a cached copy too.
async fn jwks(state: web::Data<GatewayState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/jwk-set+json")
        .insert_header(("Cache-Control", "public, max-age=300"))
        .json(keys::current_jwks(&state).await)
}

async fn websocket(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<GatewayState>,
) -> actix_web::Result<HttpResponse> {
    // The upgrade carries a DPoP proof, and an access token if the client has one, which is
    // then checked too. The device still proves its own key with the login frame.
    if let Some(auth) = &state.auth {
        let token = auth::proofs::access_token(&req)?;
        let proof = auth.check_proof(&req, token)?;
        if let Some(token) = token {
            auth.verify_access_token(token, &proof)?;
        }
    }
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let peer = req.peer_addr();
    let state = state.into_inner();
    actix_web::rt::spawn(session::run(state, session, stream, peer));
    Ok(response)
}
