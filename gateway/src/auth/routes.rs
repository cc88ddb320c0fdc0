//! HTTP handlers of the account endpoints. Every handler checks the DPoP proof first.

use super::ceremonies::CeremonyKind;
use super::{Auth, AuthError};
use crate::GatewayState;
use actix_web::{HttpRequest, HttpResponse, web};
use atlas_actors::directory::valid_account;
use atlas_actors::{GroupError, GroupMsg};
use atlas_protocol::accounts::{
    CeremonyFinish, CeremonyStart, CeremonyStarted, DeviceEnrolled, DeviceEnrollment, PasskeyInfo,
    PasskeyList, PasskeyRegistered, RefreshRequest,
};
use atlas_protocol::dpop::DpopProof;
use atlas_protocol::{DeviceId, GroupId};
use atlas_storage::{AccountRecord, Change, MAX_PASSKEYS_PER_ACCOUNT, PasskeyRecord};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use webauthn_rs::prelude::{Passkey, PublicKeyCredential, RegisterPublicKeyCredential, Uuid};

/// Maximum size of a JSON request body of these endpoints.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Adds the account endpoints to an app.
pub(crate) fn configure(config: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(|e, _| AuthError::InvalidRequest(format!("request body: {e}")).into());
    // A path segment that does not parse (a sequence number beyond u64) gets the JSON error
    // of every other bad request, not actix-web's plain-text 404.
    let path = web::PathConfig::default()
        .error_handler(|e, _| AuthError::InvalidRequest(format!("request path: {e}")).into());
    config
        .app_data(json)
        .app_data(path)
        .route(
            "/v1/passkeys/register/start",
            web::post().to(register_start),
        )
        .route(
            "/v1/passkeys/register/finish",
            web::post().to(register_finish),
        )
        .route("/v1/passkeys/login/start", web::post().to(login_start))
        .route("/v1/passkeys/login/finish", web::post().to(login_finish))
        .route("/v1/passkeys", web::get().to(list_passkeys))
        .route(
            "/v1/passkeys/{credential}",
            web::delete().to(remove_passkey),
        )
        .route("/v1/token", web::post().to(refresh))
        .route("/v1/devices", web::post().to(enroll_device))
        .route("/v1/receipts/{group}/{seq}", web::get().to(receipt))
        .route("/login", web::get().to(login_page));
}

/// Placeholder in the login page for the per-response CSP nonce.
const NONCE_PLACEHOLDER: &str = "ATLAS_CSP_NONCE";

/// Serves a minimal page that runs the passkey ceremonies in a browser, with an ES256 DPoP key
/// kept in WebCrypto. Its script and style run only with this response's CSP nonce, and Trusted
/// Types admit no DOM injection sinks (the page writes text only).
async fn login_page() -> HttpResponse {
    let mut raw = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let nonce = URL_SAFE_NO_PAD.encode(raw);
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
         require-trusted-types-for 'script'; trusted-types 'none'"
    );
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", policy))
        .insert_header(("Cross-Origin-Embedder-Policy", "require-corp"))
        .insert_header(("Cache-Control", "no-store"))
        .body(include_str!("login.html").replace(NONCE_PLACEHOLDER, &nonce))
}

fn auth(state: &GatewayState) -> Result<&Auth, AuthError> {
    state
        .auth
        .as_deref()
        .ok_or_else(|| AuthError::NotFound("passkey accounts are not configured".into()))
}

fn count_tokens(state: &GatewayState, grant: &str) {
    state
        .metrics
        .tokens_issued
        .with_label_values(&[grant])
        .inc();
}

fn check_account(account: &str) -> Result<(), AuthError> {
    if valid_account(account) {
        Ok(())
    } else {
        Err(AuthError::InvalidRequest(format!(
            "invalid account name {:?}: use 1 to 64 characters from a-z, 0-9, '.', '_', '-'",
            account.chars().take(80).collect::<String>()
        )))
    }
}

