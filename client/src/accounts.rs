//! The account endpoints over HTTPS: passkey registration and login, DPoP-bound tokens,
//! device enrollment with a token and receipts over HTTP.
//!
//! An [`AccountSession`] keeps its own Ed25519 DPoP key, the key its tokens are bound to, and
//! signs a fresh proof for every request.

use crate::dpop_state::DpopState;
use crate::{ClientError, EnrollmentRequest, ServerTrust, tls};
use atlas_protocol::accounts::{
    CeremonyFinish, CeremonyStart, CeremonyStarted, DeviceEnrolled, DeviceEnrollment, ErrorBody,
    PasskeyList, PasskeyRegistered, RefreshRequest, Tokens,
};
use atlas_protocol::dpop::{ProofParams, make_proof};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_authenticator_rs::prelude::Url;

/// An error response of the account endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpFailure {
    pub status: u16,
    /// The `error` code of the JSON body.
    pub error: String,
    pub description: String,
    /// The `WWW-Authenticate` header, if any.
    pub challenge: Option<String>,
    /// The `DPoP-Nonce` header, if any.
    pub dpop_nonce: Option<String>,
    /// The `Date` header, if any.
    pub date: Option<String>,
}

/// A client of one node's account endpoints.
pub struct AccountSession {
    base: String,
    http: reqwest::Client,
    dpop_key: SigningKey,
    tokens: Option<Tokens>,
    dpop: DpopState,
}

