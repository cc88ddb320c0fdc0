//! Node configuration: built-in defaults, then a TOML file, then `ATLAS_*` environment
//! variables and command-line flags (flags win over the environment; both win over the file).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Minimum length of the cluster cookie, in bytes.
const MIN_COOKIE_BYTES: usize = 16;

/// Settings of one node. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory for storage, the development certificate and other node files.
    pub data_dir: PathBuf,
    /// Address of the TLS WebSocket listener.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP Prometheus metrics listener.
    pub metrics_listen: SocketAddr,
    /// Host name clients use; signed into every device login and put in the development
    /// certificate.
    pub server_name: String,
    /// PEM certificate chain; with `tls_key`, replaces the generated development certificate.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// HTTP worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Maximum frames in each connection's outbound queue before the client counts as slow.
    pub queue_capacity: usize,
    /// Maximum bytes in each connection's outbound queue before the client counts as slow.
    pub queue_max_bytes: usize,
    /// Connections that may wait to log in at the same time; more are closed with 1013.
    pub max_unauthenticated: usize,
    /// Seconds between keepalive pings.
    pub ping_interval_secs: u64,
    /// Seconds of silence after which a connection is closed.
    pub idle_timeout_secs: u64,
    /// Seconds after which an idle group actor stops.
    pub group_idle_secs: u64,
    /// Days after which log entries are removed even if not every member acknowledged them.
    pub retention_days: u64,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// Secret (64 hex digits) that seals the signing keys at rest. Without it the node keeps a
    /// generated one in `<data_dir>/signing-key-secret`, which protects nothing against a
    /// reader of the data directory; give it through `ATLAS_SIGNING_KEY_SECRET` in production.
    pub signing_key_secret: Option<Secret>,
    /// Seconds between scheduled rotations of the signing key.
    pub signing_key_rotation_secs: u64,
    /// Seconds a retired signing key stays in the JWKS.
    pub signing_key_grace_secs: u64,
    /// Seconds between signed tree heads while the key transparency log grows.
    pub tree_head_interval_secs: u64,
    /// This node's name in the cluster; the common name of its cluster certificate.
    pub node_name: String,
    /// Address of the node-to-node listener (mutual TLS). Without it the node runs alone.
    pub cluster_listen: Option<SocketAddr>,
    /// Address other nodes dial to reach this one; defaults to `cluster_listen`.
    pub cluster_advertise: Option<SocketAddr>,
    /// Cluster addresses of nodes to join through.
    pub seeds: Vec<SocketAddr>,
    /// Shared secret of the cluster.
    pub cluster_cookie: Option<Secret>,
    /// PEM file of the cluster CA, which must have issued every node's certificate.
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate chain and key of this node, from `atlas cert node NAME`.
    pub cluster_cert: Option<PathBuf>,
    pub cluster_key: Option<PathBuf>,
    /// Milliseconds between heartbeats to the other members.
    pub heartbeat_ms: u64,
    /// A member not heard from for this many milliseconds is marked dead.
    pub failure_timeout_ms: u64,
    /// Entries of each replicated log between two snapshots, after which older entries are
    /// removed; a node that falls behind them catches up from a snapshot.
    pub log_snapshot_entries: u64,
    /// Number of shards. Each shard's groups change through a replicated log of their own,
    /// so a node runs this many logs besides the directory's.
    pub shards: u32,
    /// Replicas of each shard (fewer when fewer nodes are alive).
    pub replication: u32,
    /// Whether a login with an unknown device key registers it under an unused account name.
    /// For development and benchmarks only: anyone may then claim any free account name.
    /// Off, devices are enrolled with a passkey access token or from a current device.
    pub open_registration: bool,
    /// WebAuthn relying party id; defaults to `server_name`.
    pub rp_id: Option<String>,
    /// Origin of the pages that run passkey ceremonies; defaults to
    /// `https://<server_name>:<listen port>`.
    pub rp_origin: Option<String>,
    /// Lifetime of access tokens, in seconds.
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// Seconds a client has to finish a passkey ceremony.
    pub ceremony_ttl_secs: u64,
    /// Largest accepted distance between a DPoP proof's `iat` and the server clock, in
    /// seconds.
    pub dpop_window_secs: u64,
    /// Whether DPoP proofs must carry a server nonce (`DPoP-Nonce`).
    pub dpop_nonces: bool,
    /// Capacity of the DPoP `jti` replay cache; one client address may use a tenth of it.
    pub dpop_replay_capacity: usize,
    /// Seconds after a passkey login during which its tokens may add or remove passkeys.
    pub reauthentication_window_secs: u64,
}

