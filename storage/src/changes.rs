//! Changes to the state that every node of a cluster shares, in a form that can be replicated.
//!
//! Groups, their logs and cursors, KeyPackages, devices, the key transparency log and accounts
//! change only through [`Store::write`] with a [`Change`]. On a single node the change is
//! applied at once. In a cluster, a [`Replicator`] orders it in a replicated log (the log of
//! the shard of its group or device, or the directory's), and every node applies it with [`Store::apply`] in
//! log order. `apply` reads nothing but the change and the stored state (no clock, no
//! randomness), so every node reaches the same state.
//!
//! Node-local state stays out of this path: the node's signing keys, its signed tree heads
//! (each node signs its own) and refresh tokens.
//!
//! Writers that compute a change from state they read earlier guard it. An append names the
//! sequence number it takes, and fails with [`StorageError::Conflict`] when another node took
//! it first. An account update names the record it replaces. The writer then reloads and
//! retries.

use crate::transparency::{DirectoryChange, KeyEventOutcome};
use crate::{AccountRecord, GroupMeta, KeyPackageRecord, StorageError, Store, decode, encode};
use crate::{keys, transparency};
use atlas_protocol::transparency::KeyEvent;
use atlas_protocol::{DeviceId, GroupId, LogEntry, WelcomeEntry};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;

/// A change to the shared state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Change {
    /// Registers a new group, rejected when the id is taken.
    CreateGroup {
        group: GroupId,
        meta: GroupMeta,
        #[serde(with = "serde_bytes")]
        public_state: Vec<u8>,
    },
    /// Appends an accepted entry at `entry.seq`, with its de-duplication id and, for commits,
    /// the new meta, public state and Welcomes. Rejected with a conflict when the sequence
    /// number or the sender's message id is taken.
    Append {
        group: GroupId,
        entry: LogEntry,
        meta: Option<GroupMeta>,
        #[serde(with = "serde_bytes")]
        public_state: Option<Vec<u8>>,
        welcomes: Vec<(DeviceId, WelcomeEntry)>,
        /// Devices that the entry, a commit, removed from the group.
        #[serde(default)]
        departed: Vec<DeviceId>,
    },
    /// Appends consecutive entries of one group atomically, each like [`Change::Append`]; the
    /// whole batch is rejected when any of them conflicts.
    AppendBatch {
        group: GroupId,
        items: Vec<AppendItem>,
    },
    /// Raises a device's cursor and drops its Welcome for the group.
    Acknowledge {
        device: DeviceId,
        group: GroupId,
        seq: u64,
    },
    /// Removes entries up to and including `through_seq` and advances the group's first
    /// stored sequence number.
    Prune { group: GroupId, through_seq: u64 },
    /// Stores validated KeyPackages of a device.
    PutKeyPackages {
        device: DeviceId,
        one_time: Vec<KeyPackageRecord>,
        last_resort: Option<KeyPackageRecord>,
    },
    /// Hands out one KeyPackage of a device valid at `now_secs`.
    ClaimKeyPackage { device: DeviceId, now_secs: u64 },
    /// Deletes every KeyPackage of a device.
    RemoveKeyPackages { device: DeviceId },
    /// Appends a key event to the transparency log with its directory change.
    KeyEvent {
        event: KeyEvent,
        change: DirectoryChange,
    },
    /// Creates a passkey account.
    CreateAccount(AccountRecord),
    /// Replaces an account record, rejected with a conflict unless the stored record equals
    /// `before`.
    ReplaceAccount {
        before: AccountRecord,
        after: AccountRecord,
    },
    /// Records how a cluster's shard logs start, rejected with a conflict when they were
    /// started already.
    StartShardLogs(ShardLogStart),
    /// Publishes the public signing keys of node `node`, so that every node of the cluster
    /// serves them in its JWKS. A key with the kid of a published one replaces it; the
    /// node's other published keys stay.
    PublishNodeKeys { node: String, keys: Vec<NodeKey> },
}

/// A public signing key of a node, as the directory keeps it for the other nodes' JWKS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKey {
    /// Key id, the RFC 7638 thumbprint of the key.
    pub kid: String,
    /// The Ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub public: [u8; 32],
    /// Time, in milliseconds since the Unix epoch, after which the key is no longer
    /// published; `None` while it is the node's current key.
    pub until_ms: Option<u64>,
}

/// How a cluster's shard logs started: every node must run the same number of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLogStart {
    /// Number of shards, and so of shard logs.
    pub shards: u32,
    /// The first voters of every shard log: raft id and node name.
    pub voters: Vec<(u64, String)>,
    /// Voters of each shard log, its replica set; 0 in records of versions that did not
    /// record it.
    #[serde(default)]
    pub replication: u32,
    /// Random id of the cluster, made when its shard logs start; nodes of two clusters with
    /// different ids ignore each other. 0 in records of versions that did not record it.
    #[serde(default)]
    pub cluster: u64,
}

