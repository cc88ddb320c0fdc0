//! Account security over HTTP: passkey ceremonies (webauthn-rs), DPoP-bound access and refresh
//! tokens (RFC 9449), and device enrollment with a token.
//!
//! Every request to these endpoints carries a DPoP proof. A passkey login yields a short-lived
//! access token (a JWT signed with the node's current JWKS key, bound to the proof's key by
//! `cnf.jkt`) and a refresh token bound to the same key, which rotates on every use.

mod ceremonies;
mod error;
pub(crate) mod proofs;
pub(crate) mod routes;
mod tokens;

pub use error::AuthError;
pub use tokens::AccessClaims;

use atlas_actors::Keyring;
use atlas_storage::Store;
use ceremonies::Ceremonies;
use proofs::ReplayCache;
use std::sync::Arc;
use std::time::Duration;
use webauthn_rs::Webauthn;

/// Settings of passkeys and tokens.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// WebAuthn relying party id: the host name that passkeys are bound to.
    pub rp_id: String,
    /// Origin of the pages that run the ceremonies, such as `https://localhost:8443`.
    pub rp_origin: url::Url,
    /// Issuer (`iss`) of access tokens.
    pub issuer: String,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Time a client has to finish a passkey ceremony.
    pub ceremony_ttl: Duration,
    /// Largest accepted distance between a proof's `iat` and the server's clock.
    pub dpop_window: Duration,
    /// Whether proofs must carry a server nonce (`DPoP-Nonce`).
    pub dpop_nonces: bool,
    /// Capacity of the `jti` replay cache; proofs are rejected while it is full of unexpired
    /// entries.
    pub replay_cache_capacity: usize,
    /// Ceremonies that may be in progress at once.
    pub max_ceremonies: usize,
    /// Largest age of the passkey login behind a token that may add or remove passkeys.
    pub reauthentication_window: Duration,
}

/// Shared state of the account endpoints.
pub struct Auth {
    pub(crate) settings: AuthSettings,
    pub(crate) webauthn: Webauthn,
    pub(crate) ceremonies: Ceremonies,
    pub(crate) replays: ReplayCache,
    pub(crate) keyring: Arc<Keyring>,
    pub(crate) store: Store,
    /// Secret of the stateless DPoP nonces; random per process, so a restart invalidates
    /// outstanding nonces and clients retry with the new one.
    pub(crate) nonce_secret: [u8; 32],
    /// Start of this process, in seconds since the Unix epoch.
    pub(crate) started_s: u64,
}

impl Auth {
    /// Builds the relying party from `settings`; fails on an origin that does not match the
    /// relying party id.
    pub fn new(
        settings: AuthSettings,
        keyring: Arc<Keyring>,
        store: Store,
    ) -> Result<Self, AuthError> {
        let webauthn = webauthn_rs::WebauthnBuilder::new(&settings.rp_id, &settings.rp_origin)
            .and_then(|b| b.rp_name("Atlas").timeout(settings.ceremony_ttl).build())
            .map_err(|e| {
                AuthError::Config(format!(
                    "relying party id {:?} with origin {} is not usable: {e}; the origin's host \
                     must be the id or a subdomain of it",
                    settings.rp_id, settings.rp_origin
                ))
            })?;
        let mut nonce_secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce_secret);
        Ok(Self {
            ceremonies: Ceremonies::new(settings.max_ceremonies),
            replays: ReplayCache::new(settings.replay_cache_capacity),
            settings,
            webauthn,
            keyring,
            store,
            nonce_secret,
            started_s: atlas_actors::now_ms() / 1000,
        })
    }
}
