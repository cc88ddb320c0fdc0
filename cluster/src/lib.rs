//! The node-local routing seam: where a group's actor runs and where a device is connected.
//!
//! Gateway sessions call [`Router`] for every group request and register their outbound queue
//! in [`Presence`]. On a single node both resolve locally; a cluster replaces their insides
//! (remote actor references, presence by node) while sessions keep calling the same methods.

mod forward;
mod links;
mod membership;
mod placement;
mod presence;
pub mod replication;
mod router;
pub mod tls;

pub use forward::{ForwardHandler, Forwarder, ForwarderMsg, GroupOwners};
pub use membership::{
    Cluster, ClusterSettings, Layout, MEMBERSHIP_GROUP, MemberState, MemberView, MembershipMsg,
    MembershipObserver, bootstrap_wait,
};
pub use placement::{NodeName, ShardId, replicas, shard_of};
pub use presence::{Outbound, OutboundReceiver, Presence, SessionHandle};
pub use router::Router;
