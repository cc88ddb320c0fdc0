//! The Atlas client SDK: device identity, MLS groups (openmls) and the Atlas wire protocol.
//!
//! A [`Client`] keeps all of its state (device key, MLS group state, cursors, own sent
//! messages) in one state directory, written atomically after every change, so a restarted
//! client continues its groups. Plaintext never leaves the client: the server receives MLS
//! ciphertext only.

pub mod accounts;
pub mod audit;
mod conn;
mod dpop_state;
mod failover;
mod kt;
mod state;
mod tls;

pub use conn::CloseInfo;
pub use dpop_state::{DPOP_RETRIES, DpopState};
pub use failover::NodeAddress;
pub use kt::{KtViolation, ViolationKind};
pub use tls::{ServerTrust, fingerprint_hex};

use atlas_protocol::receipts::{ReceiptError, ReceiptFields, SignedReceipt, content_digest};
use atlas_protocol::transparency::{
    KeyEvent, KeyEventKind, ProvenEntry, SignedTreeHead, key_event_statement,
};
use atlas_protocol::{
    Accepted, ClientBody, ClientMsgId, DeviceId, EntryKind, ErrorCode, GroupId, LogEntry,
    ServerBody, WelcomeEntry, login_transcript,
};
use conn::Connection;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::Signer;
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use state::{GroupLocal, SavedState};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The ciphersuite every Atlas client uses.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Attempts for a commit or message that loses a race for the epoch.
const MAX_EPOCH_RETRIES: usize = 8;

/// Past epochs whose keys a client keeps, to decrypt messages sent just before a commit.
const MAX_PAST_EPOCHS: usize = 8;

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Invalid configuration or input on the client side.
    #[error("{0}")]
    Config(String),
    /// The connection could not be established.
    #[error("{0}")]
    Connect(String),
    /// The server replied with an error frame.
    #[error("server error {code:?}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        epoch: Option<u64>,
    },
    /// The server sent an unexpected response.
    #[error("unexpected response to {request}: {response}")]
    Unexpected {
        request: &'static str,
        response: String,
    },
    /// No response within the request timeout.
    #[error("request {0} timed out")]
    Timeout(u64),
    /// The connection closed; carries the close code and reason if the server sent them.
    #[error("disconnected (close frame: {0:?})")]
    Disconnected(CloseInfo),
    /// Not connected.
    #[error("not connected; call connect first")]
    NotConnected,
    /// An MLS operation failed.
    #[error("MLS error: {0}")]
    Mls(String),
    /// Reading or writing the state directory failed.
    #[error("state directory {path}: {detail}")]
    State { path: String, detail: String },
    /// The group is not known to this client.
    #[error("unknown group {0}")]
    UnknownGroup(String),
    /// The account has no device, or a device has no KeyPackage.
    #[error("{0}")]
    NotFound(String),
    /// A key transparency proof or tree head did not verify; the key it was meant to prove is
    /// not used.
    #[error("key transparency check failed: {0}")]
    KeyTransparency(String),
    /// A receipt from the server did not verify against its JWKS. The message itself was
    /// accepted and is recorded.
    #[error("receipt check failed: {0}")]
    Receipt(String),
    /// The server showed two contradicting views of its key log. The client refuses to work
    /// with this server from now on.
    #[error("security error: {0}")]
    Security(Box<KtViolation>),
    /// An account endpoint returned an error status.
    #[error("HTTP {}: {} ({})", .0.status, .0.description, .0.error)]
    Http(Box<accounts::HttpFailure>),
    /// The server's response did not have the expected form.
    #[error("invalid response: {0}")]
    Protocol(String),
    /// The server's log of a group contradicts what this device already read from it. It
    /// ends before this device's cursor, has another entry under it, skips an entry, or
    /// acknowledged a message under a position where this device read another entry. The
    /// node lost acknowledged writes (a restored backup, a damaged disk). Nothing read before
    /// is changed, and the device reads and writes the group no more.
    #[error("the server's log contradicts this device: {0}")]
    LogConflict(String),
}

impl ClientError {
    /// Returns the server's error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn mls<E: std::fmt::Display>(e: E) -> ClientError {
    ClientError::Mls(e.to_string())
}

/// A new device's request to join its account, signed by the new device's key; see
/// [`Client::enrollment_request`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnrollmentRequest {
    pub server_name: String,
    pub account: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub time_ms: u64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A decrypted log entry as the application receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub group: GroupId,
    pub seq: u64,
    pub sender_account: String,
    pub sender: DeviceId,
    pub event: Event,
}

/// Event at one position of a group's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An application message and its plaintext.
    Message(String),
    /// A commit that changed the membership; lists accounts added and removed.
    Membership {
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// This device joined the group through a Welcome.
    Joined,
    /// This device was removed from the group.
    Removed,
    /// An application message this client could not process, skipped, with the reason.
    Unreadable(String),
}

/// A client device with its MLS state.
pub struct Client {
    dir: PathBuf,
    account: String,
    signer: SignatureKeyPair,
    provider: OpenMlsRustCrypto,
    groups: BTreeMap<Vec<u8>, GroupLocal>,
    kt: kt::KtState,
    conn: Option<Connection>,
    /// Server name from the last login challenge; signed statements name it.
    server_name: Option<String>,
    request_timeout: Duration,
    /// Server nonce and clock offset learnt from DPoP challenges.
    dpop: DpopState,
    /// The cluster's nodes given to [`Client::connect_any`], and the one used last.
    nodes: Vec<NodeAddress>,
    node_index: usize,
    /// Events that the sync of a failover read and no call has returned yet.
    missed: Vec<Received>,
    /// Groups with entries after the cursor that no read has fetched yet, known from a push
    /// whose read failed or from an own entry acknowledged past them. The next
    /// [`Client::receive`] reads them first.
    behind: BTreeSet<GroupId>,
}

impl Client {
    /// Opens the client stored in `dir`, or creates a new device for `account` there.
    pub fn open(dir: &Path, account: &str) -> Result<Self, ClientError> {
        std::fs::create_dir_all(dir).map_err(|e| ClientError::State {
            path: dir.display().to_string(),
            detail: e.to_string(),
        })?;
        let provider = OpenMlsRustCrypto::default();
        let (signer, groups, account, kt) = match SavedState::load(dir)? {
            Some(saved) => {
                if saved.account != account {
                    return Err(ClientError::Config(format!(
                        "state directory {} belongs to account {:?}, not {account:?}",
                        dir.display(),
                        saved.account
                    )));
                }
                saved.restore_storage(provider.storage());
                (saved.signer()?, saved.groups, saved.account, saved.kt)
            }
            None => {
                let signer =
                    SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
                (
                    signer,
                    BTreeMap::new(),
                    account.to_owned(),
                    kt::KtState::default(),
                )
            }
        };
        let client = Self {
            dir: dir.to_owned(),
            account,
            signer,
            provider,
            groups,
            kt,
            conn: None,
            server_name: None,
            request_timeout: Duration::from_secs(30),
            dpop: DpopState::default(),
            nodes: Vec::new(),
            node_index: 0,
            missed: Vec::new(),
            behind: BTreeSet::new(),
        };
        client.save()?;
        Ok(client)
    }

    /// Returns whether `dir` contains a saved client state, so that a caller can tell opening an
    /// existing device from creating a new one before it calls [`Client::open`].
    pub fn state_exists(dir: &Path) -> bool {
        SavedState::exists(dir)
    }

