//! Serves key transparency requests: signed tree heads over the durable log, lookups and
//! histories with inclusion proofs, consistency proofs and pages of entries for auditors.

use crate::group::now_ms;
use crate::keyring::{Keyring, thumbprint};
use atlas_protocol::ErrorCode;
use atlas_protocol::transparency::{
    ConsistencyProof, Jwk, Jwks, MAX_KT_ENTRIES, MAX_KT_PAGE_BYTES, ProvenEntry, SignedTreeHead,
    wire_path,
};
use atlas_storage::{StorageError, Store};
use ed25519_dalek::VerifyingKey;
use std::sync::Arc;

/// Failure of a key transparency request.
#[derive(Debug, thiserror::Error)]
pub enum KtError {
    #[error("tree size {requested} is larger than the log ({size} entries)")]
    BeyondLog { requested: u64, size: u64 },
    #[error("consistency needs 0 < from <= to, got from {from} to {to}")]
    BadRange { from: u64, to: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl KtError {
    /// Returns the error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BeyondLog { .. } | Self::BadRange { .. } => ErrorCode::InvalidRequest,
            Self::Storage(_) => ErrorCode::StorageFailure,
        }
    }
}

/// The key transparency service of a node.
pub struct KeyTransparency {
    store: Store,
    keyring: Arc<Keyring>,
    /// Latest signed head; the lock also serialises signing.
    head: tokio::sync::Mutex<Option<SignedTreeHead>>,
}

impl KeyTransparency {
    /// Opens the service and checks the stored tree against the latest signed head, so a
    /// damaged tree hash is found at start rather than by a client.
    pub fn open(store: Store, keyring: Arc<Keyring>) -> Result<Self, StorageError> {
        let head = store.latest_tree_head()?;
        if let Some(head) = &head {
            let size = store.kt_size();
            if head.size > size {
                return Err(StorageError::Corrupt {
                    what: "key transparency log".into(),
                    detail: format!(
                        "the latest signed tree head has {} entries but the log has {size}; \
                         restore the data directory from a backup",
                        head.size
                    ),
                });
            }
            if store.kt_root(head.size)? != head.root {
                return Err(StorageError::Corrupt {
                    what: "key transparency log".into(),
                    detail: format!(
                        "the root of the first {} entries differs from the signed tree head; \
                         restore the data directory from a backup",
                        head.size
                    ),
                });
            }
        }
        Ok(Self {
            store,
            keyring,
            head: tokio::sync::Mutex::new(head),
        })
    }

