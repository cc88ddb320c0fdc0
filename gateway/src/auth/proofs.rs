//! Checks of the DPoP proof on each request: the proof itself (`atlas_protocol::dpop`), then
//! the server's own state: the `jti` replay cache and the nonce.

use super::{Auth, AuthError};
use actix_web::HttpRequest;
use atlas_protocol::dpop::{DpopError, DpopProof, ProofRequest, verify_proof};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

/// Proof ids seen within the accepted `iat` window, bounded. Entries leave when their proof
/// could no longer pass the time check. One client network may hold at most a tenth of the
/// capacity, so a flood from one address is slowed down without filling the cache for
/// everyone. A cache full of unexpired entries rejects new proofs rather than risking a
/// replay.
pub(crate) struct ReplayCache {
    capacity: usize,
    per_peer: usize,
    inner: Mutex<ReplayInner>,
}

#[derive(Default)]
struct ReplayInner {
    /// Key (thumbprint and jti) to the second after which the proof is stale anyway.
    seen: HashMap<String, u64>,
    /// Keys by expiry with their client network, earliest first, for pruning.
    expiries: BinaryHeap<Reverse<(u64, String, Option<IpAddr>)>>,
    /// Entries held by each client network (see [`client_network`]).
    by_peer: HashMap<IpAddr, usize>,
}

/// The network a client address counts under for per-client limits: its /24 for IPv4 and
/// its /64 for IPv6, since one party usually controls a whole such range.
pub(crate) fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

impl ReplayCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            per_peer: (capacity / 10).max(1),
            inner: Mutex::default(),
        }
    }

    /// Records `proof`; fails if its `jti` was seen from the same key before it expired.
    fn record(
        &self,
        proof: &DpopProof,
        peer: Option<IpAddr>,
        expires_s: u64,
        now_s: u64,
    ) -> Result<(), AuthError> {
        let peer = peer.map(client_network);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(Reverse((expiry, _, _))) = inner.expiries.peek()
            && *expiry < now_s
        {
            if let Some(Reverse((_, key, owner))) = inner.expiries.pop() {
                inner.seen.remove(&key);
                if let Some(ip) = owner
                    && let Some(count) = inner.by_peer.get_mut(&ip)
                {
                    *count -= 1;
                    if *count == 0 {
                        inner.by_peer.remove(&ip);
                    }
                }
            }
        }
        let key = format!("{}:{}", proof.jkt, proof.jti);
        if inner.seen.contains_key(&key) {
            return Err(AuthError::ReplayedProof);
        }
        if let Some(ip) = peer
            && inner.by_peer.get(&ip).copied().unwrap_or(0) >= self.per_peer
        {
            let oldest = inner
                .expiries
                .iter()
                .filter(|Reverse((_, _, owner))| *owner == Some(ip))
                .map(|Reverse((expiry, _, _))| *expiry)
                .min()
                .map_or(1, |expiry| expiry.saturating_sub(now_s).max(1));
            return Err(AuthError::TooManyProofs {
                retry_after_s: oldest,
            });
        }
        if inner.seen.len() >= self.capacity {
            return Err(AuthError::ReplayCacheFull);
        }
        inner.seen.insert(key.clone(), expires_s);
        if let Some(ip) = peer {
            *inner.by_peer.entry(ip).or_default() += 1;
        }
        inner.expiries.push(Reverse((expires_s, key, peer)));
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().seen.len()
    }
}

