use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use atlas_actors::LoginError;
use atlas_protocol::dpop::DpopError;
use atlas_storage::StorageError;

/// Algorithms offered in every DPoP challenge.
pub(crate) const DPOP_ALGS: &str = "EdDSA ES256";

/// Failure of an account, token or enrollment request. Each maps to an HTTP status, an error
/// code in the JSON body and, for authentication failures, a `WWW-Authenticate: DPoP`
/// challenge (RFC 9449 section 7.1).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid passkey configuration: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidProof(#[from] DpopError),
    #[error("the DPoP proof's jti was used before; make a new proof for every request")]
    ReplayedProof,
    #[error("the DPoP proof must carry the server nonce sent in the DPoP-Nonce header")]
    UseNonce { nonce: String },
    #[error("the DPoP replay cache is full; retry in a few seconds")]
    ReplayCacheFull,
    #[error("too many recent DPoP proofs from this address; retry in {retry_after_s} s")]
    TooManyProofs { retry_after_s: u64 },
    #[error("the DPoP proof was issued before this server started; make a new proof")]
    ProofBeforeStart,
    #[error(
        "this change needs a passkey login within the last {max_age_s} s; log in with a \
         passkey again"
    )]
    StepUpRequired { max_age_s: u64 },
    #[error("this request needs an access token: Authorization: DPoP <token>")]
    MissingToken,
    #[error("invalid access token: {0}")]
    InvalidToken(String),
    #[error("invalid grant: {0}")]
    InvalidGrant(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(
        "no passkey ceremony {0:?} is in progress: it was finished, never started or forgotten"
    )]
    CeremonyNotFound(String),
    #[error("passkey ceremony {0:?} expired; start a new one")]
    CeremonyExpired(String),
    #[error("passkey ceremony {0:?} was started with another DPoP key")]
    CeremonyKeyMismatch(String),
    #[error("too many passkey ceremonies in progress {scope}; retry in {retry_after_s} s")]
    TooManyCeremonies {
        scope: &'static str,
        retry_after_s: u64,
    },
    #[error("passkey verification failed: {0}")]
    PasskeyRejected(String),
    #[error(
        "account {0:?} already exists; choose another name, or log in with one of its \
         passkeys to add another"
    )]
    AccountTaken(String),
    #[error("this passkey is registered already")]
    CredentialInUse,
    #[error("account {0:?} has no passkeys")]
    AccountNotFound(String),
    #[error("the last passkey of an account cannot be removed; add another one first")]
    LastPasskey,
    #[error("account {account:?} already has {max} passkeys")]
    TooManyPasskeys { account: String, max: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the group could not answer: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Directory(#[from] LoginError),
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for AuthError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::AccountTaken(account) => Self::AccountTaken(account),
            StorageError::CredentialInUse => Self::CredentialInUse,
            StorageError::UnknownAccount(account) => Self::AccountNotFound(account),
            other => Self::Storage(other),
        }
    }
}

