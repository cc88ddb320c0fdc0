//! An auditor of a node's key transparency log: it checks every signed tree head against the
//! one before, every entry's inclusion in a signed head, and every entry's authorisation by
//! replaying the device directory from the log.

use crate::{ClientError, RawConnection, ServerTrust};
use atlas_protocol::transparency::{
    Authorization, AuthorizationError, DirectoryReplay, Jwks, KeyEvent, MAX_KT_ENTRIES,
    SignedTreeHead,
};
use atlas_protocol::{ClientBody, ServerBody};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of one audit run.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// First entry to check; entries before it are trusted, except that the history of every
    /// account seen later is fetched and replayed to check its authorisations.
    pub from: u64,
    /// After catching up, poll for new heads this often; `None` stops after catching up.
    pub follow: Option<Duration>,
    /// Stop after this many polls when following; `None` polls until an error.
    pub max_polls: Option<u32>,
    /// File that keeps the last verified head between runs, so that a log rolled back or
    /// forked between two runs is detected.
    pub state_file: Option<PathBuf>,
}

/// Result of an audit that found nothing wrong.
#[derive(Debug, Clone)]
pub struct AuditReport {
    pub head: SignedTreeHead,
    pub entries_checked: u64,
    /// Passkey grants signed by a node key no longer in the JWKS, whose node signature could
    /// not be checked (the new key's own signature was).
    pub unverified_grants: u64,
}

/// The first inconsistency an audit found, or why it could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot talk to the node: {0}")]
    Connect(#[from] ClientError),
    #[error("tree head of size {size} rejected: {reason}")]
    BadHead { size: u64, reason: String },
    #[error(
        "log is inconsistent: head of size {} (root {}) does not extend head of size {} (root {}): {detail}",
        new.size, new.root_hex(), old.size, old.root_hex()
    )]
    Inconsistent {
        old: Box<SignedTreeHead>,
        new: Box<SignedTreeHead>,
        detail: String,
    },
    #[error("entry {index} rejected: {reason}")]
    BadEntry { index: u64, reason: String },
    #[error(transparent)]
    Authorization(#[from] AuthorizationError),
    #[error("audit state file {path}: {detail}")]
    State { path: String, detail: String },
    #[error("{0}")]
    Options(String),
}

impl AuditError {
    /// Returns whether the error is evidence against the node: a rejected head or entry, an
    /// inconsistent log, or an entry without valid authorisation. The others (no connection,
    /// an unusable state file, bad options) are no evidence about the node's log.
    pub fn is_evidence(&self) -> bool {
        match self {
            Self::BadHead { .. }
            | Self::Inconsistent { .. }
            | Self::BadEntry { .. }
            | Self::Authorization(_) => true,
            Self::Connect(_) | Self::State { .. } | Self::Options(_) => false,
        }
    }
}

/// The audit state file: the last verified head of one node, named by the server name its
/// login challenge carries.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedHead {
    server_name: String,
    head: SignedTreeHead,
}

struct Auditor {
    conn: RawConnection,
    server_name: String,
    jwks: Jwks,
    head: Option<SignedTreeHead>,
    replay: DirectoryReplay,
    /// Accounts whose entries before the start were replayed.
    loaded: std::collections::HashSet<String>,
    from: u64,
    checked: u64,
}

