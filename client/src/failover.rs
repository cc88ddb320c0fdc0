//! Connections to a cluster: a client knows several nodes, moves to another one when its node
//! fails, and retries a send (under the same message id) or a read of a group there.

use crate::{Client, ClientError, Received, ServerTrust, new_msg_id};
use atlas_protocol::{ErrorCode, GroupId};
use std::time::{Duration, Instant};

/// A node of a cluster, as a client reaches it.
#[derive(Debug, Clone)]
pub struct NodeAddress {
    /// `wss://host:port/v1/ws`
    pub url: String,
    pub trust: ServerTrust,
}

/// Time [`Client::send_reliably`] keeps trying before it gives up.
const SEND_DEADLINE: Duration = Duration::from_secs(30);

/// Pause between two rounds over every node.
const ROUND_PAUSE: Duration = Duration::from_millis(250);

/// Time a node of a list of several gets to accept a connection and send its login
/// challenge before the next one is tried. The kernel accepts TCP connections for a paused
/// process (SIGSTOP), which then never replies. A live node usually replies within
/// milliseconds.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time one attempt of [`Client::send_reliably`] may take, with several nodes to try, before
/// the next node is tried. Shorter than [`SEND_DEADLINE`], so a node that stopped replying
/// leaves time for others.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects to one of `nodes`, trying them in turn from the one used last, and remembers
    /// the list for [`Client::fail_over`]. Returns the index of the node connected.
    pub async fn connect_any(&mut self, nodes: &[NodeAddress]) -> Result<usize, ClientError> {
        if nodes.is_empty() {
            return Err(ClientError::Config("no node addresses given".into()));
        }
        if self.nodes.len() != nodes.len()
            || self.nodes.iter().zip(nodes).any(|(a, b)| a.url != b.url)
        {
            self.nodes = nodes.to_vec();
            self.node_index = 0;
        }
        self.connect_from(self.node_index).await
    }

    /// Returns the node of the list given to [`Client::connect_any`] that this client uses now.
    pub fn current_node(&self) -> Option<&NodeAddress> {
        self.conn.as_ref().and(self.nodes.get(self.node_index))
    }

    /// Leaves the current node and connects to the next one of the list given to
    /// [`Client::connect_any`] that accepts, then syncs every group from its cursor. Returns
    /// the index of the node connected.
    ///
    /// The events that sync reads advance the cursors, so no later read returns them again.
    /// They wait in the client until [`Client::take_missed`], [`Client::sync`] or, for
    /// one group, [`Client::sync_group`] returns them.
    pub async fn fail_over(&mut self) -> Result<usize, ClientError> {
        if self.nodes.is_empty() {
            return Err(ClientError::Config(
                "no node list to fail over to; connect with connect_any first".into(),
            ));
        }
        self.disconnect();
        let index = self.connect_from(self.node_index + 1).await?;
        let events = self.sync().await?;
        self.missed = events;
        Ok(index)
    }

    /// Returns the events that the sync of a failover read (messages and membership changes
    /// of every group, and groups joined), in the order read, and clears them. A failover
    /// happens inside [`Client::send_reliably`] and [`Client::sync_group_reliably`]; call
    /// this after them to show what arrived meanwhile.
    pub fn take_missed(&mut self) -> Vec<Received> {
        std::mem::take(&mut self.missed)
    }

    async fn connect_from(&mut self, first: usize) -> Result<usize, ClientError> {
        let count = self.nodes.len();
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let node = self.nodes[index].clone();
            let limit = (count > 1).then_some(NODE_CONNECT_TIMEOUT);
            let connected = bounded(
                limit,
                "no login challenge",
                self.connect(&node.url, &node.trust),
            );
            match connected.await {
                Ok(_) => {
                    self.node_index = index;
                    return Ok(index);
                }
                // A key transparency violation is about the data, not the node: stop.
                Err(e @ ClientError::Security(_)) => return Err(e),
                Err(e) => failures.push(format!("{}: {e}", node.url)),
            }
        }
        Err(ClientError::Connect(format!(
            "no node accepted the connection: {}",
            failures.join("; ")
        )))
    }

    /// Sends a text message like [`Client::send`], and when the node fails or cannot commit
    /// (`unavailable`), moves to another node of the list and sends again under the same
    /// message id, so the message is stored once. Gives up after 30 seconds.
    pub async fn send_reliably(&mut self, group: &GroupId, text: &str) -> Result<u64, ClientError> {
        let msg_id = new_msg_id();
        let deadline = Instant::now() + SEND_DEADLINE;
        let mut attempts = 0;
        loop {
            // Cancelling an attempt is safe: the text stays recorded as unacknowledged, and the
            // next attempt uses the same message id, so the node stores the message once.
            let limit = (self.nodes.len() > 1).then_some(ATTEMPT_TIMEOUT);
            let attempt = bounded(
                limit,
                "no acknowledgement",
                self.send_with_id(group, text, msg_id),
            );
            let failure = match attempt.await {
                Ok(seq) => return Ok(seq),
                Err(e) if retriable(&e) => e,
                Err(e) => return Err(e),
            };
            attempts += 1;
            if Instant::now() >= deadline {
                return Err(failure);
            }
            tracing::debug!(attempts, error = %failure, "send failed; trying another node");
            if attempts % self.nodes.len().max(1) == 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            if self.nodes.is_empty() {
                tokio::time::sleep(ROUND_PAUSE).await;
                continue;
            }
            if let Err(e) = self.fail_over().await {
                tracing::debug!(error = %e, "no node to fail over to yet");
                tokio::time::sleep(ROUND_PAUSE).await;
            }
        }
    }
}

