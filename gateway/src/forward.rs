//! Sends and commits of a group whose owner is another node of the cluster. The session's
//! node forwards them to the owner, which validates, orders and stores them. The session's
//! node then signs the receipt again with its own key, which its clients know.

use crate::GatewayState;
use crate::session::{group_error_body, group_request_here};
use atlas_actors::ReceiptSigning;
use atlas_cluster::GroupOwners;
use atlas_protocol::receipts::ReceiptFields;
use atlas_protocol::{Accepted, ClientBody, DeviceId, ErrorCode, GroupId, LogEntry, ServerBody};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A device's request as the owner receives it. The forwarding node authenticated `sender`
/// and is itself authenticated by the cluster's mutual TLS and cookie.
#[derive(Serialize, Deserialize)]
struct Forwarded {
    sender: DeviceId,
    body: ClientBody,
}

/// Forwards a send or commit of `sender` to `owner`, the owner of `group`, and returns its
/// reply, with the receipt signed by this node. Fails when the owner cannot be reached,
/// replies with `unavailable`, or the accepted entry cannot be read here. The caller then
/// handles the request itself.
pub(crate) async fn submit_at_owner(
    state: &GatewayState,
    owners: &GroupOwners,
    owner: &str,
    group: &GroupId,
    sender: DeviceId,
    body: &ClientBody,
) -> Result<ServerBody, String> {
    let request = Forwarded {
        sender,
        body: body.clone(),
    };
    let bytes = rmp_serde::to_vec_named(&request).map_err(|e| e.to_string())?;
    let reply = owners.forward_for(group.as_bytes(), owner, bytes).await?;
    let reply: ServerBody = rmp_serde::from_slice(&reply)
        .map_err(|e| format!("undecodable reply from node {owner}: {e}"))?;
    match reply {
        ServerBody::Accepted(accepted) => {
            let payload = match body {
                ClientBody::Send { message, .. } => message.as_slice(),
                ClientBody::Commit { commit, .. } => commit.as_slice(),
                _ => &[],
            };
            let signed = sign_here(state, accepted, sender, payload).await?;
            Ok(ServerBody::Accepted(signed))
        }
        // An owner that could not write the entry (it stopped, or lost its log's leader)
        // leaves the request to this node, which writes through the log's current leader.
        // Whether the owner's write went through is unknown, as after a timeout: the
        // group's sequence numbers and the message id keep the entry from being stored twice.
        ServerBody::Error {
            code: ErrorCode::Unavailable,
            message,
            ..
        } => Err(format!("node {owner} could not store it: {message}")),
        // Any other error reply from the owner, such as a stale epoch, goes to the client as
        // it is.
        other => Ok(other),
    }
}

/// Replaces the owner's receipt with one signed by this node, whose keys the client fetched.
/// A new entry contains the request's payload. A retry's entry contains the original's,
/// which is read here once this node applied it.
async fn sign_here(
    state: &GatewayState,
    accepted: Accepted,
    sender: DeviceId,
    payload: &[u8],
) -> Result<Accepted, String> {
    let fields = if accepted.duplicate {
        let entry = applied_entry(state, &accepted).await?;
        ReceiptFields::new(
            accepted.group.clone(),
            accepted.seq,
            entry.sender,
            entry.accepted_at_ms,
            &entry.payload,
        )
    } else {
        ReceiptFields::new(
            accepted.group.clone(),
            accepted.seq,
            sender,
            accepted.accepted_at_ms,
            payload,
        )
    };
    let receipt = state
        .kt
        .keyring()
        .sign_receipt(&fields)
        .map_err(|e| format!("signing a receipt failed: {e}"))?;
    Ok(Accepted {
        receipt,
        ..accepted
    })
}

/// Time a node waits to apply an entry that the owner reported as committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Waits until the accepted entry is applied on this node, polling its storage: the owner
/// replied after a majority committed it, so this node applies it within a few milliseconds
/// unless it lags behind.
async fn applied_entry(state: &GatewayState, accepted: &Accepted) -> Result<LogEntry, String> {
    let deadline = Instant::now() + APPLY_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let stored = state
            .store
            .entry(&accepted.group, accepted.seq)
            .map_err(|e| e.to_string())?;
        match stored {
            Some(entry) => return Ok(entry),
            None if Instant::now() >= deadline => {
                return Err(format!(
                    "accepted entry {} of group {} was not applied here within {} s",
                    accepted.seq,
                    accepted.group,
                    APPLY_WAIT.as_secs()
                ));
            }
            None => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Serves a send or commit that another node forwarded: `bytes` is a MessagePack
/// [`Forwarded`], and the reply is the encoded [`ServerBody`].
pub async fn serve_forwarded(state: Arc<GatewayState>, bytes: Vec<u8>) -> Vec<u8> {
    let reply = match rmp_serde::from_slice::<Forwarded>(&bytes) {
        Ok(Forwarded { sender, body }) => {
            // The forwarding node signs the receipt again with its own key, so it is not
            // signed here.
            match group_request_here(&state, sender, body, ReceiptSigning::ByForwarder).await {
                Ok(reply) => reply,
                Err(e) => group_error_body(&state, &e),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "undecodable request forwarded by another node");
            crate::session::error_body(
                ErrorCode::MalformedFrame,
                format!("undecodable forwarded request: {e}"),
            )
        }
    };
    // Server bodies are plain structs and enums of bytes, strings and numbers, which
    // MessagePack encodes without failure.
    rmp_serde::to_vec_named(&reply).expect("server body serializes")
}
