use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Metrics of the WebSocket sessions.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// WebSocket connections currently open.
    pub connections_open: IntGauge,
    /// Frames received, by frame type (`invalid` for frames that did not decode).
    pub frames_in: IntCounterVec,
    /// Frames sent, by frame type.
    pub frames_out: IntCounterVec,
    /// Error frames sent, by error code name.
    pub errors: IntCounterVec,
    /// Connections closed by the server, by close reason.
    pub closes: IntCounterVec,
    /// Rejected account, token and upgrade requests, by error code.
    pub auth_rejections: IntCounterVec,
    /// Token pairs issued, by grant (`passkey_registration`, `passkey_login`, `refresh`).
    pub tokens_issued: IntCounterVec,
}

impl GatewayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            connections_open: IntGauge::new(
                "atlas_connections_open",
                "WebSocket connections currently open",
            )?,
            frames_in: IntCounterVec::new(
                Opts::new("atlas_frames_received_total", "Frames received by type"),
                &["type"],
            )?,
            frames_out: IntCounterVec::new(
                Opts::new("atlas_frames_sent_total", "Frames sent by type"),
                &["type"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("atlas_errors_total", "Error frames sent by error code"),
                &["code"],
            )?,
            closes: IntCounterVec::new(
                Opts::new(
                    "atlas_connections_closed_total",
                    "Connections closed by the server by reason",
                ),
                &["reason"],
            )?,
            auth_rejections: IntCounterVec::new(
                Opts::new(
                    "atlas_auth_rejections_total",
                    "Rejected account, token and WebSocket upgrade requests by error code",
                ),
                &["code"],
            )?,
            tokens_issued: IntCounterVec::new(
                Opts::new("atlas_tokens_issued_total", "Token pairs issued by grant"),
                &["grant"],
            )?,
        };
        registry.register(Box::new(metrics.auth_rejections.clone()))?;
        registry.register(Box::new(metrics.tokens_issued.clone()))?;
        registry.register(Box::new(metrics.connections_open.clone()))?;
        registry.register(Box::new(metrics.frames_in.clone()))?;
        registry.register(Box::new(metrics.frames_out.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.closes.clone()))?;
        Ok(metrics)
    }
}
