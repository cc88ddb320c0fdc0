//! The device directory and the key transparency log, in the `directory` tree.
//!
//! Key prefixes:
//! - `D` + device id: the device record;
//! - `I` + account + 0 + device id: the account's current devices;
//! - `e` + index (u64 BE): entry `index` as a count byte `k`, then the `k` tree hashes that
//!   tlog_tiles stores when appending it (its leaf hash and the roots of the subtrees it
//!   completes, level 0 first), then the leaf bytes. Keeping the hashes with the leaf writes one
//!   record per append; a proof reads O(log n) records;
//! - `a` + account + 0 + index: the account's entries, for history lookups;
//! - `t` + size (u64 BE): signed tree heads.
//!
//! Every directory change is a key event: appends are serialised by one mutex that holds the log
//! size, and each append and its directory change are one write set (see the `atomic`
//! module), so a crash keeps both or neither. Reads of device records happen under the mutex, so no transaction is needed.

use crate::atomic::WriteSet;
use crate::{DeviceRecord, StorageError, Store, decode, encode};
use atlas_protocol::DeviceId;
use atlas_protocol::transparency::{KeyEvent, SignedTreeHead};
use tlog_tiles::tlog::{self, Hash, HashReader};

/// Maximum number of active devices of one account.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 64;

/// A directory change that a key event records. It is applied in the same write set as the
/// append, so the directory never shows a key the log does not contain.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DirectoryChange {
    /// Registers the first device of an account that has no log entries yet.
    Register(DeviceRecord),
    /// Adds a device to an existing account on behalf of `signer`, an active device of it.
    Enroll {
        signer: DeviceId,
        record: DeviceRecord,
    },
    /// Marks an active device revoked at `at_ms` on behalf of `signer`, an active device of
    /// the same account (possibly the revoked one).
    Revoke {
        device: DeviceId,
        signer: DeviceId,
        at_ms: u64,
    },
    /// Replaces the active device `previous` with a new one of the same account.
    Rotate {
        previous: DeviceId,
        new: DeviceRecord,
    },
    /// Adds a device to a passkey account on the strength of an access token for it; the
    /// account record must exist.
    EnrollByToken(DeviceRecord),
}

/// Result of [`Store::append_key_event`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyEventOutcome {
    /// The event is entry `index`; `device` is the record as stored.
    Appended { index: u64, device: DeviceRecord },
    /// A registration of a key that was already registered under the same account: nothing
    /// was appended.
    AlreadyRegistered(DeviceRecord),
}

/// Reason a directory change was not applied.
enum Refusal {
    Existing(DeviceRecord),
    Storage(StorageError),
}

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

impl From<sled::Error> for Refusal {
    fn from(e: sled::Error) -> Self {
        Self::Storage(e.into())
    }
}

pub(crate) fn device_key(device: &DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(b'D');
    key.extend_from_slice(device.as_bytes());
    key
}

pub(crate) fn account_devices_prefix(account: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + 18);
    key.push(b'I');
    key.extend_from_slice(account.as_bytes());
    key.push(0);
    key
}

fn entry_key(index: u64) -> [u8; 9] {
    prefixed(b'e', index)
}

fn head_key(size: u64) -> [u8; 9] {
    prefixed(b't', size)
}

fn prefixed(tag: u8, n: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = tag;
    key[1..].copy_from_slice(&n.to_be_bytes());
    key
}

pub(crate) fn account_prefix(account: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + 10);
    key.push(b'a');
    key.extend_from_slice(account.as_bytes());
    key.push(0);
    key
}

fn account_key(account: &str, index: u64) -> Vec<u8> {
    let mut key = account_prefix(account);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn device_account_key(account: &str, device: &DeviceId) -> Vec<u8> {
    let mut key = account_devices_prefix(account);
    key.extend_from_slice(device.as_bytes());
    key
}

/// An entry record split into its stored tree hashes and its leaf bytes.
struct EntryRecord<'a> {
    hashes: &'a [u8],
    leaf: &'a [u8],
}

impl<'a> EntryRecord<'a> {
    fn encode(hashes: &[Hash], leaf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + hashes.len() * 32 + leaf.len());
        // At most 65 hashes: one per level of a tree of 2^64 entries.
        out.push(hashes.len() as u8);
        for hash in hashes {
            out.extend_from_slice(&hash.0);
        }
        out.extend_from_slice(leaf);
        out
    }

    fn decode(raw: &'a [u8]) -> Option<Self> {
        let count = usize::from(*raw.first()?);
        let end = 1 + count * 32;
        (raw.len() >= end).then(|| Self {
            hashes: &raw[1..end],
            leaf: &raw[end..],
        })
    }

    fn hash(&self, level: usize) -> Option<Hash> {
        let bytes = self.hashes.get(level * 32..level * 32 + 32)?;
        Some(Hash(bytes.try_into().ok()?))
    }
}

