//! Passkey ceremony state, kept in the node's memory between the start and finish requests.
//! Each ceremony is used at most once: finishing removes it whatever the outcome.
//!
//! NOTE: the state is per node; a client must finish a ceremony on the node that started it.

use super::AuthError;
use rand::RngCore;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use webauthn_rs::prelude::{PasskeyAuthentication, PasskeyRegistration};

/// The action a ceremony takes when it finishes.
pub(crate) enum CeremonyKind {
    /// Registers a passkey: creates `account` when `new_account`, otherwise adds to it.
    Registration {
        account: String,
        user_id: [u8; 16],
        new_account: bool,
        /// For a passkey added to an existing account: `auth_time` of the token that started
        /// it, checked again at the finish.
        login_time: Option<u64>,
        state: Box<PasskeyRegistration>,
    },
    /// Logs in to `account`.
    Authentication {
        account: String,
        state: Box<PasskeyAuthentication>,
    },
}

pub(crate) struct Ceremony {
    pub(crate) kind: CeremonyKind,
    /// Thumbprint of the DPoP key that started it; the finish must come with the same key.
    pub(crate) jkt: String,
    /// Network of the client that started it.
    peer: Option<IpAddr>,
    expires: Instant,
}

/// Ceremonies one DPoP key may have open at once.
const MAX_PER_KEY: usize = 4;

/// Ceremonies one client network (an IPv4 /24 or IPv6 /64) may have open at once. A flood
/// from one network then leaves room for everyone else.
const MAX_PER_PEER: usize = 32;

pub(crate) struct Ceremonies {
    capacity: usize,
    pending: Mutex<HashMap<String, Ceremony>>,
}

impl Ceremonies {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            pending: Mutex::default(),
        }
    }

    /// Stores a ceremony that expires after `ttl`; returns its id. Fails when the key, the
    /// client address or the node has too many open ceremonies.
    pub(crate) fn insert(
        &self,
        kind: CeremonyKind,
        jkt: String,
        peer: Option<IpAddr>,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let now = Instant::now();
        let peer = peer.map(super::proofs::client_network);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= self.capacity / 2 {
            // Expired ceremonies are kept while there is room, so that a late finish gets
            // `ceremony_expired` rather than `ceremony_not_found`.
            pending.retain(|_, c| c.expires > now);
        }
        let retry_after = |open: &mut dyn Iterator<Item = &Ceremony>| {
            open.map(|c| c.expires.saturating_duration_since(now))
                .min()
                .unwrap_or(ttl)
                .as_secs()
                .max(1)
        };
        let open = |c: &&Ceremony| c.expires > now;
        let by_key = pending
            .values()
            .filter(open)
            .filter(|c| c.jkt == jkt)
            .count();
        if by_key >= MAX_PER_KEY {
            let wait = retry_after(&mut pending.values().filter(open).filter(|c| c.jkt == jkt));
            return Err(AuthError::TooManyCeremonies {
                scope: "for this DPoP key",
                retry_after_s: wait,
            });
        }
        if let Some(ip) = peer {
            let by_peer = pending
                .values()
                .filter(open)
                .filter(|c| c.peer == Some(ip))
                .count();
            if by_peer >= MAX_PER_PEER {
                let wait =
                    retry_after(&mut pending.values().filter(open).filter(|c| c.peer == Some(ip)));
                return Err(AuthError::TooManyCeremonies {
                    scope: "from this network",
                    retry_after_s: wait,
                });
            }
        }
        if pending.len() >= self.capacity {
            let wait = retry_after(&mut pending.values());
            return Err(AuthError::TooManyCeremonies {
                scope: "on this node",
                retry_after_s: wait,
            });
        }
        let mut raw = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let id = hex::encode(raw);
        pending.insert(
            id.clone(),
            Ceremony {
                kind,
                jkt,
                peer,
                expires: now + ttl,
            },
        );
        Ok(id)
    }

    /// Removes and returns ceremony `id` if it has not expired.
    pub(crate) fn take(&self, id: &str) -> Result<Ceremony, AuthError> {
        let ceremony = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .ok_or_else(|| AuthError::CeremonyNotFound(shorten(id)))?;
        if ceremony.expires <= Instant::now() {
            return Err(AuthError::CeremonyExpired(shorten(id)));
        }
        Ok(ceremony)
    }
}

/// Keeps client-chosen ids short and printable in errors and logs.
fn shorten(id: &str) -> String {
    atlas_protocol::dpop::printable(&id.chars().take(40).collect::<String>())
}
