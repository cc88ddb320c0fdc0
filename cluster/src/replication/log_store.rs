//! The raft log in sled: entries under their index (big-endian, so in order), and the vote,
//! the purge point and the committed id in a metadata tree.

use super::{LogDisk, RaftNodeId, TypeConfig, any, encode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

pub(super) const VOTE_KEY: &[u8] = b"vote";
pub(super) const PURGED_KEY: &[u8] = b"purged";
const COMMITTED_KEY: &[u8] = b"committed";

/// The raft log of one replicated log, in two sled trees.
#[derive(Clone)]
pub struct SledLogStore {
    entries: sled::Tree,
    meta: sled::Tree,
    disk: LogDisk,
}

impl SledLogStore {
    /// Opens the log named `name` in `disk`.
    pub fn open(disk: &LogDisk, name: &str) -> sled::Result<Self> {
        Ok(Self {
            entries: disk.db.open_tree(format!("raft-log-{name}"))?,
            meta: disk.db.open_tree(format!("raft-meta-{name}"))?,
            disk: disk.clone(),
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        failed: fn(openraft::AnyError) -> StorageIOError<RaftNodeId>,
    ) -> Result<Option<T>, StorageError<RaftNodeId>> {
        let Some(raw) = self.meta.get(key).map_err(|e| failed(any(e)))? else {
            return Ok(None);
        };
        Ok(Some(
            rmp_serde::from_slice(&raw).map_err(|e| failed(any(e)))?,
        ))
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        failed: fn(openraft::AnyError) -> StorageIOError<RaftNodeId>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        self.meta
            .insert(key, encode(value))
            .map_err(|e| failed(any(e)))?;
        self.disk.flush().await.map_err(|e| failed(any(e)))?;
        Ok(())
    }

    fn decode_entry(raw: &[u8]) -> Result<Entry<TypeConfig>, StorageError<RaftNodeId>> {
        Ok(rmp_serde::from_slice(raw).map_err(|e| StorageIOError::read_logs(any(e)))?)
    }
}

pub(super) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<RaftNodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.entries.range((start, end)) {
            let (_, raw) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            out.push(Self::decode_entry(&raw)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<RaftNodeId>> {
        let last_purged_log_id: Option<LogId<RaftNodeId>> =
            self.read_meta(PURGED_KEY, StorageIOError::read_logs)?;
        let last = match self
            .entries
            .last()
            .map_err(|e| StorageIOError::read_logs(any(e)))?
        {
            // Entries that a crash during a purge left behind are older than the purge point.
            Some((_, raw)) => Some(Self::decode_entry(&raw)?.log_id).max(last_purged_log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftNodeId>) -> Result<(), StorageError<RaftNodeId>> {
        self.write_meta(VOTE_KEY, vote, StorageIOError::write_vote)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftNodeId>>, StorageError<RaftNodeId>> {
        self.read_meta(VOTE_KEY, StorageIOError::read_vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<RaftNodeId>>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        // No fsync: openraft calls this before every apply, in the loop that also takes
        // appends and acknowledgements, so a wait here stalled the log once per commit. The
        // committed id only lets a restarted node apply entries before it hears its leader.
        // sled recovers a prefix of its writes, and this write comes after those of the
        // entries it covers and before their state machine writes, so a recovered id never
        // runs ahead of the log or behind the state machine.
        self.meta
            .insert(COMMITTED_KEY, encode(&committed))
            .map_err(|e| StorageIOError::write(any(e)))?;
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<RaftNodeId>>, StorageError<RaftNodeId>> {
        Ok(self
            .read_meta::<Option<LogId<RaftNodeId>>>(COMMITTED_KEY, StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<RaftNodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Plain inserts in index order rather than one sled batch, which costs two log buffer
        // writes (see `atlas_storage`'s `atomic` module). sled recovers its log as a prefix, so
        // a crash keeps the first entries of the call without a gap, and openraft has counted
        // none of them as stored yet.
        for entry in entries {
            self.entries
                .insert(index_key(entry.log_id.index), encode(&entry))
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        // openraft counts the entries as stored only after the callback: that is after the
        // fsync, so an acknowledged entry survives a crash.
        let flushed = self.disk.flush().await;
        let result = flushed.map(|_| ()).map_err(std::io::Error::other);
        let failed = result.as_ref().err().map(ToString::to_string);
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(StorageIOError::write_logs(any(std::io::Error::other(e))).into()),
            None => Ok(()),
        }
    }

    async fn truncate(
        &mut self,
        log_id: LogId<RaftNodeId>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        // Newest first: a crash half-way leaves a shorter log without a gap.
        for item in self.entries.range(index_key(log_id.index)..).rev() {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(any(e)))?;
            self.entries
                .remove(key)
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        self.disk
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<RaftNodeId>) -> Result<(), StorageError<RaftNodeId>> {
        // The purge point is written first, so a crash leaves entries that are already
        // purged rather than a gap.
        self.write_meta(PURGED_KEY, &log_id, StorageIOError::write_logs)
            .await?;
        // Oldest first: a crash half-way leaves purged entries at the front, without a gap.
        for item in self.entries.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(any(e)))?;
            self.entries
                .remove(key)
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
        }
        Ok(())
    }
}