fn decode_passkey(record: &PasskeyRecord, account: &str) -> Result<Passkey, AuthError> {
    serde_json::from_slice(&record.passkey).map_err(|e| {
        AuthError::Storage(atlas_storage::StorageError::Corrupt {
            what: format!("passkey of account {account:?}"),
            detail: e.to_string(),
        })
    })
}

/// Returns the signature counter stored in a passkey (webauthn-rs keeps it private, but
/// serializes it).
fn stored_counter(passkey: &Passkey) -> u32 {
    serde_json::to_value(passkey)
        .ok()
        .and_then(|v| v["cred"]["counter"].as_u64())
        .map_or(0, |c| c as u32)
}

fn encode_passkey(passkey: &Passkey) -> Vec<u8> {
    // A Passkey is plain data with string keys, so encoding it into a Vec cannot fail.
    serde_json::to_vec(passkey).expect("passkey serializes")
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("WebAuthn options serialize")
}

async fn register_start(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<CeremonyStart>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let token = super::proofs::access_token(&req)?;
    let proof = auth.check_proof(&req, token)?;
    let account = body.into_inner().account;
    check_account(&account)?;
    let existing = auth.store.account(&account)?;
    let (user_id, new_account, exclude, login_time) = match (token, existing) {
        (None, None) => {
            if !state.directory.devices(&account)?.is_empty() {
                return Err(AuthError::AccountTaken(account));
            }
            let mut user_id = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut user_id);
            (user_id, true, Vec::new(), None)
        }
        (None, Some(_)) => return Err(AuthError::AccountTaken(account)),
        (Some(token), existing) => {
            let claims = auth.verify_access_token(token, &proof)?;
            auth.require_recent_login(&claims)?;
            let record = existing.filter(|_| claims.sub == account).ok_or_else(|| {
                AuthError::Forbidden(format!(
                    "the access token is for account {:?}, not {account:?}",
                    claims.sub
                ))
            })?;
            let exclude = record
                .passkeys
                .iter()
                .map(|p| p.credential_id.clone())
                .collect();
            (record.user_id, false, exclude, Some(claims.auth_time))
        }
    };
    let (options, registration) = auth
        .webauthn
        .start_passkey_registration(Uuid::from_bytes(user_id), &account, &account, Some(exclude))
        .map_err(|e| AuthError::PasskeyRejected(e.to_string()))?;
    let kind = CeremonyKind::Registration {
        account,
        user_id,
        new_account,
        login_time,
        state: Box::new(registration),
    };
    started(auth, &req, kind, proof.jkt, to_json(&options))
}

/// Stores a ceremony for the DPoP key `jkt` and returns its id with the WebAuthn options.
fn started(
    auth: &Auth,
    req: &HttpRequest,
    kind: CeremonyKind,
    jkt: String,
    options: serde_json::Value,
) -> Result<HttpResponse, AuthError> {
    let peer = req.peer_addr().map(|a| a.ip());
    let ceremony = auth
        .ceremonies
        .insert(kind, jkt, peer, auth.settings.ceremony_ttl)?;
    Ok(HttpResponse::Ok().json(CeremonyStarted { ceremony, options }))
}

/// Checks the proof of a ceremony finish and takes ceremony `id`, which must have been
/// started with the same DPoP key.
fn finish_prelude<'a>(
    state: &'a GatewayState,
    req: &HttpRequest,
    id: &str,
) -> Result<(&'a Auth, DpopProof, CeremonyKind), AuthError> {
    let auth = auth(state)?;
    let proof = auth.check_proof(req, None)?;
    let ceremony = auth.ceremonies.take(id)?;
    if ceremony.jkt != proof.jkt {
        let shown: String = id.chars().take(40).collect();
        return Err(AuthError::CeremonyKeyMismatch(
            atlas_protocol::dpop::printable(&shown),
        ));
    }
    Ok((auth, proof, ceremony.kind))
}