impl AccountSession {
    /// Creates a session for the node at `base` (`https://host:port`) with a new DPoP key.
    pub fn new(base: &str, trust: &ServerTrust) -> Result<Self, ClientError> {
        Self::with_key(base, trust, SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Creates a session that signs its proofs with `dpop_key`.
    pub fn with_key(
        base: &str,
        trust: &ServerTrust,
        dpop_key: SigningKey,
    ) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls::client_config(trust)?)
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client setup failed: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            dpop_key,
            tokens: None,
            dpop: DpopState::default(),
        })
    }

    /// Returns the `https://host:port` base of a `wss://host:port/v1/ws` URL.
    pub fn base_of(ws_url: &str) -> Result<String, ClientError> {
        let url = Url::parse(ws_url)
            .map_err(|e| ClientError::Config(format!("invalid URL {ws_url}: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| ClientError::Config(format!("URL {ws_url} has no host")))?;
        Ok(match url.port() {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        })
    }

    /// Returns the HTTP client, with the session's TLS trust, for requests built by hand.
    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn dpop_key(&self) -> &SigningKey {
        &self.dpop_key
    }

    pub fn tokens(&self) -> Option<&Tokens> {
        self.tokens.as_ref()
    }

    /// Replaces the tokens, such as with ones saved earlier.
    pub fn set_tokens(&mut self, tokens: Option<Tokens>) {
        self.tokens = tokens;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Signs a proof for `method` on `path` with the session's key, for the current access
    /// token if `with_token`.
    pub fn proof(&self, method: &str, path: &str, with_token: bool) -> String {
        let token = with_token.then(|| self.tokens.as_ref().map(|t| t.access_token.as_str()));
        make_proof(
            &self.dpop_key,
            &ProofParams {
                method,
                uri: &self.url(path),
                access_token: token.flatten(),
                nonce: self.dpop.nonce().as_deref(),
                now_s: self.dpop.now_s(),
            },
        )
    }

    /// Sends a request with a fresh proof (and the access token when `with_token`) and returns
    /// the raw response. A request rejected because the server wants a nonce, or because the
    /// local clock is off, is sent once more with a corrected proof.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        with_token: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let mut retries = 0;
        loop {
            let response = self
                .send_once(method.clone(), path, body, with_token)
                .await?;
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let challenge = (response.status() == reqwest::StatusCode::UNAUTHORIZED)
                .then(|| header("www-authenticate"))
                .flatten();
            let retry = self.dpop.learn(
                header("dpop-nonce").as_deref(),
                header("date").as_deref(),
                challenge.as_deref(),
            );
            if !retry || retries >= crate::DPOP_RETRIES {
                return Ok(response);
            }
            retries += 1;
        }
    }

    async fn send_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        with_token: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let proof = self.proof(method.as_str(), path, with_token);
        let token = match (with_token, &self.tokens) {
            (false, _) => None,
            (true, Some(tokens)) => Some(tokens.access_token.as_str()),
            (true, None) => {
                return Err(ClientError::Config(
                    "no access token: log in with a passkey first".into(),
                ));
            }
        };
        self.dispatch(method, path, body, Some(&proof), token).await
    }

    /// Sends a request with exactly the given `DPoP` and `Authorization: DPoP` values, for
    /// tests of the server's checks.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        proof: Option<&str>,
        access_token: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        self.dispatch(method, path, body, proof, access_token).await
    }

    async fn dispatch(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        proof: Option<&str>,
        access_token: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method, self.url(path));
        if let Some(proof) = proof {
            request = request.header("DPoP", proof);
        }
        if let Some(token) = access_token {
            request = request.header("Authorization", format!("DPoP {token}"));
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request
            .send()
            .await
            .map_err(|e| ClientError::Connect(format!("request to {path} failed: {e}")))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        with_token: bool,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body, with_token).await?;
        parse(path, response).await
    }

    /// Creates `account` with a new passkey made by `authenticator` for `origin`, and keeps
    /// the tokens of the new account.
    pub async fn register(
        &mut self,
        account: &str,
        authenticator: &mut impl WebauthnAuthenticator,
        origin: &Url,
    ) -> Result<PasskeyRegistered, ClientError> {
        let registered = self
            .register_passkey(account, authenticator, origin, false)
            .await?;
        if let Some(tokens) = &registered.tokens {
            self.tokens = Some(tokens.clone());
        }
        Ok(registered)
    }

    /// Adds another passkey to the logged-in account.
    pub async fn add_passkey(
        &mut self,
        authenticator: &mut impl WebauthnAuthenticator,
        origin: &Url,
    ) -> Result<PasskeyRegistered, ClientError> {
        let account = self.logged_in_account()?;
        self.register_passkey(&account, authenticator, origin, true)
            .await
    }

    async fn register_passkey(
        &mut self,
        account: &str,
        authenticator: &mut impl WebauthnAuthenticator,
        origin: &Url,
        with_token: bool,
    ) -> Result<PasskeyRegistered, ClientError> {
        let (ceremony, options) = self
            .start_ceremony("/v1/passkeys/register/start", account, with_token)
            .await?;
        let credential = authenticator
            .do_registration(origin.clone(), options)
            .map_err(|e| ClientError::Config(format!("authenticator failed: {e:?}")))?;
        self.finish_ceremony("/v1/passkeys/register/finish", ceremony, &credential)
            .await
    }

    async fn start_ceremony<T: DeserializeOwned>(
        &self,
        path: &str,
        account: &str,
        with_token: bool,
    ) -> Result<(String, T), ClientError> {
        let body = CeremonyStart {
            account: account.to_owned(),
        };
        let started: CeremonyStarted = self
            .call(reqwest::Method::POST, path, Some(&body), with_token)
            .await?;
        let options = serde_json::from_value(started.options)
            .map_err(|e| ClientError::Protocol(format!("WebAuthn options from {path}: {e}")))?;
        Ok((started.ceremony, options))
    }

    async fn finish_ceremony<T: DeserializeOwned>(
        &self,
        path: &str,
        ceremony: String,
        credential: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = CeremonyFinish {
            ceremony,
            credential: serde_json::to_value(credential)
                .map_err(|e| ClientError::Protocol(format!("credential: {e}")))?,
        };
        self.call(reqwest::Method::POST, path, Some(&body), false)
            .await
    }

    /// Starts a passkey login; returns the ceremony id and the options for the authenticator.
    pub async fn login_start(
        &self,
        account: &str,
    ) -> Result<(String, webauthn_rs_proto::RequestChallengeResponse), ClientError> {
        self.start_ceremony("/v1/passkeys/login/start", account, false)
            .await
    }

    /// Finishes a passkey login with the authenticator's credential and keeps the tokens.
    pub async fn login_finish(
        &mut self,
        ceremony: &str,
        credential: &webauthn_rs_proto::PublicKeyCredential,
    ) -> Result<Tokens, ClientError> {
        let tokens: Tokens = self
            .finish_ceremony("/v1/passkeys/login/finish", ceremony.to_owned(), credential)
            .await?;
        self.tokens = Some(tokens.clone());
        Ok(tokens)
    }

    /// Logs in to `account` with a passkey of `authenticator` and keeps the tokens.
    pub async fn login(
        &mut self,
        account: &str,
        authenticator: &mut impl WebauthnAuthenticator,
        origin: &Url,
    ) -> Result<Tokens, ClientError> {
        let (ceremony, options) = self.login_start(account).await?;
        let credential = authenticator
            .do_authentication(origin.clone(), options)
            .map_err(|e| ClientError::Config(format!("authenticator failed: {e:?}")))?;
        self.login_finish(&ceremony, &credential).await
    }

    /// Exchanges the refresh token for new tokens.
    pub async fn refresh(&mut self) -> Result<Tokens, ClientError> {
        let refresh_token = self
            .tokens
            .as_ref()
            .map(|t| t.refresh_token.clone())
            .ok_or_else(|| ClientError::Config("no refresh token: log in first".into()))?;
        let tokens: Tokens = self
            .call(
                reqwest::Method::POST,
                "/v1/token",
                Some(&RefreshRequest {
                    grant_type: "refresh_token".into(),
                    refresh_token,
                }),
                false,
            )
            .await?;
        self.tokens = Some(tokens.clone());
        Ok(tokens)
    }

    /// Enrolls the device that made `request` (see [`crate::Client::enrollment_request`]) in
    /// the logged-in account.
    pub async fn enroll_device(
        &self,
        request: &EnrollmentRequest,
    ) -> Result<DeviceEnrolled, ClientError> {
        self.call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(&DeviceEnrollment {
                public_key: URL_SAFE_NO_PAD.encode(&request.key),
                time_ms: request.time_ms,
                signature: URL_SAFE_NO_PAD.encode(&request.signature),
            }),
            true,
        )
        .await
    }

    /// Lists the passkeys of the logged-in account.
    pub async fn passkeys(&self) -> Result<PasskeyList, ClientError> {
        self.call(reqwest::Method::GET, "/v1/passkeys", None::<&()>, true)
            .await
    }

    /// Removes a passkey of the logged-in account; the last one cannot be removed.
    pub async fn remove_passkey(&self, credential_id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/passkeys/{credential_id}");
        let response = self
            .send(reqwest::Method::DELETE, &path, None::<&()>, true)
            .await?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(failure(&path, response).await)
    }

    fn logged_in_account(&self) -> Result<String, ClientError> {
        self.tokens
            .as_ref()
            .map(|t| t.account.clone())
            .ok_or_else(|| ClientError::Config("not logged in: log in with a passkey first".into()))
    }
}