/// Log output format.
/// A configuration value that must not appear in logs; `Debug` prints a placeholder.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("atlas-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            server_name: "localhost".into(),
            tls_cert: None,
            tls_key: None,
            workers: 0,
            queue_capacity: 1024,
            queue_max_bytes: 8 * 1024 * 1024,
            max_unauthenticated: 1024,
            ping_interval_secs: 15,
            idle_timeout_secs: 45,
            group_idle_secs: 300,
            retention_days: 30,
            log_format: LogFormat::Text,
            signing_key_secret: None,
            signing_key_rotation_secs: 30 * 24 * 3600,
            signing_key_grace_secs: 90 * 24 * 3600,
            tree_head_interval_secs: 2,
            node_name: "node-1".into(),
            cluster_listen: None,
            cluster_advertise: None,
            seeds: Vec::new(),
            cluster_cookie: None,
            cluster_ca: None,
            cluster_cert: None,
            cluster_key: None,
            heartbeat_ms: 500,
            failure_timeout_ms: 3000,
            log_snapshot_entries: 50_000,
            shards: 16,
            replication: 3,
            open_registration: false,
            rp_id: None,
            rp_origin: None,
            access_token_ttl_secs: 300,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            ceremony_ttl_secs: 300,
            dpop_window_secs: 60,
            dpop_nonces: false,
            dpop_replay_capacity: 100_000,
            reauthentication_window_secs: 300,
        }
    }
}