async fn register_finish(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<CeremonyFinish>,
) -> Result<HttpResponse, AuthError> {
    let body = body.into_inner();
    let (auth, proof, kind) = finish_prelude(&state, &req, &body.ceremony)?;
    let CeremonyKind::Registration {
        account,
        user_id,
        new_account,
        login_time,
        state: registration,
    } = kind
    else {
        return Err(AuthError::InvalidRequest(format!(
            "ceremony {:?} is a login, not a registration",
            atlas_protocol::dpop::printable(&body.ceremony)
        )));
    };
    // The login that allowed adding a passkey must still be recent when the ceremony ends.
    if let Some(auth_time) = login_time {
        auth.require_recent_login_at(auth_time)?;
    }
    let credential: RegisterPublicKeyCredential = serde_json::from_value(body.credential)
        .map_err(|e| AuthError::InvalidRequest(format!("credential: {e}")))?;
    let passkey = auth
        .webauthn
        .finish_passkey_registration(&credential, &registration)
        .map_err(|e| AuthError::PasskeyRejected(e.to_string()))?;
    let now = atlas_actors::now_ms();
    let record = PasskeyRecord {
        credential_id: passkey.cred_id().to_vec(),
        passkey: encode_passkey(&passkey),
        created_ms: now,
        last_used_ms: None,
    };
    let credential_id = URL_SAFE_NO_PAD.encode(passkey.cred_id());
    let tokens = if new_account {
        auth.store
            .write_done(Change::CreateAccount(AccountRecord {
                account: account.clone(),
                user_id,
                created_ms: now,
                passkeys: vec![record],
            }))
            .await?;
        let tokens = auth.issue_tokens(&account, &proof.jkt, passkey.cred_id())?;
        count_tokens(&state, "passkey_registration");
        Some(tokens)
    } else {
        auth.store
            .write_account(&account, |stored| {
                if stored.passkeys.len() >= MAX_PASSKEYS_PER_ACCOUNT {
                    return Err(AuthError::TooManyPasskeys {
                        account: account.clone(),
                        max: MAX_PASSKEYS_PER_ACCOUNT,
                    });
                }
                if stored
                    .passkeys
                    .iter()
                    .any(|p| p.credential_id == record.credential_id)
                {
                    return Err(AuthError::CredentialInUse);
                }
                stored.passkeys.push(record.clone());
                Ok(())
            })
            .await?;
        None
    };
    auth.store.durable().await?;
    tracing::info!(%account, new_account, "passkey registered");
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(PasskeyRegistered {
            account,
            credential_id,
            tokens,
        }))
}

async fn login_start(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<CeremonyStart>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let proof = auth.check_proof(&req, None)?;
    let account = body.into_inner().account;
    check_account(&account)?;
    let record = auth
        .store
        .account(&account)?
        .filter(|r| !r.passkeys.is_empty())
        .ok_or_else(|| AuthError::AccountNotFound(account.clone()))?;
    let passkeys = record
        .passkeys
        .iter()
        .map(|p| decode_passkey(p, &account))
        .collect::<Result<Vec<_>, _>>()?;
    let (options, authentication) = auth
        .webauthn
        .start_passkey_authentication(&passkeys)
        .map_err(|e| AuthError::PasskeyRejected(e.to_string()))?;
    let kind = CeremonyKind::Authentication {
        account,
        state: Box::new(authentication),
    };
    started(auth, &req, kind, proof.jkt, to_json(&options))
}