async fn parse<T: DeserializeOwned>(
    path: &str,
    response: reqwest::Response,
) -> Result<T, ClientError> {
    if !response.status().is_success() {
        return Err(failure(path, response).await);
    }
    response
        .json()
        .await
        .map_err(|e| ClientError::Protocol(format!("response of {path}: {e}")))
}

/// Turns an error response into [`ClientError::Http`].
pub async fn failure(path: &str, response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (challenge, dpop_nonce, date) = (
        header("www-authenticate"),
        header("dpop-nonce"),
        header("date"),
    );
    let body = response.bytes().await.unwrap_or_default();
    ClientError::Http(Box::new(http_failure(
        path, status, &body, challenge, dpop_nonce, date,
    )))
}

/// Builds an [`HttpFailure`] from an error response's status, body and headers.
pub(crate) fn http_failure(
    path: &str,
    status: u16,
    body: &[u8],
    challenge: Option<String>,
    dpop_nonce: Option<String>,
    date: Option<String>,
) -> HttpFailure {
    let body: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (error, description) = body
        .map(|b| (b.error, b.error_description))
        .unwrap_or_else(|| {
            (
                "unknown".into(),
                format!("HTTP {status} without error body"),
            )
        });
    HttpFailure {
        status,
        error,
        description: format!("{path}: {description}"),
        challenge,
        dpop_nonce,
        date,
    }
}
