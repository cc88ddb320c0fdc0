//! The key transparency log in the `kt` tree, written together with the device directory.
//!
//! Key prefixes in `kt`:
//! - `e` + index (u64 BE): leaf bytes of entry `index`;
//! - `h` + stored hash index (u64 BE): the 32-byte tree hashes that tlog_tiles stores, so an
//!   inclusion or consistency proof reads O(log n) records;
//! - `a` + account + 0 + index: the account's entries, for history lookups;
//! - `t` + size (u64 BE): signed tree heads.
//!
//! Appends are serialised by one mutex that holds the log size; each append and its directory
//! change are one sled transaction over `devices`, `accounts` and `kt`.

use crate::{DeviceRecord, StorageError, Store, decode, encode};
use atlas_protocol::DeviceId;
use atlas_protocol::transparency::{KeyEvent, SignedTreeHead};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tlog_tiles::tlog::{self, Hash, HashReader};

/// A directory change that a key event records. It is applied in the same transaction as the
/// append, so the directory never shows a key the log does not contain.
#[derive(Debug, Clone)]
pub enum DirectoryChange {
    /// Registers a new device.
    Register(DeviceRecord),
    /// Marks an active device revoked at `at_ms`.
    Revoke { device: DeviceId, at_ms: u64 },
    /// Replaces the active device `previous` with a new one of the same account.
    Rotate {
        previous: DeviceId,
        new: DeviceRecord,
    },
}

/// Result of [`Store::append_key_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEventOutcome {
    /// The event is entry `index`; `device` is the record as stored.
    Appended { index: u64, device: DeviceRecord },
    /// A registration of a key that was already registered under the same account: nothing
    /// was appended.
    AlreadyRegistered(DeviceRecord),
}

/// Why a directory change was refused inside the transaction.
enum Refusal {
    Existing(DeviceRecord),
    Storage(StorageError),
}

fn entry_key(index: u64) -> [u8; 9] {
    prefixed(b'e', index)
}

fn hash_key(stored: u64) -> [u8; 9] {
    prefixed(b'h', stored)
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

fn account_prefix(account: &str) -> Vec<u8> {
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
    let mut key = account.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(device.as_bytes());
    key
}

/// Reads stored tree hashes from the `kt` tree.
struct TreeReader<'a>(&'a sled::Tree);

impl HashReader for TreeReader<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        indexes
            .iter()
            .map(|&i| {
                let raw = self
                    .0
                    .get(hash_key(i))
                    .map_err(|e| tlog::Error::InvalidInput(format!("storage read failed: {e}")))?
                    .ok_or(tlog::Error::IndexesNotInTree)?;
                <[u8; 32]>::try_from(raw.as_ref())
                    .map(Hash)
                    .map_err(|_| tlog::Error::MalformedHash)
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
    /// Appends `event` as the next log entry and applies `change` in the same transaction.
    /// Nothing is written when the change is refused.
    pub fn append_key_event(
        &self,
        event: &KeyEvent,
        change: &DirectoryChange,
    ) -> Result<KeyEventOutcome, StorageError> {
        let leaf = event.to_leaf();
        let mut size = self
            .kt_size
            .lock()
            .map_err(|_| StorageError::FlushFailed("key transparency lock poisoned".into()))?;
        let index = *size;
        let hashes = tlog::stored_hashes(index, &leaf, &TreeReader(&self.kt))
            .map_err(|e| tree_error("hashes of the last entries", e))?;
        let first_stored = tlog::stored_hash_index(0, index);
        let account = account_key(&event.account, index);

        let result =
            (&self.devices, &self.accounts, &self.kt).transaction(|(devices, accounts, kt)| {
                let device = apply_change(devices, accounts, change, index)?;
                kt.insert(&entry_key(index), leaf.as_slice())?;
                for (offset, hash) in hashes.iter().enumerate() {
                    kt.insert(&hash_key(first_stored + offset as u64), &hash.0)?;
                }
                kt.insert(account.as_slice(), &[])?;
                Ok(device)
            });
        match result {
            Ok(device) => {
                *size = index + 1;
                Ok(KeyEventOutcome::Appended { index, device })
            }
            Err(TransactionError::Abort(Refusal::Existing(record))) => {
                Ok(KeyEventOutcome::AlreadyRegistered(record))
            }
            Err(TransactionError::Abort(Refusal::Storage(e))) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StorageError::Io(e)),
        }
    }

    /// Number of entries in the key transparency log.
    pub fn kt_size(&self) -> u64 {
        // A poisoned lock still holds the last size that was written.
        *self.kt_size.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads entry `index` and checks it against its stored leaf hash.
    pub fn kt_leaf(&self, index: u64) -> Result<Vec<u8>, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: format!("key transparency entry {index}"),
            detail,
        };
        let leaf = self
            .kt
            .get(entry_key(index))?
            .ok_or_else(|| corrupt("missing".into()))?;
        let stored = TreeReader(&self.kt)
            .read_hashes(&[tlog::stored_hash_index(0, index)])
            .map_err(|e| corrupt(format!("leaf hash unreadable: {e}")))?;
        if stored[0] != tlog::record_hash(&leaf) {
            return Err(corrupt("bytes do not match the stored leaf hash".into()));
        }
        Ok(leaf.to_vec())
    }

    /// Root hash of the tree of the first `size` entries.
    pub fn kt_root(&self, size: u64) -> Result<[u8; 32], StorageError> {
        tlog::tree_hash(size, &TreeReader(&self.kt))
            .map(|h| h.0)
            .map_err(|e| tree_error(&format!("root of size {size}"), e))
    }

    /// Audit path of entry `index` in the tree of `size` entries, leaf side first.
    pub fn kt_inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, StorageError> {
        tlog::prove_record(size, index, &TreeReader(&self.kt))
            .map_err(|e| tree_error(&format!("proof of entry {index} in size {size}"), e))
    }

    /// Consistency proof from the tree of `from` entries to the tree of `to` entries.
    pub fn kt_consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, StorageError> {
        if from == to {
            return Ok(Vec::new());
        }
        tlog::prove_tree(to, from, &TreeReader(&self.kt))
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

    /// The signed tree head with the largest size.
    pub fn latest_tree_head(&self) -> Result<Option<SignedTreeHead>, StorageError> {
        let Some((_, raw)) = self.kt.scan_prefix([b't']).next_back().transpose()? else {
            return Ok(None);
        };
        decode(&raw, "tree head", &"the key transparency log").map(Some)
    }

    /// The signed tree head of `size` entries, if one was stored.
    pub fn tree_head(&self, size: u64) -> Result<Option<SignedTreeHead>, StorageError> {
        self.kt
            .get(head_key(size))?
            .map(|raw| decode(&raw, "tree head", &size))
            .transpose()
    }
}

