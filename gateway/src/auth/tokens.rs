//! Access tokens (JWTs signed with the node's JWKS key) and rotating refresh tokens.

use super::{Auth, AuthError};
use actix_web::HttpRequest;
use atlas_protocol::accounts::Tokens;
use atlas_protocol::dpop::DpopProof;
use atlas_storage::{RefreshOutcome, RefreshRecord, TokenFamily};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// JOSE `typ` of access tokens (RFC 9068).
pub(crate) const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// Claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The account.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub cnf: Confirmation,
    /// Refresh token family the token was issued in; revoking the family ends the token too.
    pub sid: String,
    /// Time of the passkey ceremony behind the token, in seconds (OpenID Connect `auth_time`).
    pub auth_time: u64,
}

/// Key confirmation (RFC 7800) of a DPoP-bound token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub jkt: String,
}

fn random_id<const N: usize>() -> [u8; N] {
    let mut raw = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    raw
}

fn refresh_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// Issues a new token pair for `account` bound to `jkt`, after a passkey ceremony with
    /// `credential_id`, starting a new refresh family.
    pub(crate) fn issue_tokens(
        &self,
        account: &str,
        jkt: &str,
        credential_id: &[u8],
    ) -> Result<Tokens, AuthError> {
        let now = atlas_actors::now_ms();
        let refresh_token = URL_SAFE_NO_PAD.encode(random_id::<32>());
        let record = RefreshRecord {
            account: account.to_owned(),
            jkt: jkt.to_owned(),
            family: random_id::<16>(),
            expires_ms: now.saturating_add(self.settings.refresh_token_ttl.as_millis() as u64),
            spent_ms: None,
        };
        let family = TokenFamily {
            account: account.to_owned(),
            created_ms: now,
            revoked_ms: None,
            credential_id: credential_id.to_vec(),
            auth_time_ms: now,
        };
        self.store
            .put_refresh_token(&refresh_hash(&refresh_token), &record, &family)?;
        Ok(self.access_pair(&record, refresh_token, now / 1000))
    }

    fn access_pair(&self, record: &RefreshRecord, refresh_token: String, auth_time: u64) -> Tokens {
        let now_s = atlas_actors::now_ms() / 1000;
        let ttl = self.settings.access_token_ttl.as_secs();
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            sub: record.account.clone(),
            iat: now_s,
            exp: now_s + ttl,
            jti: URL_SAFE_NO_PAD.encode(random_id::<16>()),
            cnf: Confirmation {
                jkt: record.jkt.clone(),
            },
            sid: hex::encode(record.family),
            auth_time,
        };
        Tokens {
            access_token: self.keyring.sign_jwt(ACCESS_TOKEN_TYP, &claims),
            token_type: "DPoP".into(),
            expires_in: ttl,
            refresh_token,
            account: record.account.clone(),
        }
    }

    /// Exchanges `refresh_token` for a new pair. The token must be bound to the proof's key;
    /// a token that was spent before revokes its whole family.
    pub(crate) fn refresh(
        &self,
        refresh_token: &str,
        proof: &DpopProof,
    ) -> Result<Tokens, AuthError> {
        let next_token = URL_SAFE_NO_PAD.encode(random_id::<32>());
        let now = atlas_actors::now_ms();
        let ttl = self.settings.refresh_token_ttl.as_millis() as u64;
        let mut bound_elsewhere = false;
        let outcome = self.store.spend_refresh_token(
            &refresh_hash(refresh_token),
            now,
            &refresh_hash(&next_token),
            |spent| RefreshRecord {
                account: spent.account.clone(),
                jkt: spent.jkt.clone(),
                family: spent.family,
                expires_ms: now.saturating_add(ttl),
                spent_ms: None,
            },
        );
        let next = match outcome? {
            RefreshOutcome::Rotated(next) if next.jkt != proof.jkt => {
                bound_elsewhere = true;
                next
            }
            RefreshOutcome::Rotated(next) => next,
            RefreshOutcome::Unknown => {
                return Err(AuthError::InvalidGrant("unknown refresh token".into()));
            }
            RefreshOutcome::Expired => {
                return Err(AuthError::InvalidGrant("refresh token expired".into()));
            }
            RefreshOutcome::Revoked => {
                return Err(AuthError::InvalidGrant(
                    "refresh token was revoked; log in with a passkey again".into(),
                ));
            }
            RefreshOutcome::Reused { family } => {
                tracing::warn!(
                    family = %hex::encode(family),
                    "spent refresh token presented again; revoked its family"
                );
                return Err(AuthError::InvalidGrant(
                    "refresh token was already used; every token of this login is now revoked"
                        .into(),
                ));
            }
        };
        if bound_elsewhere {
            // Someone has the token without its DPoP key, so the family ends.
            self.store.revoke_token_family(&next.family, now)?;
            tracing::warn!(
                family = %hex::encode(next.family),
                "refresh token presented with another DPoP key; revoked its family"
            );
            return Err(AuthError::InvalidGrant(
                "refresh token is bound to another DPoP key".into(),
            ));
        }
        let auth_time = self
            .store
            .token_family(&next.family)?
            .map_or(0, |f| f.auth_time_ms / 1000);
        Ok(self.access_pair(&next, next_token, auth_time))
    }

    /// Checks that the passkey ceremony behind `claims` is recent enough for adding or
    /// removing passkeys, so that a stolen refresh token cannot change them.
    pub(crate) fn require_recent_login(&self, claims: &AccessClaims) -> Result<(), AuthError> {
        self.require_recent_login_at(claims.auth_time)
    }

    /// Checks that a passkey login at `auth_time` (seconds) is within the reauthentication
    /// window.
    pub(crate) fn require_recent_login_at(&self, auth_time: u64) -> Result<(), AuthError> {
        let max_age_s = self.settings.reauthentication_window.as_secs();
        let age = (atlas_actors::now_ms() / 1000).saturating_sub(auth_time);
        if age > max_age_s {
            return Err(AuthError::StepUpRequired { max_age_s });
        }
        Ok(())
    }

    /// Checks an access token: signature by a published node key, issuer, expiry, binding to
    /// the proof's key, and that its family is not revoked.
    pub(crate) fn verify_access_token(
        &self,
        token: &str,
        proof: &DpopProof,
    ) -> Result<AccessClaims, AuthError> {
        let invalid = |detail: String| AuthError::InvalidToken(detail);
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            invalid(format!(
                "not a JWT: {}",
                atlas_protocol::dpop::describe_jwt_error(&e)
            ))
        })?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) || header.alg != Algorithm::EdDSA {
            return Err(invalid("not an Atlas access token".into()));
        }
        let kid = header.kid.ok_or_else(|| invalid("no kid".into()))?;
        let key = self.keyring.published_key(&kid).ok_or_else(|| {
            invalid(format!(
                "signing key {} is not published",
                atlas_protocol::dpop::printable(&kid)
            ))
        })?;
        let decoding = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(key.as_bytes()))
            .map_err(|e| invalid(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 0;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &decoding, &validation)
            .map_err(|e| invalid(atlas_protocol::dpop::describe_jwt_error(&e)))?
            .claims;
        if claims.cnf.jkt != proof.jkt {
            return Err(invalid(
                "the DPoP proof is signed by another key than the token is bound to".into(),
            ));
        }
        let family = hex::decode(&claims.sid)
            .ok()
            .and_then(|raw| <[u8; 16]>::try_from(raw).ok())
            .ok_or_else(|| invalid("malformed sid".into()))?;
        match self.store.token_family(&family)? {
            Some(f) if f.revoked_ms.is_none() => Ok(claims),
            _ => Err(invalid(
                "the login this token belongs to was revoked".into(),
            )),
        }
    }

    /// Checks the DPoP proof and access token of a protected request.
    pub(crate) fn authenticate(&self, req: &HttpRequest) -> Result<AccessClaims, AuthError> {
        let token = super::proofs::access_token(req)?;
        // A request with no credentials at all gets a plain challenge (RFC 6750 section 3.1).
        if token.is_none() && !req.headers().contains_key("dpop") {
            return Err(AuthError::MissingToken);
        }
        let proof = self.check_proof(req, token)?;
        let token = token.ok_or(AuthError::MissingToken)?;
        self.verify_access_token(token, &proof)
    }
}