/// Command-line flags of `atlas node`; each can also come from its `ATLAS_*` variable.
#[derive(Debug, Default, clap::Args)]
pub struct NodeFlags {
    /// TOML config file.
    #[arg(long, env = "ATLAS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./atlas-data].
    #[arg(long, env = "ATLAS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TLS WebSocket listen address [default: 127.0.0.1:8443].
    #[arg(long, env = "ATLAS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address [default: 127.0.0.1:9464].
    #[arg(long, env = "ATLAS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Server name clients connect to [default: localhost].
    #[arg(long, env = "ATLAS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// PEM certificate chain file (needs --tls-key).
    #[arg(long, env = "ATLAS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key file.
    #[arg(long, env = "ATLAS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// HTTP worker threads (0: one per CPU).
    #[arg(long, env = "ATLAS_WORKERS")]
    pub workers: Option<usize>,
    /// Outbound queue capacity per connection, in frames.
    #[arg(long, env = "ATLAS_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Outbound queue capacity per connection, in bytes.
    #[arg(long, env = "ATLAS_QUEUE_MAX_BYTES")]
    pub queue_max_bytes: Option<usize>,
    /// Connections that may wait to log in at the same time; more are closed with 1013.
    #[arg(long, env = "ATLAS_MAX_UNAUTHENTICATED")]
    pub max_unauthenticated: Option<usize>,
    /// Keepalive ping interval in seconds.
    #[arg(long, env = "ATLAS_PING_INTERVAL_SECS")]
    pub ping_interval_secs: Option<u64>,
    /// Seconds of silence before a connection is closed.
    #[arg(long, env = "ATLAS_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Log format.
    #[arg(long, env = "ATLAS_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Secret that seals the signing keys at rest: 64 hex digits.
    #[arg(long, env = "ATLAS_SIGNING_KEY_SECRET", hide_env_values = true)]
    pub signing_key_secret: Option<String>,
    /// Seconds between scheduled rotations of the signing key.
    #[arg(long, env = "ATLAS_SIGNING_KEY_ROTATION_SECS")]
    pub signing_key_rotation_secs: Option<u64>,
    /// Seconds a retired signing key stays published in the JWKS.
    #[arg(long, env = "ATLAS_SIGNING_KEY_GRACE_SECS")]
    pub signing_key_grace_secs: Option<u64>,
    /// Seconds between signed tree heads while the key transparency log grows.
    #[arg(long, env = "ATLAS_TREE_HEAD_INTERVAL_SECS")]
    pub tree_head_interval_secs: Option<u64>,
    /// This node's name in the cluster.
    #[arg(long, env = "ATLAS_NODE_NAME")]
    pub node_name: Option<String>,
    /// Address of the node-to-node listener; enables clustering.
    #[arg(long, env = "ATLAS_CLUSTER_LISTEN", value_parser = parse_cluster_address)]
    pub cluster_listen: Option<SocketAddr>,
    /// Address other nodes dial to reach this one (default: --cluster-listen).
    #[arg(long, env = "ATLAS_CLUSTER_ADVERTISE", value_parser = parse_cluster_address)]
    pub cluster_advertise: Option<SocketAddr>,
    /// Cluster addresses (IP:port) of nodes to join through, comma-separated.
    #[arg(long, env = "ATLAS_SEEDS", value_delimiter = ',', value_parser = parse_cluster_address)]
    pub seeds: Option<Vec<SocketAddr>>,
    /// Shared secret of the cluster.
    #[arg(long, env = "ATLAS_CLUSTER_COOKIE", hide_env_values = true)]
    pub cluster_cookie: Option<String>,
    /// PEM file of the cluster CA.
    #[arg(long, env = "ATLAS_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate chain of this node (from `atlas cert node`).
    #[arg(long, env = "ATLAS_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// PEM private key of this node.
    #[arg(long, env = "ATLAS_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
    /// Milliseconds between heartbeats to the other members, 50 to 60,000 [default: 500].
    #[arg(long, env = "ATLAS_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Milliseconds without a heartbeat after which a member is marked dead, 200 to 600,000
    /// and at least twice the heartbeat [default: 3000].
    #[arg(long, env = "ATLAS_FAILURE_TIMEOUT_MS")]
    pub failure_timeout_ms: Option<u64>,
    /// Entries of each replicated log between two snapshots (each entry carries up to a few hundred
    /// changes); older entries are then removed. 10 to 100,000,000 [default: 50000].
    #[arg(long, env = "ATLAS_LOG_SNAPSHOT_ENTRIES")]
    pub log_snapshot_entries: Option<u64>,
    /// Number of shards, each with a replicated log of its own, 1 to 256; every node of a
    /// cluster must use the same number [default: 16].
    #[arg(long, env = "ATLAS_SHARDS")]
    pub shards: Option<u32>,
    /// Replicas of each shard in the placement, and voters that the shard logs wait for
    /// before they start, 1 to 9 [default: 3].
    #[arg(long, env = "ATLAS_REPLICATION")]
    pub replication: Option<u32>,
    /// Register unknown device keys at login under any free account name (development and
    /// benchmarks only).
    #[arg(long, env = "ATLAS_OPEN_REGISTRATION")]
    pub open_registration: bool,
    /// WebAuthn relying party id [default: the server name].
    #[arg(long, env = "ATLAS_RP_ID")]
    pub rp_id: Option<String>,
    /// Origin of passkey pages [default: https://<server name>:<listen port>].
    #[arg(long, env = "ATLAS_RP_ORIGIN")]
    pub rp_origin: Option<String>,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "ATLAS_ACCESS_TOKEN_TTL_SECS")]
    pub access_token_ttl_secs: Option<u64>,
    /// Seconds a client has to finish a passkey ceremony.
    #[arg(long, env = "ATLAS_CEREMONY_TTL_SECS")]
    pub ceremony_ttl_secs: Option<u64>,
    /// Require a server nonce in DPoP proofs.
    #[arg(long, env = "ATLAS_DPOP_NONCES")]
    pub dpop_nonces: bool,
    /// Seconds after a passkey login during which its tokens may add or remove passkeys.
    #[arg(long, env = "ATLAS_REAUTHENTICATION_WINDOW_SECS")]
    pub reauthentication_window_secs: Option<u64>,
}

