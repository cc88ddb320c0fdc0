//! Group owners: each group's sends and commits are validated by one node, its owner, so
//! that the actors of one group on different nodes do not race for sequence numbers.
//!
//! The owner is the leader of the log of the group's shard, so that the node that validates
//! a request also writes it; while no leader is known, the first replica of the shard among
//! the live members (rendezvous hashing, see [`crate::replicas`]) stands in. Other nodes
//! forward a device's request to the owner's [`Forwarder`] over the cluster links. While
//! leadership moves, two nodes may both act as owner for a moment. The shard's log still
//! orders their appends, and the node whose append conflicts reloads the group and validates
//! again.

use crate::membership::{Cluster, MemberState};
use crate::placement::{NodeName, replicas, shard_of};
use crate::replication::ReplicatedLogs;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, pg};
use ractor_cluster::RactorClusterMessage;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Time an owner has to reply to a forwarded request, which waits for a commit on a majority.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a forwarded request checks that its node still owns the group. A request with
/// a reply sooner never checks.
const OWNER_CHECK: Duration = Duration::from_millis(500);

/// How long a forwarded request keeps waiting after its node stopped owning the group. It
/// leaves an owner that runs time to finish a request it took before the change.
const OWNER_CHANGE_GRACE: Duration = Duration::from_secs(1);

/// Process group of the forwarder of the node named `node`.
fn group(node: &str) -> String {
    format!("atlas.forward.{node}")
}

/// Handles a forwarded request (MessagePack bytes) and returns the encoded reply.
pub type ForwardHandler =
    Arc<dyn Fn(Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> + Send + Sync>;

/// Messages of a forwarder. They cross the network, so they serialize.
#[derive(RactorClusterMessage)]
pub enum ForwarderMsg {
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// The actor that serves requests forwarded to this node.
pub struct Forwarder;

impl Actor for Forwarder {
    type Msg = ForwarderMsg;
    type State = ForwardHandler;
    type Arguments = (String, ForwardHandler);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (node, handler): (String, ForwardHandler),
    ) -> Result<ForwardHandler, ActorProcessingErr> {
        pg::join(group(&node), vec![myself.get_cell()]);
        Ok(handler)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        handler: &mut ForwardHandler,
    ) -> Result<(), ActorProcessingErr> {
        let ForwarderMsg::Call(bytes, reply) = message;
        let answer = handler(bytes);
        // Requests wait for commits; the actor keeps taking requests meanwhile.
        tokio::spawn(async move {
            let _ = reply.send(answer.await);
        });
        Ok(())
    }
}

/// Finds the owner of a group and forwards requests to it.
pub struct GroupOwners {
    cluster: Arc<Cluster>,
    shards: u32,
    /// The node's replicated logs, whose shard leaders own the groups; set once they run.
    logs: OnceLock<Arc<ReplicatedLogs>>,
}

impl GroupOwners {
    /// Starts this node's forwarder, which serves forwarded requests with `handler`.
    pub async fn start(
        cluster: Arc<Cluster>,
        shards: u32,
        handler: ForwardHandler,
    ) -> anyhow::Result<(Self, ActorRef<ForwarderMsg>)> {
        let node = cluster.node_name().to_owned();
        let (actor, _) = Actor::spawn(None, Forwarder, (node, handler)).await?;
        let owners = Self {
            cluster,
            shards,
            logs: OnceLock::new(),
        };
        Ok((owners, actor))
    }

    /// Makes the leaders of the shard logs in `logs` the owners of their groups.
    pub fn follow_leaders(&self, logs: Arc<ReplicatedLogs>) {
        if self.logs.set(logs).is_err() {
            tracing::warn!("group owners follow a set of logs already; keeping the first");
        }
    }

    /// Returns the name of the node that owns the group with id `group_id`, or `None` when
    /// this node owns it.
    pub fn owner(&self, group_id: &[u8]) -> Option<String> {
        let live: Vec<NodeName> = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| matches!(m.state, MemberState::Local | MemberState::Alive))
            .map(|m| NodeName(m.name))
            .collect();
        let shard = shard_of(group_id, self.shards);
        let leader = self
            .logs
            .get()
            .and_then(|logs| logs.shard_leader(shard))
            .filter(|name| live.iter().any(|n| n.0 == *name));
        let owner = match leader {
            Some(leader) => leader,
            None => replicas(shard, &live, 1).into_iter().next()?.0,
        };
        (owner != self.cluster.node_name()).then_some(owner)
    }

    /// Sends an encoded request for the group with id `group_id` to the forwarder of `node`,
    /// its owner, and returns the encoded reply. Stops waiting [`OWNER_CHANGE_GRACE`] after
    /// `node` stops owning the group (it is marked dead, or the group's shard log elected
    /// another leader), so that the caller turns to the new owner instead of waiting out
    /// [`FORWARD_TIMEOUT`] for a paused node. As after a timeout, whether `node` stored the
    /// request is unknown. The group's sequence numbers and the client's message id keep a
    /// second attempt from storing it twice.
    pub async fn forward_for(
        &self,
        group_id: &[u8],
        node: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        tokio::select! {
            biased;
            reply = self.forward(node, request) => reply,
            moved = self.owner_moved(group_id, node) => Err(moved),
        }
    }

    /// Returns once `node` has not owned the group with id `group_id` for
    /// [`OWNER_CHANGE_GRACE`], checking every [`OWNER_CHECK`].
    async fn owner_moved(&self, group_id: &[u8], node: &str) -> String {
        let mut checks = tokio::time::interval(OWNER_CHECK);
        // The first tick is immediate: the owner was just looked up.
        checks.tick().await;
        loop {
            checks.tick().await;
            if self.owner(group_id).as_deref() == Some(node) {
                continue;
            }
            tokio::time::sleep(OWNER_CHANGE_GRACE).await;
            match self.owner(group_id) {
                Some(owner) if owner == node => continue,
                now => {
                    let now = now.unwrap_or_else(|| self.cluster.node_name().to_owned());
                    return format!(
                        "node {node} stopped owning the group (now {now}) while the request \
                         waited for its answer"
                    );
                }
            }
        }
    }

    /// Sends an encoded request to the forwarder of `node` and returns its encoded reply.
    pub async fn forward(&self, node: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let Some(forwarder) = pg::get_members(&group(node)).into_iter().next() else {
            return Err(format!("no link to node {node}"));
        };
        let answer = ractor::rpc::call(
            &forwarder,
            |port| ForwarderMsg::Call(request, port),
            Some(FORWARD_TIMEOUT),
        )
        .await
        .map_err(|e| format!("forwarding to node {node} failed: {e}"))?;
        match answer {
            ractor::rpc::CallResult::Success(reply) => Ok(reply),
            ractor::rpc::CallResult::Timeout => Err(format!(
                "node {node} did not answer within {} s",
                FORWARD_TIMEOUT.as_secs()
            )),
            ractor::rpc::CallResult::SenderError => {
                Err(format!("node {node} dropped the forwarded request"))
            }
        }
    }
}