async fn login_finish(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<CeremonyFinish>,
) -> Result<HttpResponse, AuthError> {
    let body = body.into_inner();
    let (auth, proof, kind) = finish_prelude(&state, &req, &body.ceremony)?;
    let CeremonyKind::Authentication {
        account,
        state: authentication,
    } = kind
    else {
        return Err(AuthError::InvalidRequest(format!(
            "ceremony {:?} is a registration, not a login",
            atlas_protocol::dpop::printable(&body.ceremony)
        )));
    };
    let credential: PublicKeyCredential = serde_json::from_value(body.credential)
        .map_err(|e| AuthError::InvalidRequest(format!("credential: {e}")))?;
    // webauthn-rs checks the challenge, origin, relying party id hash, user verification and
    // that the signature counter grew (a counter that did not suggests a cloned key).
    let result = auth
        .webauthn
        .finish_passkey_authentication(&credential, &authentication)
        .map_err(|e| AuthError::PasskeyRejected(e.to_string()))?;
    let now = atlas_actors::now_ms();
    auth.store
        .write_account(&account, |stored| {
            let record = stored
                .passkeys
                .iter_mut()
                .find(|p| p.credential_id.as_slice() == result.cred_id().as_slice())
                .ok_or_else(|| {
                    AuthError::PasskeyRejected("the passkey was removed from the account".into())
                })?;
            let mut passkey = decode_passkey(record, &account)?;
            // webauthn-rs compared the counter with the copy taken when the ceremony started. A
            // login finished since then may have raised it, so compare with the stored value too.
            // An authenticator with a counter never reports 0 again once it counted.
            let stored_counter = stored_counter(&passkey);
            if stored_counter > 0 && result.counter() <= stored_counter {
                return Err(AuthError::PasskeyRejected(
                    "the signature counter did not grow: the authenticator may be cloned".into(),
                ));
            }
            passkey.update_credential(&result);
            record.passkey = encode_passkey(&passkey);
            record.last_used_ms = Some(now);
            Ok::<(), AuthError>(())
        })
        .await?;
    let tokens = auth.issue_tokens(&account, &proof.jkt, result.cred_id())?;
    // A removal of this passkey that ran between the check above and the issue revoked the
    // logins it found, but not this one: check again, now that the login is stored.
    let still_registered = auth.store.account(&account)?.is_some_and(|record| {
        record
            .passkeys
            .iter()
            .any(|p| p.credential_id.as_slice() == result.cred_id().as_slice())
    });
    if !still_registered {
        auth.store
            .revoke_credential_logins(&account, result.cred_id(), atlas_actors::now_ms())?;
        return Err(AuthError::PasskeyRejected(
            "the passkey was removed from the account".into(),
        ));
    }
    auth.store.durable().await?;
    count_tokens(&state, "passkey_login");
    tracing::info!(%account, "passkey login");
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(tokens))
}

async fn list_passkeys(
    req: HttpRequest,
    state: web::Data<GatewayState>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let claims = auth.authenticate(&req)?;
    let record = auth
        .store
        .account(&claims.sub)?
        .ok_or_else(|| AuthError::AccountNotFound(claims.sub.clone()))?;
    Ok(HttpResponse::Ok().json(PasskeyList {
        account: record.account,
        passkeys: record
            .passkeys
            .iter()
            .map(|p| PasskeyInfo {
                credential_id: URL_SAFE_NO_PAD.encode(&p.credential_id),
                created_ms: p.created_ms,
                last_used_ms: p.last_used_ms,
            })
            .collect(),
    }))
}

async fn remove_passkey(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    path: web::Path<String>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let claims = auth.authenticate(&req)?;
    auth.require_recent_login(&claims)?;
    let credential = URL_SAFE_NO_PAD
        .decode(path.as_bytes())
        .map_err(|_| AuthError::InvalidRequest("credential id is not base64url".into()))?;
    auth.store
        .write_account(&claims.sub, |stored| {
            let before = stored.passkeys.len();
            if !stored
                .passkeys
                .iter()
                .any(|p| p.credential_id == credential)
            {
                return Err(AuthError::NotFound(format!(
                    "account {:?} has no passkey {}",
                    claims.sub,
                    atlas_protocol::dpop::printable(path.as_str())
                )));
            }
            if before == 1 {
                return Err(AuthError::LastPasskey);
            }
            stored.passkeys.retain(|p| p.credential_id != credential);
            Ok(())
        })
        .await?;
    // Sessions that the removed passkey started end with it.
    let revoked =
        auth.store
            .revoke_credential_logins(&claims.sub, &credential, atlas_actors::now_ms())?;
    auth.store.durable().await?;
    tracing::info!(account = %claims.sub, revoked, "passkey removed");
    Ok(HttpResponse::NoContent().finish())
}

