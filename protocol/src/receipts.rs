//! Receipts: an HTTP Message Signature (RFC 9421, `ed25519`) by the node over the facts of an
//! accepted message, with the ciphertext bound through a `Content-Digest` (RFC 9530, sha-256).
//!
//! A receipt describes an HTTP response that carries the ciphertext as its body: status 200, the
//! headers `content-digest`, `atlas-group` (group id in hex), `atlas-seq`, `atlas-sender`
//! (device id in hex) and `atlas-accepted-at` (ms since the Unix epoch), and the signature
//! `atlas` over all of them, with `keyid` naming a key of the node's JWKS and
//! `tag="atlas-receipt"`. `docs/receipts.md` shows the signature base. The signature base and
//! the structured field syntax come from the `httpsig` crate.

use crate::transparency::Jwks;
use crate::{DeviceId, GroupId};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use httpsig::prelude::message_component::{HttpMessageComponent, HttpMessageComponentId};
use httpsig::prelude::{
    AlgorithmName, HttpSignatureBase, HttpSignatureHeaders, HttpSignatureParams, PublicKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Label of the receipt signature in `Signature` and `Signature-Input`.
pub const SIGNATURE_LABEL: &str = "atlas";

/// `tag` parameter of every receipt signature.
pub const RECEIPT_TAG: &str = "atlas-receipt";

/// Covered components, in signature base order.
pub const COVERED_COMPONENTS: [&str; 6] = [
    "@status",
    "content-digest",
    "atlas-group",
    "atlas-seq",
    "atlas-sender",
    "atlas-accepted-at",
];

/// The facts a receipt signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptFields {
    pub group: GroupId,
    pub seq: u64,
    pub sender: DeviceId,
    pub accepted_at_ms: u64,
    /// `Content-Digest` field value of the ciphertext, see [`content_digest`].
    pub content_digest: String,
}

/// The signature of a receipt: the values of the `Signature-Input` and `Signature` fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub signature_input: String,
    pub signature: String,
}

/// A receipt with the facts it signs: what a client keeps, and the file format of
/// `atlas-chat receipt` and `atlas-chat verify-receipt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    pub fields: ReceiptFields,
    pub receipt: Receipt,
}

impl SignedReceipt {
    /// Verifies the signature with a key of `jwks`.
    pub fn verify(&self, jwks: &Jwks) -> Result<(), ReceiptError> {
        self.fields.verify(&self.receipt, jwks)
    }
}

/// Failure to sign or verify a receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt signature fields do not parse: {0}")]
    Malformed(String),
    #[error("receipt has no signature labelled {SIGNATURE_LABEL:?}")]
    MissingLabel,
    #[error(
        "receipt signature fields are not in canonical form (one signature labelled atlas, \
         parameters created, alg, keyid, tag in that order, nothing else); expected {expected:?}"
    )]
    NotCanonical { expected: String },
    #[error("receipt covers {found:?}, expected {expected:?}", expected = COVERED_COMPONENTS)]
    WrongComponents { found: Vec<String> },
    #[error("receipt parameter {name} is {found:?}, expected {expected:?}")]
    WrongParameter {
        name: &'static str,
        found: Option<String>,
        expected: String,
    },
    #[error("receipt is signed with key {0:?}, which the JWKS does not contain")]
    UnknownKey(String),
    #[error("invalid JWKS key {0:?}")]
    InvalidKey(String),
    #[error("receipt signature does not verify: the signed fields or the ciphertext differ")]
    BadSignature,
    #[error("content digest {found:?} does not match the ciphertext ({expected:?})")]
    DigestMismatch { found: String, expected: String },
}

/// Returns the RFC 9530 `Content-Digest` field value of `body` with sha-256.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", STANDARD.encode(Sha256::digest(body)))
}

impl ReceiptFields {
    /// Describes the receipt of `ciphertext`, accepted as `seq` of `group` from `sender`.
    pub fn new(
        group: GroupId,
        seq: u64,
        sender: DeviceId,
        accepted_at_ms: u64,
        ciphertext: &[u8],
    ) -> Self {
        Self {
            group,
            seq,
            sender,
            accepted_at_ms,
            content_digest: content_digest(ciphertext),
        }
    }

    /// Returns the covered field values, in [`COVERED_COMPONENTS`] order.
    pub fn values(&self) -> [String; 6] {
        [
            "200".to_owned(),
            self.content_digest.clone(),
            self.group.to_string(),
            self.seq.to_string(),
            self.sender.to_string(),
            self.accepted_at_ms.to_string(),
        ]
    }

    fn components(&self) -> Result<Vec<HttpMessageComponent>, ReceiptError> {
        COVERED_COMPONENTS
            .iter()
            .zip(self.values())
            .map(|(name, value)| {
                let id = HttpMessageComponentId::try_from(format!("\"{name}\"").as_str())
                    .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
                HttpMessageComponent::try_from((&id, [value].as_slice()))
                    .map_err(|e| ReceiptError::Malformed(e.to_string()))
            })
            .collect()
    }

