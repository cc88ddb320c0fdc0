//! Requests about device keys: key transparency queries (also allowed before login), the JWKS,
//! KeyPackage claims with their inclusion proof, revocations and rotations.

use crate::GatewayState;
use atlas_actors::KtError;
use atlas_actors::directory::valid_account;
use atlas_protocol::{ClientBody, DeviceId, ErrorCode, ServerBody};
use atlas_storage::{DeviceRecord, ReadScope};

/// Maximum wait of a JWKS request for this node to apply the directory's committed changes.
const JWKS_BARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Returns the JWKS once this node has applied every change the directory committed before
/// the call, so that it lists a key that another node published before signing with it
/// (a rotation). Without a majority it serves the keys it has after [`JWKS_BARRIER_WAIT`].
pub(crate) async fn current_jwks(state: &GatewayState) -> atlas_protocol::transparency::Jwks {
    let barrier = state.store.read_barrier(ReadScope::Directory);
    match tokio::time::timeout(JWKS_BARRIER_WAIT, barrier).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "serving the JWKS without the directory's latest changes")
        }
        Err(_) => tracing::debug!(
            wait_ms = JWKS_BARRIER_WAIT.as_millis() as u64,
            "serving the JWKS without the directory's latest changes: the read barrier timed out"
        ),
    }
    state.kt.jwks()
}

/// Serves a request that reads only public key transparency data.
pub(crate) async fn public_request(state: &GatewayState, body: ClientBody) -> ServerBody {
    let kt = &state.kt;
    // Heads and proofs must cover every entry any node's head covered, because clients
    // record a smaller head that a lagging node cannot prove as a rolled-back log. Lookups
    // must also show devices registered through any node.
    if !matches!(body, ClientBody::Ping | ClientBody::Jwks)
        && let Err(e) = state.store.read_barrier(ReadScope::Directory).await
    {
        return crate::session::barrier_error_body(&e);
    }
    let result = match body {
        ClientBody::Ping => Ok(ServerBody::Pong),
        ClientBody::Jwks => Ok(ServerBody::Jwks(current_jwks(state).await)),
        ClientBody::KtHead => kt.head().await.map(ServerBody::KtHead),
        ClientBody::KtLookup { account } | ClientBody::KtHistory { account, .. }
            if !valid_account(&account) =>
        {
            let shown: String = account.chars().take(80).collect();
            return crate::session::error_body(
                ErrorCode::InvalidAccount,
                format!(
                    "invalid account name {shown:?}: use 1 to 64 characters from a-z, 0-9, '.', '_', '-'"
                ),
            );
        }
        ClientBody::KtLookup { account } => kt
            .lookup(&account)
            .await
            .map(|(head, entries)| ServerBody::KtEntries { head, entries }),
        ClientBody::KtHistory { account, start } => kt
            .history(&account, start)
            .await
            .map(|(head, entries)| ServerBody::KtEntries { head, entries }),
        ClientBody::KtEntries { start, limit } => kt
            .entries(start, limit)
            .await
            .map(|(head, entries)| ServerBody::KtEntries { head, entries }),
        ClientBody::KtConsistency { from, to } => {
            kt.consistency(from, to).map(ServerBody::KtConsistency)
        }
        other => {
            return crate::session::error_body(
                ErrorCode::NotAuthenticated,
                format!("log in before sending {}", other.type_name()),
            );
        }
    };
    result.unwrap_or_else(|e| kt_error_body(&e))
}

