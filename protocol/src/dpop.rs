//! DPoP proofs (RFC 9449): creating them on the client and checking them on the server.
//!
//! A proof is a JWT with `typ: dpop+jwt`, an asymmetric `alg` and the public key in `jwk`,
//! whose claims bind one HTTP request (`htm`, `htu`), a time (`iat`), a unique id (`jti`), the
//! access token it goes with (`ath`) and, when the server requires one, its nonce. JWT parsing
//! and signature checks are done by the `jsonwebtoken` crate; this module applies the checks of
//! RFC 9449 section 4.3 that a JWT library does not know about. The `jti` replay cache and the
//! nonce policy belong to the server, which sees [`DpopProof::jti`] and [`DpopProof::nonce`].

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, OctetKeyPairParameters,
    OctetKeyPairType, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Media type of a DPoP proof, its JOSE `typ`.
pub const DPOP_TYP: &str = "dpop+jwt";

/// Maximum length of a DPoP header value, in bytes. A proof with an Ed25519 or P-256 key is
/// well under 1 KiB; the limit stops oversized headers before any parsing.
pub const MAX_PROOF_BYTES: usize = 4096;

/// Maximum length of a `jti`, in bytes.
pub const MAX_JTI_BYTES: usize = 128;

/// Claims of a DPoP proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpopClaims {
    pub jti: String,
    pub htm: String,
    pub htu: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// A proof that passed every check of [`verify_proof`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopProof {
    /// RFC 7638 SHA-256 thumbprint of the proof's key, the value access tokens carry as
    /// `cnf.jkt`.
    pub jkt: String,
    pub jti: String,
    pub iat: u64,
    pub nonce: Option<String>,
}

/// The reason a proof was rejected. Every variant maps to `error="invalid_dpop_proof"` in the
/// `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the DPoP header is missing")]
    Missing,
    #[error("more than one DPoP header was sent")]
    Multiple,
    #[error("the DPoP proof is longer than {MAX_PROOF_BYTES} bytes")]
    TooLong,
    #[error("the DPoP proof is not a valid JWT: {0}")]
    Malformed(String),
    #[error("the DPoP proof has typ {}, expected \"dpop+jwt\"", .0.as_deref().map_or("(none)".to_owned(), |t| format!("{t:?}")))]
    WrongType(Option<String>),
    #[error("the DPoP proof has a crit header, which this server does not support")]
    CriticalHeader,
    #[error("the DPoP proof uses algorithm {0}, expected EdDSA or ES256")]
    UnsupportedAlgorithm(String),
    #[error("the DPoP proof carries no public key in its jwk header")]
    MissingKey,
    #[error("the DPoP proof's jwk is not a usable public key: {0}")]
    BadKey(String),
    #[error("the DPoP proof's signature does not verify with its jwk")]
    BadSignature,
    #[error("the DPoP proof is for method {found}, but the request is {expected}")]
    WrongMethod { expected: String, found: String },
    #[error("the DPoP proof is for {found}, but the request is {expected}")]
    WrongUri { expected: String, found: String },
    #[error("the DPoP proof was issued at {iat}, outside {window_s} s of the server's time {now}")]
    Stale { iat: u64, now: u64, window_s: u64 },
    #[error("the DPoP proof's jti is empty or longer than {MAX_JTI_BYTES} bytes")]
    BadJti,
    #[error("the DPoP proof has no ath claim, but an access token was presented")]
    MissingAth,
    #[error("the DPoP proof's ath does not match the presented access token")]
    WrongAth,
    #[error("the DPoP proof carries an ath claim, but no access token was presented")]
    UnexpectedAth,
}

/// Request a proof must match.
#[derive(Debug, Clone, Copy)]
pub struct ProofRequest<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Target URI of the request, `https://host[:port]/path`; query and fragment are ignored.
    pub uri: &'a str,
    /// The access token sent with the request, if any.
    pub access_token: Option<&'a str>,
    /// Server time, in seconds since the Unix epoch.
    pub now_s: u64,
    /// Largest accepted age of `iat` before `now_s`, in seconds.
    pub window_s: u64,
    /// Largest accepted distance of `iat` after `now_s` (clock skew), in seconds.
    pub future_s: u64,
    /// Whether `htu` may use the `ws`/`wss` scheme (WebSocket upgrade requests only).
    pub websocket: bool,
}