/// The end of the log as the appends see it, behind the append mutex.
#[derive(Default)]
pub(crate) struct LogTail {
    /// Number of entries.
    size: u64,
    /// For each level, the stored index and hash of the newest complete subtree of that level:
    /// the hashes the next append needs (see [`LogTail::record`]). Empty after an open.
    frontier: Vec<(u64, Hash)>,
}

impl LogTail {
    pub(crate) fn new(size: u64) -> Self {
        Self {
            size,
            frontier: Vec::new(),
        }
    }

    /// Records the hashes that the append of entry `index` stored, level 0 first.
    ///
    /// Entry n needs the hash of subtree `(n >> level) - 1` of each level below the number
    /// of its trailing one bits. That subtree is the newest complete one of its level before
    /// entry n, so it is in the frontier once the appends since the open completed it.
    fn record(&mut self, index: u64, hashes: &[Hash]) {
        for (level, hash) in hashes.iter().enumerate() {
            let stored = tlog::stored_hash_index(level as u8, index >> level);
            match self.frontier.get_mut(level) {
                Some(slot) => *slot = (stored, *hash),
                None => self.frontier.push((stored, *hash)),
            }
        }
    }
}

/// Reads stored tree hashes from the entry records, or from `frontier` where it has them.
struct TreeReader<'a> {
    tree: &'a sled::Tree,
    frontier: &'a [(u64, Hash)],
}

impl<'a> TreeReader<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            frontier: &[],
        }
    }
}

impl HashReader for TreeReader<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        indexes
            .iter()
            .map(|&i| {
                if let Some((_, hash)) = self.frontier.iter().find(|(stored, _)| *stored == i) {
                    return Ok(*hash);
                }
                // The hash of the subtree n at `level` was stored by the append of the
                // subtree's last leaf, at position `level` of that entry's hashes.
                let (level, n) = tlog::split_stored_hash_index(i);
                let leaf = ((n + 1) << level) - 1;
                let raw = self
                    .tree
                    .get(entry_key(leaf))
                    .map_err(|e| tlog::Error::InvalidInput(format!("storage read failed: {e}")))?
                    .ok_or(tlog::Error::IndexesNotInTree)?;
                EntryRecord::decode(&raw)
                    .and_then(|r| r.hash(usize::from(level)))
                    .ok_or(tlog::Error::MalformedHash)
            })
            .collect()
    }
}

fn tree_error(what: &str, e: tlog::Error) -> StorageError {
    StorageError::Corrupt {
        what: format!("key transparency log ({what})"),
        detail: e.to_string(),
    }
}

/// Reads the log size: one past the index of the last entry.
pub(crate) fn stored_size(kt: &sled::Tree) -> Result<u64, StorageError> {
    let Some((key, _)) = kt.scan_prefix([b'e']).next_back().transpose()? else {
        return Ok(0);
    };
    let index = <[u8; 8]>::try_from(&key[1..]).map_err(|_| StorageError::Corrupt {
        what: "key transparency log".into(),
        detail: format!("entry key of {} bytes", key.len()),
    })?;
    Ok(u64::from_be_bytes(index) + 1)
}

impl Store {
    /// Appends `event` as the next log entry and applies `change` in the same write set.
    /// Nothing is written when the change is refused.
    pub fn append_key_event(
        &self,
        event: &KeyEvent,
        change: &DirectoryChange,
    ) -> Result<KeyEventOutcome, StorageError> {
        let leaf = event.to_leaf();
        let mut tail = self.lock_directory()?;
        let index = tail.size;
        let reader = TreeReader {
            tree: &self.kt,
            frontier: &tail.frontier,
        };
        let hashes = tlog::stored_hashes(index, &leaf, &reader)
            .map_err(|e| tree_error("hashes of the last entries", e))?;
        let mut batch = WriteSet::new(&self.kt);
        let device = match self.stage_change(&mut batch, change, index) {
            Ok(device) => device,
            Err(Refusal::Existing(record)) => {
                return Ok(KeyEventOutcome::AlreadyRegistered(record));
            }
            Err(Refusal::Storage(e)) => return Err(e),
        };
        batch.insert(&entry_key(index), EntryRecord::encode(&hashes, &leaf));
        batch.insert(account_key(&event.account, index), &[]);
        self.atomic.apply(batch)?;
        tail.size = index + 1;
        tail.record(index, &hashes);
        Ok(KeyEventOutcome::Appended { index, device })
    }