/// Largest accepted distance of a proof's `iat` after the server's clock, in seconds. Clients
/// whose clocks run ahead correct them from the `Date` header of the rejection, and a short
/// skew keeps proofs from living much beyond the window.
const MAX_FUTURE_SKEW_S: u64 = 10;

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
        // The configured origin, not the request's Host header, names this server: a client
        // chooses its Host header, so a proof made for another server could otherwise pass.
        let uri = format!(
            "{}{}",
            self.settings.rp_origin.as_str().trim_end_matches('/'),
            req.path()
        );
        let checked = verify_proof(
            proof,
            &ProofRequest {
                method: req.method().as_str(),
                uri: &uri,
                access_token,
                now_s,
                window_s,
                future_s: MAX_FUTURE_SKEW_S.min(window_s),
                websocket: req.path() == "/v1/ws",
            },
        )?;
        // The replay cache starts empty, so proofs from before a restart could be replayed.
        if checked.iat < self.started_s {
            return Err(AuthError::ProofBeforeStart);
        }
        if self.settings.dpop_nonces && !self.nonce_is_valid(checked.nonce.as_deref(), now_s) {
            return Err(AuthError::UseNonce {
                nonce: self.current_nonce(now_s),
            });
        }
        let peer = req.peer_addr().map(|a| a.ip());
        self.replays.record(
            &checked,
            peer,
            checked.iat.max(now_s).saturating_add(window_s),
            now_s,
        )?;
        Ok(checked)
    }

    /// Returns the nonce for the window containing `now_s`. Nonces are keyed hashes of the window
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

    fn ip(network: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, network, 1]))
    }

    #[test]
    fn replay_cache_rejects_second_use() {
        let cache = ReplayCache::new(100);
        cache.record(&proof("k", "a"), ip(1), 160, 100).unwrap();
        assert!(matches!(
            cache.record(&proof("k", "a"), ip(2), 160, 101),
            Err(AuthError::ReplayedProof)
        ));
        // The same jti from another key is another proof.
        cache.record(&proof("other", "a"), ip(1), 160, 101).unwrap();
    }

    #[test]
    fn replay_cache_forgets_expired_rejects_when_full() {
        let cache = ReplayCache::new(2);
        cache.record(&proof("k", "a"), None, 160, 100).unwrap();
        cache.record(&proof("k", "b"), None, 160, 100).unwrap();
        assert!(matches!(
            cache.record(&proof("k", "c"), None, 160, 100),
            Err(AuthError::ReplayCacheFull)
        ));
        // After both expired, room is made again.
        cache.record(&proof("k", "c"), None, 230, 170).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn replay_cache_limits_one_address() {
        let cache = ReplayCache::new(30);
        for n in 0..3 {
            cache
                .record(&proof("k", &n.to_string()), ip(1), 160, 100)
                .unwrap();
        }
        assert!(matches!(
            cache.record(&proof("k", "x"), ip(1), 160, 100),
            Err(AuthError::TooManyProofs { retry_after_s: 60 })
        ));
        // Other addresses are not affected.
        cache.record(&proof("k", "y"), ip(2), 160, 100).unwrap();
        // Once the address's entries expire, it may send again.
        cache.record(&proof("k", "z"), ip(1), 230, 170).unwrap();
        // Addresses of one /24 share the quota.
        let cache = ReplayCache::new(10);
        cache
            .record(
                &proof("k", "a"),
                Some(IpAddr::from([10, 0, 0, 1])),
                160,
                100,
            )
            .unwrap();
        assert!(matches!(
            cache.record(
                &proof("k", "b"),
                Some(IpAddr::from([10, 0, 0, 2])),
                160,
                100
            ),
            Err(AuthError::TooManyProofs { .. })
        ));
    }

    #[test]
    fn replay_cache_prunes_out_of_order_expiries() {
        let cache = ReplayCache::new(30);
        // A long-lived entry first, then short ones from another network.
        cache.record(&proof("k", "long"), ip(9), 300, 100).unwrap();
        for n in 0..3 {
            cache
                .record(&proof("k", &n.to_string()), ip(1), 160, 100)
                .unwrap();
        }
        // The short entries leave when they expire, even behind the long one.
        cache.record(&proof("k", "x"), ip(1), 230, 170).unwrap();
        assert_eq!(cache.len(), 2);
    }
}
