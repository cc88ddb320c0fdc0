//! Raft messages over the cluster's ractor_cluster links (mutual TLS and the cookie).
//!
//! Every node runs one [`RaftEndpoint`] actor per replicated log, in the process group named
//! after the log and the node's raft id. A request to another replica is a remote call to
//! the endpoint in that replica's group, carrying the openraft request as MessagePack.

use super::{RaftNodeId, TypeConfig, encode};
use crate::replication::Raft;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, pg};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Time a replica has to reply to one raft request.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Process group of the endpoint of `node` for the log named `log`.
fn group(log: &str, node: RaftNodeId) -> String {
    format!("atlas.raft.{log}.{node}")
}

/// Messages of a raft endpoint. They cross the network, so they serialize.
#[derive(RactorClusterMessage)]
pub(crate) enum RaftEndpointMsg {
    /// A MessagePack [`Request`]; the reply is a MessagePack [`Reply`].
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

#[derive(Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftNodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<RaftNodeId>, RaftError<RaftNodeId>>),
    Vote(Result<VoteResponse<RaftNodeId>, RaftError<RaftNodeId>>),
    Snapshot(
        Result<InstallSnapshotResponse<RaftNodeId>, RaftError<RaftNodeId, InstallSnapshotError>>,
    ),
    /// The request did not decode.
    Invalid(String),
}

/// The actor that hands raft requests from other nodes to the local replica.
pub(super) struct RaftEndpoint;

/// Arguments of [`RaftEndpoint`].
pub(super) struct EndpointArgs {
    pub log: String,
    pub node: RaftNodeId,
    pub raft: Raft,
}

impl Actor for RaftEndpoint {
    type Msg = RaftEndpointMsg;
    type State = Raft;
    type Arguments = EndpointArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EndpointArgs,
    ) -> Result<Raft, ActorProcessingErr> {
        pg::join(group(&args.log, args.node), vec![myself.get_cell()]);
        Ok(args.raft)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        raft: &mut Raft,
    ) -> Result<(), ActorProcessingErr> {
        let RaftEndpointMsg::Call(bytes, reply) = message;
        let raft = raft.clone();
        // Appends wait for an fsync; the actor keeps taking requests meanwhile.
        tokio::spawn(async move {
            let answer = match rmp_serde::from_slice::<Request>(&bytes) {
                Ok(Request::Append(request)) => Reply::Append(raft.append_entries(request).await),
                Ok(Request::Vote(request)) => Reply::Vote(raft.vote(request).await),
                Ok(Request::Snapshot(request)) => {
                    Reply::Snapshot(raft.install_snapshot(request).await)
                }
                Err(e) => Reply::Invalid(e.to_string()),
            };
            let _ = reply.send(encode(&answer));
        });
        Ok(())
    }
}

/// Creates connections to the endpoints of other replicas of the log named `log`.
#[derive(Clone)]
pub(super) struct ClusterNetwork {
    pub log: String,
}

/// A connection to one replica.
pub(super) struct ClusterLink {
    log: String,
    target: RaftNodeId,
}

impl RaftNetworkFactory<TypeConfig> for ClusterNetwork {
    type Network = ClusterLink;

    async fn new_client(&mut self, target: RaftNodeId, _node: &BasicNode) -> ClusterLink {
        ClusterLink {
            log: self.log.clone(),
            target,
        }
    }
}

fn unreachable<E: std::error::Error>(detail: String) -> RPCError<RaftNodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(detail)))
}

impl ClusterLink {
    /// Sends `request` to the target's endpoint and decodes its reply.
    async fn call<E: std::error::Error>(
        &self,
        request: &Request,
    ) -> Result<Reply, RPCError<RaftNodeId, BasicNode, E>> {
        let Some(endpoint) = pg::get_members(&group(&self.log, self.target))
            .into_iter()
            .next()
        else {
            return Err(unreachable(format!(
                "no link to raft node {} of log {}",
                self.target, self.log
            )));
        };
        let bytes = encode(request);
        let answer = ractor::rpc::call(
            &endpoint,
            |port| RaftEndpointMsg::Call(bytes, port),
            Some(CALL_TIMEOUT),
        )
        .await
        .map_err(|e| unreachable(format!("raft call to node {} failed: {e}", self.target)))?;
        let raw = match answer {
            ractor::rpc::CallResult::Success(raw) => raw,
            ractor::rpc::CallResult::Timeout => {
                return Err(unreachable(format!(
                    "raft node {} did not answer within {} s",
                    self.target,
                    CALL_TIMEOUT.as_secs()
                )));
            }
            ractor::rpc::CallResult::SenderError => {
                return Err(unreachable(format!(
                    "raft node {} dropped the request",
                    self.target
                )));
            }
        };
        rmp_serde::from_slice(&raw).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn invalid<E: std::error::Error>(detail: String) -> RPCError<RaftNodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(detail)))
}

impl RaftNetwork<TypeConfig> for ClusterLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        match self.call(&Request::Append(rpc)).await? {
            Reply::Append(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to append_entries".into())),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        match self.call(&Request::Snapshot(rpc)).await? {
            Reply::Snapshot(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to install_snapshot".into())),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        match self.call(&Request::Vote(rpc)).await? {
            Reply::Vote(result) => result.map_err(|e| {
                RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e))
            }),
            Reply::Invalid(detail) => Err(invalid(detail)),
            _ => Err(invalid("wrong reply to vote".into())),
        }
    }
}