impl Client {
    /// Reads one group's log as [`Client::sync_group`] does. With several nodes given to
    /// [`Client::connect_any`], a node that cannot serve the read (lost connection, timeout,
    /// `unavailable`) is left for the next one, until the same deadline as a reliable send.
    /// The group's events that a failover read come first (see [`Client::sync_group`]); those
    /// of other groups wait for [`Client::take_missed`].
    pub async fn sync_group_reliably(
        &mut self,
        group: &GroupId,
    ) -> Result<Vec<Received>, ClientError> {
        let deadline = Instant::now() + SEND_DEADLINE;
        let mut attempts = 0;
        loop {
            let limit = (self.nodes.len() > 1).then_some(ATTEMPT_TIMEOUT);
            let failure = match bounded(limit, "no answer", self.sync_group(group)).await {
                Ok(events) => return Ok(events),
                Err(e) if retriable(&e) && self.nodes.len() > 1 => e,
                Err(e) => return Err(e),
            };
            attempts += 1;
            if Instant::now() >= deadline {
                return Err(failure);
            }
            tracing::debug!(attempts, error = %failure, "read failed; trying another node");
            if attempts % self.nodes.len() == 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            if let Err(e) = self.fail_over().await {
                tracing::debug!(error = %e, "no node to fail over to yet");
                tokio::time::sleep(ROUND_PAUSE).await;
            }
        }
    }
}

/// Runs `future`, for at most `limit` when one is given. A timeout fails with a
/// `ClientError::Connect` that starts with `missing`.
async fn bounded<T>(
    limit: Option<Duration>,
    missing: &str,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let Some(limit) = limit else {
        return future.await;
    };
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Connect(format!(
                "{missing} within {} s",
                limit.as_secs()
            )))
        })
}

/// Returns whether a failed send may succeed on another node or later.
pub(crate) fn retriable(error: &ClientError) -> bool {
    match error {
        ClientError::Server { code, .. } => *code == ErrorCode::Unavailable,
        ClientError::Disconnected(_)
        | ClientError::NotConnected
        | ClientError::Timeout(_)
        | ClientError::Connect(_) => true,
        _ => false,
    }
}