    /// Returns the published signing keys: this node's, and in a cluster those that the
    /// other nodes published through the directory, so that a receipt or tree head of any
    /// node verifies against the JWKS of every node.
    pub fn jwks(&self) -> Jwks {
        let mut jwks = self.keyring.jwks();
        let nodes = match self.store.node_keys() {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the signing keys of the other nodes; the JWKS lists this node's keys only");
                return jwks;
            }
        };
        let now = now_ms();
        for (node, keys) in nodes {
            for key in keys {
                if key.until_ms.is_some_and(|until| until < now) || jwks.find(&key.kid).is_some() {
                    continue;
                }
                match VerifyingKey::from_bytes(&key.public) {
                    Ok(public) if thumbprint(&public) == key.kid => {
                        jwks.keys.push(Jwk::ed25519(&key.kid, &public));
                    }
                    _ => {
                        tracing::warn!(%node, kid = %key.kid, "a published signing key of another node is not a valid Ed25519 key with that key id; leaving it out of the JWKS");
                    }
                }
            }
        }
        jwks
    }

    /// Returns the keyring that signs tree heads.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Returns a signed head over every entry appended before the call. A new head is signed
    /// only when the log grew or the signing key rotated, and only after the entries it covers
    /// are on disk, so a signed head never covers entries a crash could lose.
    pub async fn head(&self) -> Result<SignedTreeHead, KtError> {
        let mut latest = self.head.lock().await;
        let size = self.store.kt_size();
        // After a rotation the head is signed again with the current key, so a log that stops
        // growing does not keep a head whose key leaves the JWKS after its grace period.
        if let Some(head) = latest.as_ref()
            && head.size == size
            && head.kid == self.keyring.current_kid()
        {
            return Ok(head.clone());
        }
        self.store.durable().await?;
        let root = self.store.kt_root(size)?;
        let time = now_ms().max(latest.as_ref().map_or(0, |h| h.time_ms));
        let head = self.keyring.sign_tree_head(size, root, time);
        self.store.put_tree_head(&head)?;
        tracing::debug!(size, kid = %head.kid, "signed a tree head");
        *latest = Some(head.clone());
        Ok(head)
    }

    /// Proves entry `index` against `head`.
    pub fn prove(&self, index: u64, head: &SignedTreeHead) -> Result<ProvenEntry, KtError> {
        Ok(ProvenEntry {
            index,
            leaf: self.store.kt_leaf(index)?,
            tree_size: head.size,
            path: wire_path(self.store.kt_inclusion(index, head.size)?),
        })
    }

    /// Returns the entries that published the current keys of `account`, proved against a
    /// fresh head. An account has at most `MAX_DEVICES_PER_ACCOUNT` active devices, whose
    /// entries fit in one page.
    pub async fn lookup(
        &self,
        account: &str,
    ) -> Result<(SignedTreeHead, Vec<ProvenEntry>), KtError> {
        let head = self.head().await?;
        let indexes: Vec<u64> = self
            .store
            .account_devices(account)?
            .into_iter()
            .filter_map(|device| device.kt_index)
            .collect();
        let out = self.page(indexes.into_iter(), &head, usize::MAX)?;
        Ok((head, out))
    }

    /// Returns the entries about `account` from index `start` on, oldest first, proved against
    /// a fresh head, as many as fit in one page.
    pub async fn history(
        &self,
        account: &str,
        start: u64,
    ) -> Result<(SignedTreeHead, Vec<ProvenEntry>), KtError> {
        let head = self.head().await?;
        let indexes = self.store.kt_account_entries(account)?;
        let from_start = indexes.into_iter().filter(|&i| i >= start);
        let out = self.page(from_start, &head, MAX_KT_PAGE_BYTES)?;
        Ok((head, out))
    }

    /// Returns up to `limit` entries from `start`, proved against a fresh head, as many as fit
    /// in one page.
    pub async fn entries(
        &self,
        start: u64,
        limit: u32,
    ) -> Result<(SignedTreeHead, Vec<ProvenEntry>), KtError> {
        let head = self.head().await?;
        let end = head
            .size
            .min(start.saturating_add(u64::from(limit.min(MAX_KT_ENTRIES))));
        let out = self.page(start..end, &head, MAX_KT_PAGE_BYTES)?;
        Ok((head, out))
    }

    /// Proves the entries of `indexes` below the head's size until `budget` bytes of leaves and
    /// paths are used; the first entry is always included.
    fn page(
        &self,
        indexes: impl Iterator<Item = u64>,
        head: &SignedTreeHead,
        budget: usize,
    ) -> Result<Vec<ProvenEntry>, KtError> {
        let mut out = Vec::new();
        let mut used = 0usize;
        for index in indexes.filter(|&i| i < head.size) {
            let entry = self.prove(index, head)?;
            used += entry.leaf.len() + entry.path.len() * 32 + 32;
            if used > budget && !out.is_empty() {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Proves that the tree of `from` entries is a prefix of the tree of `to` entries.
    pub fn consistency(&self, from: u64, to: u64) -> Result<ConsistencyProof, KtError> {
        let size = self.store.kt_size();
        if to > size {
            return Err(KtError::BeyondLog {
                requested: to,
                size,
            });
        }
        if from == 0 || from > to {
            return Err(KtError::BadRange { from, to });
        }
        Ok(ConsistencyProof {
            from,
            to,
            path: wire_path(self.store.kt_consistency(from, to)?),
        })
    }

    /// Reads the stored signed head of exactly `size` entries, if the node signed one.
    pub fn head_at(&self, size: u64) -> Result<Option<SignedTreeHead>, KtError> {
        Ok(self.store.tree_head(size)?)
    }
}
