//! The raft log in sled: entries under their index (big-endian, so in order), and the vote,
//! the purge point and the committed id in a metadata tree. The newest entries are also kept
//! in memory (see [`RecentEntries`]).

use super::{LogDisk, RaftNodeId, TypeConfig, any, encode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

/// Maximum number of entries of one log that [`RecentEntries`] keeps.
const RECENT_ENTRIES: usize = 256;

/// Maximum size, encoded, of the entries of one log that [`RecentEntries`] keeps.
const RECENT_BYTES: usize = 4 << 20;

pub(super) const VOTE_KEY: &[u8] = b"vote";
pub(super) const PURGED_KEY: &[u8] = b"purged";
const COMMITTED_KEY: &[u8] = b"committed";

/// The raft log of one replicated log, in two sled trees.
#[derive(Clone)]
pub struct SledLogStore {
    entries: sled::Tree,
    meta: sled::Tree,
    disk: LogDisk,
    /// The newest entries, shared by the store and its readers.
    recent: Arc<Mutex<RecentEntries>>,
}

/// The newest entries of a log, in memory, with no gap between them. openraft reads each entry
/// back soon after it is appended: the leader once per follower to replicate it, and every
/// node once to apply it. Reading those from memory saves a sled lookup and a decode each
/// time (in a profile of the cluster benchmark, those reads took about 4% of a node's time).
/// Entries older than the kept ones, or a range that starts before them, come from sled.
#[derive(Default)]
struct RecentEntries {
    /// Consecutive entries, oldest first.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    /// Keeps `entry`, `size` bytes encoded, after the kept ones. An entry that does not follow
    /// the newest kept one replaces every kept entry from its index on, or all of them when
    /// it leaves a gap.
    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        let index = entry.log_id.index;
        match self.first_index() {
            Some(first) if index >= first && index <= first + self.entries.len() as u64 => {
                self.truncate(index);
            }
            _ => self.clear(),
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let Some((_, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Returns the position of entry `index` among the kept ones, clamped to `0..=len`.
    fn position(&self, index: u64) -> usize {
        let len = self.entries.len();
        match self.first_index() {
            Some(first) => usize::try_from(index.saturating_sub(first)).map_or(len, |p| p.min(len)),
            None => 0,
        }
    }

    /// Drops the kept entries from `index` on.
    fn truncate(&mut self, index: u64) {
        let from = self.position(index);
        self.bytes -= self
            .entries
            .drain(from..)
            .map(|(_, size)| size)
            .sum::<usize>();
    }

    /// Drops the kept entries up to `index`.
    fn purge(&mut self, index: u64) {
        let to = self.position(index.saturating_add(1));
        self.bytes -= self
            .entries
            .drain(..to)
            .map(|(_, size)| size)
            .sum::<usize>();
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Returns the entries from `start` to `end` (exclusive) if every one of them is kept.
    fn range(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        let after_last = first + self.entries.len() as u64;
        if start < first || end > after_last {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end.max(start) - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

impl SledLogStore {
    /// Opens the log named `name` in `disk`.
    pub fn open(disk: &LogDisk, name: &str) -> sled::Result<Self> {
        Ok(Self {
            entries: disk.db.open_tree(format!("raft-log-{name}"))?,
            meta: disk.db.open_tree(format!("raft-meta-{name}"))?,
            disk: disk.clone(),
            recent: Arc::default(),
        })
    }

    fn recent(&self) -> MutexGuard<'_, RecentEntries> {
        // The kept entries change only as a whole step under the lock, so a panic elsewhere
        // leaves them consistent.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
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
        let first = match range.start_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(i) => i.checked_add(1),
            Bound::Unbounded => None,
        };
        let after_last = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let (Some(first), Some(after_last)) = (first, after_last)
            && let Some(entries) = self.recent().range(first, after_last)
        {
            return Ok(entries);
        }
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
            let raw = encode(&entry);
            let size = raw.len();
            self.entries
                .insert(index_key(entry.log_id.index), raw)
                .map_err(|e| StorageIOError::write_logs(any(e)))?;
            // Readers see the entry before the flush either way: sled serves inserted
            // records before they reach the disk.
            self.recent().push(entry, size);
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
        self.recent().truncate(log_id.index);
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
        self.recent().purge(log_id.index);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Command;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command(vec![term as u8; 8])),
        }
    }

    fn indexes(entries: &[Entry<TypeConfig>]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    #[test]
    fn recent_entries_serve_whole_ranges_only() {
        let mut recent = RecentEntries::default();
        for index in 5..10 {
            recent.push(entry(1, index), 100);
        }
        assert_eq!(
            indexes(&recent.range(6, 9).unwrap()),
            [(1, 6), (1, 7), (1, 8)]
        );
        assert!(
            recent.range(4, 7).is_none(),
            "starts before the kept entries"
        );
        assert!(recent.range(8, 11).is_none(), "ends after the kept entries");
        assert_eq!(recent.range(7, 7).unwrap().len(), 0);

        // An entry that replaces index 7 drops 7 to 9 first.
        recent.push(entry(2, 7), 100);
        assert_eq!(
            indexes(&recent.range(5, 8).unwrap()),
            [(1, 5), (1, 6), (2, 7)]
        );
        assert!(recent.range(8, 9).is_none());

        recent.truncate(6);
        assert_eq!(indexes(&recent.range(5, 6).unwrap()), [(1, 5)]);
        recent.purge(5);
        assert!(recent.range(5, 6).is_none());
        assert_eq!(recent.bytes, 0);

        // An entry after a gap (a snapshot installed meanwhile) starts the window again.
        recent.push(entry(2, 20), 100);
        recent.push(entry(2, 30), 100);
        assert!(recent.range(20, 21).is_none());
        assert_eq!(indexes(&recent.range(30, 31).unwrap()), [(2, 30)]);
    }

    #[test]
    fn recent_entries_stay_bounded() {
        let mut recent = RecentEntries::default();
        for index in 1..=(RECENT_ENTRIES as u64 + 10) {
            recent.push(entry(1, index), 10);
        }
        assert_eq!(recent.entries.len(), RECENT_ENTRIES);
        assert_eq!(recent.first_index(), Some(11));
        assert_eq!(recent.bytes, RECENT_ENTRIES * 10);

        let big = RECENT_BYTES / 3 + 1;
        for index in 1..=3 {
            recent.push(entry(2, 1000 + index), big);
        }
        assert!(recent.bytes <= RECENT_BYTES);
        assert_eq!(recent.first_index(), Some(1002));
    }
}