/// Audits the log of the node at `url`. `progress` receives one line per step.
pub async fn audit(
    url: &str,
    trust: &ServerTrust,
    options: &AuditOptions,
    mut progress: impl FnMut(&str),
) -> Result<AuditReport, AuditError> {
    let (conn, challenge) = RawConnection::open(url, trust).await?;
    let ServerBody::Challenge { server_name, .. } = challenge else {
        return Err(ClientError::Connect("first frame was not a challenge".into()).into());
    };
    let saved = load_state(options.state_file.as_deref(), &server_name)?;
    let mut auditor = Auditor {
        conn,
        server_name,
        jwks: Jwks::default(),
        head: saved,
        replay: DirectoryReplay::default(),
        loaded: std::collections::HashSet::new(),
        from: options.from,
        checked: 0,
    };
    if let Some(head) = auditor.head.clone() {
        let state_error = |detail: String| AuditError::State {
            path: options
                .state_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            detail,
        };
        // A saved head signed by a key this node never published belongs to another node with
        // the same server name, or is older than the node's key grace period.
        auditor.refresh_jwks().await?;
        if auditor.jwks.find(&head.kid).is_none() {
            return Err(state_error(format!(
                "the saved head is signed by key {:?}, which this node does not publish: the \
                 file belongs to another node, or the key left the JWKS after its grace \
                 period; start a new state file",
                head.kid
            )));
        }
        // The file is only as good as the signature it kept: a damaged head is no evidence.
        if let Err(e) = head.verify(&auditor.jwks, crate::now_ms()) {
            return Err(state_error(format!(
                "the saved head of size {} does not verify ({e}): the file is damaged, so it is \
                 no evidence against the node; restore it from a backup or start a new state \
                 file",
                head.size
            )));
        }
        progress(&format!(
            "resuming from the saved head of size {} (root {})",
            head.size,
            head.root_hex()
        ));
    }
    let mut next = options.from;
    let mut polls = 0u32;
    loop {
        let head = auditor.fetch_head().await?;
        auditor.advance(head.clone()).await?;
        if polls == 0 && options.from > head.size {
            return Err(AuditError::Options(format!(
                "--from {} is beyond the end of the log ({} entries)",
                options.from, head.size
            )));
        }
        while next < head.size {
            let page = auditor.check_page(next, &head).await?;
            next += page;
            progress(&format!(
                "checked entries up to {next} of {} (root {})",
                head.size,
                head.root_hex()
            ));
        }
        if let Some(verified) = &auditor.head {
            save_state(
                options.state_file.as_deref(),
                &auditor.server_name,
                verified,
            )?;
        }
        let Some(interval) = options.follow else {
            break;
        };
        polls += 1;
        if options.max_polls.is_some_and(|max| polls >= max) {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    let head = auditor.head.clone().ok_or_else(|| AuditError::BadHead {
        size: 0,
        reason: "the node returned no head".into(),
    })?;
    progress(&format!(
        "audit passed: {} entries checked, head of size {} with root {}",
        auditor.checked,
        head.size,
        head.root_hex()
    ));
    Ok(AuditReport {
        head,
        entries_checked: auditor.checked,
        unverified_grants: auditor.replay.unverified_grants(),
    })
}

impl Auditor {
    async fn request(&self, body: ClientBody) -> Result<ServerBody, AuditError> {
        Ok(self.conn.request(body).await?)
    }

    async fn fetch_head(&mut self) -> Result<SignedTreeHead, AuditError> {
        match self.request(ClientBody::KtHead).await? {
            ServerBody::KtHead(head) => Ok(head),
            other => Err(unexpected("kt_head", other)),
        }
    }

    /// Fetches the node's JWKS and adds its keys to the known ones.
    async fn refresh_jwks(&mut self) -> Result<(), AuditError> {
        match self.request(ClientBody::Jwks).await? {
            ServerBody::Jwks(jwks) => {
                self.replay.learn_keys(&jwks);
                for key in jwks.keys {
                    if self.jwks.find(&key.kid).is_none() {
                        self.jwks.keys.push(key);
                    }
                }
                Ok(())
            }
            other => Err(unexpected("jwks", other)),
        }
    }

    /// Verifies a head's signature and its consistency with the last verified head, and makes
    /// it the last verified head when it is larger.
    async fn advance(&mut self, head: SignedTreeHead) -> Result<(), AuditError> {
        if self.jwks.find(&head.kid).is_none() {
            self.refresh_jwks().await?;
        }
        head.verify(&self.jwks, crate::now_ms())
            .map_err(|e| AuditError::BadHead {
                size: head.size,
                reason: e.to_string(),
            })?;
        let Some(old) = self.head.clone() else {
            self.head = Some(head);
            return Ok(());
        };
        let inconsistent = |detail: String| AuditError::Inconsistent {
            old: Box::new(old.clone()),
            new: Box::new(head.clone()),
            detail,
        };
        if head.size < old.size {
            return Err(inconsistent(
                "the log shrank: the node lost or removed entries it had signed".into(),
            ));
        }
        if head.size == old.size {
            return if head.root == old.root {
                Ok(())
            } else {
                Err(inconsistent("same size, different roots".into()))
            };
        }
        if old.size > 0 {
            let proof = match self
                .request(ClientBody::KtConsistency {
                    from: old.size,
                    to: head.size,
                })
                .await?
            {
                ServerBody::KtConsistency(proof) => proof,
                other => return Err(unexpected("kt_consistency", other)),
            };
            proof
                .verify(&old, &head)
                .map_err(|e| inconsistent(e.to_string()))?;
        }
        self.head = Some(head);
        Ok(())
    }

    /// Checks one page of entries from `start`; returns how many were checked.
    async fn check_page(&mut self, start: u64, head: &SignedTreeHead) -> Result<u64, AuditError> {
        let body = self
            .request(ClientBody::KtEntries {
                start,
                limit: MAX_KT_ENTRIES,
            })
            .await?;
        let ServerBody::KtEntries {
            head: page_head,
            entries,
        } = body
        else {
            return Err(unexpected("kt_entries", body));
        };
        // The log may have grown since `head`; the page's head must extend it.
        self.advance(page_head.clone()).await?;
        let end = head.size.min(page_head.size);
        let mut expected = start;
        for entry in &entries {
            if entry.index >= end {
                break;
            }
            if entry.index != expected {
                return Err(AuditError::BadEntry {
                    index: expected,
                    reason: format!("the node skipped to entry {}", entry.index),
                });
            }
            let event = entry.verify(&page_head).map_err(|e| AuditError::BadEntry {
                index: entry.index,
                reason: e.to_string(),
            })?;
            self.load_account(&event).await?;
            if let Authorization::PasskeyToken { kid, .. } = &event.authorization
                && self.jwks.find(kid).is_none()
            {
                self.refresh_jwks().await?;
            }
            self.replay.apply(entry.index, &event, &self.server_name)?;
            self.checked += 1;
            expected += 1;
        }
        if expected == start {
            return Err(AuditError::BadEntry {
                index: start,
                reason: "the node returned no entries below its head's size".into(),
            });
        }
        Ok(expected - start)
    }

    /// Replays an account's entries before the audit's first entry, once, so that later
    /// revocations and rotations can be checked against the devices they name.
    async fn load_account(&mut self, event: &KeyEvent) -> Result<(), AuditError> {
        if self.from == 0 || !self.loaded.insert(event.account.clone()) {
            return Ok(());
        }
        let mut start = 0;
        while start < self.from {
            let body = self
                .request(ClientBody::KtHistory {
                    account: event.account.clone(),
                    start,
                })
                .await?;
            let ServerBody::KtEntries { head, entries } = body else {
                return Err(unexpected("kt_history", body));
            };
            self.advance(head.clone()).await?;
            let Some(last) = entries.last().map(|e| e.index) else {
                break;
            };
            for entry in entries
                .iter()
                .filter(|e| e.index >= start && e.index < self.from)
            {
                let earlier = entry.verify(&head).map_err(|e| AuditError::BadEntry {
                    index: entry.index,
                    reason: e.to_string(),
                })?;
                self.replay
                    .apply(entry.index, &earlier, &self.server_name)?;
            }
            start = last + 1;
        }
        Ok(())
    }
}

fn unexpected(request: &'static str, body: ServerBody) -> AuditError {
    AuditError::Connect(crate::unexpected(request, body))
}

fn load_state(
    path: Option<&Path>,
    server_name: &str,
) -> Result<Option<SignedTreeHead>, AuditError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let state_error = |detail: String| AuditError::State {
        path: path.display().to_string(),
        detail,
    };
    let saved: SavedHead = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| state_error(format!("not a saved audit state: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_error(e.to_string())),
    };
    if saved.server_name != server_name {
        return Err(state_error(format!(
            "it holds the head of server {:?}, not of {server_name:?}; use one state file per \
             node",
            saved.server_name
        )));
    }
    Ok(Some(saved.head))
}

fn save_state(
    path: Option<&Path>,
    server_name: &str,
    head: &SignedTreeHead,
) -> Result<(), AuditError> {
    let Some(path) = path else {
        return Ok(());
    };
    let state_error = |detail: String| AuditError::State {
        path: path.display().to_string(),
        detail,
    };
    let tmp = path.with_extension("tmp");
    let saved = SavedHead {
        server_name: server_name.to_owned(),
        head: head.clone(),
    };
    let json = serde_json::to_vec_pretty(&saved).map_err(|e| state_error(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| state_error(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| state_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_excludes_operational_errors() {
        let evidence = [
            AuditError::BadHead {
                size: 3,
                reason: "bad signature".into(),
            },
            AuditError::BadEntry {
                index: 2,
                reason: "leaf hash differs".into(),
            },
        ];
        for error in &evidence {
            assert!(error.is_evidence(), "{error}");
        }
        let operational = [
            AuditError::Connect(ClientError::NotConnected),
            AuditError::State {
                path: "audit.json".into(),
                detail: "unreadable".into(),
            },
            AuditError::Options("--from 0 with --audit-state".into()),
        ];
        for error in &operational {
            assert!(!error.is_evidence(), "{error}");
        }
    }
}
