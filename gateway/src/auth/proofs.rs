//! Checks of the DPoP proof on each request: the proof itself (`atlas_protocol::dpop`), then
//! the server's own state: the `jti` replay cache and the nonce.

use super::{Auth, AuthError};
use actix_web::HttpRequest;
use atlas_protocol::dpop::{DpopError, DpopProof, ProofRequest, verify_proof};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Proof ids seen within the accepted `iat` window, bounded. Entries leave when their proof
/// could no longer pass the time check, so a full cache means more proofs per window than
/// the capacity; new proofs are then rejected rather than risking a replay.
pub(crate) struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
}

#[derive(Default)]
struct ReplayInner {
    /// Key (thumbprint and jti) to the second after which the proof is stale anyway.
    seen: HashMap<String, u64>,
    /// Keys in insertion order with their expiry, for pruning.
    order: VecDeque<(u64, String)>,
}

impl ReplayCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
        }
    }

    /// Records `proof`; fails if its `jti` was seen from the same key before it expired.
    fn record(&self, proof: &DpopProof, expires_s: u64, now_s: u64) -> Result<(), AuthError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((expiry, _)) = inner.order.front()
            && *expiry < now_s
        {
            if let Some((_, key)) = inner.order.pop_front() {
                inner.seen.remove(&key);
            }
        }
        let key = format!("{}:{}", proof.jkt, proof.jti);
        if inner.seen.contains_key(&key) {
            return Err(AuthError::ReplayedProof);
        }
        if inner.seen.len() >= self.capacity {
            tracing::warn!(
                capacity = self.capacity,
                "DPoP replay cache is full; rejecting proofs until entries expire"
            );
            return Err(AuthError::ReplayCacheFull);
        }
        inner.seen.insert(key.clone(), expires_s);
        // Proofs arrive in roughly increasing iat order; one that expires earlier than the
        // back of the queue only stays a little longer than needed.
        inner.order.push_back((expires_s, key));
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().seen.len()
    }
}

/// Returns the access token of an `Authorization: DPoP <token>` header, if one was sent.
pub(crate) fn access_token(req: &HttpRequest) -> Result<Option<&str>, AuthError> {
    let mut values = req.headers().get_all("authorization");
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::InvalidRequest(
            "more than one Authorization header".into(),
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::InvalidToken("Authorization header is not ASCII".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("dpop") && !token.is_empty() => {
            Ok(Some(token.trim()))
        }
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("bearer") => Err(AuthError::InvalidToken(
            "tokens are DPoP-bound: use the DPoP scheme, not Bearer".into(),
        )),
        _ => Err(AuthError::InvalidToken(
            "expected Authorization: DPoP <access token>".into(),
        )),
    }
}

/// The `htu` a proof for `req` must name: `https://` + Host + path. The gateway serves TLS
/// only, so the scheme is always https. The host comes from the request itself (the URI's
/// authority, else the `Host` header), never from `Forwarded` or `X-Forwarded-Host`, which a
/// client could set to make a proof for another server pass.
fn target_uri(req: &HttpRequest) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(actix_web::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    format!("https://{host}{}", req.path())
}

impl Auth {
    /// Checks the DPoP proof of `req`, made for `access_token` if one is presented, and
    /// records its `jti`.
    pub(crate) fn check_proof(
        &self,
        req: &HttpRequest,
        access_token: Option<&str>,
    ) -> Result<DpopProof, AuthError> {
        let mut values = req.headers().get_all("dpop");
        let header = values.next().ok_or(DpopError::Missing)?;
        if values.next().is_some() {
            return Err(DpopError::Multiple.into());
        }
        let proof = header
            .to_str()
            .map_err(|_| DpopError::Malformed("header is not ASCII".into()))?;
        let now_s = atlas_actors::now_ms() / 1000;
        let window_s = self.settings.dpop_window.as_secs();
        let uri = target_uri(req);
        let checked = verify_proof(
            proof,
            &ProofRequest {
                method: req.method().as_str(),
                uri: &uri,
                access_token,
                now_s,
                window_s,
            },
        )?;
        if self.settings.dpop_nonces && !self.nonce_is_valid(checked.nonce.as_deref(), now_s) {
            return Err(AuthError::UseNonce {
                nonce: self.current_nonce(now_s),
            });
        }
        self.replays
            .record(&checked, checked.iat.saturating_add(window_s), now_s)?;
        Ok(checked)
    }

    /// The nonce for the window containing `now_s`. Nonces are keyed hashes of the window
    /// number, so the server keeps no state for them; one stays valid for one to two windows.
    pub(crate) fn current_nonce(&self, now_s: u64) -> String {
        self.nonce_for(now_s / self.nonce_period())
    }

    fn nonce_period(&self) -> u64 {
        self.settings.dpop_window.as_secs().max(1)
    }

    fn nonce_for(&self, window: u64) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.nonce_secret);
        hasher.update(window.to_be_bytes());
        URL_SAFE_NO_PAD.encode(&hasher.finalize()[..18])
    }

    fn nonce_is_valid(&self, nonce: Option<&str>, now_s: u64) -> bool {
        let Some(nonce) = nonce else {
            return false;
        };
        let window = now_s / self.nonce_period();
        nonce == self.nonce_for(window) || nonce == self.nonce_for(window.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof(jkt: &str, jti: &str) -> DpopProof {
        DpopProof {
            jkt: jkt.into(),
            jti: jti.into(),
            iat: 100,
            nonce: None,
        }
    }

    #[test]
    fn replay_cache_rejects_second_use() {
        let cache = ReplayCache::new(10);
        cache.record(&proof("k", "a"), 160, 100).unwrap();
        assert!(matches!(
            cache.record(&proof("k", "a"), 160, 101),
            Err(AuthError::ReplayedProof)
        ));
        // The same jti from another key is another proof.
        cache.record(&proof("other", "a"), 160, 101).unwrap();
    }

    #[test]
    fn replay_cache_forgets_expired_rejects_when_full() {
        let cache = ReplayCache::new(2);
        cache.record(&proof("k", "a"), 160, 100).unwrap();
        cache.record(&proof("k", "b"), 160, 100).unwrap();
        assert!(matches!(
            cache.record(&proof("k", "c"), 160, 100),
            Err(AuthError::ReplayCacheFull)
        ));
        // After both expired, room is made again.
        cache.record(&proof("k", "c"), 230, 170).unwrap();
        assert_eq!(cache.len(), 1);
    }
}