impl NodeFlags {
    /// Builds the effective config: defaults, then the file, then flags and environment.
    pub fn resolve(&self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read config file {}: {e}", path.display())
                })?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?
            }
            None => NodeConfig::default(),
        };
        macro_rules! take_option {
            ($($field:ident),*) => {$(
                if let Some(value) = &self.$field {
                    config.$field = Some(value.clone());
                }
            )*};
        }
        macro_rules! take {
            ($($field:ident),*) => {$(
                if let Some(value) = &self.$field {
                    config.$field = value.clone().into();
                }
            )*};
        }
        take!(
            data_dir,
            listen,
            metrics_listen,
            server_name,
            workers,
            queue_capacity
        );
        take!(
            ping_interval_secs,
            idle_timeout_secs,
            log_format,
            queue_max_bytes
        );
        take!(
            signing_key_rotation_secs,
            signing_key_grace_secs,
            tree_head_interval_secs
        );
        if let Some(secret) = &self.signing_key_secret {
            config.signing_key_secret = Some(Secret(secret.clone()));
        }
        take!(
            node_name,
            heartbeat_ms,
            failure_timeout_ms,
            log_snapshot_entries,
            shards,
            replication,
            max_unauthenticated
        );
        take!(
            access_token_ttl_secs,
            ceremony_ttl_secs,
            reauthentication_window_secs
        );
        take_option!(rp_id, rp_origin);
        config.open_registration |= self.open_registration;
        config.dpop_nonces |= self.dpop_nonces;
        if let Some(seeds) = &self.seeds {
            config.seeds = seeds.clone();
        }
        if let Some(cookie) = &self.cluster_cookie {
            config.cluster_cookie = Some(Secret(cookie.clone()));
        }
        take_option!(
            cluster_listen,
            cluster_advertise,
            cluster_ca,
            cluster_cert,
            cluster_key
        );
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls_cert = Some(cert.clone());
            config.tls_key = Some(key.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

impl NodeConfig {
    /// Checks every numeric setting against its allowed range.
    fn validate(&self) -> anyhow::Result<()> {
        let ranges: [(&str, u64, u64, u64); 22] = [
            (
                "reauthentication_window_secs",
                self.reauthentication_window_secs,
                1,
                86_400,
            ),
            (
                "access_token_ttl_secs",
                self.access_token_ttl_secs,
                1,
                86_400,
            ),
            (
                "refresh_token_ttl_secs",
                self.refresh_token_ttl_secs,
                60,
                365 * 86_400,
            ),
            ("ceremony_ttl_secs", self.ceremony_ttl_secs, 1, 3600),
            ("dpop_window_secs", self.dpop_window_secs, 1, 3600),
            (
                "dpop_replay_capacity",
                self.dpop_replay_capacity as u64,
                100,
                100_000_000,
            ),
            ("workers", self.workers as u64, 0, 256),
            ("queue_capacity", self.queue_capacity as u64, 1, 1_000_000),
            (
                "queue_max_bytes",
                self.queue_max_bytes as u64,
                64 * 1024,
                1 << 30,
            ),
            ("ping_interval_secs", self.ping_interval_secs, 1, 3600),
            ("idle_timeout_secs", self.idle_timeout_secs, 2, 86_400),
            ("group_idle_secs", self.group_idle_secs, 1, 86_400),
            ("retention_days", self.retention_days, 1, 36_500),
            (
                "signing_key_rotation_secs",
                self.signing_key_rotation_secs,
                60,
                10 * 365 * 86_400,
            ),
            (
                "signing_key_grace_secs",
                self.signing_key_grace_secs,
                0,
                10 * 365 * 86_400,
            ),
            (
                "tree_head_interval_secs",
                self.tree_head_interval_secs,
                1,
                3600,
            ),
            ("heartbeat_ms", self.heartbeat_ms, 50, 60_000),
            (
                "max_unauthenticated",
                self.max_unauthenticated as u64,
                1,
                1_000_000,
            ),
            ("failure_timeout_ms", self.failure_timeout_ms, 200, 600_000),
            (
                "log_snapshot_entries",
                self.log_snapshot_entries,
                10,
                100_000_000,
            ),
            ("shards", u64::from(self.shards), 1, 256),
            ("replication", u64::from(self.replication), 1, 9),
        ];
        for (name, value, min, max) in ranges {
            anyhow::ensure!(
                (min..=max).contains(&value),
                "{name} = {value} is out of range, use a value from {min} to {max}"
            );
        }
        anyhow::ensure!(
            self.failure_timeout_ms >= 2 * self.heartbeat_ms,
            "failure_timeout_ms = {} must be at least twice heartbeat_ms = {}, or every member \
             would look dead between two heartbeats",
            self.failure_timeout_ms,
            self.heartbeat_ms
        );
        anyhow::ensure!(
            valid_node_name(&self.node_name),
            "node_name {:?} is invalid: use 1 to 64 characters from a-z, A-Z, 0-9, '.', '_', '-'",
            self.node_name.chars().take(80).collect::<String>()
        );
        let listeners = [
            ("listen", Some(self.listen)),
            ("metrics_listen", Some(self.metrics_listen)),
            ("cluster_listen", self.cluster_listen),
        ];
        for (i, (name, address)) in listeners.iter().enumerate() {
            let Some(address) = address.filter(|a| a.port() != 0) else {
                continue;
            };
            if let Some((other, _)) = listeners[i + 1..]
                .iter()
                .find(|(_, other)| *other == Some(address))
            {
                anyhow::bail!(
                    "{name} and {other} are both {address}: give each listener its own port"
                );
            }
        }
        if self.cluster_listen.is_some() {
            let missing: Vec<&str> = [
                ("cluster_cookie", self.cluster_cookie.is_none()),
                ("cluster_ca", self.cluster_ca.is_none()),
                ("cluster_cert", self.cluster_cert.is_none()),
                ("cluster_key", self.cluster_key.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, missing)| missing.then_some(name))
            .collect();
            anyhow::ensure!(
                missing.is_empty(),
                "cluster_listen is set but {} missing: create the CA and node certificate with \
                 `atlas cert ca` and `atlas cert node NAME`, and give every node the same cookie",
                missing.join(", ")
            );
            let advertised = self.cluster_advertise.or(self.cluster_listen);
            if let Some(address) = advertised.filter(|a| a.ip().is_unspecified()) {
                anyhow::bail!(
                    "the cluster address other nodes dial would be {address}, which names no \
                     host: set cluster_advertise (--cluster-advertise) to this node's IP \
                     address and port"
                );
            }
            let cookie_len = self.cluster_cookie.as_ref().map_or(0, |c| c.0.len());
            anyhow::ensure!(
                cookie_len >= MIN_COOKIE_BYTES,
                "cluster_cookie has {cookie_len} bytes, fewer than {MIN_COOKIE_BYTES}: use a long \
                 random secret, for example `head -c 24 /dev/urandom | base64`"
            );
        } else {
            anyhow::ensure!(
                self.seeds.is_empty(),
                "seeds are set but cluster_listen is not: a node joins a cluster only with a \
                 cluster listener"
            );
        }
        Ok(())
    }

    /// Parses the configured signing key secret, if any.
    pub fn parsed_signing_key_secret(&self) -> anyhow::Result<Option<[u8; 32]>> {
        let Some(Secret(text)) = &self.signing_key_secret else {
            return Ok(None);
        };
        // The value is a secret: the error names its length, never its content.
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "signing_key_secret must be 64 hex digits (32 bytes), got {} characters; \
                     generate one with `openssl rand -hex 32`",
                    text.trim().len()
                )
            })?;
        Ok(Some(bytes))
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
}