/// Claims a KeyPackage and proves the key it was published under against a fresh head.
pub(crate) async fn claim(state: &GatewayState, target: DeviceId) -> ServerBody {
    let (key_package, record) = match state.directory.claim_key_package(&target).await {
        Ok(claimed) => claimed,
        Err(e) => return crate::session::login_error_body(state, &e),
    };
    // The head must cover every entry a head of another node covered (see `public_request`).
    if let Err(e) = state.store.read_barrier(ReadScope::Directory).await {
        return crate::session::barrier_error_body(&e);
    }
    // The head waits for a flush that also covers the claim's removal of a one-time package.
    let head = match state.kt.head().await {
        Ok(head) => head,
        Err(e) => return kt_error_body(&e),
    };
    let Some(index) = record.kt_index.filter(|&i| i < head.size) else {
        tracing::error!(device_id = %target, "device has no key transparency entry");
        return crate::session::error_body(
            ErrorCode::Internal,
            format!("device {target} has no key transparency entry"),
        );
    };
    match state.kt.prove(index, &head) {
        Ok(proof) => ServerBody::KeyPackage {
            device: target,
            key_package: key_package.bytes,
            last_resort: key_package.last_resort,
            proof,
            head,
        },
        Err(e) => kt_error_body(&e),
    }
}

/// Revokes a device and closes its connection (the caller closes the signer's own connection
/// after the response when it revoked itself). The response waits until the change is on disk.
pub(crate) async fn revoke(
    state: &GatewayState,
    signer: &DeviceRecord,
    target: DeviceId,
    time_ms: u64,
    signature: &[u8],
) -> ServerBody {
    let index = match state
        .directory
        .revoke(signer, &target, time_ms, signature)
        .await
    {
        Ok(index) => index,
        Err(e) => {
            tracing::info!(device_id = %target, error = %e, "revocation rejected");
            return crate::session::login_error_body(state, &e);
        }
    };
    if let Err(e) = state.store.durable().await {
        return storage_failed(&e);
    }
    if target != signer.device {
        state
            .presence
            .close_device(&target, atlas_protocol::CloseCode::AuthFailed);
    }
    ServerBody::DeviceRevoked {
        device: target,
        index,
    }
}

/// Enrolls a new device in the signer's account (`enroll_device`) or replaces the signer's key
/// (`rotate_device_key`). The response waits until the change is on disk.
pub(crate) async fn add_device(
    state: &GatewayState,
    signer: &DeviceRecord,
    body: ClientBody,
) -> ServerBody {
    let (rotation, new_key, time_ms, signature, new_key_signature) = match body {
        ClientBody::EnrollDevice {
            new_key,
            time_ms,
            signature,
            new_key_signature,
        } => (false, new_key, time_ms, signature, new_key_signature),
        ClientBody::RotateDeviceKey {
            new_key,
            time_ms,
            signature,
            new_key_signature,
        } => (true, new_key, time_ms, signature, new_key_signature),
        other => {
            let message = format!("{} does not add a device", other.type_name());
            return crate::session::error_body(ErrorCode::Internal, message);
        }
    };
    let directory = &state.directory;
    let added = if rotation {
        directory
            .rotate(signer, &new_key, time_ms, &signature, &new_key_signature)
            .await
    } else {
        directory
            .enroll(signer, &new_key, time_ms, &signature, &new_key_signature)
            .await
    };
    let (record, index) = match added {
        Ok(added) => added,
        Err(e) => {
            tracing::info!(error = %e, rotation, "device key change rejected");
            return crate::session::login_error_body(state, &e);
        }
    };
    if let Err(e) = state.store.durable().await {
        return storage_failed(&e);
    }
    let device = record.device;
    if rotation {
        ServerBody::KeyRotated { device, index }
    } else {
        ServerBody::DeviceEnrolled { device, index }
    }
}

fn storage_failed(e: &atlas_storage::StorageError) -> ServerBody {
    tracing::error!(error = %e, "flush failed; key change not confirmed");
    crate::session::error_body(
        ErrorCode::StorageFailure,
        format!("storage flush failed: {e}"),
    )
}

fn kt_error_body(error: &KtError) -> ServerBody {
    if let KtError::Storage(e) = error {
        tracing::error!(error = %e, "key transparency storage failed");
    }
    crate::session::error_body(error.code(), error.to_string())
}