    /// Returns the account this device belongs to.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::for_key(self.signer.public())
    }

    /// Groups this client belongs to.
    pub fn groups(&self) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| !g.removed)
            .filter_map(|(id, _)| GroupId::new(id.clone()).ok())
            .collect()
    }

    /// Returns the last log position this client has processed in a group.
    pub fn cursor(&self, group: &GroupId) -> Option<u64> {
        self.groups.get(group.as_bytes()).map(|g| g.cursor)
    }

    /// Lists the accounts that have at least one device in the group, sorted and without
    /// duplicates, as this client's MLS state records them. The list is current only up to the
    /// client's cursor in the group.
    pub fn members(&self, group: &GroupId) -> Result<Vec<String>, ClientError> {
        let accounts: BTreeSet<String> = self
            .load_group(group)?
            .members()
            .map(|m| String::from_utf8_lossy(m.credential.serialized_content()).into_owned())
            .collect();
        Ok(accounts.into_iter().collect())
    }

    /// Connects to `url` (`wss://host:port/v1/ws`), verifies the server, logs in and checks the
    /// server's latest key transparency head against the heads seen before. The first login
    /// registers the device under the account. A client that found a violation refuses to
    /// connect.
    pub async fn connect(&mut self, url: &str, trust: &ServerTrust) -> Result<bool, ClientError> {
        self.conn = None;
        self.refuse_after_violation()?;
        let tls = tls::client_config(trust)?;
        let (conn, challenge) = self.open_connection(url, tls).await?;
        let ServerBody::Challenge {
            nonce, server_name, ..
        } = challenge
        else {
            return Err(ClientError::Connect(
                "first frame was not a challenge".into(),
            ));
        };
        let signature = self
            .signer
            .sign(&login_transcript(&server_name, &nonce, &self.account))
            .map_err(|e| ClientError::Mls(format!("signing the login challenge failed: {e:?}")))?;
        let body = ClientBody::Login {
            account: self.account.clone(),
            device_key: self.signer.public().to_vec(),
            signature,
        };
        let registered = match conn.request(body).await? {
            ServerBody::LoggedIn { registered, .. } => registered,
            other => return Err(unexpected("login", other)),
        };
        self.conn = Some(conn);
        self.server_name = Some(server_name);
        match self.request(ClientBody::KtHead).await? {
            ServerBody::KtHead(head) => self.check_head(&head).await?,
            other => return Err(unexpected("kt_head", other)),
        }
        Ok(registered)
    }

    /// Opens the WebSocket with a DPoP proof of the device key. An upgrade rejected because the
    /// server wants a nonce, or because the local clock is off, is tried once more.
    async fn open_connection(
        &self,
        url: &str,
        tls: rustls::ClientConfig,
    ) -> Result<(Connection, ServerBody), ClientError> {
        let mut retries = 0;
        loop {
            let proof = self.dpop_proof("GET", url, None)?;
            match Connection::open(url, tls.clone(), self.request_timeout, &proof).await {
                Err(ClientError::Http(failure))
                    if retries < DPOP_RETRIES && self.dpop.learn_from(&failure) =>
                {
                    retries += 1;
                }
                other => return other,
            }
        }
    }

    /// Makes a DPoP proof for a request to `uri`, signed with the device key.
    pub fn dpop_proof(
        &self,
        method: &str,
        uri: &str,
        access_token: Option<&str>,
    ) -> Result<String, ClientError> {
        let public: [u8; 32] = self
            .signer
            .public()
            .try_into()
            .map_err(|_| ClientError::Mls("device key is not an Ed25519 key".into()))?;
        atlas_protocol::dpop::make_proof_with(
            &public,
            |input| {
                self.signer
                    .sign(input)
                    .map_err(|e| ClientError::Mls(format!("signing a DPoP proof failed: {e:?}")))
            },
            &atlas_protocol::dpop::ProofParams {
                method,
                uri,
                access_token,
                nonce: self.dpop.nonce().as_deref(),
                now_s: self.dpop.now_s(),
            },
        )
    }

    /// Stops or resumes reading from the socket. While paused the server's pushes back up in
    /// its queue, as with a client that reads too slowly.
    pub fn set_reading_paused(&self, paused: bool) {
        if let Some(conn) = &self.conn {
            conn.paused.send_replace(paused);
        }
    }

    /// Drops the connection.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Returns the close code and reason if the server closed the connection.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.conn.as_ref().and_then(|c| c.closed.borrow().clone())
    }

    fn conn(&self) -> Result<&Connection, ClientError> {
        self.conn.as_ref().ok_or(ClientError::NotConnected)
    }

    /// Sends a request body and returns the server's response; error frames become errors.
    pub async fn request(&self, body: ClientBody) -> Result<ServerBody, ClientError> {
        self.conn()?.request(body).await
    }

    /// Sends arbitrary bytes as one WebSocket binary message registered under a fresh request
    /// id, and waits for the response with that id. For tests of malformed input.
    pub async fn request_raw(
        &self,
        build: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<ServerBody, ClientError> {
        let conn = self.conn()?;
        let id = conn.next_request_id();
        conn.request_raw(id, build(id)).await
    }

    /// Sends arbitrary bytes without waiting for a response.
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.conn()?.send_raw(bytes).await
    }

    /// Waits up to `wait` for the connection to close and returns the close code and reason.
    pub async fn wait_closed(&mut self, wait: Duration) -> Option<CloseInfo> {
        let conn = self.conn.as_mut()?;
        let mut closed = conn.closed.clone();
        tokio::time::timeout(wait, closed.wait_for(|c| c.is_some()))
            .await
            .ok()?
            .ok()?
            .clone()
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.account.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// Uploads `count` one-time KeyPackages and a last-resort one.
    pub async fn publish_key_packages(&mut self, count: usize) -> Result<u32, ClientError> {
        let lifetime = Lifetime::new(30 * 24 * 3600);
        let mut one_time = Vec::with_capacity(count);
        for _ in 0..count {
            let bundle = KeyPackage::builder()
                .key_package_lifetime(lifetime)
                .build(CIPHERSUITE, &self.provider, &self.signer, self.credential())
                .map_err(mls)?;
            let message = MlsMessageOut::from(bundle.key_package().clone());
            one_time.push(serde_bytes::ByteBuf::from(
                message.tls_serialize_detached().map_err(mls)?,
            ));
        }
        let capabilities = Capabilities::builder()
            .extensions(vec![ExtensionType::LastResort])
            .build();
        let last_resort = KeyPackage::builder()
            .key_package_lifetime(lifetime)
            .leaf_node_capabilities(capabilities)
            .mark_as_last_resort()
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential())
            .map_err(mls)?;
        let last_resort = MlsMessageOut::from(last_resort.key_package().clone())
            .tls_serialize_detached()
            .map_err(mls)?;
        self.save()?;
        let body = ClientBody::UploadKeyPackages {
            key_packages: one_time,
            last_resort: Some(serde_bytes::ByteBuf::from(last_resort)),
        };
        match self.request(body).await? {
            ServerBody::KeyPackagesStored { available, .. } => Ok(available),
            other => Err(unexpected("upload_key_packages", other)),
        }
    }

    /// Creates a group with this device as its only member and registers it on the server.
    pub async fn create_group(&mut self, name: &str) -> Result<GroupId, ClientError> {
        let mut id = name.as_bytes().to_vec();
        let mut suffix = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut suffix);
        id.push(b'-');
        id.extend_from_slice(hex::encode(suffix).as_bytes());
        let group_id = GroupId::new(id).map_err(|e| ClientError::Config(e.to_string()))?;

        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let mut group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            openmls::group::GroupId::from_slice(group_id.as_bytes()),
            self.credential(),
        )
        .map_err(mls)?;
        let info = group
            .export_group_info(self.provider.crypto(), &self.signer, true)
            .map_err(mls)?;
        let info = info.tls_serialize_detached().map_err(mls)?;
        let created = self
            .request(ClientBody::CreateGroup {
                group: group_id.clone(),
                group_info: info,
            })
            .await;
        if let Ok(ServerBody::GroupCreated { .. }) = created {
            self.groups
                .insert(group_id.as_bytes().to_vec(), GroupLocal::default());
            self.save()?;
            return Ok(group_id);
        }
        // The server did not confirm the group, so this client forgets it: a group known only
        // here would fail every later sync with `group_not_found`.
        // NOTE: when the outcome is unknown (the node stopped replying), the node may have
        // stored the group anyway. It then has this device as its only member and no client.
        group.delete(self.provider.storage()).map_err(mls)?;
        self.save()?;
        match created {
            Ok(other) => Err(unexpected("create_group", other)),
            Err(e) => Err(e),
        }
    }

    fn load_group(&self, group: &GroupId) -> Result<MlsGroup, ClientError> {
        MlsGroup::load(
            self.provider.storage(),
            &openmls::group::GroupId::from_slice(group.as_bytes()),
        )
        .map_err(mls)?
        .ok_or_else(|| ClientError::UnknownGroup(group.to_string()))
    }

    /// Adds every device of each account to the group, retrying after catching up when another
    /// commit wins the epoch. Returns the commit's sequence number.
    pub async fn add_members(
        &mut self,
        group: &GroupId,
        accounts: &[&str],
    ) -> Result<u64, ClientError> {
        let mut key_packages = Vec::new();
        for account in accounts {
            let devices = self.lookup_devices(account).await?;
            if devices.is_empty() {
                return Err(ClientError::NotFound(format!(
                    "account {account:?} has no devices"
                )));
            }
            for (device, key) in devices {
                let body = self.request(ClientBody::ClaimKeyPackage { device }).await?;
                let ServerBody::KeyPackage {
                    key_package,
                    proof,
                    head,
                    ..
                } = body
                else {
                    return Err(unexpected("claim_key_package", body));
                };
                self.check_key_proof(account, &device, &key, &proof, &head)
                    .await?;
                key_packages.push(self.verify_key_package(&key_package, &key, account)?);
            }
        }
        self.commit_with_retry(group, |client, mls_group| {
            let (commit, welcome, _) = mls_group
                .add_members(&client.provider, &client.signer, &key_packages)
                .map_err(mls)?;
            Ok((commit, Some(welcome)))
        })
        .await
    }

    fn verify_key_package(
        &self,
        bytes: &[u8],
        device_key: &[u8],
        account: &str,
    ) -> Result<KeyPackage, ClientError> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(mls)?;
        let MlsMessageBodyIn::KeyPackage(kp) = message.extract() else {
            return Err(ClientError::Mls(
                "server returned something other than a KeyPackage".into(),
            ));
        };
        let kp = kp
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(mls)?;
        if kp.leaf_node().signature_key().as_slice() != device_key {
            return Err(ClientError::Mls(
                "KeyPackage key does not match the listed device key".into(),
            ));
        }
        let identity =
            BasicCredential::try_from(kp.leaf_node().credential().clone()).map_err(mls)?;
        if identity.identity() != account.as_bytes() {
            return Err(ClientError::Mls(format!(
                "KeyPackage credential is not for account {account:?}"
            )));
        }
        Ok(kp)
    }

    /// Returns the key transparency violation this client found, if any. A client that found
    /// one refuses to work with the server.
    pub fn kt_violation(&self) -> Option<&KtViolation> {
        self.kt.violation.as_ref()
    }

    /// Largest signed tree head this client has verified.
    pub fn kt_latest_head(&self) -> Option<&SignedTreeHead> {
        self.kt.latest.as_ref()
    }

    fn refuse_after_violation(&self) -> Result<(), ClientError> {
        match &self.kt.violation {
            Some(v) => Err(ClientError::Security(Box::new(v.clone()))),
            None => Ok(()),
        }
    }

    /// Verifies a tree head the server presented: its signature against the server's JWKS,
    /// its time, and its consistency with the largest head seen before. A contradiction is
    /// recorded as a violation and returned as [`ClientError::Security`].
    pub async fn check_head(&mut self, head: &SignedTreeHead) -> Result<(), ClientError> {
        self.refuse_after_violation()?;
        if self.kt.jwks.find(&head.kid).is_none() {
            self.refresh_jwks().await?;
        }
        head.verify(&self.kt.jwks, now_ms())
            .map_err(|e| kt::proof_error("tree head rejected", &e))?;
        // The kept head counts as evidence only while its signature holds: a head damaged in
        // the state file would accuse an honest server.
        if let Some(seen) = &self.kt.latest
            && let Err(e) = seen.verify(&self.kt.jwks, now_ms())
        {
            return Err(ClientError::KeyTransparency(format!(
                "the tree head of size {} kept in the client state does not verify ({e}): the \
                 state is damaged, so it proves nothing about the server; restore the state \
                 directory from a backup",
                seen.size
            )));
        }
        let Some(seen) = self.kt.latest.clone() else {
            self.kt.latest = Some(head.clone());
            return self.save();
        };
        let (old, new) = if head.size >= seen.size {
            (&seen, head)
        } else {
            (head, &seen)
        };
        let verdict = if old.size == new.size {
            if old.root == new.root {
                Ok(())
            } else {
                Err((ViolationKind::Fork, "same size, different roots".to_owned()))
            }
        } else if old.size == 0 {
            Ok(())
        } else {
            let proof = self
                .request(ClientBody::KtConsistency {
                    from: old.size,
                    to: new.size,
                })
                .await;
            match proof {
                Ok(ServerBody::KtConsistency(proof)) => proof
                    .verify(old, new)
                    .map_err(|e| (ViolationKind::Fork, e.to_string())),
                Ok(other) => return Err(unexpected("kt_consistency", other)),
                // The server cannot prove a size it no longer has.
                Err(ClientError::Server { code, message, .. })
                    if code == ErrorCode::InvalidRequest && head.size < seen.size =>
                {
                    Err((ViolationKind::Rollback, message))
                }
                Err(e) => return Err(e),
            }
        };
        match verdict {
            Ok(()) => {
                if head.size > seen.size {
                    self.kt.latest = Some(head.clone());
                    self.save()?;
                }
                Ok(())
            }
            Err((kind, detail)) => {
                let violation = KtViolation {
                    kind,
                    seen,
                    presented: head.clone(),
                    detail,
                };
                tracing::error!(%violation, "key transparency violation");
                self.kt.violation = Some(violation.clone());
                self.save()?;
                Err(ClientError::Security(Box::new(violation)))
            }
        }
    }

    fn connected_server_name(&self) -> Result<String, ClientError> {
        self.server_name.clone().ok_or(ClientError::NotConnected)
    }

    /// Fetches the node's JWKS and adds its keys to the ones this client has.
    async fn refresh_jwks(&mut self) -> Result<(), ClientError> {
        match self.request(ClientBody::Jwks).await? {
            ServerBody::Jwks(jwks) => {
                self.kt.merge_jwks(jwks);
                Ok(())
            }
            other => Err(unexpected("jwks", other)),
        }
    }

    /// Verifies the receipt of this device's own entry, whose ciphertext had `digest`, and
    /// keeps it in the state.
    async fn keep_receipt(
        &mut self,
        accepted: &Accepted,
        digest: String,
    ) -> Result<(), ClientError> {
        // A retry is acknowledged with the original entry's receipt, which covers the
        // ciphertext sent first, not the one just re-encrypted: fetch it with its fields.
        if accepted.duplicate {
            let signed = self.fetch_receipt(&accepted.group, accepted.seq).await?;
            if signed.fields.sender != self.device_id()
                || signed.fields.accepted_at_ms != accepted.accepted_at_ms
            {
                return Err(ClientError::Receipt(format!(
                    "entry {} of group {} that acknowledges a retry was not sent by this device",
                    accepted.seq, accepted.group
                )));
            }
            if let Some(local) = self.groups.get_mut(accepted.group.as_bytes()) {
                local.receipts.insert(accepted.seq, signed);
            }
            return self.save();
        }
        let signed = SignedReceipt {
            fields: ReceiptFields {
                group: accepted.group.clone(),
                seq: accepted.seq,
                sender: self.device_id(),
                accepted_at_ms: accepted.accepted_at_ms,
                content_digest: digest,
            },
            receipt: accepted.receipt.clone(),
        };
        self.verify_receipt(&signed).await?;
        if let Some(local) = self.groups.get_mut(accepted.group.as_bytes()) {
            local.receipts.insert(accepted.seq, signed);
        }
        self.save()
    }

    /// Verifies a receipt against the node's JWKS, fetching it when the receipt names a key
    /// this client has not seen.
    pub async fn verify_receipt(&mut self, signed: &SignedReceipt) -> Result<(), ClientError> {
        if let Err(ReceiptError::UnknownKey(_)) = signed.verify(&self.kt.jwks) {
            self.refresh_jwks().await?;
        }
        signed.verify(&self.kt.jwks).map_err(|e| {
            ClientError::Receipt(format!(
                "receipt of entry {} in group {}: {e}",
                signed.fields.seq, signed.fields.group
            ))
        })
    }

    /// Returns the kept receipt of this device's entry `seq` in `group`.
    pub fn receipt(&self, group: &GroupId, seq: u64) -> Option<&SignedReceipt> {
        self.groups.get(group.as_bytes())?.receipts.get(&seq)
    }

    /// Fetches a freshly signed receipt for any stored entry of a group this device belongs
    /// to, and verifies it.
    pub async fn fetch_receipt(
        &mut self,
        group: &GroupId,
        seq: u64,
    ) -> Result<SignedReceipt, ClientError> {
        let body = self
            .request(ClientBody::Receipt {
                group: group.clone(),
                seq,
            })
            .await?;
        let ServerBody::Receipt { fields, receipt } = body else {
            return Err(unexpected("receipt", body));
        };
        if fields.group != *group || fields.seq != seq {
            return Err(ClientError::Receipt(format!(
                "asked for entry {seq} of group {group}, got entry {} of group {}",
                fields.seq, fields.group
            )));
        }
        let signed = SignedReceipt { fields, receipt };
        self.verify_receipt(&signed).await?;
        Ok(signed)
    }

    /// Checks that `proof` is an entry of the log under `head` that publishes `key` as the
    /// current key of `device` in `account`.
    async fn check_key_proof(
        &mut self,
        account: &str,
        device: &DeviceId,
        key: &[u8],
        proof: &ProvenEntry,
        head: &SignedTreeHead,
    ) -> Result<(), ClientError> {
        self.check_head(head).await?;
        let event = proof
            .verify(head)
            .map_err(|e| kt::proof_error(&format!("key of device {device}"), &e))?;
        let publishes = matches!(event.kind, KeyEventKind::Added | KeyEventKind::Rotated);
        if !publishes || event.account != account || event.device != *device || event.key != key {
            return Err(ClientError::KeyTransparency(format!(
                "log entry {} does not publish the key of device {device} in account \
                 {account:?}",
                proof.index
            )));
        }
        Ok(())
    }

    /// Looks up the current devices of an account in the key transparency log and verifies
    /// each one's inclusion proof. Returns each device with its key.
    pub async fn lookup_devices(
        &mut self,
        account: &str,
    ) -> Result<Vec<(DeviceId, Vec<u8>)>, ClientError> {
        self.refuse_after_violation()?;
        let body = self
            .request(ClientBody::KtLookup {
                account: account.to_owned(),
            })
            .await?;
        let ServerBody::KtEntries { head, entries } = body else {
            return Err(unexpected("kt_lookup", body));
        };
        self.check_head(&head).await?;
        let mut devices = Vec::new();
        for entry in entries {
            let event = entry
                .verify(&head)
                .map_err(|e| kt::proof_error(&format!("lookup of {account:?}"), &e))?;
            let publishes = matches!(event.kind, KeyEventKind::Added | KeyEventKind::Rotated);
            if !publishes || event.account != account {
                return Err(ClientError::KeyTransparency(format!(
                    "lookup of {account:?} returned log entry {} about {:?}",
                    entry.index, event.account
                )));
            }
            devices.push((event.device, event.key));
        }
        Ok(devices)
    }

    /// Fetches every key event of an account with proofs, page by page, each verified
    /// against a checked head.
    pub async fn key_history(
        &mut self,
        account: &str,
    ) -> Result<Vec<(u64, KeyEvent)>, ClientError> {
        self.refuse_after_violation()?;
        let mut out: Vec<(u64, KeyEvent)> = Vec::new();
        loop {
            let start = out.last().map_or(0, |(index, _)| index + 1);
            let body = self
                .request(ClientBody::KtHistory {
                    account: account.to_owned(),
                    start,
                })
                .await?;
            let ServerBody::KtEntries { head, entries } = body else {
                return Err(unexpected("kt_history", body));
            };
            self.check_head(&head).await?;
            if entries.is_empty() {
                return Ok(out);
            }
            for entry in entries {
                let event = entry
                    .verify(&head)
                    .map_err(|e| kt::proof_error(&format!("history of {account:?}"), &e))?;
                if event.account != account || entry.index < start {
                    return Err(ClientError::KeyTransparency(format!(
                        "history of {account:?} from entry {start} returned log entry {} about \
                         {:?}",
                        entry.index, event.account
                    )));
                }
                out.push((entry.index, event));
            }
        }
    }

    /// Asks the server to add the device of `request` to this device's account, signing the
    /// same statement as the new device. Returns the log index of the enrollment.
    pub async fn enroll_device(&mut self, request: &EnrollmentRequest) -> Result<u64, ClientError> {
        if request.account != self.account {
            return Err(ClientError::Config(format!(
                "the enrollment request is for account {:?}, this device belongs to {:?}",
                request.account, self.account
            )));
        }
        let device = DeviceId::for_key(&request.key);
        let server_name = self.connected_server_name()?;
        if request.server_name != server_name {
            return Err(ClientError::Config(format!(
                "the enrollment request is for server {:?}, this device is connected to {server_name:?}",
                request.server_name
            )));
        }
        let statement = key_event_statement(
            KeyEventKind::Added,
            &server_name,
            &self.account,
            &device,
            &request.key,
            request.time_ms,
        );
        let signature = self
            .signer
            .sign(&statement)
            .map_err(|e| ClientError::Mls(format!("signing the enrollment failed: {e:?}")))?;
        match self
            .request(ClientBody::EnrollDevice {
                new_key: request.key.clone(),
                time_ms: request.time_ms,
                signature,
                new_key_signature: request.signature.clone(),
            })
            .await?
        {
            ServerBody::DeviceEnrolled { index, .. } => Ok(index),
            other => Err(unexpected("enroll_device", other)),
        }
    }

    /// Builds the request of this new, not yet registered device to join its account on the
    /// server named `server_name` (see [`server_name_of`]): its key and its signature over the
    /// enrollment statement. A device of the account passes it to [`Client::enroll_device`]
    /// within 10 minutes; this device then connects as usual.
    pub fn enrollment_request(&self, server_name: &str) -> Result<EnrollmentRequest, ClientError> {
        let time_ms = now_ms();
        let key = self.signer.public().to_vec();
        let statement = key_event_statement(
            KeyEventKind::Added,
            server_name,
            &self.account,
            &self.device_id(),
            &key,
            time_ms,
        );
        let signature = self
            .signer
            .sign(&statement)
            .map_err(|e| ClientError::Mls(format!("signing the enrollment failed: {e:?}")))?;
        Ok(EnrollmentRequest {
            server_name: server_name.to_owned(),
            account: self.account.clone(),
            key,
            time_ms,
            signature,
        })
    }

    /// Revokes a device of this account (or this device). Returns the log index of the
    /// revocation.
    pub async fn revoke_device(&mut self, device: DeviceId) -> Result<u64, ClientError> {
        let devices = self.lookup_devices(&self.account.clone()).await?;
        let Some((_, key)) = devices.iter().find(|(d, _)| *d == device) else {
            return Err(ClientError::NotFound(format!(
                "device {device} is not a current device of account {:?}",
                self.account
            )));
        };
        let time_ms = now_ms();
        let server_name = self.connected_server_name()?;
        let statement = key_event_statement(
            KeyEventKind::Revoked,
            &server_name,
            &self.account,
            &device,
            key,
            time_ms,
        );
        let signature = self
            .signer
            .sign(&statement)
            .map_err(|e| ClientError::Mls(format!("signing the revocation failed: {e:?}")))?;
        match self
            .request(ClientBody::RevokeDevice {
                device,
                time_ms,
                signature,
            })
            .await?
        {
            ServerBody::DeviceRevoked { index, .. } => Ok(index),
            other => Err(unexpected("revoke_device", other)),
        }
    }

    /// Removes every device of each account from the group. Returns the commit's sequence number.
    pub async fn remove_members(
        &mut self,
        group: &GroupId,
        accounts: &[&str],
    ) -> Result<u64, ClientError> {
        let accounts: Vec<Vec<u8>> = accounts.iter().map(|a| a.as_bytes().to_vec()).collect();
        self.commit_with_retry(group, |_client, mls_group| {
            let leaves: Vec<LeafNodeIndex> = mls_group
                .members()
                .filter(|m| {
                    accounts
                        .iter()
                        .any(|a| a.as_slice() == m.credential.serialized_content())
                })
                .map(|m| m.index)
                .collect();
            if leaves.is_empty() {
                return Err(ClientError::NotFound(
                    "no member devices of those accounts".into(),
                ));
            }
            let (commit, _, _) = mls_group
                .remove_members(&_client.provider, &_client.signer, &leaves)
                .map_err(mls)?;
            Ok((commit, None))
        })
        .await
    }

    async fn commit_with_retry(
        &mut self,
        group: &GroupId,
        mut build: impl FnMut(
            &Self,
            &mut MlsGroup,
        ) -> Result<(MlsMessageOut, Option<MlsMessageOut>), ClientError>,
    ) -> Result<u64, ClientError> {
        for _ in 0..MAX_EPOCH_RETRIES {
            self.sync_group(group).await?;
            let mut mls_group = self.load_group(group)?;
            let (commit, welcome) = build(self, &mut mls_group)?;
            let commit = commit.tls_serialize_detached().map_err(mls)?;
            let welcome = welcome
                .map(|w| w.tls_serialize_detached().map(serde_bytes::ByteBuf::from))
                .transpose()
                .map_err(mls)?;
            let msg_id = new_msg_id();
            self.save()?;
            let digest = content_digest(&commit);
            let stored = entry_digest(&msg_id, &commit);
            let body = ClientBody::Commit {
                group: group.clone(),
                msg_id,
                commit,
                welcome,
            };
            match self.request(body).await {
                Ok(ServerBody::Accepted(accepted)) => {
                    mls_group
                        .merge_pending_commit(&self.provider)
                        .map_err(mls)?;
                    self.record_own(group, accepted.seq, None, stored);
                    self.save()?;
                    self.keep_receipt(&accepted, digest).await?;
                    return Ok(accepted.seq);
                }
                Ok(other) => return Err(unexpected("commit", other)),
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    // Another commit won this epoch: drop ours, catch up, build again.
                    mls_group
                        .clear_pending_commit(self.provider.storage())
                        .map_err(mls)?;
                    self.save()?;
                }
                Err(e) => {
                    mls_group
                        .clear_pending_commit(self.provider.storage())
                        .map_err(mls)?;
                    self.save()?;
                    return Err(e);
                }
            }
        }
        Err(ClientError::Mls(format!(
            "commit to group {group} lost the epoch race {MAX_EPOCH_RETRIES} times"
        )))
    }

    /// Encrypts a text message for the group's current epoch without sending it, and returns
    /// the MLS PrivateMessage bytes. Load generators use it to pre-encrypt a payload; sending
    /// the same ciphertext twice is something real clients never do.
    pub fn encrypt(&mut self, group: &GroupId, text: &str) -> Result<Vec<u8>, ClientError> {
        let message = self.encrypt_unsaved(group, text)?;
        self.save()?;
        Ok(message)
    }

    /// Encrypts a text message; the caller saves the advanced MLS state.
    fn encrypt_unsaved(&mut self, group: &GroupId, text: &str) -> Result<Vec<u8>, ClientError> {
        let mut mls_group = self.load_group(group)?;
        mls_group
            .create_message(&self.provider, &self.signer, text.as_bytes())
            .map_err(mls)?
            .tls_serialize_detached()
            .map_err(mls)
    }

    /// Takes the logged-in connection out of the client, for callers that drive the protocol
    /// directly (load generators). The client is disconnected afterwards.
    pub fn take_connection(&mut self) -> Option<RawConnection> {
        self.conn.take().map(|conn| RawConnection { conn })
    }

    /// Encrypts and sends a text message. Returns its sequence number.
    pub async fn send(&mut self, group: &GroupId, text: &str) -> Result<u64, ClientError> {
        self.send_with_id(group, text, new_msg_id()).await
    }

    /// Like [`Client::send`] with a caller-chosen message id, so a retry after a lost
    /// acknowledgement is recognised by the server.
    pub async fn send_with_id(
        &mut self,
        group: &GroupId,
        text: &str,
        msg_id: ClientMsgId,
    ) -> Result<u64, ClientError> {
        self.check_no_conflict(group)?;
        for _ in 0..MAX_EPOCH_RETRIES {
            let message = self.encrypt_unsaved(group, text)?;
            if let Some(local) = self.groups.get_mut(group.as_bytes()) {
                local.unacknowledged.insert(msg_id.0, text.to_owned());
            }
            self.save()?;
            let digest = content_digest(&message);
            let stored = entry_digest(&msg_id, &message);
            let body = ClientBody::Send {
                group: group.clone(),
                msg_id,
                message,
            };
            match self.request(body).await {
                Ok(ServerBody::Accepted(accepted)) => {
                    // A sync may have met this entry already and recorded it.
                    let recorded = self
                        .groups
                        .get_mut(group.as_bytes())
                        .is_some_and(|g| g.unacknowledged.remove(&msg_id.0).is_none());
                    if !recorded {
                        self.check_own_position(group, accepted.seq, msg_id, text)?;
                        self.record_own(group, accepted.seq, Some(text.to_owned()), stored);
                    }
                    self.save()?;
                    self.keep_receipt(&accepted, digest).await?;
                    return Ok(accepted.seq);
                }
                Ok(other) => return Err(unexpected("send", other)),
                Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => {
                    self.sync_group(group).await?;
                }
                Err(e) => {
                    // A server error frame means nothing was stored, except `unavailable`: in a
                    // cluster the send may still commit. A lost connection may hide an
                    // acknowledgement too. Then the text stays for a later sync to find.
                    if matches!(&e, ClientError::Server { code, .. } if *code != ErrorCode::Unavailable)
                        && let Some(local) = self.groups.get_mut(group.as_bytes())
                    {
                        local.unacknowledged.remove(&msg_id.0);
                        self.save()?;
                    }
                    return Err(e);
                }
            }
        }
        Err(ClientError::Mls(format!(
            "message to group {group} lost the epoch race {MAX_EPOCH_RETRIES} times"
        )))
    }

    /// Fails with [`ClientError::LogConflict`] when the server acknowledged the message `text`
    /// at a position this device has read already, unless the entry read there is this
    /// message (a retry whose original a sync met). The text then stays unacknowledged, so a
    /// sync that finds the message elsewhere still records it.
    fn check_own_position(
        &mut self,
        group: &GroupId,
        seq: u64,
        msg_id: ClientMsgId,
        text: &str,
    ) -> Result<(), ClientError> {
        let Some(local) = self.groups.get_mut(group.as_bytes()) else {
            return Ok(());
        };
        if seq > local.cursor {
            return Ok(());
        }
        let read = local
            .transcript
            .binary_search_by_key(&seq, |(s, _, _)| *s)
            .ok()
            .map(|i| &local.transcript[i]);
        if read.is_some_and(|(_, account, read)| *account == self.account && read == text) {
            return Ok(());
        }
        let cursor = local.cursor;
        local.unacknowledged.insert(msg_id.0, text.to_owned());
        Err(self.record_conflict(
            group,
            format!(
                "the server acknowledged a message to group {group} as entry {seq}, but this \
                 device already read another entry {seq} there (it has read up to entry {cursor})"
            ),
        ))
    }

    /// Records that the server's log of `group` contradicts this device, as `detail`
    /// describes, and returns the error to report. From then on the device refuses to read or write the
    /// group through the server (see [`Client::check_no_conflict`]).
    fn record_conflict(&mut self, group: &GroupId, detail: String) -> ClientError {
        if let Some(local) = self.groups.get_mut(group.as_bytes()) {
            local.conflict = Some(detail.clone());
        }
        match self.save() {
            Ok(()) => ClientError::LogConflict(detail),
            Err(e) => e,
        }
    }

    /// Returns how the server's log of `group` contradicted this device, if it did. The device
    /// then no longer reads or writes the group (see [`ClientError::LogConflict`]).
    pub fn log_conflict(&self, group: &GroupId) -> Option<&str> {
        self.groups
            .get(group.as_bytes())
            .and_then(|g| g.conflict.as_deref())
    }

    /// Fails with the recorded [`ClientError::LogConflict`] if the server's log of `group`
    /// contradicted this device before.
    fn check_no_conflict(&self, group: &GroupId) -> Result<(), ClientError> {
        match self
            .groups
            .get(group.as_bytes())
            .and_then(|g| g.conflict.as_ref())
        {
            Some(detail) => Err(ClientError::LogConflict(detail.clone())),
            None => Ok(()),
        }
    }

    /// Records this device's own entry `seq`, acknowledged by the server, with its digest
    /// ([`entry_digest`]).
    fn record_own(&mut self, group: &GroupId, seq: u64, text: Option<String>, digest: [u8; 32]) {
        let local = self.groups.entry(group.as_bytes().to_vec()).or_default();
        if seq == local.cursor + 1 {
            local.cursor = seq;
            local.last_read = Some((seq, digest));
            local.record(seq, &self.account, text);
        } else if seq > local.cursor {
            local.own.insert(seq, text);
            local.own_digests.insert(seq, digest);
            // Entries of others came first. Their pushes may never come (a node that caught up
            // from a snapshot pushes only the newest entry), so the next receive reads them.
            self.behind.insert(group.clone());
        }
    }

    /// Joins groups from pending Welcomes, then reads every group's log from its cursor.
    /// Returns the events in log order per group, after those that a failover read before
    /// (see [`Client::take_missed`]).
    ///
    /// When a read fails part way, the cursors have moved past the events read before it, so
    /// the client keeps them and the next call returns them first.
    pub async fn sync(&mut self) -> Result<Vec<Received>, ClientError> {
        let mut out = std::mem::take(&mut self.missed);
        match self.sync_into(&mut out).await {
            Ok(()) => {
                self.behind.clear();
                Ok(out)
            }
            Err(e) => {
                out.append(&mut self.missed);
                self.missed = out;
                Err(e)
            }
        }
    }

    async fn sync_into(&mut self, out: &mut Vec<Received>) -> Result<(), ClientError> {
        let welcomes = match self.request(ClientBody::Welcomes).await? {
            ServerBody::Welcomes { welcomes } => welcomes,
            other => return Err(unexpected("welcomes", other)),
        };
        for welcome in welcomes {
            // One Welcome that cannot be processed must not keep this device out of others.
            let group = welcome.group.clone();
            match self.join(welcome) {
                Ok(joined) => out.extend(joined),
                Err(e) => {
                    tracing::warn!(%group, error = %e, "skipped a Welcome that could not be processed; a member can add this device again")
                }
            }
        }
        for group in self.groups() {
            // Reported when it was found; the other groups go on.
            if self.check_no_conflict(&group).is_err() {
                tracing::warn!(%group, "not reading the group: the server's log contradicted this device");
                continue;
            }
            out.extend(self.sync_group(&group).await?);
        }
        Ok(())
    }

    fn join(&mut self, welcome: WelcomeEntry) -> Result<Option<Received>, ClientError> {
        // A device already in the group, or removed at or after the Welcome's commit, has
        // used this Welcome: the server keeps it until the device acknowledges the group,
        // which a removed device cannot do.
        if self
            .groups
            .get(welcome.group.as_bytes())
            .is_some_and(|g| !g.removed || g.cursor >= welcome.seq)
        {
            return Ok(None);
        }
        let message = MlsMessageIn::tls_deserialize_exact(&welcome.welcome).map_err(mls)?;
        let MlsMessageBodyIn::Welcome(w) = message.extract() else {
            return Err(ClientError::Mls(
                "Welcome entry does not hold a Welcome".into(),
            ));
        };
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        // A device added again after its removal joins anew under the same group id, where
        // openmls still keeps the state it was removed with.
        let earlier = self.groups.get(welcome.group.as_bytes()).cloned();
        if earlier.is_some() {
            let id = openmls::group::GroupId::from_slice(welcome.group.as_bytes());
            if let Some(mut old) = MlsGroup::load(self.provider.storage(), &id).map_err(mls)? {
                old.delete(self.provider.storage()).map_err(mls)?;
            }
        }
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &config, w, None).map_err(mls)?;
        let group = staged.into_group(&self.provider).map_err(mls)?;
        if group.group_id().as_slice() != welcome.group.as_bytes() {
            return Err(ClientError::Mls(
                "Welcome is for another group than announced".into(),
            ));
        }
        // The messages and receipts from before the removal stay readable.
        let local = GroupLocal {
            cursor: welcome.seq,
            transcript: earlier
                .as_ref()
                .map(|g| g.transcript.clone())
                .unwrap_or_default(),
            receipts: earlier.map(|g| g.receipts).unwrap_or_default(),
            ..GroupLocal::default()
        };
        self.groups.insert(welcome.group.as_bytes().to_vec(), local);
        self.save()?;
        Ok(Some(Received {
            group: welcome.group,
            seq: welcome.seq,
            sender_account: String::new(),
            sender: self.device_id(),
            event: Event::Joined,
        }))
    }

    /// Reads one group's log from the cursor to the head, processes it and acknowledges it.
    /// The group's events that an earlier read moved the cursor past without returning them
    /// (a failover's sync, a read that failed part way) come first.
    ///
    /// Fails with [`ClientError::LogConflict`] when the server's log ends before the cursor
    /// or skips an entry it still holds.
    pub async fn sync_group(&mut self, group: &GroupId) -> Result<Vec<Received>, ClientError> {
        let (mut out, others) = std::mem::take(&mut self.missed)
            .into_iter()
            .partition::<Vec<_>, _>(|r| &r.group == group);
        self.missed = others;
        match self.sync_group_into(group, &mut out).await {
            Ok(()) => {
                self.behind.remove(group);
                Ok(out)
            }
            Err(e) => {
                self.missed.append(&mut out);
                Err(e)
            }
        }
    }

    async fn sync_group_into(
        &mut self,
        group: &GroupId,
        out: &mut Vec<Received>,
    ) -> Result<(), ClientError> {
        // The first page starts at the entry under the cursor, to check that the server still
        // has the entry this device read there.
        let mut verify = true;
        self.check_no_conflict(group)?;
        loop {
            let Some(local) = self.groups.get(group.as_bytes()) else {
                return Err(ClientError::UnknownGroup(group.to_string()));
            };
            if local.removed {
                return Ok(());
            }
            let after = local.cursor;
            let read_there = local
                .last_read
                .filter(|(seq, _)| verify && *seq == after && after > 0)
                .map(|(_, digest)| digest);
            verify = false;
            let body = ClientBody::Sync {
                group: group.clone(),
                after: after - u64::from(read_there.is_some()),
                limit: 200,
            };
            let (entries, head, first_available) = match self.request(body).await {
                Ok(ServerBody::Entries {
                    entries,
                    head,
                    first_available,
                    ..
                }) => (entries, head, first_available),
                Ok(other) => return Err(unexpected("sync", other)),
                Err(ClientError::Server {
                    code: ErrorCode::NotMember,
                    epoch,
                    ..
                }) => {
                    // A removal moves the group to a later epoch than this device's. A server
                    // at this device's epoch or an earlier one lost the commits that added it.
                    let mine = self.load_group(group)?.epoch().as_u64();
                    if let Some(theirs) = epoch.filter(|e| *e <= mine) {
                        return Err(self.record_conflict(
                            group,
                            format!(
                                "the server's group {group} is at epoch {theirs} without this \
                                 device, but this device is a member at epoch {mine}"
                            ),
                        ));
                    }
                    // The server refuses a removed device before it has read the commit
                    // that removed it, so the event carries the cursor instead.
                    self.mark_removed(group)?;
                    out.push(Received {
                        group: group.clone(),
                        seq: after,
                        sender_account: String::new(),
                        sender: self.device_id(),
                        event: Event::Removed,
                    });
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if head < after {
                return Err(self.record_conflict(
                    group,
                    format!(
                        "the server's log of group {group} ends at entry {head}, but this device \
                     has read up to entry {after}"
                    ),
                ));
            }
            if let Some(digest) = read_there
                && first_available <= after
            {
                match entries.first() {
                    Some(entry) if entry.seq == after => {
                        if entry_digest(&entry.msg_id, &entry.payload) != digest {
                            return Err(self.record_conflict(
                                group,
                                format!(
                                    "entry {after} of group {group} on the server is not the one \
                                 this device read there"
                                ),
                            ));
                        }
                    }
                    _ => {
                        return Err(self.record_conflict(
                            group,
                            format!(
                                "the server did not return entry {after} of group {group}, which \
                             this device read"
                            ),
                        ));
                    }
                }
            }
            // Entries below `first_available` were removed by retention; the rest must follow
            // one another.
            let first = (after + 1).max(first_available);
            let read = entries.iter().filter(|e| e.seq > after);
            for (entry, expected) in read.zip(first..) {
                if entry.seq != expected {
                    return Err(self.record_conflict(
                        group,
                        format!(
                            "the server's log of group {group} skips from entry {} to entry {}",
                            expected - 1,
                            entry.seq
                        ),
                    ));
                }
            }
            let count = entries.iter().filter(|e| e.seq > after).count();
            for entry in entries {
                out.extend(self.process_entry(group, entry)?);
            }
            let cursor = self.cursor(group).unwrap_or(0);
            if cursor > after && !self.groups.get(group.as_bytes()).is_some_and(|g| g.removed) {
                self.request(ClientBody::Ack {
                    group: group.clone(),
                    seq: cursor,
                })
                .await?;
            }
            if count == 0 || cursor >= head {
                return Ok(());
            }
        }
    }

    fn mark_removed(&mut self, group: &GroupId) -> Result<(), ClientError> {
        if let Some(local) = self.groups.get_mut(group.as_bytes()) {
            local.removed = true;
        }
        self.save()
    }

    /// Applies one log entry in order; entries at or below the cursor are skipped.
    fn process_entry(
        &mut self,
        group: &GroupId,
        entry: LogEntry,
    ) -> Result<Option<Received>, ClientError> {
        let me = self.device_id();
        let local = self
            .groups
            .get_mut(group.as_bytes())
            .ok_or_else(|| ClientError::UnknownGroup(group.to_string()))?;
        if entry.seq <= local.cursor {
            // The cursor may have moved over own entries acknowledged ahead of it without
            // reading them. The last of them must be the entry the server has there.
            if let Some((seq, own)) = local.last_read
                && seq == entry.seq
                && own != entry_digest(&entry.msg_id, &entry.payload)
            {
                return Err(self.record_conflict(
                    group,
                    format!(
                        "the server acknowledged a message of this device to group {group} as \
                         entry {seq}, but its log holds another entry there"
                    ),
                ));
            }
            return Ok(None);
        }
        local.own_digests.remove(&entry.seq);
        local.last_read = Some((entry.seq, entry_digest(&entry.msg_id, &entry.payload)));
        // MLS cannot decrypt our own messages: the text comes from the entry recorded at its
        // acknowledgement, or, when the acknowledgement never arrived (crash or lost
        // connection), from the unacknowledged list. An own commit never merged is lost.
        let own_text = match local.own.remove(&entry.seq) {
            Some(text) => Some(text),
            None if entry.sender == me => Some(local.unacknowledged.remove(&entry.msg_id.0)),
            None => None,
        };
        if let Some(text) = own_text {
            local.cursor = entry.seq;
            local.record(entry.seq, &self.account, text.clone());
            self.save()?;
            return Ok(text.map(|t| Received {
                group: group.clone(),
                seq: entry.seq,
                sender_account: self.account.clone(),
                sender: me,
                event: Event::Message(t),
            }));
        }
        let mut mls_group = self.load_group(group)?;
        let processed = match Self::open_entry(&self.provider, &mut mls_group, &entry) {
            Ok(processed) => processed,
            // Any member can submit bytes that others cannot process (a replayed ciphertext,
            // garbage under a valid header). For application messages the entry is skipped so
            // the group keeps working; a commit that fails is a real divergence and stops.
            Err(e) if entry.kind == EntryKind::Application => {
                return self.skip_entry(group, &entry, e.to_string());
            }
            Err(e) => return Err(e),
        };
        if entry.kind == EntryKind::Application
            && let Sender::Member(leaf) = processed.sender()
            && mls_group
                .member(*leaf)
                .is_some_and(|_| Self::leaf_device(&mls_group, *leaf) != Some(entry.sender))
        {
            let reason = "the message was encrypted by another member than the device that sent it";
            return self.skip_entry(group, &entry, reason.to_owned());
        }
        let sender_account =
            String::from_utf8_lossy(processed.credential().serialized_content()).into_owned();
        let event = match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                Event::Message(String::from_utf8_lossy(&app.into_bytes()).into_owned())
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let added = staged
                    .add_proposals()
                    .map(|p| {
                        String::from_utf8_lossy(
                            p.add_proposal()
                                .key_package()
                                .leaf_node()
                                .credential()
                                .serialized_content(),
                        )
                        .into_owned()
                    })
                    .collect();
                let removed_leaves: Vec<LeafNodeIndex> = staged
                    .remove_proposals()
                    .map(|p| p.remove_proposal().removed())
                    .collect();
                let removed = removed_leaves
                    .iter()
                    .filter_map(|leaf| mls_group.member(*leaf))
                    .map(|c| String::from_utf8_lossy(c.serialized_content()).into_owned())
                    .collect();
                let self_removed = staged.self_removed();
                mls_group
                    .merge_staged_commit(&self.provider, *staged)
                    .map_err(mls)?;
                if self_removed {
                    Event::Removed
                } else {
                    Event::Membership { added, removed }
                }
            }
            _ => {
                return Err(ClientError::Mls(format!(
                    "entry {} contains an unsupported MLS message",
                    entry.seq
                )));
            }
        };
        let local = self
            .groups
            .get_mut(group.as_bytes())
            .ok_or_else(|| ClientError::UnknownGroup(group.to_string()))?;
        local.cursor = entry.seq;
        if event == Event::Removed {
            local.removed = true;
        }
        if let Event::Message(text) = &event {
            local.record(entry.seq, &sender_account, Some(text.clone()));
        }
        local.take_own_entries(&self.account);
        self.save()?;
        Ok(Some(Received {
            group: group.clone(),
            seq: entry.seq,
            sender_account,
            sender: entry.sender,
            event,
        }))
    }

    /// Parses an entry's MLS message and processes it in the group.
    fn open_entry(
        provider: &OpenMlsRustCrypto,
        mls_group: &mut MlsGroup,
        entry: &LogEntry,
    ) -> Result<ProcessedMessage, ClientError> {
        let message = MlsMessageIn::tls_deserialize_exact(&entry.payload).map_err(mls)?;
        let protocol: ProtocolMessage = message.try_into_protocol_message().map_err(mls)?;
        mls_group.process_message(provider, protocol).map_err(mls)
    }

    /// Returns the device id of the member at `leaf`.
    fn leaf_device(mls_group: &MlsGroup, leaf: LeafNodeIndex) -> Option<DeviceId> {
        mls_group
            .members()
            .find(|m| m.index == leaf)
            .map(|m| DeviceId::for_key(&m.signature_key))
    }

    /// Moves the cursor past an application entry this client cannot process, and reports it.
    fn skip_entry(
        &mut self,
        group: &GroupId,
        entry: &LogEntry,
        reason: String,
    ) -> Result<Option<Received>, ClientError> {
        tracing::warn!(group_id = %group, seq = entry.seq, sender = %entry.sender, %reason, "skipping an entry that cannot be processed");
        let local = self
            .groups
            .get_mut(group.as_bytes())
            .ok_or_else(|| ClientError::UnknownGroup(group.to_string()))?;
        local.cursor = entry.seq;
        local.take_own_entries(&self.account);
        self.save()?;
        Ok(Some(Received {
            group: group.clone(),
            seq: entry.seq,
            sender_account: String::new(),
            sender: entry.sender,
            event: Event::Unreadable(reason),
        }))
    }

    /// Processes pushes that arrive within `wait`: new entries in order (syncing over gaps)
    /// and Welcomes. Returns what was received.
    ///
    /// Like [`Client::sync`], it returns first the events an earlier read moved the cursors
    /// past, and a failure keeps the events processed before it for the next read.
    pub async fn receive(&mut self, wait: Duration) -> Result<Vec<Received>, ClientError> {
        let mut out = std::mem::take(&mut self.missed);
        match self.receive_into(wait, &mut out).await {
            Ok(()) => Ok(out),
            Err(e) => {
                out.append(&mut self.missed);
                self.missed = out;
                Err(e)
            }
        }
    }

    async fn receive_into(
        &mut self,
        wait: Duration,
        out: &mut Vec<Received>,
    ) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        // The push that showed these groups' gaps is gone, so they are read before waiting.
        while let Some(group) = self.behind.first().cloned() {
            let read = self.sync_group(&group).await.inspect_err(|e| {
                if !failover::retriable(e) {
                    self.behind.remove(&group);
                }
            })?;
            out.extend(read);
        }
        loop {
            let conn = self.conn.as_mut().ok_or(ClientError::NotConnected)?;
            let push = match tokio::time::timeout_at(deadline, conn.pushes.recv()).await {
                Ok(Some(push)) => push,
                Ok(None) => return Err(ClientError::Disconnected(conn.close_info())),
                Err(_) => return Ok(()),
            };
            match push {
                ServerBody::Push { group, entry } => {
                    // A device removed from the group reads nothing more of it until a Welcome
                    // adds it again.
                    let removed = self.groups.get(group.as_bytes()).is_some_and(|g| g.removed);
                    let Some(cursor) = self.cursor(&group).filter(|_| !removed) else {
                        continue;
                    };
                    if entry.seq == cursor + 1 {
                        out.extend(self.process_entry(&group, entry)?);
                        let seq = self.cursor(&group).unwrap_or(0);
                        if !self.groups.get(group.as_bytes()).is_some_and(|g| g.removed) {
                            self.request(ClientBody::Ack { group, seq }).await?;
                        }
                    } else if entry.seq > cursor + 1 {
                        let read = self.sync_group(&group).await.inspect_err(|e| {
                            if failover::retriable(e) {
                                self.behind.insert(group.clone());
                            }
                        })?;
                        out.extend(read);
                    }
                }
                ServerBody::WelcomePush(welcome) => {
                    let group = welcome.group.clone();
                    match self.join(welcome) {
                        Ok(joined) => {
                            out.extend(joined);
                            // As after a gap: a read that fails for a lost node is made
                            // again at the start of the next receive.
                            let read = self.sync_group(&group).await.inspect_err(|e| {
                                if failover::retriable(e) {
                                    self.behind.insert(group.clone());
                                }
                            })?;
                            out.extend(read);
                        }
                        Err(e) => {
                            tracing::warn!(%group, error = %e, "skipped a Welcome that could not be processed; a member can add this device again")
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Returns every message this client has received or sent in a group, in log order, as
    /// `(seq, account, text)`.
    pub fn transcript(&self, group: &GroupId) -> Vec<(u64, String, String)> {
        self.groups
            .get(group.as_bytes())
            .map(|g| g.transcript.clone())
            .unwrap_or_default()
    }

    fn save(&self) -> Result<(), ClientError> {
        SavedState::capture(
            &self.account,
            &self.signer,
            self.provider.storage(),
            &self.groups,
            &self.kt,
        )?
        .store(&self.dir)
    }
}

/// Connects to `url` and returns the server name of its login challenge, which signed
/// statements name; the connection is closed again.
pub async fn server_name_of(url: &str, trust: &ServerTrust) -> Result<String, ClientError> {
    let (_conn, challenge) = RawConnection::open(url, trust).await?;
    match challenge {
        ServerBody::Challenge { server_name, .. } => Ok(server_name),
        other => Err(unexpected("connect", other)),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_msg_id() -> ClientMsgId {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    ClientMsgId(id)
}

fn unexpected(request: &'static str, response: ServerBody) -> ClientError {
    let mut text = format!("{response:?}");
    text.truncate(200);
    ClientError::Unexpected {
        request,
        response: text,
    }
}

/// A connection without a device identity: it sends frames exactly as given. Tests and tools
/// use it to exercise the login and the server's handling of bad input.
pub struct RawConnection {
    conn: Connection,
}

impl RawConnection {
    /// Connects and returns the connection with the server's login challenge. Like
    /// [`Client::connect`], it retries an upgrade rejected for a missing nonce or a skewed
    /// clock.
    pub async fn open(url: &str, trust: &ServerTrust) -> Result<(Self, ServerBody), ClientError> {
        let tls = tls::client_config(trust)?;
        // No device identity: the proof is made with a key used for this connection only.
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let dpop = DpopState::default();
        let mut retries = 0;
        loop {
            let proof = atlas_protocol::dpop::make_proof(
                &key,
                &atlas_protocol::dpop::ProofParams {
                    method: "GET",
                    uri: url,
                    access_token: None,
                    nonce: dpop.nonce().as_deref(),
                    now_s: dpop.now_s(),
                },
            );
            match Connection::open(url, tls.clone(), Duration::from_secs(30), &proof).await {
                Ok((conn, challenge)) => return Ok((Self { conn }, challenge)),
                Err(ClientError::Http(failure))
                    if retries < DPOP_RETRIES && dpop.learn_from(&failure) =>
                {
                    retries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, body: ClientBody) -> Result<ServerBody, ClientError> {
        self.conn.request(body).await
    }

    /// Sends the bytes built for a fresh request id and waits for the response with that id.
    pub async fn request_raw(
        &self,
        build: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<ServerBody, ClientError> {
        let id = self.conn.next_request_id();
        self.conn.request_raw(id, build(id)).await
    }

    /// Sends bytes without waiting for a response.
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.conn.send_raw(bytes).await
    }

    /// Waits for the next push (a frame with id 0 other than the challenge); `None` once the
    /// connection is closed.
    pub async fn next_push(&mut self) -> Option<ServerBody> {
        self.conn.pushes.recv().await
    }

    /// Takes the channel of pushes, so one task can read pushes while others send requests.
    /// Later calls to [`RawConnection::next_push`] return `None`.
    pub fn take_pushes(&mut self) -> tokio::sync::mpsc::UnboundedReceiver<ServerBody> {
        std::mem::replace(
            &mut self.conn.pushes,
            tokio::sync::mpsc::unbounded_channel().1,
        )
    }

    /// Waits up to `wait` for the server to close the connection; returns its close frame.
    pub async fn wait_closed(&self, wait: Duration) -> Option<CloseInfo> {
        let mut closed = self.conn.closed.clone();
        tokio::time::timeout(wait, closed.wait_for(|c| c.is_some()))
            .await
            .ok()?
            .ok()?
            .clone()
    }
}

/// Returns the digest by which a client recognises a log entry it read: SHA-256 over the
/// client message id and the MLS message.
pub(crate) fn entry_digest(msg_id: &ClientMsgId, payload: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(msg_id.0);
    hash.update(payload);
    hash.finalize().into()
}
