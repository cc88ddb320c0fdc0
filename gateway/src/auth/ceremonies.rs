//! Passkey ceremony state, kept in the node's memory between the start and finish requests.
//! Each ceremony is used at most once: finishing removes it whatever the outcome.
//!
//! NOTE: the state is per node; a client must finish a ceremony on the node that started it.

use super::AuthError;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use webauthn_rs::prelude::{PasskeyAuthentication, PasskeyRegistration};

/// What a ceremony will do when it finishes.
pub(crate) enum CeremonyKind {
    /// Registers a passkey: creates `account` when `new_account`, otherwise adds to it.
    Registration {
        account: String,
        user_id: [u8; 16],
        new_account: bool,
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
    expires: Instant,
}

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

    /// Stores a ceremony that expires after `ttl`; returns its id.
    pub(crate) fn insert(
        &self,
        kind: CeremonyKind,
        jkt: String,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= self.capacity {
            // Expired ceremonies stay one more lifetime, so that a late finish is told the
            // ceremony expired rather than that it never existed.
            pending.retain(|_, c| c.expires + ttl > now);
        }
        if pending.len() >= self.capacity {
            return Err(AuthError::TooManyCeremonies);
        }
        let mut raw = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let id = hex::encode(raw);
        pending.insert(
            id.clone(),
            Ceremony {
                kind,
                jkt,
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

/// Keeps client-chosen ids short in errors and logs.
fn shorten(id: &str) -> String {
    id.chars().take(40).collect()
}