impl Change {
    /// Returns the shard key of the state this change alone reads and writes: the id of its
    /// group, or of the device whose KeyPackages it changes. `None` marks a change to the
    /// directory (devices, the key transparency log, accounts). A replicated store orders
    /// the changes of one shard key in the log of its shard and the directory's in a log of
    /// its own, so no change may read state of another shard key or of the directory.
    pub fn shard_key(&self) -> Option<&[u8]> {
        match self {
            Self::CreateGroup { group, .. }
            | Self::Append { group, .. }
            | Self::AppendBatch { group, .. }
            | Self::Acknowledge { group, .. }
            | Self::Prune { group, .. } => Some(group.as_bytes()),
            Self::PutKeyPackages { device, .. }
            | Self::ClaimKeyPackage { device, .. }
            | Self::RemoveKeyPackages { device } => Some(device.as_bytes()),
            Self::KeyEvent { .. }
            | Self::CreateAccount(_)
            | Self::ReplaceAccount { .. }
            | Self::StartShardLogs(_)
            | Self::PublishNodeKeys { .. } => None,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CreateGroup { .. } => "create_group",
            Self::Append { .. } => "append",
            Self::AppendBatch { .. } => "append_batch",
            Self::Acknowledge { .. } => "acknowledge",
            Self::Prune { .. } => "prune",
            Self::PutKeyPackages { .. } => "put_key_packages",
            Self::ClaimKeyPackage { .. } => "claim_key_package",
            Self::RemoveKeyPackages { .. } => "remove_key_packages",
            Self::KeyEvent { .. } => "key_event",
            Self::CreateAccount(_) => "create_account",
            Self::ReplaceAccount { .. } => "replace_account",
            Self::StartShardLogs(_) => "start_shard_logs",
            Self::PublishNodeKeys { .. } => "publish_node_keys",
        }
    }
}

/// One entry of a [`Change::AppendBatch`], with what a commit changes besides the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendItem {
    pub entry: LogEntry,
    pub meta: Option<GroupMeta>,
    #[serde(with = "serde_bytes")]
    pub public_state: Option<Vec<u8>>,
    pub welcomes: Vec<(DeviceId, WelcomeEntry)>,
    /// Devices that the entry, a commit, removed from the group.
    #[serde(default)]
    pub departed: Vec<DeviceId>,
}

/// The result of a [`Change`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// One-time KeyPackages now available.
    Available(u32),
    Claimed(Option<KeyPackageRecord>),
    /// The stored cursor.
    Cursor(u64),
    Pruned {
        removed: usize,
        first_seq: u64,
    },
    KeyEvent(KeyEventOutcome),
    Account(AccountRecord),
}

impl Outcome {
    fn unexpected(self, change: &str) -> StorageError {
        StorageError::Replication(format!("{change} returned {self:?}"))
    }
}

/// A rejection by [`Store::apply`] in a form that crosses the network to the proposer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Refused {
    GroupExists(GroupId),
    DeviceOwnedElsewhere {
        device: DeviceId,
        account: String,
    },
    UnknownDevice(DeviceId),
    DeviceRevoked(DeviceId),
    AccountTaken(String),
    CredentialInUse,
    UnknownAccount(String),
    TooManyDevices {
        account: String,
        max: usize,
    },
    Conflict(String),
    /// Any other failure, such as an I/O error on the replica that applied the change.
    Failed(String),
}

impl From<StorageError> for Refused {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::GroupExists(g) => Self::GroupExists(g),
            StorageError::DeviceOwnedElsewhere { device, account } => {
                Self::DeviceOwnedElsewhere { device, account }
            }
            StorageError::UnknownDevice(d) => Self::UnknownDevice(d),
            StorageError::DeviceRevoked(d) => Self::DeviceRevoked(d),
            StorageError::AccountTaken(a) => Self::AccountTaken(a),
            StorageError::CredentialInUse => Self::CredentialInUse,
            StorageError::UnknownAccount(a) => Self::UnknownAccount(a),
            StorageError::TooManyDevices { account, max } => Self::TooManyDevices { account, max },
            StorageError::Conflict(what) => Self::Conflict(what),
            other => Self::Failed(other.to_string()),
        }
    }
}

impl From<Refused> for StorageError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::GroupExists(g) => Self::GroupExists(g),
            Refused::DeviceOwnedElsewhere { device, account } => {
                Self::DeviceOwnedElsewhere { device, account }
            }
            Refused::UnknownDevice(d) => Self::UnknownDevice(d),
            Refused::DeviceRevoked(d) => Self::DeviceRevoked(d),
            Refused::AccountTaken(a) => Self::AccountTaken(a),
            Refused::CredentialInUse => Self::CredentialInUse,
            Refused::UnknownAccount(a) => Self::UnknownAccount(a),
            Refused::TooManyDevices { account, max } => Self::TooManyDevices { account, max },
            Refused::Conflict(what) => Self::Conflict(what),
            Refused::Failed(detail) => Self::Replication(detail),
        }
    }
}

