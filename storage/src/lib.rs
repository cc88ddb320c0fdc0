//! Durable state of an Atlas node in sled.
//!
//! Trees:
//! - `meta`: the storage format version.
//! - `groups`: everything that must change atomically with a group's log, under key prefixes:
//!   `m` group meta (epoch, sequence range), `s` MLS public group state, `l` log entries,
//!   `d` de-duplication ids, `w` Welcomes waiting for a device. One write set (see the
//!   `atomic` module) covers an accepted message, so a crash leaves all of it or none of it.
//! - `directory`: devices, the account index, the key transparency log and its signed tree
//!   heads, in one tree so that a key event and its directory change are one write set (see
//!   [`transparency`]).
//! - `key_packages`, `cursors`.
//! - `redo`: write sets in progress (see the `atomic` module); empty after a clean stop.
//! - `signing_keys`: the node's signing keys, sealed by the caller before they get here.
//! - `tokens`: refresh tokens and their families (see [`accounts`]).
//!
//! Writes become durable only through [`Store::durable`], which batches the fsyncs of many
//! writers (group commit): callers acknowledge nothing before it returns `Ok`.

mod accounts;
mod atomic;
mod changes;
mod error;
mod flusher;
mod keys;
mod marks;
mod records;
pub mod transparency;

pub use accounts::{
    AccountRecord, MAX_PASSKEYS_PER_ACCOUNT, PasskeyRecord, RefreshOutcome, RefreshRecord,
    TokenFamily,
};
pub use changes::{
    AppendItem, Barrier, Change, ImportedNews, NodeKey, Outcome, Proposal, ReadScope, Refused,
    Replicator, ShardFilter, ShardLogStart, SharedPart,
};
pub use error::StorageError;
pub use records::{DeviceRecord, GroupMeta, KeyPackageRecord};
pub use transparency::{DirectoryChange, KeyEventOutcome, MAX_DEVICES_PER_ACCOUNT};

use atlas_protocol::{ClientMsgId, DeviceId, GroupId, LogEntry, WelcomeEntry};
use atomic::{AtomicWriter, WriteSet};
pub use flusher::Flusher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Storage format version written on first open; a mismatch is refused by [`Store::open`].
pub const FORMAT_VERSION: u32 = 2;

const FORMAT_KEY: &[u8] = b"format_version";

/// sled page cache size in bytes.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Time `Store::open` retries, at most, while the database's lock is held.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// A handle to the node's sled database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// Directory of the database files.
    dir: Arc<std::path::PathBuf>,
    /// Durability marks of the database (see the `marks` module).
    marks: Arc<marks::Marks>,
    groups: sled::Tree,
    key_packages: sled::Tree,
    cursors: sled::Tree,
    kt: sled::Tree,
    signing_keys: sled::Tree,
    tokens: sled::Tree,
    /// Serialises refresh token rotations.
    tokens_lock: Arc<Mutex<()>>,
    /// Size and newest subtree hashes of the key transparency log; held while appending, so
    /// appends are serialised.
    kt_tail: Arc<Mutex<transparency::LogTail>>,
    flusher: Arc<Flusher>,
    /// Makes the writes of one change all or nothing.
    atomic: Arc<AtomicWriter>,
    /// Orders changes in the cluster's replicated logs; unset on a single node.
    replicator: Arc<std::sync::OnceLock<Arc<dyn Replicator>>>,
}

/// Entries of a group's log as [`Store::read_log_page`] reads them.
#[derive(Debug)]
pub struct LogPage {
    pub entries: Vec<LogEntry>,
    /// The first sequence number that retention kept, read after the entries, so it covers
    /// every removal that the read saw.
    pub first_seq: u64,
    /// The sequence number of the newest stored entry (0 without any), read before the
    /// entries.
    pub newest_seq: u64,
}

