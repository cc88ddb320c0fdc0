//! Writes of several keys that a crash keeps whole or not at all, at the cost of plain inserts.
//!
//! sled's own `apply_batch` seals and writes out its current log buffer twice when a batch
//! starts, before and after it reserves the batch's manifest (`PageCache::pin_log` in sled
//! 0.34), so each batch costs two buffer writes however small it is. Measured on the benchmark machine with the
//! store's settings, a batch of one 300-byte insert ran at about 13,000 per second where the
//! same insert alone ran at about 125,000 (see `docs/benchmarks.md`). Every accepted message
//! and key event is such a batch, so that cost bounded the node.
//!
//! A [`WriteSet`] of two or more writes goes through a redo record instead:
//! 1. one insert in the `redo` tree contains every write of the set;
//! 2. the writes follow as plain inserts and removes;
//! 3. the redo record is removed.
//!
//! sled recovers its log as a prefix: it never keeps a write whose predecessor in the log was
//! lost (see "linearizability" in sled's `pagecache/segment.rs`). So after a crash either the
//! redo record is gone with nothing of the set, or it is there and [`AtomicWriter::open`]
//! applies every write of it again before anything reads the database. Applying a write twice
//! gives the same result, so a set that was complete is unchanged by that.
//!
//! Sets are applied one at a time under a mutex, so a set replayed at open cannot overtake a
//! later set that wrote the same key: a later set starts only after the earlier one's redo
//! record is gone.

use crate::StorageError;
use sled::IVec;
use std::sync::Mutex;

/// Name of the tree that contains the redo records.
const REDO_TREE: &str = "redo";

/// Version byte that starts every redo record.
const RECORD_VERSION: u8 = 1;

/// Writes to one tree that [`AtomicWriter::apply`] makes all or nothing.
pub(crate) struct WriteSet {
    tree: sled::Tree,
    /// Each key with its new value, or `None` to remove it, in the order given.
    writes: Vec<(IVec, Option<IVec>)>,
}

impl WriteSet {
    pub(crate) fn new(tree: &sled::Tree) -> Self {
        Self {
            tree: tree.clone(),
            writes: Vec::new(),
        }
    }

    pub(crate) fn insert(&mut self, key: impl Into<IVec>, value: impl Into<IVec>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    pub(crate) fn remove(&mut self, key: impl Into<IVec>) {
        self.writes.push((key.into(), None));
    }

    /// Encodes the set as a redo record: the version, the tree name, the number of writes, then
    /// each write as a kind byte (0 remove, 1 insert), the key and, for inserts, the value, each
    /// with a u32 big-endian length.
    fn encode(&self) -> Vec<u8> {
        let name = self.tree.name();
        let size: usize = self
            .writes
            .iter()
            .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, |v| v.len()))
            .sum();
        let mut out = Vec::with_capacity(7 + name.len() + size);
        out.push(RECORD_VERSION);
        put_bytes(&mut out, &name);
        out.extend_from_slice(&(self.writes.len() as u32).to_be_bytes());
        for (key, value) in &self.writes {
            out.push(u8::from(value.is_some()));
            put_bytes(&mut out, key);
            if let Some(value) = value {
                put_bytes(&mut out, value);
            }
        }
        out
    }

    fn write_plainly(&self) -> Result<(), sled::Error> {
        for (key, value) in &self.writes {
            match value {
                Some(value) => self.tree.insert(key, value.clone())?,
                None => self.tree.remove(key)?,
            };
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a redo record back; `None` if it is cut short or malformed.
struct RecordReader<'a> {
    raw: &'a [u8],
}

impl<'a> RecordReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.raw.split_at_checked(n)?;
        self.raw = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn decode(db: &sled::Db, raw: &[u8]) -> Result<Option<WriteSet>, sled::Error> {
        let mut reader = RecordReader { raw };
        let Some(&[RECORD_VERSION]) = reader.take(1) else {
            return Ok(None);
        };
        let Some(name) = reader.bytes() else {
            return Ok(None);
        };
        let Some(count) = reader.u32() else {
            return Ok(None);
        };
        let mut set = WriteSet::new(&db.open_tree(name)?);
        for _ in 0..count {
            let parsed = (|| {
                let kind = reader.take(1)?[0];
                let key = reader.bytes()?;
                match kind {
                    0 => Some((IVec::from(key), None)),
                    1 => Some((IVec::from(key), Some(IVec::from(reader.bytes()?)))),
                    _ => None,
                }
            })();
            let Some(write) = parsed else {
                return Ok(None);
            };
            set.writes.push(write);
        }
        Ok(reader.raw.is_empty().then_some(set))
    }
}

/// Applies [`WriteSet`]s so that a crash keeps each whole or not at all (see the module docs).
pub(crate) struct AtomicWriter {
    redo: sled::Tree,
    /// Id of the next redo record. The mutex is held while a set is written.
    next_id: Mutex<u64>,
}

impl AtomicWriter {
    /// Opens the writer of `db` and completes the sets a crash interrupted. Returns the writer
    /// and the number of sets completed.
    pub(crate) fn open(db: &sled::Db) -> Result<(Self, usize), StorageError> {
        let redo = db.open_tree(REDO_TREE)?;
        let mut completed = 0;
        for item in redo.iter() {
            let (id, raw) = item?;
            let set = RecordReader::decode(db, &raw)?.ok_or_else(|| StorageError::Corrupt {
                what: format!("redo record of {} bytes", raw.len()),
                detail: "cut short or malformed, so an interrupted write cannot be completed; \
                         restore the data directory from a backup"
                    .into(),
            })?;
            set.write_plainly()?;
            redo.remove(id)?;
            completed += 1;
        }
        if completed > 0 {
            db.flush()?;
        }
        Ok((
            Self {
                redo,
                next_id: Mutex::new(0),
            },
            completed,
        ))
    }

    /// Applies every write of `set`, in order. A set of one write needs no redo record.
    ///
    /// If this fails half-way (an I/O error of sled), the next open completes the set.
    pub(crate) fn apply(&self, set: WriteSet) -> Result<(), StorageError> {
        let mut next_id = self
            .next_id
            .lock()
            .map_err(|_| StorageError::FlushFailed("redo record lock poisoned".into()))?;
        if set.writes.len() <= 1 {
            set.write_plainly()?;
            return Ok(());
        }
        let id = next_id.to_be_bytes();
        *next_id += 1;
        self.redo.insert(id, set.encode())?;
        set.write_plainly()?;
        self.redo.remove(id)?;
        Ok(())
    }

    /// Writes the redo record of `set` and nothing else, as a crash right after step 1 would
    /// leave it.
    #[cfg(test)]
    pub(crate) fn record_only(&self, set: &WriteSet) -> Result<(), StorageError> {
        let mut next_id = self.next_id.lock().unwrap();
        self.redo.insert(next_id.to_be_bytes(), set.encode())?;
        *next_id += 1;
        Ok(())
    }
}