/// A boxed future of a proposal.
pub type Proposal = Pin<Box<dyn Future<Output = Result<Outcome, StorageError>> + Send>>;

/// A boxed future of a read barrier.
pub type Barrier = Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send>>;

/// Orders changes in a replicated log.
pub trait Replicator: Send + Sync + 'static {
    /// Proposes a change. The future resolves once the change is committed on a majority and
    /// applied on this node, with the result of applying it. A [`Change::AppendBatch`] may
    /// resolve before this node applied it: call [`Store::read_barrier`] before reading it.
    fn propose(&self, change: Change) -> Proposal;

    /// Resolves once this node has applied every change of `scope` committed before the
    /// call, so that a read of that scope that follows sees every write acknowledged
    /// anywhere before it.
    fn barrier(&self, scope: ReadScope) -> Barrier;
}

/// The part of the shared state that a read needs to be current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadScope {
    /// Everything: every group and the directory.
    Everything,
    /// Devices, the key transparency log and accounts.
    Directory,
    /// One group: its log, state, cursors and Welcomes.
    Group(GroupId),
}

/// Decides whether the shard key (a group id, or a device id for KeyPackages) belongs to a
/// [`SharedPart::Shard`].
pub type ShardFilter = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A part of the shared state that one replicated log carries, for its snapshots.
#[derive(Clone)]
pub enum SharedPart {
    /// The directory tree: devices, the key transparency log and accounts.
    Directory,
    /// The groups whose id the filter accepts (their records, logs, Welcomes and cursors),
    /// and the KeyPackages of the devices whose id it accepts.
    Shard(ShardFilter),
}

impl SharedPart {
    fn trees(&self) -> &'static [&'static str] {
        match self {
            Self::Directory => &DIRECTORY_TREES,
            Self::Shard(_) => &SHARD_TREES,
        }
    }

    /// Returns whether the record under `key` of tree `tree` belongs to this part.
    fn holds(&self, tree: &str, key: &[u8]) -> bool {
        match self {
            Self::Directory => !(tree == "directory" && key.first() == Some(&TREE_HEAD_TAG)),
            Self::Shard(accepts) => keys::shard_key_of(tree, key).is_some_and(|id| accepts(id)),
        }
    }
}

/// Trees of the directory part.
const DIRECTORY_TREES: [&str; 1] = ["directory"];

/// Trees of shard parts, in snapshot order.
const SHARD_TREES: [&str; 3] = ["groups", "cursors", "key_packages"];

/// Key prefix of signed tree heads in the directory tree: node-local, kept out of snapshots.
const TREE_HEAD_TAG: u8 = b't';

/// Key prefix of the records of [`Change::PublishNodeKeys`] in the directory tree, followed
/// by the node's name.
const NODE_KEYS_TAG: u8 = b'N';

fn node_keys_key(node: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + node.len());
    key.push(NODE_KEYS_TAG);
    key.extend_from_slice(node.as_bytes());
    key
}

/// Key of the record of [`Change::StartShardLogs`] in the directory tree.
const SHARD_LOGS_KEY: &[u8] = b"Sshard-logs";

/// Start of a snapshot made by [`Store::export_shared_to`], with its format version.
const SNAPSHOT_MAGIC: &[u8; 8] = b"ATLSNAP2";

/// Tag of the record that ends a snapshot: the number of records, then the SHA-256 of every
/// byte before the tag.
const SNAPSHOT_END: u8 = 0xff;

/// Records written or removed per sled batch while a snapshot is imported.
const IMPORT_BATCH: usize = 1_000;

impl Store {
    /// Makes [`Store::write`] go through `replicator`. Set once, before the node serves.
    pub fn set_replicator(&self, replicator: std::sync::Arc<dyn Replicator>) {
        if self.replicator.set(replicator).is_err() {
            tracing::warn!("a replicator was set already; keeping the first");
        }
    }

    /// Returns whether changes go through a replicated log.
    pub fn is_replicated(&self) -> bool {
        self.replicator.get().is_some()
    }

    /// Makes a change: through the replicator when one is set, else at once. Either way the
    /// change is not yet durable in this node's files: call [`Store::durable`] before
    /// acknowledging it when the node runs alone.
    pub async fn write(&self, change: Change) -> Result<Outcome, StorageError> {
        match self.replicator.get() {
            Some(replicator) => replicator.propose(change).await,
            None => self.apply(&change),
        }
    }