impl Store {
    /// Opens or creates the database in `dir` and checks its format version. Must be called
    /// inside a Tokio runtime, which runs the group-commit flusher.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        // sled starts an empty database (and rewrites the file) when it cannot read an existing
        // one, so remember whether there was data before opening and refuse to run empty.
        let had_data = std::fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // Bounds the page cache, the main part of a node's memory besides connections.
            .cache_capacity(CACHE_BYTES)
            // Durability comes from explicit flushes; sled's own timer flush is turned off.
            .flush_every_ms(None);
        let started = Instant::now();
        let opened = loop {
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
            let Ok(Err(e)) = opened else {
                break opened;
            };
            match StorageError::open(dir, e) {
                // A store dropped in this process keeps the lock until sled's background
                // writes of it end, which can take a moment on a busy machine.
                StorageError::InUse { .. } if started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return Err(other),
            }
        };
        let db = match opened {
            Ok(result) => result.map_err(|e| StorageError::open(dir, e))?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|m| (*m).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                return Err(StorageError::open_panicked(dir, &message));
            }
        };
        // sled reads most of the file lazily, so damage it did not see while opening shows up
        // as an I/O error of the first reads below.
        Self::open_trees(dir, db, had_data).map_err(|e| match e {
            StorageError::Io(e @ sled::Error::Corruption { .. }) => {
                StorageError::open_failed_reading(dir, &e.to_string())
            }
            other => other,
        })
    }

    /// Checks the format version and the durability marks of the database that `open` opened,
    /// completes interrupted write sets and opens the trees.
    fn open_trees(dir: &Path, db: sled::Db, had_data: bool) -> Result<Self, StorageError> {
        let meta = db.open_tree("meta")?;
        match meta.get(FORMAT_KEY)? {
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StorageError::Corrupt {
                        what: "format version".into(),
                        detail: format!("{} bytes instead of 4", raw.len()),
                    })?;
                if found != FORMAT_VERSION {
                    return Err(StorageError::FormatVersion {
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
            None if had_data => {
                return Err(StorageError::Corrupt {
                    what: format!("storage in {}", dir.display()),
                    detail: "the database file has data but no readable format version; \
                             restore it from a backup or move it away to start empty"
                        .into(),
                });
            }
            None => {
                meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        let marks = Arc::new(marks::Marks::open(dir, meta)?);
        // Before anything reads: completes the writes a crash interrupted.
        let (atomic, completed) = AtomicWriter::open(&db)?;
        if completed > 0 {
            tracing::warn!(
                completed,
                "completed writes that the last run of this data directory left half done"
            );
        }
        let kt = db.open_tree("directory")?;
        let store = Self {
            atomic: Arc::new(atomic),
            kt_tail: Arc::new(Mutex::new(transparency::LogTail::new(
                transparency::stored_size(&kt)?,
            ))),
            kt,
            signing_keys: db.open_tree("signing_keys")?,
            tokens: db.open_tree("tokens")?,
            tokens_lock: Arc::default(),
            groups: db.open_tree("groups")?,
            key_packages: db.open_tree("key_packages")?,
            cursors: db.open_tree("cursors")?,
            flusher: Flusher::start_marking(db.clone(), Some(Arc::clone(&marks))),
            marks,
            replicator: Arc::default(),
            db,
            dir: Arc::new(dir.to_path_buf()),
        };
        Ok(store)
    }

    pub(crate) fn lock_tokens(&self) -> Result<std::sync::MutexGuard<'_, ()>, StorageError> {
        self.tokens_lock
            .lock()
            .map_err(|_| StorageError::FlushFailed("refresh token lock poisoned".into()))
    }

    /// Returns the directory of the database files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the sled database, for components that keep their own trees in it (the
    /// replicated logs of the cluster).
    pub fn sled_db(&self) -> &sled::Db {
        &self.db
    }

    /// Returns the group-commit flusher of the database, for other writers of it.
    pub fn flusher(&self) -> Arc<Flusher> {
        Arc::clone(&self.flusher)
    }

    /// Sets a function called with the duration of every flush, for metrics.
    pub fn set_flush_observer(&self, observer: impl Fn(Duration) + Send + Sync + 'static) {
        self.flusher.set_observer(Box::new(observer));
    }

    /// Waits until every write made before this call is on disk (fsync'd). Concurrent callers
    /// share one flush.
    pub async fn durable(&self) -> Result<(), StorageError> {
        self.flusher.wait().await
    }

    /// Flushes everything and stops the flusher task. Other clones of this store must be
    /// dropped too before the directory can be opened again.
    ///
    /// The last flush also writes a durability mark (see the `marks` module), so a database
    /// that later loses any write made before the stop is refused.
    pub async fn close(&self) -> Result<(), StorageError> {
        let db = self.db.clone();
        let marks = Arc::clone(&self.marks);
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let mark = marks.stage()?;
            db.flush()?;
            marks.record(mark)
        })
        .await
        .map_err(|e| StorageError::FlushFailed(e.to_string()))??;
        self.flusher.close().await;
        Ok(())
    }

    /// Total bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.db.size_on_disk()?)
    }

    // ----- groups -------------------------------------------------------------------------

    /// Stores a new group's meta and public state; fails with [`StorageError::GroupExists`]
    /// when the id is taken.
    pub fn create_group(
        &self,
        group: &GroupId,
        meta: &GroupMeta,
        public_state: &[u8],
    ) -> Result<(), StorageError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};

        let meta_key = keys::group_meta(group);
        let state_key = keys::group_state(group);
        let meta_bytes = encode(meta);
        let result = self.groups.transaction(|tx| {
            if tx.get(&meta_key)?.is_some() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            tx.insert(meta_key.as_slice(), meta_bytes.as_slice())?;
            tx.insert(state_key.as_slice(), public_state)?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StorageError::GroupExists(group.clone())),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Loads a group's meta and public state.
    pub fn load_group(
        &self,
        group: &GroupId,
    ) -> Result<Option<(GroupMeta, Vec<u8>)>, StorageError> {
        let Some(meta) = self.groups.get(keys::group_meta(group))? else {
            return Ok(None);
        };
        let mut meta: GroupMeta = decode(&meta, "group meta", group)?;
        // Application messages do not rewrite the meta record (see `append`), so the newest
        // log entry gives the last sequence number. Retention may have removed every entry;
        // then the first number it left is the next one, as `next_seq` expects.
        if let Some(newest) = self.newest_seq(group)? {
            meta.last_seq = meta.last_seq.max(newest);
        }
        meta.last_seq = meta.last_seq.max(meta.first_seq.saturating_sub(1));
        let state =
            self.groups
                .get(keys::group_state(group))?
                .ok_or_else(|| StorageError::Corrupt {
                    what: format!("group {group}"),
                    detail: "meta present but public state missing".into(),
                })?;
        Ok(Some((meta, state.to_vec())))
    }

    /// Returns the sequence number of a group's newest stored entry.
    pub(crate) fn newest_seq(&self, group: &GroupId) -> Result<Option<u64>, StorageError> {
        let Some(item) = self
            .groups
            .range(keys::log(group, 0)..keys::log_end(group))
            .next_back()
        else {
            return Ok(None);
        };
        let (key, _) = item?;
        let seq =
            <[u8; 8]>::try_from(&key[key.len() - 8..]).map_err(|_| StorageError::Corrupt {
                what: format!("log key of group {group}"),
                detail: "shorter than a sequence number".into(),
            })?;
        Ok(Some(u64::from_be_bytes(seq)))
    }

    /// Appends one accepted entry atomically with its de-duplication id and, for commits, the
    /// new group meta, public state, Welcomes for added devices and the removal of the
    /// `departed` devices (see [`Store::departure`]). The change is not yet durable: call
    /// [`Store::durable`] before acknowledging it.
    ///
    /// `meta` may be `None` when only `last_seq` changed: [`Store::load_group`] derives it from
    /// the log, which saves a write per application message.
    pub fn append(
        &self,
        group: &GroupId,
        entry: &LogEntry,
        meta: Option<&GroupMeta>,
        public_state: Option<&[u8]>,
        welcomes: &[(DeviceId, WelcomeEntry)],
        departed: &[DeviceId],
    ) -> Result<(), StorageError> {
        let mut batch = WriteSet::new(&self.groups);
        stage_append(
            &mut batch,
            group,
            entry,
            meta,
            public_state,
            welcomes,
            departed,
        );
        self.atomic.apply(batch)?;
        Ok(())
    }

    /// Appends several entries of one group in one write set, each as [`Store::append`].
    pub fn append_batch(&self, group: &GroupId, items: &[AppendItem]) -> Result<(), StorageError> {
        let mut batch = WriteSet::new(&self.groups);
        for item in items {
            stage_append(
                &mut batch,
                group,
                &item.entry,
                item.meta.as_ref(),
                item.public_state.as_deref(),
                &item.welcomes,
                &item.departed,
            );
        }
        self.atomic.apply(batch)?;
        Ok(())
    }

    /// Returns the sequence number of the commit that removed `device` from `group`, if one
    /// did and no later commit added it again.
    pub fn departure(
        &self,
        group: &GroupId,
        device: &DeviceId,
    ) -> Result<Option<u64>, StorageError> {
        self.stored_seq(keys::departure(group, device), || {
            format!("departure of device {device} from group {group}")
        })
    }

    /// Finds the sequence number stored earlier for a sender's client message id.
    pub fn dedupe(
        &self,
        group: &GroupId,
        sender: &DeviceId,
        msg_id: &ClientMsgId,
    ) -> Result<Option<u64>, StorageError> {
        self.stored_seq(keys::dedupe(group, sender, msg_id), || {
            format!("dedupe id in group {group}")
        })
    }

    /// Reads the big-endian sequence number stored under `key` in the `groups` tree. `record`
    /// names the record in the error for a value that is not 8 bytes.
    fn stored_seq(
        &self,
        key: Vec<u8>,
        record: impl FnOnce() -> String,
    ) -> Result<Option<u64>, StorageError> {
        let Some(raw) = self.groups.get(key)? else {
            return Ok(None);
        };
        let seq = <[u8; 8]>::try_from(raw.as_ref()).map_err(|_| StorageError::Corrupt {
            what: record(),
            detail: format!("{} bytes instead of 8", raw.len()),
        })?;
        Ok(Some(u64::from_be_bytes(seq)))
    }

    /// Reads one log entry.
    pub fn entry(&self, group: &GroupId, seq: u64) -> Result<Option<LogEntry>, StorageError> {
        self.groups
            .get(keys::log(group, seq))?
            .map(|raw| decode(&raw, "log entry", group))
            .transpose()
    }

    /// Reads up to `limit` entries with sequence numbers above `after`, in order.
    ///
    /// Fails with [`StorageError::Corrupt`] when an entry is missing: the numbers from the
    /// first one that retention kept up to the newest stored one have no gaps. sled can lose
    /// part of a damaged tree without an error, so that a scan ends early or skips entries
    /// that exist.
    ///
    /// NOTE: a snapshot installed on a node of a cluster replaces the group's entries while
    /// reads go on, and a read during it may fail this way although nothing is lost.
    pub fn read_log(
        &self,
        group: &GroupId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        Ok(self.read_log_page(group, after, limit)?.entries)
    }

    /// Reads entries as [`Store::read_log`] does, with the numbers that bound the stored log.
    pub fn read_log_page(
        &self,
        group: &GroupId,
        after: u64,
        limit: usize,
    ) -> Result<LogPage, StorageError> {
        // Appends only add entries, so every entry up to the newest one found before the scan
        // must be in it.
        let newest = self.newest_seq(group)?.unwrap_or(0);
        let start = keys::log(group, after.saturating_add(1));
        let end = keys::log_end(group);
        let mut out = Vec::new();
        for item in self.groups.range(start..end).take(limit) {
            let (_, raw) = item?;
            out.push(decode::<LogEntry>(&raw, "log entry", group)?);
        }
        // Retention writes the group's new first number before it removes entries, so a first
        // number read after the scan covers every removal that the scan saw.
        let first_seq = self.first_seq(group)?;
        let mut expected = after.saturating_add(1).max(first_seq);
        for entry in &out {
            if entry.seq < expected {
                continue;
            }
            if entry.seq > newest {
                break;
            }
            if entry.seq != expected {
                return Err(missing_entry(group, expected, newest));
            }
            expected += 1;
        }
        if out.len() < limit && expected <= newest {
            return Err(missing_entry(group, expected, newest));
        }
        Ok(LogPage {
            entries: out,
            first_seq,
            newest_seq: newest,
        })
    }

    /// Returns the first sequence number of a group that retention kept, as stored (0 for a
    /// group without a meta record).
    fn first_seq(&self, group: &GroupId) -> Result<u64, StorageError> {
        Ok(match self.groups.get(keys::group_meta(group))? {
            Some(raw) => decode::<GroupMeta>(&raw, "group meta", group)?.first_seq,
            None => 0,
        })
    }

    /// Removes log entries up to and including `through_seq` and their de-duplication ids,
    /// then stores `meta` (whose `first_seq` the caller has advanced). Returns how many entries
    /// were removed.
    pub fn prune(
        &self,
        group: &GroupId,
        through_seq: u64,
        meta: &GroupMeta,
    ) -> Result<usize, StorageError> {
        let mut batch = WriteSet::new(&self.groups);
        // The new first number goes in before the removals, as `read_log` expects.
        batch.insert(keys::group_meta(group), encode(meta));
        let mut removed = 0;
        for item in self
            .groups
            .range(keys::log(group, 0)..=keys::log(group, through_seq))
        {
            let (key, raw) = item?;
            let entry: LogEntry = decode(&raw, "log entry", group)?;
            batch.remove(key);
            batch.remove(keys::dedupe(group, &entry.sender, &entry.msg_id));
            removed += 1;
        }
        self.atomic.apply(batch)?;
        Ok(removed)
    }

    /// Returns the last sequence number accepted before `cutoff_ms`, if any. The scan starts at
    /// the oldest entry and stops at the first one that is not older than the cutoff.
    pub fn last_seq_before(
        &self,
        group: &GroupId,
        cutoff_ms: u64,
    ) -> Result<Option<u64>, StorageError> {
        let mut last = None;
        for item in self.groups.range(keys::log(group, 0)..keys::log_end(group)) {
            let (_, raw) = item?;
            let entry: LogEntry = decode(&raw, "log entry", group)?;
            if entry.accepted_at_ms >= cutoff_ms {
                break;
            }
            last = Some(entry.seq);
        }
        Ok(last)
    }

    /// Lists the Welcomes waiting for a device.
    pub fn welcomes(&self, device: &DeviceId) -> Result<Vec<WelcomeEntry>, StorageError> {
        let mut out = Vec::new();
        for item in self.groups.scan_prefix(keys::welcome_prefix(device)) {
            let (_, raw) = item?;
            out.push(decode(&raw, "welcome", device)?);
        }
        Ok(out)
    }

    /// Deletes a device's Welcome for a group once the device has acknowledged the group.
    pub fn remove_welcome(&self, device: &DeviceId, group: &GroupId) -> Result<(), StorageError> {
        self.groups.remove(keys::welcome(device, group))?;
        Ok(())
    }

    // ----- devices ------------------------------------------------------------------------

    /// Looks up a device.
    pub fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StorageError> {
        self.kt
            .get(transparency::device_key(device))?
            .map(|raw| decode(&raw, "device", device))
            .transpose()
    }

    /// Lists the devices of an account.
    pub fn account_devices(&self, account: &str) -> Result<Vec<DeviceRecord>, StorageError> {
        let prefix = transparency::account_devices_prefix(account);
        let mut out = Vec::new();
        for item in self.kt.scan_prefix(&prefix) {
            let (key, _) = item?;
            let id =
                <[u8; 16]>::try_from(&key[prefix.len()..]).map_err(|_| StorageError::Corrupt {
                    what: format!("account index of {account:?}"),
                    detail: "device id is not 16 bytes".into(),
                })?;
            if let Some(record) = self.device(&DeviceId::from_bytes(id))? {
                out.push(record);
            }
        }
        Ok(out)
    }

    // ----- key packages -------------------------------------------------------------------

    /// Stores validated one-time KeyPackages and, if given, replaces the last-resort one.
    /// Returns the number of one-time KeyPackages now available for the device.
    pub fn put_key_packages(
        &self,
        device: &DeviceId,
        one_time: &[KeyPackageRecord],
        last_resort: Option<&KeyPackageRecord>,
    ) -> Result<u32, StorageError> {
        let mut batch = WriteSet::new(&self.key_packages);
        for record in one_time {
            batch.insert(keys::key_package(device, &record.hash_ref), encode(record));
        }
        if let Some(record) = last_resort {
            batch.insert(keys::last_resort(device), encode(record));
        }
        self.atomic.apply(batch)?;
        Ok(self
            .key_packages
            .scan_prefix(keys::key_package_prefix(device))
            .count() as u32)
    }

    /// Claims a KeyPackage of `device` valid at `now_secs`: a one-time one if any is left
    /// (removing it, so no two callers get the same), else the last-resort one. Expired
    /// one-time KeyPackages met on the way are deleted.
    pub fn claim_key_package(
        &self,
        device: &DeviceId,
        now_secs: u64,
    ) -> Result<Option<KeyPackageRecord>, StorageError> {
        for item in self
            .key_packages
            .scan_prefix(keys::key_package_prefix(device))
        {
            let (key, _) = item?;
            // `remove` returns the value only to the one caller that removed it.
            let Some(raw) = self.key_packages.remove(&key)? else {
                continue;
            };
            let record: KeyPackageRecord = decode(&raw, "key package", device)?;
            if record.valid_at(now_secs) {
                return Ok(Some(record));
            }
        }
        let Some(raw) = self.key_packages.get(keys::last_resort(device))? else {
            return Ok(None);
        };
        let record: KeyPackageRecord = decode(&raw, "last-resort key package", device)?;
        Ok(record.valid_at(now_secs).then_some(record))
    }

    // ----- signing keys -------------------------------------------------------------------

    /// Stores a signing key record under its key id, replacing any record with that id.
    pub fn put_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<(), StorageError> {
        self.signing_keys.insert(kid.as_bytes(), sealed)?;
        Ok(())
    }

    /// Deletes a signing key record.
    pub fn remove_signing_key(&self, kid: &str) -> Result<(), StorageError> {
        self.signing_keys.remove(kid.as_bytes())?;
        Ok(())
    }

    /// Lists every stored signing key record as (key id, bytes).
    pub fn signing_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        for item in self.signing_keys.iter() {
            let (kid, raw) = item?;
            let kid = String::from_utf8(kid.to_vec()).map_err(|_| StorageError::Corrupt {
                what: "signing key id".into(),
                detail: "not UTF-8".into(),
            })?;
            out.push((kid, raw.to_vec()));
        }
        Ok(out)
    }

    /// Deletes every stored KeyPackage of a device, one-time and last-resort.
    pub fn remove_key_packages(&self, device: &DeviceId) -> Result<(), StorageError> {
        let mut batch = WriteSet::new(&self.key_packages);
        for item in self
            .key_packages
            .scan_prefix(keys::key_package_prefix(device))
        {
            let (key, _) = item?;
            batch.remove(key);
        }
        batch.remove(keys::last_resort(device).as_slice());
        self.atomic.apply(batch)?;
        Ok(())
    }

    // ----- cursors ------------------------------------------------------------------------

    /// Raises a device's cursor in a group to `seq`; a lower value leaves it unchanged.
    /// Returns the stored cursor.
    pub fn advance_cursor(
        &self,
        device: &DeviceId,
        group: &GroupId,
        seq: u64,
    ) -> Result<u64, StorageError> {
        let key = keys::cursor(device, group);
        let stored = self.cursors.update_and_fetch(key, |old| {
            let old = old
                .and_then(|raw| <[u8; 8]>::try_from(raw).ok())
                .map(u64::from_be_bytes);
            Some(old.unwrap_or(0).max(seq).to_be_bytes().to_vec())
        })?;
        Ok(stored
            .and_then(|raw| <[u8; 8]>::try_from(raw.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(seq))
    }

    /// Returns a device's cursor in a group (0 when it has acknowledged nothing).
    pub fn cursor(&self, device: &DeviceId, group: &GroupId) -> Result<u64, StorageError> {
        let Some(raw) = self.cursors.get(keys::cursor(device, group))? else {
            return Ok(0);
        };
        let bytes = <[u8; 8]>::try_from(raw.as_ref()).map_err(|_| StorageError::Corrupt {
            what: format!("cursor of device {device} in group {group}"),
            detail: format!("{} bytes instead of 8", raw.len()),
        })?;
        Ok(u64::from_be_bytes(bytes))
    }
}

/// Adds the writes of one appended entry to `batch`.
/// Returns the error of a log read that found entry `missing` absent below the newest entry
/// `newest`.
fn missing_entry(group: &GroupId, missing: u64, newest: u64) -> StorageError {
    StorageError::Corrupt {
        what: format!("log of group {group}"),
        detail: format!(
            "entry {missing} is missing although the log reaches entry {newest}; the database \
             is damaged: restore the data directory from a backup, or, on a node of a \
             cluster, empty it and start the node with --seeds"
        ),
    }
}

fn stage_append(
    batch: &mut WriteSet,
    group: &GroupId,
    entry: &LogEntry,
    meta: Option<&GroupMeta>,
    public_state: Option<&[u8]>,
    welcomes: &[(DeviceId, WelcomeEntry)],
    departed: &[DeviceId],
) {
    batch.insert(keys::log(group, entry.seq), encode(entry));
    batch.insert(
        keys::dedupe(group, &entry.sender, &entry.msg_id),
        &entry.seq.to_be_bytes(),
    );
    if let Some(meta) = meta {
        batch.insert(keys::group_meta(group), encode(meta));
    }
    if let Some(state) = public_state {
        batch.insert(keys::group_state(group), state);
    }
    for (device, welcome) in welcomes {
        batch.insert(keys::welcome(device, group), encode(welcome));
        // Added again: the window of its earlier membership closes.
        batch.remove(keys::departure(group, device));
    }
    for device in departed {
        batch.insert(keys::departure(group, device), &entry.seq.to_be_bytes());
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The record types are plain structs with string keys; encoding into a Vec cannot fail.
    rmp_serde::to_vec_named(value).expect("storage record serializes")
}

pub(crate) fn decode<T: DeserializeOwned>(
    raw: &[u8],
    what: &str,
    owner: &impl std::fmt::Display,
) -> Result<T, StorageError> {
    rmp_serde::from_slice(raw).map_err(|e| StorageError::Corrupt {
        what: format!("{what} of {owner}"),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