/// Checks `proof` against `request`: header, signature, method, URI, time and access token
/// hash. Returns the key thumbprint, `jti` and nonce for the server's own checks.
pub fn verify_proof(proof: &str, request: &ProofRequest<'_>) -> Result<DpopProof, DpopError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(DpopError::TooLong);
    }
    let header = jsonwebtoken::decode_header(proof)
        .map_err(|e| DpopError::Malformed(describe_jwt_error(&e)))?;
    if header.typ.as_deref() != Some(DPOP_TYP) {
        return Err(DpopError::WrongType(header.typ.as_deref().map(printable)));
    }
    if !matches!(header.alg, Algorithm::EdDSA | Algorithm::ES256) {
        return Err(DpopError::UnsupportedAlgorithm(format!("{:?}", header.alg)));
    }
    let jwk = header.jwk.ok_or(DpopError::MissingKey)?;
    check_public_jwk(&jwk, header.alg)?;
    reject_private_members(proof)?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| DpopError::BadKey(e.to_string()))?;

    let mut validation = Validation::new(header.alg);
    // A proof has no exp, aud or iss; its lifetime is the iat window checked below.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<DpopClaims>(proof, &key, &validation).map_err(|e| match e
        .kind()
    {
        jsonwebtoken::errors::ErrorKind::InvalidSignature => DpopError::BadSignature,
        _ => DpopError::Malformed(e.to_string()),
    })?;
    let claims = data.claims;

    if claims.htm != request.method {
        return Err(DpopError::WrongMethod {
            expected: request.method.to_owned(),
            found: printable(&claims.htm),
        });
    }
    let target = normalize_uri(&claims.htu, request.websocket);
    if target.is_none() || target != normalize_uri(request.uri, request.websocket) {
        return Err(DpopError::WrongUri {
            expected: request.uri.to_owned(),
            found: printable(&claims.htu),
        });
    }
    let allowed = if claims.iat > request.now_s {
        request.future_s
    } else {
        request.window_s
    };
    if claims.iat.abs_diff(request.now_s) > allowed {
        return Err(DpopError::Stale {
            iat: claims.iat,
            now: request.now_s,
            window_s: allowed,
        });
    }
    if claims.jti.is_empty() || claims.jti.len() > MAX_JTI_BYTES {
        return Err(DpopError::BadJti);
    }
    match (request.access_token, claims.ath.as_deref()) {
        (Some(token), Some(ath)) if ath == access_token_hash(token) => {}
        (Some(_), Some(_)) => return Err(DpopError::WrongAth),
        (Some(_), None) => return Err(DpopError::MissingAth),
        (None, Some(_)) => return Err(DpopError::UnexpectedAth),
        (None, None) => {}
    }
    Ok(DpopProof {
        jkt: jwk.thumbprint(ThumbprintHash::SHA256),
        jti: claims.jti,
        iat: claims.iat,
        nonce: claims.nonce,
    })
}

/// Describes a jsonwebtoken error in words; its `Display` shows bare variant names such as
/// `InvalidToken`.
pub fn describe_jwt_error(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidToken => "not three base64url parts separated by dots".into(),
        ErrorKind::InvalidSignature => "the signature does not verify".into(),
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::InvalidIssuer => "the token was issued by another server".into(),
        ErrorKind::InvalidAlgorithm => "the algorithm does not match the key".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the {claim} claim is missing"),
        ErrorKind::Base64(_) => "a part is not valid base64url".into(),
        ErrorKind::Json(e) => format!("a part is not the expected JSON: {e}"),
        ErrorKind::Utf8(_) => "a part is not UTF-8".into(),
        _ => printable(&error.to_string()),
    }
}

/// Rejects keys that do not fit the algorithm or that carry private parts.
fn check_public_jwk(jwk: &Jwk, alg: Algorithm) -> Result<(), DpopError> {
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA)
            if p.curve == EllipticCurve::Ed25519 => {}
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256)
            if p.curve == EllipticCurve::P256 => {}
        _ => {
            return Err(DpopError::BadKey(format!(
                "key type does not match algorithm {alg:?}"
            )));
        }
    }
    Ok(())
}