    /// Waits until this node's files contain every change acknowledged anywhere in the
    /// cluster before the call; returns at once on a single node. Call it before a read that
    /// must see writes made through other nodes, such as a sync.
    pub async fn read_barrier(&self, scope: ReadScope) -> Result<(), StorageError> {
        match self.replicator.get() {
            Some(replicator) => replicator.barrier(scope).await,
            None => Ok(()),
        }
    }

    /// Applies a change to this node's files. Deterministic: see the module documentation.
    pub fn apply(&self, change: &Change) -> Result<Outcome, StorageError> {
        match change {
            Change::CreateGroup {
                group,
                meta,
                public_state,
            } => {
                self.create_group(group, meta, public_state)?;
                Ok(Outcome::Done)
            }
            Change::Append {
                group,
                entry,
                meta,
                public_state,
                welcomes,
                departed,
            } => {
                self.check_free(group, entry, self.next_seq(group)?)?;
                self.append(
                    group,
                    entry,
                    meta.as_ref(),
                    public_state.as_deref(),
                    welcomes,
                    departed,
                )?;
                Ok(Outcome::Done)
            }
            Change::AppendBatch { group, items } => {
                let next = self.next_seq(group)?;
                for (i, item) in items.iter().enumerate() {
                    self.check_free(group, &item.entry, next + i as u64)?;
                    let repeated = items[..i].iter().any(|earlier| {
                        earlier.entry.seq == item.entry.seq
                            || (earlier.entry.sender == item.entry.sender
                                && earlier.entry.msg_id == item.entry.msg_id)
                    });
                    if repeated {
                        return Err(StorageError::Conflict(format!(
                            "a batch for group {group} repeats sequence number {} or its \
                             message id",
                            item.entry.seq
                        )));
                    }
                }
                self.append_batch(group, items)?;
                Ok(Outcome::Done)
            }
            Change::Acknowledge { device, group, seq } => {
                let stored = self.advance_cursor(device, group, *seq)?;
                self.remove_welcome(device, group)?;
                Ok(Outcome::Cursor(stored))
            }
            Change::Prune { group, through_seq } => {
                let raw = self.groups.get(keys::group_meta(group))?.ok_or_else(|| {
                    StorageError::Corrupt {
                        what: format!("group {group}"),
                        detail: "pruned without a meta record".into(),
                    }
                })?;
                let mut meta: GroupMeta = decode(&raw, "group meta", group)?;
                meta.first_seq = meta.first_seq.max(through_seq.saturating_add(1));
                let removed = self.prune(group, *through_seq, &meta)?;
                Ok(Outcome::Pruned {
                    removed,
                    first_seq: meta.first_seq,
                })
            }
            Change::PutKeyPackages {
                device,
                one_time,
                last_resort,
            } => Ok(Outcome::Available(self.put_key_packages(
                device,
                one_time,
                last_resort.as_ref(),
            )?)),
            Change::ClaimKeyPackage { device, now_secs } => {
                Ok(Outcome::Claimed(self.claim_key_package(device, *now_secs)?))
            }
            Change::RemoveKeyPackages { device } => {
                self.remove_key_packages(device)?;
                Ok(Outcome::Done)
            }
            Change::KeyEvent { event, change } => {
                Ok(Outcome::KeyEvent(self.append_key_event(event, change)?))
            }
            Change::CreateAccount(record) => {
                self.create_account(record)?;
                Ok(Outcome::Done)
            }
            Change::ReplaceAccount { before, after } => {
                Ok(Outcome::Account(self.replace_account(before, after)?))
            }
            Change::StartShardLogs(start) => {
                if let Some(earlier) = self.shard_log_start()? {
                    return Err(StorageError::Conflict(format!(
                        "the {} shard logs were started already, with {} voters",
                        earlier.shards,
                        earlier.voters.len()
                    )));
                }
                self.kt.insert(SHARD_LOGS_KEY, encode(start))?;
                Ok(Outcome::Done)
            }
            Change::PublishNodeKeys { node, keys } => {
                // Keys published before stay: a node that lost its data directory comes back
                // under its name with new keys, and its earlier receipts must still verify.
                let mut merged: Vec<NodeKey> = match self.kt.get(node_keys_key(node))? {
                    Some(raw) => decode(&raw, "published signing keys", node)?,
                    None => Vec::new(),
                };
                merged.retain(|old| keys.iter().all(|new| new.kid != old.kid));
                merged.extend(keys.iter().cloned());
                self.kt.insert(node_keys_key(node), encode(&merged))?;
                Ok(Outcome::Done)
            }
        }
    }