    fn read_device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, Refusal> {
        Ok(self.device(id)?)
    }

    fn active_device(&self, id: &DeviceId) -> Result<DeviceRecord, Refusal> {
        match self.read_device(id)? {
            None => Err(StorageError::UnknownDevice(*id).into()),
            Some(record) if record.revoked_at_ms.is_some() => {
                Err(StorageError::DeviceRevoked(*id).into())
            }
            Some(record) => Ok(record),
        }
    }

    /// Checks that `signer` is an active device of `account`.
    fn active_signer(&self, signer: &DeviceId, account: &str) -> Result<(), Refusal> {
        let record = self.active_device(signer)?;
        if record.account != account {
            return Err(StorageError::DeviceOwnedElsewhere {
                device: *signer,
                account: record.account,
            }
            .into());
        }
        Ok(())
    }

    /// Adds the inserts of a new device to `batch`, or refuses a key already registered.
    fn stage_new_device(
        &self,
        batch: &mut WriteSet,
        record: &DeviceRecord,
        index: u64,
    ) -> Result<DeviceRecord, Refusal> {
        let existing = self.read_device(&record.device)?;
        Self::stage_device(batch, record, index, existing)
    }

    /// Adds the inserts of a new device to `batch`, given the stored record of its key.
    fn stage_device(
        batch: &mut WriteSet,
        record: &DeviceRecord,
        index: u64,
        existing: Option<DeviceRecord>,
    ) -> Result<DeviceRecord, Refusal> {
        if let Some(existing) = existing {
            if existing.account != record.account {
                return Err(StorageError::DeviceOwnedElsewhere {
                    device: record.device,
                    account: existing.account,
                }
                .into());
            }
            if existing.revoked_at_ms.is_some() {
                return Err(StorageError::DeviceRevoked(record.device).into());
            }
            return Err(Refusal::Existing(existing));
        }
        let stored = DeviceRecord {
            kt_index: Some(index),
            revoked_at_ms: None,
            ..record.clone()
        };
        batch.insert(device_key(&record.device), encode(&stored));
        batch.insert(device_account_key(&record.account, &record.device), &[]);
        Ok(stored)
    }

    /// Checks a directory change against the stored devices and adds its writes to `batch`.
    /// Runs under the append mutex, so the devices it reads cannot change before the batch.
    fn stage_change(
        &self,
        batch: &mut WriteSet,
        change: &DirectoryChange,
        index: u64,
    ) -> Result<DeviceRecord, Refusal> {
        match change {
            DirectoryChange::Register(record) => {
                let existing = self.read_device(&record.device)?;
                if existing.is_some() {
                    // A key that is already registered is refused, or reported as registered.
                    return Self::stage_device(batch, record, index, existing);
                }
                // A passkey account without devices yet is taken too.
                if self
                    .kt
                    .scan_prefix(account_prefix(&record.account))
                    .next()
                    .is_some()
                    || self.account(&record.account)?.is_some()
                {
                    return Err(StorageError::AccountTaken(record.account.clone()).into());
                }
                Self::stage_device(batch, record, index, None)
            }
            DirectoryChange::Enroll { signer, record } => {
                self.active_signer(signer, &record.account)?;
                self.check_device_count(&record.account)?;
                self.stage_new_device(batch, record, index)
            }
            DirectoryChange::EnrollByToken(record) => {
                if self.account(&record.account)?.is_none() {
                    return Err(StorageError::UnknownAccount(record.account.clone()).into());
                }
                self.check_device_count(&record.account)?;
                self.stage_new_device(batch, record, index)
            }
            DirectoryChange::Revoke {
                device,
                signer,
                at_ms,
            } => {
                let mut record = self.active_device(device)?;
                self.active_signer(signer, &record.account)?;
                record.revoked_at_ms = Some(*at_ms);
                batch.insert(device_key(device), encode(&record));
                batch.remove(device_account_key(&record.account, device));
                Ok(record)
            }
            DirectoryChange::Rotate { previous, new } => {
                let mut old = self.active_device(previous)?;
                if old.account != new.account {
                    return Err(StorageError::DeviceOwnedElsewhere {
                        device: *previous,
                        account: old.account,
                    }
                    .into());
                }
                let added = self.stage_new_device(batch, new, index)?;
                old.revoked_at_ms = Some(new.registered_at_ms);
                batch.insert(device_key(previous), encode(&old));
                batch.remove(device_account_key(&old.account, previous));
                Ok(added)
            }
        }
    }

