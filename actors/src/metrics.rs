use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Metrics updated by the domain actors.
#[derive(Clone)]
pub struct ActorMetrics {
    /// Entries accepted into group logs, by kind (`commit`, `application`).
    pub messages_accepted: IntCounterVec,
    /// Group session actors currently running.
    pub group_actors_alive: IntGauge,
}

impl ActorMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered();
        registry.register(Box::new(metrics.messages_accepted.clone()))?;
        registry.register(Box::new(metrics.group_actors_alive.clone()))?;
        Ok(metrics)
    }

    /// Creates metrics that no registry exports, for tests.
    pub fn unregistered() -> Self {
        Self {
            // The names and labels below are constants, so construction cannot fail.
            messages_accepted: IntCounterVec::new(
                Opts::new(
                    "atlas_messages_accepted_total",
                    "Entries accepted into group logs",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            group_actors_alive: IntGauge::new(
                "atlas_group_actors_alive",
                "Group session actors currently running",
            )
            .expect("valid metric"),
        }
    }
}