    /// Returns the signing keys that each node of the cluster published, by node name (see
    /// [`Change::PublishNodeKeys`]), expired ones included.
    pub fn node_keys(&self) -> Result<Vec<(String, Vec<NodeKey>)>, StorageError> {
        let mut out = Vec::new();
        for item in self.kt.scan_prefix([NODE_KEYS_TAG]) {
            let (key, raw) = item?;
            let node = String::from_utf8_lossy(&key[1..]).into_owned();
            let keys = decode(&raw, "published signing keys", &node)?;
            out.push((node, keys));
        }
        Ok(out)
    }

    /// Returns how the cluster's shard logs started, or `None` before they started (see
    /// [`Change::StartShardLogs`]).
    pub fn shard_log_start(&self) -> Result<Option<ShardLogStart>, StorageError> {
        match self.kt.get(SHARD_LOGS_KEY)? {
            Some(raw) => Ok(Some(decode(&raw, "shard log start", &"the cluster")?)),
            None => Ok(None),
        }
    }

    /// Returns the sequence number the next entry of a group must take: one above the newest
    /// stored entry, or the first one retention left when it removed every entry.
    fn next_seq(&self, group: &GroupId) -> Result<u64, StorageError> {
        let raw =
            self.groups
                .get(keys::group_meta(group))?
                .ok_or_else(|| StorageError::Corrupt {
                    what: format!("group {group}"),
                    detail: "appended to without a meta record".into(),
                })?;
        let meta: GroupMeta = decode(&raw, "group meta", group)?;
        let newest = self.newest_seq(group)?.unwrap_or(0);
        Ok((newest + 1).max(meta.first_seq).max(1))
    }

    /// Rejects an entry that does not take sequence number `expected`, or whose message id is
    /// stored already. Either means another node appended first (possibly entries retention
    /// removed since), or that a retry was validated on another node before the original was
    /// applied there.
    fn check_free(
        &self,
        group: &GroupId,
        entry: &LogEntry,
        expected: u64,
    ) -> Result<(), StorageError> {
        if entry.seq != expected {
            return Err(StorageError::Conflict(format!(
                "entry {} of group {group} is not the next one, {expected}",
                entry.seq
            )));
        }
        if let Some(seq) = self.dedupe(group, &entry.sender, &entry.msg_id)? {
            return Err(StorageError::Conflict(format!(
                "the message id is stored already, at sequence number {seq} of group {group}"
            )));
        }
        Ok(())
    }

    /// Writes a change whose outcome is [`Outcome::Done`].
    pub async fn write_done(&self, change: Change) -> Result<(), StorageError> {
        let name = change.name();
        match self.write(change).await? {
            Outcome::Done => Ok(()),
            other => Err(other.unexpected(name)),
        }
    }

    /// Stores KeyPackages; returns the number of one-time KeyPackages available.
    pub async fn write_key_packages(
        &self,
        device: &DeviceId,
        one_time: Vec<KeyPackageRecord>,
        last_resort: Option<KeyPackageRecord>,
    ) -> Result<u32, StorageError> {
        let change = Change::PutKeyPackages {
            device: *device,
            one_time,
            last_resort,
        };
        match self.write(change).await? {
            Outcome::Available(n) => Ok(n),
            other => Err(other.unexpected("put_key_packages")),
        }
    }

    /// Claims a KeyPackage (see [`Store::claim_key_package`]).
    pub async fn write_claim(
        &self,
        device: &DeviceId,
        now_secs: u64,
    ) -> Result<Option<KeyPackageRecord>, StorageError> {
        let change = Change::ClaimKeyPackage {
            device: *device,
            now_secs,
        };
        match self.write(change).await? {
            Outcome::Claimed(claimed) => Ok(claimed),
            other => Err(other.unexpected("claim_key_package")),
        }
    }

    /// Appends a key event (see [`Store::append_key_event`]).
    pub async fn write_key_event(
        &self,
        event: &KeyEvent,
        change: &DirectoryChange,
    ) -> Result<KeyEventOutcome, StorageError> {
        let change = Change::KeyEvent {
            event: event.clone(),
            change: change.clone(),
        };
        match self.write(change).await? {
            Outcome::KeyEvent(outcome) => Ok(outcome),
            other => Err(other.unexpected("key_event")),
        }
    }