async fn refresh(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let proof = auth.check_proof(&req, None)?;
    if body.grant_type != "refresh_token" {
        return Err(AuthError::InvalidRequest(format!(
            "unsupported grant_type {:?}; use refresh_token",
            body.grant_type.chars().take(40).collect::<String>()
        )));
    }
    let tokens = auth.refresh(&body.refresh_token, &proof)?;
    auth.store.durable().await?;
    count_tokens(&state, "refresh");
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(tokens))
}

async fn enroll_device(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    body: web::Json<DeviceEnrollment>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let claims = auth.authenticate(&req)?;
    // A new device can read what the account receives from then on, so a stolen refresh
    // token must not be enough to add one.
    auth.require_recent_login(&claims)?;
    let decode = |field: &str, value: &str| {
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| AuthError::InvalidRequest(format!("{field} is not base64url")))
    };
    let key = decode("public_key", &body.public_key)?;
    let signature = decode("signature", &body.signature)?;
    let (record, kt_index) = state
        .directory
        .enroll_by_token(
            &claims.sub,
            &claims.jti,
            &key,
            body.time_ms,
            &signature,
            &auth.keyring,
        )
        .await?;
    auth.store.durable().await?;
    Ok(HttpResponse::Ok().json(DeviceEnrolled {
        account: record.account,
        device: record.device.to_string(),
        kt_index,
    }))
}

/// Returns the receipt of entry `seq` of a group as an HTTP response whose own fields carry
/// the RFC 9421 signature, with the ciphertext as its body. Only accounts with a device in
/// the group may read it.
async fn receipt(
    req: HttpRequest,
    state: web::Data<GatewayState>,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, AuthError> {
    let auth = auth(&state)?;
    let claims = auth.authenticate(&req)?;
    let (group, seq) = path.into_inner();
    let group = hex::decode(&group)
        .ok()
        .and_then(|raw| GroupId::new(raw).ok())
        .ok_or_else(|| AuthError::InvalidRequest("group id must be 1 to 64 bytes in hex".into()))?;
    let devices: Vec<DeviceId> = state
        .directory
        .devices(&claims.sub)?
        .into_iter()
        .map(|d| d.device)
        .collect();
    let mut last_error = None;
    for device in devices {
        let answer = state
            .router
            .request(&group, |reply| GroupMsg::Receipt { device, seq, reply })
            .await;
        match answer {
            Ok((fields, receipt)) => {
                let entry = state.store.entry(&group, seq)?.ok_or_else(|| {
                    AuthError::NotFound(format!("entry {seq} of group {group} was pruned"))
                })?;
                return Ok(HttpResponse::Ok()
                    .content_type("application/octet-stream")
                    .insert_header(("Content-Digest", fields.content_digest.as_str()))
                    .insert_header(("Atlas-Group", fields.group.to_string()))
                    .insert_header(("Atlas-Seq", fields.seq.to_string()))
                    .insert_header(("Atlas-Sender", fields.sender.to_string()))
                    .insert_header(("Atlas-Accepted-At", fields.accepted_at_ms.to_string()))
                    .insert_header(("Signature-Input", receipt.signature_input))
                    .insert_header(("Signature", receipt.signature))
                    .body(entry.payload));
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(GroupError::NotMember(..)) | None => AuthError::Forbidden(format!(
            "no device of account {:?} is a member of group {group}",
            claims.sub
        )),
        Some(GroupError::NotFound(_) | GroupError::Invalid(..)) => {
            AuthError::NotFound(format!("group {group} has no stored entry {seq}"))
        }
        Some(e) => AuthError::Unavailable(e.to_string()),
    })
}