    /// Returns the RFC 9421 signature base for these fields under `signature_params` (the inner
    /// list and parameters of the `Signature-Input` entry).
    pub fn signature_base(&self, signature_params: &str) -> Result<String, ReceiptError> {
        let params = HttpSignatureParams::try_from(signature_params)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let base = HttpSignatureBase::try_new(&self.components()?, &params)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        Ok(base.to_string())
    }

    /// Signs the fields with `key`, published under `kid`, at `created` (seconds since the
    /// Unix epoch). Ed25519 is deterministic, so equal inputs give equal receipts.
    pub fn sign(
        &self,
        kid: &str,
        key: &impl ed25519_dalek::Signer<ed25519_dalek::Signature>,
        created: u64,
    ) -> Result<Receipt, ReceiptError> {
        let covered: Vec<String> = COVERED_COMPONENTS
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        let mut params = HttpSignatureParams::try_from(format!("({})", covered.join(" ")).as_str())
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        params
            .set_created(created)
            .set_alg(&AlgorithmName::Ed25519)
            .set_keyid(kid)
            .set_tag(RECEIPT_TAG);
        let base = HttpSignatureBase::try_new(&self.components()?, &params)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let signature = key
            .try_sign(&base.as_bytes())
            .map_err(|e| ReceiptError::Malformed(format!("signing failed: {e}")))?;
        Ok(Receipt {
            signature_input: format!("{SIGNATURE_LABEL}={params}"),
            signature: format!(
                "{SIGNATURE_LABEL}=:{}:",
                STANDARD.encode(signature.to_bytes())
            ),
        })
    }

    /// Verifies `receipt` over these fields with a key of `jwks`. The receipt must cover
    /// exactly [`COVERED_COMPONENTS`] with `alg="ed25519"` and `tag="atlas-receipt"`.
    pub fn verify(&self, receipt: &Receipt, jwks: &Jwks) -> Result<(), ReceiptError> {
        let parsed = HttpSignatureHeaders::try_parse(&receipt.signature, &receipt.signature_input)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let headers = parsed
            .get(SIGNATURE_LABEL)
            .ok_or(ReceiptError::MissingLabel)?;
        let params = headers.signature_params();
        // httpsig rebuilds the parameters in its own order and drops unknown ones, so the base
        // it verifies may differ from what was received. Accept only the canonical form, with
        // one signature, so every RFC 9421 verifier reaches the same verdict.
        let canonical_input = format!("{SIGNATURE_LABEL}={params}");
        if parsed.len() != 1 || receipt.signature_input != canonical_input {
            return Err(ReceiptError::NotCanonical {
                expected: canonical_input.chars().take(300).collect(),
            });
        }
        if receipt.signature != headers.signature_header_value() {
            return Err(ReceiptError::NotCanonical {
                expected: "a single signature labelled atlas".into(),
            });
        }
        let found: Vec<String> = params
            .covered_components
            .iter()
            .map(|c| c.to_string().trim_matches('"').to_owned())
            .collect();
        if found != COVERED_COMPONENTS {
            return Err(ReceiptError::WrongComponents { found });
        }
        check_parameter("alg", params.alg.as_deref(), "ed25519")?;
        check_parameter("tag", params.tag.as_deref(), RECEIPT_TAG)?;
        let kid = params.keyid.clone().ok_or(ReceiptError::WrongParameter {
            name: "keyid",
            found: None,
            expected: "a key id of the JWKS".into(),
        })?;
        let jwk = jwks
            .find(&kid)
            .ok_or_else(|| ReceiptError::UnknownKey(kid.clone()))?;
        let public = jwk
            .verifying_key()
            .map_err(|_| ReceiptError::InvalidKey(kid.clone()))?;
        let key = PublicKey::from_bytes(&AlgorithmName::Ed25519, public.as_bytes())
            .map_err(|_| ReceiptError::InvalidKey(kid))?;
        HttpSignatureBase::try_new(&self.components()?, params)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?
            .verify_signature_headers(&key, headers)
            .map_err(|_| ReceiptError::BadSignature)
    }

    /// Checks that the signed digest is the digest of `ciphertext`.
    pub fn check_ciphertext(&self, ciphertext: &[u8]) -> Result<(), ReceiptError> {
        let expected = content_digest(ciphertext);
        if self.content_digest == expected {
            Ok(())
        } else {
            Err(ReceiptError::DigestMismatch {
                found: self.content_digest.clone(),
                expected,
            })
        }
    }
}

fn check_parameter(
    name: &'static str,
    found: Option<&str>,
    expected: &str,
) -> Result<(), ReceiptError> {
    if found == Some(expected) {
        Ok(())
    } else {
        Err(ReceiptError::WrongParameter {
            name,
            found: found.map(str::to_owned),
            expected: expected.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
