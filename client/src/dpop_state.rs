//! The facts a client learns from a server's DPoP challenges (its latest nonce and the offset
//! of the local clock from its clock), so that the next proof passes.

use std::sync::Mutex;

/// The DPoP state of one server, shared by every request to it.
#[derive(Debug, Default)]
pub struct DpopState {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    nonce: Option<String>,
    /// Server clock minus local clock, in seconds.
    offset_s: i64,
}

/// Clock differences below this are left alone; the `Date` header has whole seconds.
const MIN_CORRECTION_S: i64 = 2;

/// Times a rejected request is retried with a corrected proof: one for a nonce and one for
/// the clock, which a server may both ask for.
pub const DPOP_RETRIES: u32 = 2;

impl DpopState {
    /// Returns the time to put in a proof's `iat`: the local clock corrected by the learnt
    /// offset.
    pub fn now_s(&self) -> u64 {
        let offset = self.lock().offset_s;
        (crate::now_ms() / 1000).saturating_add_signed(offset)
    }

    /// Returns the latest nonce the server sent, if any.
    pub fn nonce(&self) -> Option<String> {
        self.lock().nonce.clone()
    }

    /// Learns from a response's `DPoP-Nonce` and `Date` headers. Returns whether a request
    /// that failed with `challenge` is worth retrying with a new proof: the server asked
    /// for a nonce, or the local clock is off.
    pub fn learn(&self, nonce: Option<&str>, date: Option<&str>, challenge: Option<&str>) -> bool {
        let mut inner = self.lock();
        let mut retry = false;
        if let Some(nonce) = nonce
            && inner.nonce.as_deref() != Some(nonce)
        {
            inner.nonce = Some(nonce.to_owned());
            retry |= challenge.is_some_and(|c| c.contains("use_dpop_nonce"));
        }
        if let Some(server) = date.and_then(|d| httpdate::parse_http_date(d).ok())
            && let Ok(server) = server.duration_since(std::time::UNIX_EPOCH)
        {
            let offset = server.as_secs() as i64 - (crate::now_ms() / 1000) as i64;
            if (offset - inner.offset_s).abs() >= MIN_CORRECTION_S {
                inner.offset_s = offset;
                retry |= challenge.is_some_and(|c| c.contains("invalid_dpop_proof"));
            }
        }
        retry
    }

    /// Learns from a rejected request's [`HttpFailure`](crate::accounts::HttpFailure); see
    /// [`DpopState::learn`].
    pub fn learn_from(&self, failure: &crate::accounts::HttpFailure) -> bool {
        self.learn(
            failure.dpop_nonce.as_deref(),
            failure.date.as_deref(),
            failure.challenge.as_deref(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_challenge_asks_for_retry_once() {
        let state = DpopState::default();
        let challenge = Some(r#"DPoP error="use_dpop_nonce""#);
        assert!(state.learn(Some("n1"), None, challenge));
        assert_eq!(state.nonce().as_deref(), Some("n1"));
        // The same nonce again: retrying would not help.
        assert!(!state.learn(Some("n1"), None, challenge));
    }

    #[test]
    fn clock_offset_learnt_from_date() {
        let state = DpopState::default();
        let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(120);
        let date = httpdate::fmt_http_date(ahead);
        let challenge = Some(r#"DPoP error="invalid_dpop_proof""#);
        assert!(state.learn(None, Some(&date), challenge));
        let now = crate::now_ms() / 1000;
        assert!((state.now_s() as i64 - now as i64 - 120).abs() <= 1);
        // A second response with the same clock needs no retry.
        assert!(!state.learn(None, Some(&date), challenge));
    }
}
