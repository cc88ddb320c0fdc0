//! Key transparency: the events of the key directory's append-only log, signed tree heads,
//! inclusion and consistency proofs (RFC 9162 tree shape, SHA-256), and the signing keys that
//! the node publishes as a JWKS.
//!
//! Leaf `i` of the log is the MessagePack encoding of a [`KeyEvent`]; its leaf hash is
//! `SHA-256(0x00 || bytes)`. Proofs travel with the exact leaf bytes, so a verifier hashes what
//! it received before decoding it.

use crate::DeviceId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use tlog_tiles::tlog::{self, Hash};

/// Domain-separation prefix of a signed tree head.
pub const TREE_HEAD_CONTEXT: &[u8] = b"atlas-tree-head-v1";

/// Domain-separation prefix of a device's signature over a key event.
pub const KEY_EVENT_CONTEXT: &[u8] = b"atlas-key-event-v2";

/// How far in the future a tree head's time may be before a verifier rejects it, in ms.
pub const MAX_HEAD_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// Maximum number of log entries returned by one entries request.
pub const MAX_KT_ENTRIES: u32 = 1000;

/// Maximum encoded size of the entries in one key transparency response. A page stops before
/// the entry that would exceed it, but has at least one entry, so responses stay well under
/// the frame limit. The client requests the rest from where the page ended.
pub const MAX_KT_PAGE_BYTES: usize = 128 * 1024;

/// Kind of change to a device key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyEventKind {
    /// The device joined the account with `key`.
    Added,
    /// The device was revoked; `key` is the key it had.
    Revoked,
    /// The device replaced the device named in the authorisation; `key` is its new key.
    Rotated,
}