/// Rejects a `jwk` header that carries the private key (`d`). jsonwebtoken's `Jwk` drops
/// members it does not know, so this reads the raw header.
fn reject_private_members(proof: &str) -> Result<(), DpopError> {
    let encoded = proof.split('.').next().unwrap_or_default();
    let raw = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| DpopError::Malformed(format!("header is not base64url: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| DpopError::Malformed(format!("header is not JSON: {e}")))?;
    if header.get("jwk").and_then(|jwk| jwk.get("d")).is_some() {
        return Err(DpopError::BadKey("the jwk contains a private key".into()));
    }
    // RFC 7515 section 4.1.11: a recipient must reject extensions it does not understand.
    if header.get("crit").is_some() {
        return Err(DpopError::CriticalHeader);
    }
    Ok(())
}

/// Makes a client-supplied value safe to put in an error message, a log line or a header:
/// control characters become `?`, and it is cut to 100 characters.
pub fn printable(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if value.chars().count() > 100 {
        out.push('…');
    }
    out
}

/// Scheme, host, port and path of `uri`. With `websocket`, `ws`/`wss` map to `http`/`https`
/// so that a proof for a WebSocket upgrade may name either form.
fn normalize_uri(uri: &str, websocket: bool) -> Option<(String, String, u16, String)> {
    let parsed = url::Url::parse(uri).ok()?;
    let scheme = match parsed.scheme() {
        "https" => "https",
        "http" => "http",
        "wss" if websocket => "https",
        "ws" if websocket => "http",
        _ => return None,
    };
    let port = parsed.port_or_known_default()?;
    Some((
        scheme.to_owned(),
        parsed.host_str()?.to_owned(),
        port,
        parsed.path().to_owned(),
    ))
}

/// `ath` of an access token: base64url of its SHA-256 hash.
pub fn access_token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// Public JWK of an Ed25519 key.
pub fn ed25519_jwk(key: &SigningKey) -> Jwk {
    Jwk {
        common: CommonParameters::default(),
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        }),
    }
}

/// RFC 7638 thumbprint of the public half of `key`, as in `cnf.jkt`.
pub fn ed25519_jkt(key: &SigningKey) -> String {
    ed25519_jwk(key).thumbprint(ThumbprintHash::SHA256)
}

/// The values a client puts in one proof.
#[derive(Debug, Clone, Copy)]
pub struct ProofParams<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub access_token: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub now_s: u64,
}

/// Signs a DPoP proof with `key` (EdDSA), with a random `jti`.
pub fn make_proof(key: &SigningKey, params: &ProofParams<'_>) -> String {
    sign_proof(key, &proof_claims(params))
}

/// Builds a DPoP proof for the Ed25519 key `public` whose private half is only reachable
/// through `sign` (such as an MLS signer), which must return the 64-byte signature of its
/// input.
pub fn make_proof_with<E>(
    public: &[u8; 32],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    params: &ProofParams<'_>,
) -> Result<String, E> {
    let header = serde_json::json!({
        "typ": DPOP_TYP,
        "alg": "EdDSA",
        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(public)},
    });
    // Plain JSON values always serialize.
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header serializes"));
    let claims = serde_json::to_vec(&proof_claims(params)).expect("claims serialize");
    let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims));
    let signature = sign(signing_input.as_bytes())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

fn proof_claims(params: &ProofParams<'_>) -> DpopClaims {
    let mut jti = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut jti);
    DpopClaims {
        jti: URL_SAFE_NO_PAD.encode(jti),
        htm: params.method.to_owned(),
        htu: params.uri.to_owned(),
        iat: params.now_s,
        ath: params.access_token.map(access_token_hash),
        nonce: params.nonce.map(str::to_owned),
    }
}

/// Signs arbitrary proof claims with `key`; tests use it to build invalid proofs.
pub fn sign_proof(key: &SigningKey, claims: &DpopClaims) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(DPOP_TYP.to_owned());
    header.jwk = Some(ed25519_jwk(key));
    sign_jwt(key, &header, claims)
}

/// Signs `claims` under `header` with an Ed25519 key.
pub fn sign_jwt<T: Serialize>(key: &SigningKey, header: &Header, claims: &T) -> String {
    // A 32-byte seed always encodes as PKCS#8, and an EdDSA header with an Ed25519 key and
    // serializable claims always signs.
    let der = key.to_pkcs8_der().expect("Ed25519 key encodes as PKCS#8");
    jsonwebtoken::encode(header, claims, &EncodingKey::from_ed_der(der.as_bytes()))
        .expect("EdDSA JWT signs")
}

#[cfg(test)]
mod tests;