type Abortable<T> = Result<T, ConflictableTransactionError<Refusal>>;

fn abort<T>(e: StorageError) -> Abortable<T> {
    Err(ConflictableTransactionError::Abort(Refusal::Storage(e)))
}

fn read_device(devices: &TransactionalTree, id: &DeviceId) -> Abortable<Option<DeviceRecord>> {
    match devices.get(id.as_bytes())? {
        None => Ok(None),
        Some(raw) => match decode::<DeviceRecord>(&raw, "device", id) {
            Ok(record) => Ok(Some(record)),
            Err(e) => abort(e),
        },
    }
}

fn active_device(devices: &TransactionalTree, id: &DeviceId) -> Abortable<DeviceRecord> {
    match read_device(devices, id)? {
        None => abort(StorageError::UnknownDevice(*id)),
        Some(record) if record.revoked_at_ms.is_some() => abort(StorageError::DeviceRevoked(*id)),
        Some(record) => Ok(record),
    }
}

fn insert_new_device(
    devices: &TransactionalTree,
    accounts: &TransactionalTree,
    record: &DeviceRecord,
    index: u64,
) -> Abortable<DeviceRecord> {
    if let Some(existing) = read_device(devices, &record.device)? {
        if existing.account != record.account {
            return abort(StorageError::DeviceOwnedElsewhere {
                device: record.device,
                account: existing.account,
            });
        }
        if existing.revoked_at_ms.is_some() {
            return abort(StorageError::DeviceRevoked(record.device));
        }
        return Err(ConflictableTransactionError::Abort(Refusal::Existing(
            existing,
        )));
    }
    let stored = DeviceRecord {
        kt_index: Some(index),
        revoked_at_ms: None,
        ..record.clone()
    };
    devices.insert(record.device.as_bytes(), encode(&stored))?;
    accounts.insert(device_account_key(&record.account, &record.device), &[])?;
    Ok(stored)
}

fn apply_change(
    devices: &TransactionalTree,
    accounts: &TransactionalTree,
    change: &DirectoryChange,
    index: u64,
) -> Abortable<DeviceRecord> {
    match change {
        DirectoryChange::Register(record) => insert_new_device(devices, accounts, record, index),
        DirectoryChange::Revoke { device, at_ms } => {
            let mut record = active_device(devices, device)?;
            record.revoked_at_ms = Some(*at_ms);
            devices.insert(device.as_bytes(), encode(&record))?;
            accounts.remove(device_account_key(&record.account, device))?;
            Ok(record)
        }
        DirectoryChange::Rotate { previous, new } => {
            let mut old = active_device(devices, previous)?;
            if old.account != new.account {
                return abort(StorageError::DeviceOwnedElsewhere {
                    device: *previous,
                    account: old.account,
                });
            }
            old.revoked_at_ms = Some(new.registered_at_ms);
            devices.insert(previous.as_bytes(), encode(&old))?;
            accounts.remove(device_account_key(&old.account, previous))?;
            insert_new_device(devices, accounts, new, index)
        }
    }
}