/// Evidence that an event was allowed, checkable by anyone who reads the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Authorization {
    /// The new key signed its own login transcript for this account on this server.
    ///
    /// NOTE: registration is open, so this proves possession of the key only, not the right to
    /// the account name. Passkey-bound tokens are meant to replace it.
    LoginSignature {
        server_name: String,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// A device of the account that was current at the time signed [`key_event_statement`]
    /// for a new device, and so did the new key, proving that its holder has it.
    Enrollment {
        signer: DeviceId,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        new_key_signature: Vec<u8>,
    },
    /// A device of the account that was current at the time signed [`key_event_statement`].
    DeviceSignature {
        signer: DeviceId,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// The replaced device signed [`key_event_statement`] and so did the new key, proving that
    /// its holder has it.
    Rotation {
        previous: DeviceId,
        #[serde(with = "serde_bytes")]
        previous_signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        new_key_signature: Vec<u8>,
    },
    /// A DPoP-bound access token from a passkey ceremony of the account allowed the addition.
    /// The new key signed [`key_event_statement`]; the node, with its JWKS key `kid`, signed
    /// [`passkey_grant_statement`] over it and the token's `jti`.
    ///
    /// NOTE: the passkey assertion itself is not in the log, so an auditor trusts the node's
    /// word that a ceremony took place; it can only check the node's signature.
    PasskeyToken {
        token_id: String,
        kid: String,
        #[serde(with = "serde_bytes")]
        node_signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        new_key_signature: Vec<u8>,
    },
}

/// Context of the node's signature in [`Authorization::PasskeyToken`].
pub const PASSKEY_GRANT_CONTEXT: &[u8] = b"atlas-passkey-grant-v1";

/// Bytes the node signs when it adds a device on the strength of a passkey session: the
/// context, the [`key_event_statement`] the new key signed and the access token's `jti`, each
/// length-prefixed.
pub fn passkey_grant_statement(statement: &[u8], token_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(statement.len() + 64);
    for part in [PASSKEY_GRANT_CONTEXT, statement, token_id.as_bytes()] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// One entry of the key transparency log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    pub kind: KeyEventKind,
    pub account: String,
    pub device: DeviceId,
    /// Ed25519 public key of the device (32 bytes).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Time of the event in ms since the Unix epoch: the server time for `added`, the time the
    /// authorising device signed for `revoked` and `rotated`.
    pub time_ms: u64,
    pub authorization: Authorization,
}

impl KeyEvent {
    /// Encodes the event as the leaf bytes of the log.
    pub fn to_leaf(&self) -> Vec<u8> {
        // Plain data with string keys: encoding into a Vec cannot fail.
        rmp_serde::to_vec_named(self).expect("key event serializes")
    }

    /// Decodes leaf bytes.
    pub fn from_leaf(bytes: &[u8]) -> Result<Self, ProofError> {
        rmp_serde::from_slice(bytes).map_err(|e| ProofError::MalformedEntry(e.to_string()))
    }
}

/// Builds the bytes a device signs to authorise an enrollment, revocation or rotation: the
/// context string, the event kind, the server name (so a statement for one deployment does not
/// verify on another), the account, the target device, its key and the client's time, each
/// length-prefixed.
pub fn key_event_statement(
    kind: KeyEventKind,
    server_name: &str,
    account: &str,
    device: &DeviceId,
    key: &[u8],
    time_ms: u64,
) -> Vec<u8> {
    let kind: &[u8] = match kind {
        KeyEventKind::Added => b"added",
        KeyEventKind::Revoked => b"revoked",
        KeyEventKind::Rotated => b"rotated",
    };
    let time = time_ms.to_be_bytes();
    let mut out = Vec::with_capacity(128);
    for part in [
        KEY_EVENT_CONTEXT,
        kind,
        server_name.as_bytes(),
        account.as_bytes(),
        device.as_bytes(),
        key,
        &time,
    ] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A tree head signed by the node: the log had `size` entries with root hash `root` at
/// `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    pub size: u64,
    #[serde(with = "serde_bytes")]
    pub root: [u8; 32],
    pub time_ms: u64,
    /// JWKS `kid` of the signing key.
    pub kid: String,
    /// Ed25519 signature over [`SignedTreeHead::signing_input`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedTreeHead {
    /// Signs a tree head with `key`, published under `kid`.
    pub fn sign(size: u64, root: [u8; 32], time_ms: u64, kid: &str, key: &SigningKey) -> Self {
        let signature = key.sign(&Self::signing_input(size, &root, time_ms, kid));
        Self {
            size,
            root,
            time_ms,
            kid: kid.to_owned(),
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Returns the signed bytes: context, size, root, time and key id.
    pub fn signing_input(size: u64, root: &[u8; 32], time_ms: u64, kid: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(TREE_HEAD_CONTEXT.len() + 64 + kid.len());
        out.extend_from_slice(TREE_HEAD_CONTEXT);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(root);
        out.extend_from_slice(&time_ms.to_be_bytes());
        out.extend_from_slice(&(kid.len() as u32).to_be_bytes());
        out.extend_from_slice(kid.as_bytes());
        out
    }

    /// Verifies the signature with the JWKS and rejects heads more than
    /// [`MAX_HEAD_CLOCK_SKEW_MS`] ahead of `now_ms`.
    pub fn verify(&self, jwks: &Jwks, now_ms: u64) -> Result<(), ProofError> {
        let key = jwks
            .find(&self.kid)
            .ok_or_else(|| ProofError::UnknownKey(self.kid.clone()))?
            .verifying_key()?;
        let signature = Signature::from_slice(&self.signature)
            .map_err(|_| ProofError::BadSignature(self.size))?;
        key.verify(
            &Self::signing_input(self.size, &self.root, self.time_ms, &self.kid),
            &signature,
        )
        .map_err(|_| ProofError::BadSignature(self.size))?;
        if self.time_ms > now_ms.saturating_add(MAX_HEAD_CLOCK_SKEW_MS) {
            return Err(ProofError::FutureHead {
                size: self.size,
                time_ms: self.time_ms,
                now_ms,
            });
        }
        Ok(())
    }

    /// Returns the root hash in hex, for messages.
    pub fn root_hex(&self) -> String {
        self.root.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A log entry with its position and the audit path to a tree head of `tree_size` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenEntry {
    pub index: u64,
    /// The leaf bytes, a MessagePack [`KeyEvent`].
    #[serde(with = "serde_bytes")]
    pub leaf: Vec<u8>,
    pub tree_size: u64,
    /// Audit path, leaf side first (RFC 9162 section 2.1.3).
    pub path: Vec<serde_bytes::ByteArray<32>>,
}

impl ProvenEntry {
    /// Checks that the leaf is entry `index` of the tree `head` signs, and decodes it.
    pub fn verify(&self, head: &SignedTreeHead) -> Result<KeyEvent, ProofError> {
        if self.tree_size != head.size {
            return Err(ProofError::SizeMismatch {
                proof: self.tree_size,
                head: head.size,
            });
        }
        if self.index >= head.size {
            return Err(ProofError::IndexOutOfRange {
                index: self.index,
                size: head.size,
            });
        }
        let path: Vec<Hash> = self.path.iter().map(|h| Hash(h.into_array())).collect();
        tlog::check_record(
            &path,
            head.size,
            Hash(head.root),
            self.index,
            tlog::record_hash(&self.leaf),
        )
        .map_err(|_| ProofError::InclusionFailed {
            index: self.index,
            size: head.size,
        })?;
        KeyEvent::from_leaf(&self.leaf)
    }
}

/// Proof that the tree of `from` entries is a prefix of the tree of `to` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub from: u64,
    pub to: u64,
    /// RFC 9162 section 2.1.4 order.
    pub path: Vec<serde_bytes::ByteArray<32>>,
}

impl ConsistencyProof {
    /// Checks that `old` is a prefix of `new`. Heads of equal size must have equal roots.
    pub fn verify(&self, old: &SignedTreeHead, new: &SignedTreeHead) -> Result<(), ProofError> {
        if self.from != old.size || self.to != new.size {
            return Err(ProofError::SizeMismatch {
                proof: self.to,
                head: new.size,
            });
        }
        if old.size > new.size {
            return Err(ProofError::ConsistencyFailed {
                from: old.size,
                to: new.size,
            });
        }
        if old.size == 0 {
            return if self.path.is_empty() {
                Ok(())
            } else {
                Err(ProofError::ConsistencyFailed {
                    from: 0,
                    to: new.size,
                })
            };
        }
        let path: Vec<Hash> = self.path.iter().map(|h| Hash(h.into_array())).collect();
        tlog::check_tree(&path, new.size, Hash(new.root), old.size, Hash(old.root)).map_err(|_| {
            ProofError::ConsistencyFailed {
                from: old.size,
                to: new.size,
            }
        })
    }
}

/// Converts tlog_tiles hashes to wire hashes.
pub fn wire_path(hashes: impl IntoIterator<Item = Hash>) -> Vec<serde_bytes::ByteArray<32>> {
    hashes
        .into_iter()
        .map(|h| serde_bytes::ByteArray::new(h.0))
        .collect()
}

/// A failed check of a tree head, proof or log entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("tree head is signed with key {0:?}, which the JWKS does not contain")]
    UnknownKey(String),
    #[error("signature of the tree head of size {0} does not verify")]
    BadSignature(u64),
    #[error("tree head of size {size} is dated {time_ms} ms, later than now ({now_ms} ms)")]
    FutureHead {
        size: u64,
        time_ms: u64,
        now_ms: u64,
    },
    #[error("proof is for a tree of {proof} entries but the head has {head}")]
    SizeMismatch { proof: u64, head: u64 },
    #[error("entry {index} is outside a tree of {size} entries")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("inclusion proof of entry {index} does not match the tree head of size {size}")]
    InclusionFailed { index: u64, size: u64 },
    #[error("consistency proof from size {from} to size {to} does not verify")]
    ConsistencyFailed { from: u64, to: u64 },
    #[error("log entry is not a key event: {0}")]
    MalformedEntry(String),
    #[error("invalid JWK {kid:?}: {reason}")]
    InvalidJwk { kid: String, reason: String },
}

/// The device directory rebuilt from log entries, to check each entry's authorisation.
#[derive(Debug, Clone, Default)]
pub struct DirectoryReplay {
    /// Current devices and their keys, by account.
    accounts: std::collections::HashMap<String, std::collections::HashMap<DeviceId, Vec<u8>>>,
    /// Devices that were revoked or rotated away; they may never return.
    retired: std::collections::HashSet<DeviceId>,
    /// The node's signing keys known to the auditor, by `kid`.
    node_keys: std::collections::HashMap<String, VerifyingKey>,
    /// Passkey grants signed by a key that is no longer published, so not checked.
    unverified_grants: u64,
}

/// An entry whose authorisation or directory effect is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log entry {index} ({kind:?} of device {device} in account {account:?}): {reason}")]
pub struct AuthorizationError {
    pub index: u64,
    pub kind: KeyEventKind,
    pub account: String,
    pub device: DeviceId,
    pub reason: String,
}

impl DirectoryReplay {
    /// Adds the Ed25519 keys of `jwks` to the keys that passkey grants are checked with. Keys
    /// stay known after they leave the node's JWKS.
    pub fn learn_keys(&mut self, jwks: &Jwks) {
        for jwk in &jwks.keys {
            if let Ok(key) = jwk.verifying_key() {
                self.node_keys.insert(jwk.kid.clone(), key);
            }
        }
    }

    /// Number of passkey grants whose node key was unknown, so their node signature was not
    /// checked (the new key's signature always is).
    pub fn unverified_grants(&self) -> u64 {
        self.unverified_grants
    }

    /// Current devices of `account` with their keys.
    pub fn devices(&self, account: &str) -> Vec<(DeviceId, Vec<u8>)> {
        let mut out: Vec<_> = self
            .accounts
            .get(account)
            .map(|d| d.iter().map(|(id, key)| (*id, key.clone())).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Checks entry `index` against the directory so far and applies it. `server_name` is the
    /// name the node signs logins for.
    pub fn apply(
        &mut self,
        index: u64,
        event: &KeyEvent,
        server_name: &str,
    ) -> Result<(), AuthorizationError> {
        let fail = |reason: String| AuthorizationError {
            index,
            kind: event.kind,
            account: event.account.clone(),
            device: event.device,
            reason,
        };
        let key = VerifyingKey::try_from(event.key.as_slice())
            .map_err(|_| fail("key is not an Ed25519 public key".into()))?;
        let verify = |key: &VerifyingKey, message: &[u8], signature: &[u8], who: &str| {
            let signature = Signature::from_slice(signature)
                .map_err(|_| fail(format!("{who} signature is not 64 bytes")))?;
            key.verify_strict(message, &signature)
                .map_err(|_| fail(format!("{who} signature does not verify")))
        };
        let current = self.accounts.get(&event.account);
        let current_key = |device: &DeviceId| -> Result<VerifyingKey, AuthorizationError> {
            let bytes = current.and_then(|d| d.get(device)).ok_or_else(|| {
                fail(format!(
                    "device {device} is not a current device of the account"
                ))
            })?;
            VerifyingKey::try_from(bytes.as_slice())
                .map_err(|_| fail(format!("stored key of device {device} is invalid")))
        };
        let statement = key_event_statement(
            event.kind,
            server_name,
            &event.account,
            &event.device,
            &event.key,
            event.time_ms,
        );
        match (&event.kind, &event.authorization) {
            (
                KeyEventKind::Added,
                Authorization::LoginSignature {
                    server_name: signed_for,
                    nonce,
                    signature,
                },
            ) => {
                if signed_for != server_name {
                    return Err(fail(format!(
                        "login was signed for server {signed_for:?}, not {server_name:?}"
                    )));
                }
                if self.accounts.contains_key(&event.account) {
                    return Err(fail(
                        "a login registered a device in an account that already existed".into(),
                    ));
                }
                self.check_new_device(event).map_err(fail)?;
                let transcript = crate::login_transcript(signed_for, nonce, &event.account);
                verify(&key, &transcript, signature, "login")?;
            }
            (
                KeyEventKind::Added,
                Authorization::Enrollment {
                    signer,
                    signature,
                    new_key_signature,
                },
            ) => {
                self.check_new_device(event).map_err(fail)?;
                verify(
                    &current_key(signer)?,
                    &statement,
                    signature,
                    "enrolling device",
                )?;
                verify(&key, &statement, new_key_signature, "new key")?;
            }
            (
                KeyEventKind::Added,
                Authorization::PasskeyToken {
                    token_id,
                    kid,
                    node_signature,
                    new_key_signature,
                },
            ) => {
                self.check_new_device(event).map_err(fail)?;
                verify(&key, &statement, new_key_signature, "new key")?;
                match self.node_keys.get(kid) {
                    Some(node_key) => verify(
                        node_key,
                        &passkey_grant_statement(&statement, token_id),
                        node_signature,
                        "node's passkey grant",
                    )?,
                    None => self.unverified_grants += 1,
                }
            }
            (KeyEventKind::Revoked, Authorization::DeviceSignature { signer, signature }) => {
                let stored = current_key(&event.device)?;
                if stored.as_bytes() != event.key.as_slice() {
                    return Err(fail(
                        "revoked key differs from the device's current key".into(),
                    ));
                }
                verify(
                    &current_key(signer)?,
                    &statement,
                    signature,
                    "revoking device",
                )?;
            }
            (
                KeyEventKind::Rotated,
                Authorization::Rotation {
                    previous,
                    previous_signature,
                    new_key_signature,
                },
            ) => {
                self.check_new_device(event).map_err(fail)?;
                verify(
                    &current_key(previous)?,
                    &statement,
                    previous_signature,
                    "previous device",
                )?;
                verify(&key, &statement, new_key_signature, "new key")?;
            }
            (kind, authorization) => {
                return Err(fail(format!(
                    "{kind:?} event cannot be authorised by {authorization:?}"
                )));
            }
        }
        let devices = self.accounts.entry(event.account.clone()).or_default();
        match (&event.kind, &event.authorization) {
            (KeyEventKind::Added, _) => {
                devices.insert(event.device, event.key.clone());
            }
            (KeyEventKind::Revoked, _) => {
                devices.remove(&event.device);
                self.retired.insert(event.device);
            }
            (KeyEventKind::Rotated, Authorization::Rotation { previous, .. }) => {
                devices.remove(previous);
                self.retired.insert(*previous);
                devices.insert(event.device, event.key.clone());
            }
            (KeyEventKind::Rotated, _) => {}
        }
        Ok(())
    }

    fn check_new_device(&self, event: &KeyEvent) -> Result<(), String> {
        if DeviceId::for_key(&event.key) != event.device {
            return Err("device id is not derived from the key".into());
        }
        if self.retired.contains(&event.device) {
            return Err("a revoked device cannot be added again".into());
        }
        if self
            .accounts
            .values()
            .any(|d| d.contains_key(&event.device))
        {
            return Err("device is already registered".into());
        }
        Ok(())
    }
}

/// An Ed25519 public key as a JSON Web Key (RFC 8037).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    pub kid: String,
    /// Always `EdDSA`.
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    /// Describes an Ed25519 verifying key.
    pub fn ed25519(kid: &str, key: &VerifyingKey) -> Self {
        Self {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(key.as_bytes()),
            kid: kid.to_owned(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }
    }

    /// Returns the Ed25519 key, rejecting anything but an OKP Ed25519 key of 32 bytes.
    pub fn verifying_key(&self) -> Result<VerifyingKey, ProofError> {
        let invalid = |reason: &str| ProofError::InvalidJwk {
            kid: self.kid.clone(),
            reason: reason.to_owned(),
        };
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(invalid("expected kty OKP and crv Ed25519"));
        }
        if self.alg != "EdDSA" || self.use_ != "sig" {
            return Err(invalid("expected alg EdDSA and use sig"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(&self.x)
            .map_err(|_| invalid("x is not base64url"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| invalid("x is not 32 bytes"))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| invalid("x is not an Ed25519 point"))
    }
}

/// A JSON Web Key Set (RFC 7517).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Returns the key with `kid`.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

#[cfg(test)]
mod tests;