    /// Reads an account, lets `change` edit it, and stores the result, retrying when another
    /// writer changed the record in between. `change` may reject the edit by returning an error.
    pub async fn write_account<E: From<StorageError>>(
        &self,
        account: &str,
        mut change: impl FnMut(&mut AccountRecord) -> Result<(), E>,
    ) -> Result<AccountRecord, E> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 0;
        loop {
            let before = self
                .account(account)?
                .ok_or_else(|| StorageError::UnknownAccount(account.to_owned()))?;
            let mut after = before.clone();
            change(&mut after)?;
            match self.write(Change::ReplaceAccount { before, after }).await {
                Ok(Outcome::Account(record)) => return Ok(record),
                Ok(other) => return Err(other.unexpected("replace_account").into()),
                Err(StorageError::Conflict(_)) if attempt + 1 < ATTEMPTS => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Returns a snapshot of one part of the shared state, in memory (see
    /// [`Store::export_shared_to`]).
    pub fn export_shared(&self, part: &SharedPart) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        self.export_shared_to(part, &mut out)?;
        Ok(out)
    }

    /// Writes a snapshot of one part of the shared state to `out`, one record at a time, and
    /// returns the number of records.
    ///
    /// The format starts with [`SNAPSHOT_MAGIC`], the number of the part's trees and each
    /// tree's name (with a one-byte length). Each record follows as the index of its tree
    /// (one byte), its key and its value (each with a u32 big-endian length). The end is
    /// [`SNAPSHOT_END`], the record count (u64 big-endian) and the SHA-256 of every byte
    /// before the end tag.
    pub fn export_shared_to(
        &self,
        part: &SharedPart,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, StorageError> {
        let mut out = HashingWriter::new(out);
        out.write(SNAPSHOT_MAGIC)?;
        out.write(&[part.trees().len() as u8])?;
        for name in part.trees() {
            out.write(&[name.len() as u8])?;
            out.write(name.as_bytes())?;
        }
        let mut count = 0u64;
        for (index, name) in part.trees().iter().enumerate() {
            let tree = self.db.open_tree(name)?;
            for item in tree.iter() {
                let (key, value) = item?;
                if !part.holds(name, &key) {
                    continue;
                }
                out.write(&[index as u8])?;
                for bytes in [&key, &value] {
                    let len = u32::try_from(bytes.len()).map_err(|_| StorageError::Corrupt {
                        what: format!("record of tree {name}"),
                        detail: format!("{} bytes do not fit a snapshot record", bytes.len()),
                    })?;
                    out.write(&len.to_be_bytes())?;
                    out.write(bytes)?;
                }
                count += 1;
            }
        }
        let digest = out.digest();
        let inner = out.into_inner()?;
        let mut end = vec![SNAPSHOT_END];
        end.extend_from_slice(&count.to_be_bytes());
        end.extend_from_slice(&digest);
        inner.write_all(&end).map_err(snapshot_io)?;
        inner.flush().map_err(snapshot_io)?;
        Ok(count)
    }

    /// Replaces one part of the shared state with a snapshot of it made by
    /// [`Store::export_shared`]. Records outside the part stay as they are. Returns what the
    /// snapshot brought to which group (see [`Store::import_shared_from`]).
    pub fn import_shared(
        &self,
        part: &SharedPart,
        bytes: &[u8],
    ) -> Result<Vec<ImportedNews>, StorageError> {
        self.import_shared_from(part, &mut std::io::Cursor::new(bytes))
    }

    /// Checks in full the snapshot of `part` that `input` contains from its current position,
    /// as [`Store::import_shared_from`] does before it changes anything: its trees, each
    /// record's part, the record count and the checksum. Leaves `input` where it started.
    pub fn check_shared<R: std::io::Read + std::io::Seek>(
        &self,
        part: &SharedPart,
        input: &mut R,
    ) -> Result<(), StorageError> {
        let start = input.stream_position().map_err(snapshot_io)?;
        let trees = part.trees();
        let mut reader = SnapshotReader::new(&mut *input, trees)?;
        while let Some((index, key, _)) = reader.next()? {
            let name = trees[index];
            if !part.holds(name, &key) {
                return Err(StorageError::Corrupt {
                    what: "snapshot".into(),
                    detail: format!("a record of tree {name:?} lies outside the snapshot's part"),
                });
            }
        }
        input
            .seek(std::io::SeekFrom::Start(start))
            .map_err(snapshot_io)?;
        Ok(())
    }

    /// Replaces one part of the shared state with the snapshot that `input` contains from its
    /// current position, made by [`Store::export_shared_to`]. Records outside the part stay
    /// as they are. A first pass checks the snapshot in full ([`Store::check_shared`]), so
    /// that a bad snapshot changes nothing.
    ///
    /// Returns each group whose newest log entry after the import is newer than before it, or
    /// that got Welcomes it did not have, so that the caller can tell its members.
    ///
    /// NOTE: the second pass writes in batches, so a crash during it leaves the part half
    /// replaced. The caller must import the snapshot again before it uses the part (the
    /// replicated log's state machine records a marker for that).
    pub fn import_shared_from<R: std::io::Read + std::io::Seek>(
        &self,
        part: &SharedPart,
        input: &mut R,
    ) -> Result<Vec<ImportedNews>, StorageError> {
        self.check_shared(part, input)?;
        let trees = part.trees();
        let mut reader = SnapshotReader::new(&mut *input, trees)?;
        let mut tail = self.lock_directory()?;
        let mut before = GroupNews::default();
        for name in trees {
            let tree = self.db.open_tree(name)?;
            let mut batch = sled::Batch::default();
            let mut pending = 0;
            for item in tree.iter() {
                let (key, _) = item?;
                if part.holds(name, &key) {
                    before.see(name, &key, None);
                    batch.remove(key);
                    pending += 1;
                    if pending == IMPORT_BATCH {
                        tree.apply_batch(std::mem::take(&mut batch))?;
                        pending = 0;
                    }
                }
            }
            tree.apply_batch(batch)?;
        }
        let handles = trees
            .iter()
            .map(|name| self.db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch = sled::Batch::default();
        let mut batch_tree: Option<usize> = None;
        let mut pending = 0;
        let mut after = GroupNews::default();
        while let Some((index, key, value)) = reader.next()? {
            after.see(trees[index], &key, Some(&value));
            if batch_tree.is_some_and(|t| t != index) || pending == IMPORT_BATCH {
                if let Some(t) = batch_tree {
                    handles[t].apply_batch(std::mem::take(&mut batch))?;
                }
                pending = 0;
            }
            batch_tree = Some(index);
            batch.insert(key, value);
            pending += 1;
        }
        if let Some(t) = batch_tree {
            handles[t].apply_batch(batch)?;
        }
        *tail = transparency::LogTail::new(transparency::stored_size(&self.kt)?);
        Ok(after.news_since(&before))
    }
}

/// A group whose log a snapshot import extended, or that it gave new Welcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedNews {
    pub group: GroupId,
    /// Sequence number of the group's newest stored entry after the import.
    pub newest_seq: u64,
    /// The Welcomes to the group that the import added, by device.
    pub welcomes: Vec<(DeviceId, WelcomeEntry)>,
}

/// The group records that an import reads: the newest log entry of each group, and the
/// Welcomes by key.
#[derive(Default)]
struct GroupNews {
    newest: HashMap<Vec<u8>, u64>,
    welcomes: HashMap<Vec<u8>, Vec<u8>>,
}

impl GroupNews {
    /// Notes the record `key` of tree `tree` if it is a log entry or a Welcome. `value` is
    /// kept for Welcomes only, and only when given.
    fn see(&mut self, tree: &str, key: &[u8], value: Option<&[u8]>) {
        if tree != "groups" {
            return;
        }
        if let Some((group, seq)) = keys::log_entry_of(key) {
            let newest = self.newest.entry(group.to_vec()).or_default();
            *newest = (*newest).max(seq);
        } else if key.first() == Some(&keys::WELCOME_TAG) {
            self.welcomes
                .insert(key.to_vec(), value.map(<[u8]>::to_vec).unwrap_or_default());
        }
    }

    /// Returns, in group id order, the groups whose newest entry here is newer than in
    /// `before`, and the groups of the Welcomes that `before` lacks. The import is done by
    /// then, so a Welcome that does not decode is left out with a warning, not an error.
    fn news_since(self, before: &Self) -> Vec<ImportedNews> {
        let mut news: BTreeMap<Vec<u8>, Vec<(DeviceId, WelcomeEntry)>> = self
            .newest
            .iter()
            .filter(|(group, seq)| before.newest.get(*group).is_none_or(|old| *seq > old))
            .map(|(group, _)| (group.clone(), Vec::new()))
            .collect();
        for (key, value) in &self.welcomes {
            if before.welcomes.contains_key(key) {
                continue;
            }
            let Some(device) = keys::welcome_device_of(key) else {
                tracing::warn!(
                    "a snapshot brought a Welcome record with a short key; it is not pushed"
                );
                continue;
            };
            match decode::<WelcomeEntry>(value, "welcome", &device) {
                Ok(welcome) => news
                    .entry(welcome.group.as_bytes().to_vec())
                    .or_default()
                    .push((device, welcome)),
                Err(e) => {
                    tracing::warn!(device_id = %device, error = %e, "a snapshot brought a Welcome that does not decode; it is not pushed");
                }
            }
        }
        news.into_iter()
            .filter_map(|(group, welcomes)| {
                let newest_seq = self.newest.get(&group).copied().unwrap_or(0);
                let group = GroupId::new(group).ok()?;
                Some(ImportedNews {
                    group,
                    newest_seq,
                    welcomes,
                })
            })
            .collect()
    }
}

/// Wraps an I/O error of reading or writing a snapshot.
fn snapshot_io(e: std::io::Error) -> StorageError {
    StorageError::Corrupt {
        what: "snapshot".into(),
        detail: format!("reading or writing it failed: {e}"),
    }
}

/// A writer that hashes what it writes, for the checksum at the end of a snapshot.
struct HashingWriter<'a> {
    inner: std::io::BufWriter<&'a mut dyn std::io::Write>,
    hash: sha2::Sha256,
}

impl<'a> HashingWriter<'a> {
    fn new(inner: &'a mut dyn std::io::Write) -> Self {
        Self {
            inner: std::io::BufWriter::new(inner),
            hash: sha2::Sha256::default(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        use sha2::Digest;
        use std::io::Write;
        self.hash.update(bytes);
        self.inner.write_all(bytes).map_err(snapshot_io)
    }

    fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        self.hash.clone().finalize().into()
    }

    fn into_inner(self) -> Result<&'a mut dyn std::io::Write, StorageError> {
        self.inner
            .into_inner()
            .map_err(|e| snapshot_io(e.into_error()))
    }
}

/// Reads the records of a snapshot made by [`Store::export_shared_to`], checking each tree
/// index against the part's trees, and at the end the record count and the checksum.
struct SnapshotReader<R> {
    input: std::io::BufReader<R>,
    hash: sha2::Sha256,
    count: u64,
    trees: usize,
}

impl<R: std::io::Read> SnapshotReader<R> {
    /// Starts reading a snapshot, which must name the trees `trees` of the part to import.
    fn new(input: R, trees: &[&str]) -> Result<Self, StorageError> {
        let mut reader = Self {
            input: std::io::BufReader::new(input),
            hash: sha2::Sha256::default(),
            count: 0,
            trees: trees.len(),
        };
        let mut magic = [0u8; 8];
        reader.read_hashed(&mut magic)?;
        if &magic != SNAPSHOT_MAGIC {
            return Err(corrupt_snapshot(format!(
                "it starts with {magic:02x?}, not the format mark {SNAPSHOT_MAGIC:02x?}"
            )));
        }
        let mut count = [0u8; 1];
        reader.read_hashed(&mut count)?;
        let mut named = Vec::new();
        for _ in 0..count[0] {
            let mut len = [0u8; 1];
            reader.read_hashed(&mut len)?;
            let mut name = vec![0u8; usize::from(len[0])];
            reader.read_hashed(&mut name)?;
            named.push(String::from_utf8_lossy(&name).into_owned());
        }
        if named != trees {
            return Err(corrupt_snapshot(format!(
                "it contains the trees {named:?}, but the part to replace has {trees:?}"
            )));
        }
        Ok(reader)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StorageError> {
        use std::io::Read;
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt_snapshot(format!(
                "it ends after {} records, without its end",
                self.count
            )),
            _ => snapshot_io(e),
        })
    }

    fn read_hashed(&mut self, buf: &mut [u8]) -> Result<(), StorageError> {
        use sha2::Digest;
        self.read_exact(buf)?;
        self.hash.update(&*buf);
        Ok(())
    }

    fn read_bytes(&mut self) -> Result<Vec<u8>, StorageError> {
        use sha2::Digest;
        use std::io::Read;
        let mut len = [0u8; 4];
        self.read_hashed(&mut len)?;
        let len = u32::from_be_bytes(len);
        // Grows with the bytes read, so a damaged length cannot allocate gigabytes at once.
        let mut bytes = Vec::new();
        (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut bytes)
            .map_err(snapshot_io)?;
        if bytes.len() != len as usize {
            return Err(corrupt_snapshot(format!(
                "it ends inside record {}, without its end",
                self.count + 1
            )));
        }
        self.hash.update(&bytes);
        Ok(bytes)
    }

    /// Returns the next record as (tree index, key, value), or `None` once the end record
    /// was read and matched.
    #[allow(clippy::type_complexity)]
    fn next(&mut self) -> Result<Option<(usize, Vec<u8>, Vec<u8>)>, StorageError> {
        use sha2::Digest;
        let mut tag = [0u8; 1];
        self.read_exact(&mut tag)?;
        if tag[0] == SNAPSHOT_END {
            let digest: [u8; 32] = self.hash.clone().finalize().into();
            let mut count = [0u8; 8];
            self.read_exact(&mut count)?;
            let mut stored = [0u8; 32];
            self.read_exact(&mut stored)?;
            let count = u64::from_be_bytes(count);
            if count != self.count {
                return Err(corrupt_snapshot(format!(
                    "its end names {count} records, but it contains {}",
                    self.count
                )));
            }
            if stored != digest {
                return Err(corrupt_snapshot(
                    "its checksum does not match its records".into(),
                ));
            }
            return Ok(None);
        }
        self.hash.update(tag);
        let index = usize::from(tag[0]);
        if index >= self.trees {
            return Err(corrupt_snapshot(format!(
                "record {} names tree {index}, but the part has {} trees",
                self.count + 1,
                self.trees
            )));
        }
        let key = self.read_bytes()?;
        let value = self.read_bytes()?;
        self.count += 1;
        Ok(Some((index, key, value)))
    }
}

fn corrupt_snapshot(detail: String) -> StorageError {
    StorageError::Corrupt {
        what: "snapshot".into(),
        detail,
    }
}
