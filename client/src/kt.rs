//! Key transparency on the client: checks every signed tree head against the heads seen
//! before, and every device key against its inclusion proof.
//!
//! The client keeps the largest head it has verified. A new head must be signed by a key of
//! the node's JWKS, must not be dated in the future, and must be consistent with the kept
//! head: a larger one through a consistency proof from the kept size, a smaller one through a
//! consistency proof up to the kept head. A head that fails this is evidence of a forked or
//! rolled-back log. The client then records both heads and stops working with the server.

use atlas_protocol::transparency::{Jwks, ProofError, SignedTreeHead};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Kind of contradiction found in the server's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// Two heads that cannot both describe one append-only log.
    Fork,
    /// The server no longer has entries covered by a head it signed earlier.
    Rollback,
}

/// Evidence of a key transparency violation: two heads signed by the server that no
/// append-only log can produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KtViolation {
    pub kind: ViolationKind,
    /// The head the client had verified before.
    pub seen: SignedTreeHead,
    /// The head the server presented that contradicts it.
    pub presented: SignedTreeHead,
    /// Reason the two heads contradict each other.
    pub detail: String,
}

impl fmt::Display for KtViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ViolationKind::Fork => "forked",
            ViolationKind::Rollback => "rolled back",
        };
        write!(
            f,
            "the server's key transparency log was {kind}: head of size {} with root {} \
             (signed by {}) contradicts the earlier head of size {} with root {} (signed by {}): \
             {}; keep both heads as evidence and stop using this server",
            self.presented.size,
            self.presented.root_hex(),
            self.presented.kid,
            self.seen.size,
            self.seen.root_hex(),
            self.seen.kid,
            self.detail
        )
    }
}

/// Key transparency state saved with the client.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct KtState {
    /// Largest verified head.
    pub(crate) latest: Option<SignedTreeHead>,
    /// Every signing key seen in the server's JWKS; retired keys are kept so that older heads
    /// still verify.
    pub(crate) jwks: Jwks,
    /// Set once a violation is found; the client then refuses the server.
    pub(crate) violation: Option<KtViolation>,
}

impl KtState {
    /// Adds keys from a freshly fetched JWKS, keeping the ones already known.
    pub(crate) fn merge_jwks(&mut self, fetched: Jwks) {
        for key in fetched.keys {
            if self.jwks.find(&key.kid).is_none() {
                self.jwks.keys.push(key);
            }
        }
    }
}

/// Failure of a key transparency check that is not (yet) evidence of a violation.
pub(crate) fn proof_error(context: &str, e: &ProofError) -> crate::ClientError {
    crate::ClientError::KeyTransparency(format!("{context}: {e}"))
}
