//! Passkey accounts, DPoP-bound tokens and HTTP receipts against a real node process with its
//! default security (no open registration), using software authenticators from
//! webauthn-authenticator-rs.

use atlas_chaos::NodeProcess;
use atlas_client::accounts::{AccountSession, HttpFailure};
use atlas_client::{Client, ClientError, ServerTrust};
use atlas_protocol::dpop::{DpopClaims, ProofParams, make_proof, sign_proof};
use atlas_protocol::receipts::{Receipt, ReceiptFields};
use atlas_protocol::transparency::Jwks;
use atlas_protocol::{DeviceId, ErrorCode, GroupId};
use ed25519_dalek::SigningKey;
use reqwest::Method;
use std::path::{Path, PathBuf};
use std::time::Duration;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_authenticator_rs::prelude::Url;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::softtoken::SoftToken;

const BIN: &str = env!("CARGO_BIN_EXE_atlas");

struct Node {
    process: NodeProcess,
    trust: ServerTrust,
    origin: Url,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, false)
    }

    /// Starts a node that logs at every level.
    fn start_traced(extra: &[&str]) -> Self {
        Self::start_with(extra, true)
    }

    fn start_with(extra: &[&str], traced: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let data = dir.path().join("node");
        let start = if traced {
            NodeProcess::start_secure_traced
        } else {
            NodeProcess::start_secure
        };
        let process = start(Path::new(BIN), &data, extra, &log).unwrap();
        let trust = ServerTrust::fingerprint(&process.fingerprint).unwrap();
        let origin = Url::parse(&process.https_base()).unwrap();
        Self {
            process,
            trust,
            origin,
            log,
            _dir: dir,
        }
    }

    fn session(&self) -> AccountSession {
        AccountSession::new(&self.process.https_base(), &self.trust).unwrap()
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self._dir.path().join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn http_failure(result: Result<impl std::fmt::Debug, ClientError>) -> HttpFailure {
    match result {
        Err(ClientError::Http(failure)) => *failure,
        other => panic!("expected an HTTP error response, got {other:?}"),
    }
}

async fn status_and_error(response: reqwest::Response) -> (u16, String, Option<String>) {
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    (status, error, challenge)
}

fn passkey() -> SoftPasskey {
    // `true` makes the software authenticator report user verification, which the node
    // requires.
    SoftPasskey::new(true)
}

/// Registers `account`, enrolls a new device with the account's token and connects it.
async fn account_with_device(node: &Node, account: &str) -> (AccountSession, SoftPasskey, Client) {
    let mut session = node.session();
    let mut authenticator = passkey();
    session
        .register(account, &mut authenticator, &node.origin)
        .await
        .unwrap();
    let mut client = Client::open(&node.state_dir(account), account).unwrap();
    let request = client.enrollment_request("localhost").unwrap();
    let enrolled = session.enroll_device(&request).await.unwrap();
    assert_eq!(enrolled.device, client.device_id().to_string());
    client
        .connect(&node.process.url(), &node.trust)
        .await
        .unwrap();
    (session, authenticator, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkey_account_end_to_end() {
    let node = Node::start(&[]);

    // A device that no one enrolled cannot log in, because registration is not open.
    let mut stranger = Client::open(&node.state_dir("stranger"), "stranger").unwrap();
    let err = stranger
        .connect(&node.process.url(), &node.trust)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DeviceNotEnrolled), "{err}");

    let (mut session, mut authenticator, mut alice) = account_with_device(&node, "alice").await;
    let first = session.tokens().unwrap().clone();
    assert_eq!(first.token_type, "DPoP");
    assert_eq!(first.account, "alice");

    // The enrolled device's key is provable in the key transparency log.
    let devices = alice.lookup_devices("alice").await.unwrap();
    assert_eq!(devices.len(), 1);

    // The name is taken now, for a new passkey and for a device by open registration.
    let failure = http_failure(
        node.session()
            .register("alice", &mut passkey(), &node.origin)
            .await,
    );
    assert_eq!(failure.status, 409);
    assert_eq!(failure.error, "account_taken");

    // Logging in again with the passkey gives new tokens.
    let tokens = session
        .login("alice", &mut authenticator, &node.origin)
        .await
        .unwrap();
    assert_ne!(tokens.access_token, first.access_token);
    let refreshed = session.refresh().await.unwrap();
    assert_ne!(refreshed.refresh_token, tokens.refresh_token);

    // The only passkey cannot be removed; after adding a second one, the first can.
    let list = session.passkeys().await.unwrap();
    assert_eq!(list.passkeys.len(), 1);
    let only = list.passkeys[0].credential_id.clone();
    let failure = http_failure(session.remove_passkey(&only).await);
    assert_eq!(failure.status, 409);
    assert_eq!(failure.error, "last_passkey");
    let mut second = passkey();
    let added = session
        .add_passkey(&mut second, &node.origin)
        .await
        .unwrap();
    assert!(
        added.tokens.is_none(),
        "adding a passkey issues no new login"
    );
    assert_eq!(session.passkeys().await.unwrap().passkeys.len(), 2);
    session.remove_passkey(&only).await.unwrap();
    // The session came from a login with the removed passkey, so it ended with it.
    let failure = http_failure(session.passkeys().await);
    assert_eq!(failure.error, "invalid_token", "{failure:?}");
    let failure = http_failure(session.refresh().await);
    assert_eq!(failure.error, "invalid_grant", "{failure:?}");
    // The removed passkey is no longer offered for login, so its authenticator has no
    // credential to sign with, and the second one logs in.
    let removed = session
        .login("alice", &mut authenticator, &node.origin)
        .await;
    assert!(removed.is_err(), "{removed:?}");
    session
        .login("alice", &mut second, &node.origin)
        .await
        .unwrap();
    let remaining = session.passkeys().await.unwrap().passkeys;
    assert_eq!(remaining.len(), 1);
    assert!(remaining.iter().all(|p| p.credential_id != only));

    // Adding a passkey needs a session of the account itself.
    let (mut bob_session, _, _bob) = account_with_device(&node, "bob").await;
    bob_session.set_tokens(session.tokens().cloned());
    let failure = http_failure(bob_session.add_passkey(&mut passkey(), &node.origin).await);
    assert_eq!(
        failure.status, 401,
        "alice's token with bob's DPoP key: {failure:?}"
    );

    // An auditor replays the log and checks the node's signature on both passkey grants.
    let options = atlas_client::audit::AuditOptions {
        from: 0,
        follow: None,
        max_polls: None,
        state_file: None,
    };
    let report = atlas_client::audit::audit(&node.process.url(), &node.trust, &options, |_| {})
        .await
        .unwrap();
    assert_eq!(report.entries_checked, 2, "{report:?}");
    assert_eq!(report.unverified_grants, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_misuse_rejected() {
    let node = Node::start(&["--ceremony-ttl-secs", "1"]);
    let mut session = node.session();
    let mut authenticator = passkey();
    session
        .register("carol", &mut authenticator, &node.origin)
        .await
        .unwrap();

    // A ceremony finishes at most once.
    let (ceremony, options) = session.login_start("carol").await.unwrap();
    let credential = authenticator
        .do_authentication(node.origin.clone(), options)
        .unwrap();
    session.login_finish(&ceremony, &credential).await.unwrap();
    let failure = http_failure(session.login_finish(&ceremony, &credential).await);
    assert_eq!(failure.status, 400);
    assert_eq!(failure.error, "ceremony_not_found");

    // A ceremony finished after its lifetime is rejected.
    let (ceremony, options) = session.login_start("carol").await.unwrap();
    let credential = authenticator
        .do_authentication(node.origin.clone(), options)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failure = http_failure(session.login_finish(&ceremony, &credential).await);
    assert_eq!(failure.error, "ceremony_expired", "{failure:?}");

    // An assertion made for another origin is rejected.
    let (ceremony, options) = session.login_start("carol").await.unwrap();
    let evil = Url::parse("https://evil.localhost:1").unwrap();
    let credential = authenticator.do_authentication(evil, options).unwrap();
    let failure = http_failure(session.login_finish(&ceremony, &credential).await);
    assert_eq!(failure.error, "passkey_rejected", "{failure:?}");

    // An assertion made for another relying party id is rejected.
    let (ceremony, mut options) = session.login_start("carol").await.unwrap();
    options.public_key.rp_id = "evil.localhost".into();
    let evil = Url::parse("https://evil.localhost").unwrap();
    let credential = authenticator.do_authentication(evil, options).unwrap();
    let failure = http_failure(session.login_finish(&ceremony, &credential).await);
    assert_eq!(failure.error, "passkey_rejected", "{failure:?}");

    // A ceremony started with one DPoP key cannot be finished with another.
    let (ceremony, options) = session.login_start("carol").await.unwrap();
    let credential = authenticator
        .do_authentication(node.origin.clone(), options)
        .unwrap();
    let mut other = node.session();
    let failure = http_failure(other.login_finish(&ceremony, &credential).await);
    assert_eq!(failure.status, 400);

    // A cloned authenticator shows itself by a signature counter that did not grow.
    let (mut token, _) = SoftToken::new(true).unwrap();
    let mut cloned_session = node.session();
    cloned_session
        .register("dave", &mut token, &node.origin)
        .await
        .unwrap();
    let mut clone = SoftToken::from_cbor(&token.to_cbor().unwrap()).unwrap();
    cloned_session
        .login("dave", &mut token, &node.origin)
        .await
        .unwrap();
    cloned_session
        .login("dave", &mut token, &node.origin)
        .await
        .unwrap();
    let failure = http_failure(cloned_session.login("dave", &mut clone, &node.origin).await);
    assert_eq!(failure.error, "passkey_rejected", "{failure:?}");

    // A clone that finishes a ceremony started before the original's last login is rejected,
    // because the counter is compared with the stored one, not the one of the ceremony's start.
    let mut early_clone = SoftToken::from_cbor(&token.to_cbor().unwrap()).unwrap();
    let (early, early_options) = cloned_session.login_start("dave").await.unwrap();
    cloned_session
        .login("dave", &mut token, &node.origin)
        .await
        .unwrap();
    let credential = early_clone
        .do_authentication(node.origin.clone(), early_options)
        .unwrap();
    let failure = http_failure(cloned_session.login_finish(&early, &credential).await);
    assert_eq!(failure.error, "passkey_rejected", "{failure:?}");

    // Two clients race for one name, and the second finish gets 409 account_taken.
    let (mut first, mut second) = (node.session(), node.session());
    let mut first_key = passkey();
    let mut second_key = passkey();
    let (one, one_options) = start_registration(&first, "erin").await;
    let (two, two_options) = start_registration(&second, "erin").await;
    let one_credential = first_key
        .do_registration(node.origin.clone(), one_options)
        .unwrap();
    let two_credential = second_key
        .do_registration(node.origin.clone(), two_options)
        .unwrap();
    finish_registration(&mut first, &one, &one_credential)
        .await
        .unwrap();
    let failure = http_failure(finish_registration(&mut second, &two, &two_credential).await);
    assert_eq!(
        (failure.status, failure.error.as_str()),
        (409, "account_taken")
    );
}

async fn start_registration(
    session: &AccountSession,
    account: &str,
) -> (
    String,
    webauthn_authenticator_rs::prelude::CreationChallengeResponse,
) {
    let response = session
        .send(
            Method::POST,
            "/v1/passkeys/register/start",
            Some(&serde_json::json!({ "account": account })),
            false,
        )
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let started: serde_json::Value = response.json().await.unwrap();
    (
        started["ceremony"].as_str().unwrap().to_owned(),
        serde_json::from_value(started["options"].clone()).unwrap(),
    )
}

async fn finish_registration(
    session: &mut AccountSession,
    ceremony: &str,
    credential: &impl serde::Serialize,
) -> Result<(), ClientError> {
    let body = serde_json::json!({ "ceremony": ceremony, "credential": credential });
    let response = session
        .send(
            Method::POST,
            "/v1/passkeys/register/finish",
            Some(&body),
            false,
        )
        .await?;
    if response.status().is_success() {
        return Ok(());
    }
    Err(atlas_client::accounts::failure("/v1/passkeys/register/finish", response).await)
}

/// Starts a registration for `flood-N`; returns the status, error code and `Retry-After`.
async fn start(session: &AccountSession, n: usize) -> (u16, String, Option<String>) {
    let body = serde_json::json!({ "account": format!("flood-{n}") });
    let response = session
        .send(
            Method::POST,
            "/v1/passkeys/register/start",
            Some(&body),
            false,
        )
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, error, _) = status_and_error(response).await;
    (status, error, retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_limits_per_key_and_address() {
    let node = Node::start(&[]);
    // One DPoP key may have four ceremonies open.
    let session = node.session();
    for n in 0..4 {
        assert_eq!(start(&session, n).await.0, 200);
    }
    let (status, error, retry_after) = start(&session, 4).await;
    assert_eq!((status, error.as_str()), (503, "temporarily_unavailable"));
    let wait: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=300).contains(&wait), "{wait}");

    // One address may have 32 open, whatever the keys.
    let mut opened = 4;
    let mut sessions = Vec::new();
    while opened < 32 {
        let other = node.session();
        for _ in 0..4 {
            assert_eq!(start(&other, 100 + opened).await.0, 200);
            opened += 1;
        }
        sessions.push(other);
    }
    let fresh = node.session();
    let (status, error, _) = start(&fresh, 999).await;
    assert_eq!((status, error.as_str()), (503, "temporarily_unavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkey_changes_need_recent_login() {
    let node = Node::start(&["--reauthentication-window-secs", "1"]);
    let (mut session, mut authenticator, _client) = account_with_device(&node, "frank").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // A refreshed token still carries the time of the old passkey login.
    session.refresh().await.unwrap();
    let failure = http_failure(session.add_passkey(&mut passkey(), &node.origin).await);
    assert_eq!(failure.status, 401);
    assert_eq!(failure.error, "insufficient_user_authentication");
    let challenge = failure.challenge.unwrap_or_default();
    assert!(challenge.contains("max_age=1"), "{challenge}");
    let only = session.passkeys().await.unwrap().passkeys[0]
        .credential_id
        .clone();
    let failure = http_failure(session.remove_passkey(&only).await);
    assert_eq!(failure.error, "insufficient_user_authentication");
    // Nor may it enroll a device, which would read what the account receives.
    let device = Client::open(&node.state_dir("frank-laptop"), "frank").unwrap();
    let request = device.enrollment_request("localhost").unwrap();
    let failure = http_failure(session.enroll_device(&request).await);
    assert_eq!(failure.error, "insufficient_user_authentication");
    // A passkey registration started within the window cannot finish after it.
    session
        .login("frank", &mut authenticator, &node.origin)
        .await
        .unwrap();
    let response = session
        .send(
            Method::POST,
            "/v1/passkeys/register/start",
            Some(&serde_json::json!({ "account": "frank" })),
            true,
        )
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let started: serde_json::Value = response.json().await.unwrap();
    let options = serde_json::from_value(started["options"].clone()).unwrap();
    let credential = passkey()
        .do_registration(node.origin.clone(), options)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let failure = http_failure(
        finish_registration(
            &mut session,
            started["ceremony"].as_str().unwrap(),
            &credential,
        )
        .await,
    );
    assert_eq!(failure.error, "insufficient_user_authentication");
    // A fresh passkey login allows it.
    session
        .login("frank", &mut authenticator, &node.origin)
        .await
        .unwrap();
    session
        .add_passkey(&mut passkey(), &node.origin)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_failures_rejected() {
    let node = Node::start_traced(&["--access-token-ttl-secs", "2"]);
    let (mut session, _, _alice) = account_with_device(&node, "erin").await;
    let token = session.tokens().unwrap().access_token.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |htm: &str, path: &str, iat: u64, ath: Option<&str>| DpopClaims {
        jti: format!("jti-{htm}-{path}-{iat}-{}", ath.is_some()),
        htm: htm.into(),
        htu: session.url(path),
        iat,
        ath: ath.map(atlas_protocol::dpop::access_token_hash),
        nonce: None,
    };
    let key = session.dpop_key().clone();
    let list = |proof: Option<String>, token: Option<String>| {
        let session = &session;
        async move {
            let response = session
                .send_raw(
                    Method::GET,
                    "/v1/passkeys",
                    None,
                    proof.as_deref(),
                    token.as_deref(),
                )
                .await
                .unwrap();
            status_and_error(response).await
        }
    };

    let good = sign_proof(&key, &claims("GET", "/v1/passkeys", now, Some(&token)));
    let (status, _, _) = list(Some(good.clone()), Some(token.clone())).await;
    assert_eq!(status, 200, "a correct proof passes");

    let cases: Vec<(&str, Option<String>, Option<String>, &str)> = vec![
        (
            "missing proof",
            None,
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "wrong htm",
            Some(sign_proof(
                &key,
                &claims("POST", "/v1/passkeys", now, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "wrong htu",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/devices", now, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "stale iat",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/passkeys", now - 600, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "replayed jti",
            Some(good),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "wrong ath",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/passkeys", now + 1, Some("another token")),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "proof by another key than cnf.jkt",
            Some(sign_proof(
                &SigningKey::from_bytes(&[9; 32]),
                &claims("GET", "/v1/passkeys", now, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_token",
        ),
        (
            "iat too far ahead",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/passkeys", now + 30, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "issued before the node started",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/passkeys", now - 50, Some(&token)),
            )),
            Some(token.clone()),
            "invalid_dpop_proof",
        ),
        (
            "no token",
            Some(sign_proof(
                &key,
                &claims("GET", "/v1/passkeys", now + 2, None),
            )),
            None,
            "invalid_token",
        ),
    ];
    for (case, proof, token, expected) in cases {
        let (status, error, challenge) = list(proof, token).await;
        assert_eq!(status, 401, "{case}");
        assert_eq!(error, expected, "{case}");
        let challenge = challenge.unwrap_or_default();
        assert!(challenge.starts_with("DPoP "), "{case}: {challenge}");
        if case != "no token" {
            assert!(
                challenge.contains(&format!("error=\"{expected}\"")),
                "{case}: {challenge}"
            );
        }
    }

    // Each rejection is counted by its code: the seven proof failures and the replay above,
    // and the key mismatch and missing token.
    let counted = |code: &str| {
        node.process
            .metric(&format!("atlas_auth_rejections_total{{code=\"{code}\"}}"))
            .unwrap()
    };
    assert_eq!(counted("invalid_dpop_proof"), 8.0);
    assert_eq!(counted("invalid_token"), 2.0);

    // Neither the Host header nor a forwarding header can make a proof for another host
    // pass: the configured origin names this server.
    let elsewhere = DpopClaims {
        htu: "https://evil.example/v1/passkeys".into(),
        ..claims("GET", "/v1/passkeys", now + 3, Some(&token))
    };
    let response = session
        .http_client()
        .get(session.url("/v1/passkeys"))
        .header("DPoP", sign_proof(&key, &elsewhere))
        .header("Authorization", format!("DPoP {token}"))
        .header("Host", "evil.example")
        .header("X-Forwarded-Host", "evil.example")
        .header("Forwarded", "host=evil.example;proto=https")
        .send()
        .await
        .unwrap();
    let (status, error, _) = status_and_error(response).await;
    assert_eq!((status, error.as_str()), (401, "invalid_dpop_proof"));

    // The WebSocket upgrade needs a proof too.
    let ws = session
        .send_raw(Method::GET, "/v1/ws", None, None, None)
        .await
        .unwrap();
    assert_eq!(ws.status().as_u16(), 401);

    // An expired access token is rejected.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let failure = http_failure(session.passkeys().await);
    assert_eq!(failure.status, 401);
    assert_eq!(failure.error, "invalid_token", "{failure:?}");

    // A refresh token works once; presenting a spent one revokes its whole chain.
    let spent = session.tokens().unwrap().clone();
    let fresh = session.refresh().await.unwrap();
    session.passkeys().await.unwrap();
    session.set_tokens(Some(spent));
    let failure = http_failure(session.refresh().await);
    assert_eq!(failure.status, 400);
    assert_eq!(failure.error, "invalid_grant");
    session.set_tokens(Some(fresh.clone()));
    let failure = http_failure(session.refresh().await);
    assert_eq!(
        failure.error, "invalid_grant",
        "the newest token is revoked too"
    );
    let issued = node
        .process
        .metric("atlas_tokens_issued_total{grant=\"refresh\"}")
        .unwrap();
    assert_eq!(issued, 1.0, "one refresh succeeded");
    let failure = http_failure(session.passkeys().await);
    assert_eq!(
        failure.error, "invalid_token",
        "access tokens of the chain end too"
    );

    // A refresh token presented with another DPoP key is rejected.
    let (mut frank, _, _) = account_with_device(&node, "frank").await;
    let mut thief = node.session();
    thief.set_tokens(frank.tokens().cloned());
    let failure = http_failure(thief.refresh().await);
    assert_eq!(failure.error, "invalid_grant");
    let failure = http_failure(frank.refresh().await);
    assert_eq!(
        failure.error, "invalid_grant",
        "the stolen chain is revoked"
    );

    // Neither tokens, proofs nor the sealing secret appear in the node's log at any level.
    let log = node.log_text();
    assert!(log.contains("TRACE"), "the node logged at trace level");
    assert!(
        log.contains("account request rejected"),
        "failures are logged"
    );
    let sealing_secret =
        std::fs::read_to_string(node.process.data_dir.join("signing-key-secret")).unwrap();
    let proof = session.proof("GET", "/v1/passkeys", true);
    let header_part = proof.split('.').next().unwrap().to_owned();
    for (what, secret) in [
        ("access token", fresh.access_token.as_str()),
        ("refresh token", fresh.refresh_token.as_str()),
        ("first access token", token.as_str()),
        ("sealing secret", sealing_secret.trim()),
        ("proof header", header_part.as_str()),
    ] {
        assert!(!log.contains(secret), "the {what} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_nonce_required_when_configured() {
    let node = Node::start(&["--dpop-nonces"]);
    let session = node.session();
    let path = "/v1/passkeys/login/start";
    let body = serde_json::json!({"account": "nobody"});
    let response = session
        .send_raw(
            Method::POST,
            path,
            Some(&body),
            Some(&session.proof("POST", path, false)),
            None,
        )
        .await
        .unwrap();
    let nonce = response
        .headers()
        .get("dpop-nonce")
        .map(|v| v.to_str().unwrap().to_owned())
        .expect("a DPoP-Nonce header");
    let (status, error, _) = status_and_error(response).await;
    assert_eq!(status, 401);
    assert_eq!(error, "use_dpop_nonce");

    let proof = make_proof(
        session.dpop_key(),
        &ProofParams {
            method: "POST",
            uri: &session.url(path),
            access_token: None,
            nonce: Some(&nonce),
            now_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        },
    );
    let response = session
        .send_raw(Method::POST, path, Some(&body), Some(&proof), None)
        .await
        .unwrap();
    let (status, error, _) = status_and_error(response).await;
    assert_eq!((status, error.as_str()), (404, "account_not_found"));

    // The SDK learns the nonce from the challenge and retries, over HTTP and for the
    // WebSocket upgrade.
    let (_, _, mut client) = account_with_device(&node, "nonce-user").await;
    client.publish_key_packages(1).await.unwrap();
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_over_http_verifies() {
    let node = Node::start(&[]);
    let (alice_session, _, mut alice) = account_with_device(&node, "grace").await;
    let (_, _, mut bob) = account_with_device(&node, "heidi").await;
    let (outsider, _, _) = account_with_device(&node, "ivan").await;
    bob.publish_key_packages(2).await.unwrap();
    let group = alice.create_group("receipts").await.unwrap();
    alice.add_members(&group, &["heidi"]).await.unwrap();
    let seq = alice.send(&group, "signed and delivered").await.unwrap();

    let path = format!("/v1/receipts/{}/{seq}", hex::encode(group.as_bytes()));
    let response = alice_session
        .send(Method::GET, &path, None::<&()>, true)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let fields = ReceiptFields {
        group: GroupId::new(hex::decode(header(&response, "atlas-group")).unwrap()).unwrap(),
        seq: header(&response, "atlas-seq").parse().unwrap(),
        sender: DeviceId::from_hex(&header(&response, "atlas-sender")).unwrap(),
        accepted_at_ms: header(&response, "atlas-accepted-at").parse().unwrap(),
        content_digest: header(&response, "content-digest"),
    };
    let receipt = Receipt {
        signature_input: header(&response, "signature-input"),
        signature: header(&response, "signature"),
    };
    let body = response.bytes().await.unwrap();
    let jwks: Jwks = node
        .session()
        .send_raw(Method::GET, "/.well-known/jwks.json", None, None, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    fields.verify(&receipt, &jwks).unwrap();
    fields.check_ciphertext(&body).unwrap();
    assert_eq!(fields.seq, seq);
    assert_eq!(fields.sender, alice.device_id());
    // The same receipt the SDK kept from the acknowledgement.
    assert_eq!(alice.receipt(&group, seq).unwrap().fields, fields);

    // An account with no device in the group may not read it.
    let response = outsider
        .send(Method::GET, &path, None::<&()>, true)
        .await
        .unwrap();
    let (status, error, _) = status_and_error(response).await;
    assert_eq!((status, error.as_str()), (403, "forbidden"));
    // Nor may a request without a token.
    let response = outsider
        .send_raw(
            Method::GET,
            &path,
            None,
            Some(&outsider.proof("GET", &path, false)),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // A sequence number beyond u64 is a bad request, with the JSON error body.
    let beyond = format!(
        "/v1/receipts/{}/18446744073709551616",
        hex::encode(group.as_bytes())
    );
    let response = alice_session
        .send(Method::GET, &beyond, None::<&()>, true)
        .await
        .unwrap();
    let (status, error, _) = status_and_error(response).await;
    assert_eq!((status, error.as_str()), (400, "invalid_request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_page_security_headers() {
    let node = Node::start(&[]);
    let session = node.session();
    let mut nonces = Vec::new();
    for _ in 0..2 {
        let response = session
            .send_raw(Method::GET, "/login", None, None, None)
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        for (name, expected) in [
            ("strict-transport-security", "max-age=31536000"),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("cross-origin-opener-policy", "same-origin"),
            ("cross-origin-embedder-policy", "require-corp"),
            ("cross-origin-resource-policy", "same-origin"),
        ] {
            assert_eq!(header(&response, name), expected, "{name}");
        }
        let policy = header(&response, "content-security-policy");
        assert!(
            policy.contains("require-trusted-types-for 'script'"),
            "{policy}"
        );
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        let nonce = policy
            .split("'nonce-")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .expect("a script nonce")
            .to_owned();
        let page = response.text().await.unwrap();
        assert!(page.contains(&format!("<script type=\"module\" nonce=\"{nonce}\">")));
        assert!(!page.contains("ATLAS_CSP_NONCE"));
        nonces.push(nonce);
    }
    assert_ne!(nonces[0], nonces[1], "every response gets its own nonce");

    // An unknown path or a wrong method gets a JSON error, not an empty body.
    let response = session
        .send_raw(Method::GET, "/v1/passkeys/login/start", None, None, None)
        .await
        .unwrap();
    let (status, error, _) = status_and_error(response).await;
    assert_eq!((status, error.as_str()), (404, "not_found"));
}
