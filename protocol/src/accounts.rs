//! JSON bodies of the account endpoints: passkey ceremonies, tokens and device enrollment.
//! WebAuthn options and credentials travel as the JSON that webauthn-rs and browsers use
//! (`PublicKeyCredentialCreationOptions` and friends); this crate keeps them as JSON values.

use serde::{Deserialize, Serialize};

/// `POST /v1/passkeys/register/start` and `POST /v1/passkeys/login/start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeremonyStart {
    pub account: String,
}

/// Response to a ceremony start: the id to finish it with and the WebAuthn options for
/// `navigator.credentials.create()` or `.get()`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeremonyStarted {
    pub ceremony: String,
    pub options: serde_json::Value,
}

/// `POST /v1/passkeys/register/finish` and `POST /v1/passkeys/login/finish`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeremonyFinish {
    pub ceremony: String,
    pub credential: serde_json::Value,
}

/// Response to a finished registration. A new account also gets its first tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyRegistered {
    pub account: String,
    /// Credential id, base64url.
    pub credential_id: String,
    pub tokens: Option<Tokens>,
}

/// Token response (RFC 6749 section 5.1 names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    /// Always `DPoP`.
    pub token_type: String,
    /// Lifetime of the access token, in seconds.
    pub expires_in: u64,
    pub refresh_token: String,
    pub account: String,
}

/// `POST /v1/token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// Must be `refresh_token`.
    pub grant_type: String,
    pub refresh_token: String,
}

/// One passkey in `GET /v1/passkeys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyInfo {
    /// Credential id, base64url.
    pub credential_id: String,
    pub created_ms: u64,
    pub last_used_ms: Option<u64>,
}

/// Response of `GET /v1/passkeys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyList {
    pub account: String,
    pub passkeys: Vec<PasskeyInfo>,
}

/// `POST /v1/devices`: enrolls a device key in the token's account. The key signs
/// [`crate::transparency::key_event_statement`] for an `added` event at `time_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceEnrollment {
    /// Ed25519 public key, base64url.
    pub public_key: String,
    pub time_ms: u64,
    /// Signature of the new key, base64url.
    pub signature: String,
}

/// Response of `POST /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceEnrolled {
    pub account: String,
    /// Device id, 32 lowercase hex digits.
    pub device: String,
    /// Index of the key transparency entry that added it.
    pub kt_index: u64,
}

/// Error body of every account endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub error_description: String,
}