/// Parses a cluster address, which must be an IP address and port: host names are not
/// resolved.
fn parse_cluster_address(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?} is not an IP:port address; host names are not resolved, so give the \
             node's IP address, such as 127.0.0.1:7001"
        )
    })
}

/// Returns whether `name` can name a node: 1 to 64 characters from a-z, A-Z, 0-9, '.', '_'
/// and '-'.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("atlas.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:7000\"\nqueue_capacity = 8\n").unwrap();
        let flags = NodeFlags {
            config: Some(file),
            queue_capacity: Some(16),
            ..NodeFlags::default()
        };
        let config = flags.resolve().unwrap();
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 7000)));
        assert_eq!(config.queue_capacity, 16);
        assert_eq!(config.server_name, "localhost");
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("atlas.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:7000\"\n").unwrap();
        let flags = NodeFlags {
            config: Some(file.clone()),
            ..NodeFlags::default()
        };
        let err = flags.resolve().unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
    }

    #[test]
    fn signing_key_secret_must_be_32_hex_bytes() {
        let short = NodeFlags {
            signing_key_secret: Some("abcd".into()),
            ..NodeFlags::default()
        };
        let err = short
            .resolve()
            .unwrap()
            .parsed_signing_key_secret()
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        assert!(
            !err.contains("abcd"),
            "the error must not echo the secret: {err}"
        );
        let good = NodeFlags {
            signing_key_secret: Some("11".repeat(32)),
            ..NodeFlags::default()
        };
        let parsed = good.resolve().unwrap().parsed_signing_key_secret().unwrap();
        assert_eq!(parsed, Some([0x11; 32]));
    }

    #[test]
    fn zero_queue_capacity_is_refused() {
        let flags = NodeFlags {
            queue_capacity: Some(0),
            ..NodeFlags::default()
        };
        assert!(flags.resolve().is_err());
    }

    #[test]
    fn short_cluster_cookie_is_refused() {
        let flags = |cookie: &str| NodeFlags {
            cluster_listen: Some("127.0.0.1:7001".parse().unwrap()),
            cluster_ca: Some("ca.pem".into()),
            cluster_cert: Some("node.pem".into()),
            cluster_key: Some("node-key.pem".into()),
            cluster_cookie: Some(cookie.into()),
            ..NodeFlags::default()
        };
        let error = flags("short").resolve().unwrap_err().to_string();
        assert!(error.contains("cluster_cookie has 5 bytes"), "{error}");
        assert!(flags("a-cookie-of-24-bytes-ok!").resolve().is_ok());
    }

    #[test]
    fn cluster_address_must_be_dialable_ip() {
        let error = parse_cluster_address("localhost:7001").unwrap_err();
        assert!(error.contains("host names are not resolved"), "{error}");
        assert!(parse_cluster_address("127.0.0.1:7001").is_ok());

        let flags = |listen: &str, advertise: Option<&str>| NodeFlags {
            cluster_listen: Some(listen.parse().unwrap()),
            cluster_advertise: advertise.map(|a| a.parse().unwrap()),
            cluster_ca: Some("ca.pem".into()),
            cluster_cert: Some("node.pem".into()),
            cluster_key: Some("node-key.pem".into()),
            cluster_cookie: Some("a-cookie-of-24-bytes-ok!".into()),
            ..NodeFlags::default()
        };
        for (listen, advertise) in [
            ("0.0.0.0:7001", None),
            ("127.0.0.1:7001", Some("[::]:7001")),
        ] {
            let error = flags(listen, advertise).resolve().unwrap_err().to_string();
            assert!(error.contains("set cluster_advertise"), "{error}");
        }
        assert!(
            flags("0.0.0.0:7001", Some("10.0.0.5:7001"))
                .resolve()
                .is_ok()
        );
    }

    #[test]
    fn listeners_need_their_own_ports() {
        let flags = |listen: &str, metrics: &str| NodeFlags {
            listen: Some(listen.parse().unwrap()),
            metrics_listen: Some(metrics.parse().unwrap()),
            ..NodeFlags::default()
        };
        let error = flags("127.0.0.1:7000", "127.0.0.1:7000")
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("listen and metrics_listen are both 127.0.0.1:7000"),
            "{error}"
        );
        assert!(flags("127.0.0.1:0", "127.0.0.1:0").resolve().is_ok());
        assert!(flags("127.0.0.1:7000", "127.0.0.1:7001").resolve().is_ok());
    }

    #[test]
    fn shard_and_replica_flags_are_checked() {
        let flags = |shards: u32, replication: u32| NodeFlags {
            shards: Some(shards),
            replication: Some(replication),
            ..NodeFlags::default()
        };
        let config = flags(4, 5).resolve().unwrap();
        assert_eq!((config.shards, config.replication), (4, 5));
        let error = flags(0, 3).resolve().unwrap_err().to_string();
        assert!(error.contains("shards = 0 is out of range"), "{error}");
        let error = flags(1000, 3).resolve().unwrap_err().to_string();
        assert!(error.contains("shards = 1000 is out of range"), "{error}");
        let error = flags(16, 0).resolve().unwrap_err().to_string();
        assert!(error.contains("replication = 0 is out of range"), "{error}");
    }
}