    fn check_device_count(&self, account: &str) -> Result<(), StorageError> {
        let devices = self.kt.scan_prefix(account_devices_prefix(account)).count();
        if devices >= MAX_DEVICES_PER_ACCOUNT {
            return Err(StorageError::TooManyDevices {
                account: account.to_owned(),
                max: MAX_DEVICES_PER_ACCOUNT,
            });
        }
        Ok(())
    }

    /// Takes the lock that serialises appends to the key transparency log and other writes
    /// to the directory that must see them.
    pub(crate) fn lock_directory(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, LogTail>, StorageError> {
        self.kt_tail
            .lock()
            .map_err(|_| StorageError::FlushFailed("key transparency lock poisoned".into()))
    }

    /// Number of entries in the key transparency log.
    pub fn kt_size(&self) -> u64 {
        // A poisoned lock still holds the last size that was written.
        self.kt_tail.lock().unwrap_or_else(|p| p.into_inner()).size
    }

    /// Reads entry `index` and checks it against its stored leaf hash.
    pub fn kt_leaf(&self, index: u64) -> Result<Vec<u8>, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: format!("key transparency entry {index}"),
            detail,
        };
        let raw = self
            .kt
            .get(entry_key(index))?
            .ok_or_else(|| corrupt("missing".into()))?;
        let record =
            EntryRecord::decode(&raw).ok_or_else(|| corrupt("record is truncated".into()))?;
        let stored = record
            .hash(0)
            .ok_or_else(|| corrupt("record has no leaf hash".into()))?;
        if stored != tlog::record_hash(record.leaf) {
            return Err(corrupt("bytes do not match the stored leaf hash".into()));
        }
        Ok(record.leaf.to_vec())
    }

    /// Root hash of the tree of the first `size` entries.
    pub fn kt_root(&self, size: u64) -> Result<[u8; 32], StorageError> {
        tlog::tree_hash(size, &TreeReader::new(&self.kt))
            .map(|h| h.0)
            .map_err(|e| tree_error(&format!("root of size {size}"), e))
    }

    /// Audit path of entry `index` in the tree of `size` entries, leaf side first.
    pub fn kt_inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, StorageError> {
        tlog::prove_record(size, index, &TreeReader::new(&self.kt))
            .map_err(|e| tree_error(&format!("proof of entry {index} in size {size}"), e))
    }

    /// Consistency proof from the tree of `from` entries to the tree of `to` entries.
    pub fn kt_consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, StorageError> {
        if from == to {
            return Ok(Vec::new());
        }
        tlog::prove_tree(to, from, &TreeReader::new(&self.kt))
            .map_err(|e| tree_error(&format!("consistency from {from} to {to}"), e))
    }

    /// Indexes of every entry about `account`, oldest first.
    pub fn kt_account_entries(&self, account: &str) -> Result<Vec<u64>, StorageError> {
        let prefix = account_prefix(account);
        let mut out = Vec::new();
        for item in self.kt.scan_prefix(&prefix) {
            let (key, _) = item?;
            let index =
                <[u8; 8]>::try_from(&key[prefix.len()..]).map_err(|_| StorageError::Corrupt {
                    what: format!("key transparency index of account {account:?}"),
                    detail: "entry index is not 8 bytes".into(),
                })?;
            out.push(u64::from_be_bytes(index));
        }
        Ok(out)
    }

    /// Stores a signed tree head.
    pub fn put_tree_head(&self, head: &SignedTreeHead) -> Result<(), StorageError> {
        self.kt.insert(head_key(head.size), encode(head))?;
        Ok(())
    }

    /// Reads the signed tree head with the largest size.
    pub fn latest_tree_head(&self) -> Result<Option<SignedTreeHead>, StorageError> {
        let Some((_, raw)) = self.kt.scan_prefix([b't']).next_back().transpose()? else {
            return Ok(None);
        };
        decode(&raw, "tree head", &"the key transparency log").map(Some)
    }

    /// Reads the signed tree head of `size` entries, if one was stored.
    pub fn tree_head(&self, size: u64) -> Result<Option<SignedTreeHead>, StorageError> {
        self.kt
            .get(head_key(size))?
            .map(|raw| decode(&raw, "tree head", &size))
            .transpose()
    }
}