impl AuthError {
    /// Error code of the JSON body; OAuth codes where RFC 6749, 6750 or 9449 define one.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config(_) => "server_error",
            Self::InvalidProof(_) | Self::ReplayedProof | Self::ProofBeforeStart => {
                "invalid_dpop_proof"
            }
            Self::TooManyProofs { .. } => "slow_down",
            Self::StepUpRequired { .. } => "insufficient_user_authentication",
            Self::CredentialInUse => "credential_in_use",
            Self::UseNonce { .. } => "use_dpop_nonce",
            Self::ReplayCacheFull | Self::TooManyCeremonies { .. } | Self::Unavailable(_) => {
                "temporarily_unavailable"
            }
            Self::MissingToken | Self::InvalidToken(_) => "invalid_token",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidRequest(_) => "invalid_request",
            Self::CeremonyNotFound(_) | Self::CeremonyKeyMismatch(_) => "ceremony_not_found",
            Self::CeremonyExpired(_) => "ceremony_expired",
            Self::PasskeyRejected(_) => "passkey_rejected",
            Self::AccountTaken(_) => "account_taken",
            Self::AccountNotFound(_) => "account_not_found",
            Self::LastPasskey => "last_passkey",
            Self::TooManyPasskeys { .. } => "too_many_passkeys",
            Self::NotFound(_) => "not_found",
            Self::Forbidden(_) => "forbidden",
            Self::Directory(LoginError::KeyInUse(_)) => "key_in_use",
            Self::Directory(LoginError::AccountTaken(_)) => "account_taken",
            Self::Directory(e) => e.code().name(),
            Self::Storage(_) => "storage_failure",
        }
    }

    /// Returns the `WWW-Authenticate` value for failures of the proof or the token.
    fn challenge(&self) -> Option<String> {
        let with_error = |error: &str| {
            // A header value may not hold control characters, and the quoted string ends at
            // a quote or takes a backslash as an escape.
            let description: String = self
                .to_string()
                .chars()
                .map(|c| {
                    if c.is_control() || c == '"' || c == '\\' {
                        '\''
                    } else {
                        c
                    }
                })
                .collect();
            format!(
                r#"DPoP algs="{DPOP_ALGS}", error="{error}", error_description="{description}""#
            )
        };
        match self {
            Self::InvalidProof(_) | Self::ReplayedProof | Self::ProofBeforeStart => {
                Some(with_error("invalid_dpop_proof"))
            }
            Self::UseNonce { .. } => Some(with_error("use_dpop_nonce")),
            Self::InvalidToken(_) => Some(with_error("invalid_token")),
            // RFC 9470: the client should run a new passkey ceremony and retry.
            Self::StepUpRequired { max_age_s } => Some(format!(
                "{}, max_age={max_age_s}",
                with_error("insufficient_user_authentication")
            )),
            // RFC 6750 section 3.1: no error code when the request had no credentials.
            Self::MissingToken => Some(format!(r#"DPoP algs="{DPOP_ALGS}""#)),
            _ => None,
        }
    }
}

impl ResponseError for AuthError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidProof(_)
            | Self::ReplayedProof
            | Self::ProofBeforeStart
            | Self::StepUpRequired { .. }
            | Self::UseNonce { .. }
            | Self::MissingToken
            | Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::TooManyProofs { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InvalidGrant(_)
            | Self::InvalidRequest(_)
            | Self::CeremonyNotFound(_)
            | Self::CeremonyExpired(_)
            | Self::CeremonyKeyMismatch(_) => StatusCode::BAD_REQUEST,
            Self::PasskeyRejected(_) | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::AccountNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::AccountTaken(_)
            | Self::CredentialInUse
            | Self::LastPasskey
            | Self::TooManyPasskeys { .. } => StatusCode::CONFLICT,
            Self::ReplayCacheFull | Self::TooManyCeremonies { .. } | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Directory(LoginError::Storage(_)) | Self::Storage(_) | Self::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Directory(LoginError::AccountTaken(_) | LoginError::KeyInUse(_)) => {
                StatusCode::CONFLICT
            }
            Self::Directory(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Some(challenge) = self.challenge() {
            response.insert_header(("WWW-Authenticate", challenge));
        }
        if let Self::UseNonce { nonce } = self {
            response.insert_header(("DPoP-Nonce", nonce.as_str()));
        }
        match self {
            Self::TooManyCeremonies { retry_after_s, .. }
            | Self::TooManyProofs { retry_after_s } => {
                response.insert_header(("Retry-After", retry_after_s.to_string()));
            }
            Self::ReplayCacheFull | Self::Unavailable(_) => {
                response.insert_header(("Retry-After", "5"));
            }
            _ => {}
        }
        response.insert_header(("Cache-Control", "no-store"));
        response.json(serde_json::json!({
            "error": self.code(),
            "error_description": self.to_string(),
        }))
    }
}
