//! Durability marks: a number written into the database before each flush and, once the
//! flush is done, into the file `durable-mark` beside it.
//!
//! sled recovers its log only up to the first record it cannot read, and logs only a WARN
//! line. A file damaged that way (bytes written over its start) started without the last
//! acknowledged entries of a group, whose numbers then went to new messages. A mark is
//! written after the writes its flush covers, and sled keeps a prefix of its log. So a
//! database that lost any acknowledged write lost the mark of that write's flush too, and
//! [`Marks::open`] rejects it because the database's number is lower than the file's.
//!
//! NOTE: the file is rewritten in place (20 digits and a newline at offset 0) and synced
//! with `fdatasync`, which relies on the disk writing those 21 bytes of one sector whole.

use crate::StorageError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Key in `meta` of the latest mark.
const MARK_KEY: &[u8] = b"durable_mark";

/// File beside the database with the latest mark whose flush is done.
const MARK_FILE: &str = "durable-mark";

/// The durability marks of one database.
pub(crate) struct Marks {
    dir: PathBuf,
    meta: sled::Tree,
    /// The latest mark staged.
    staged: Mutex<u64>,
    /// The mark file, opened by the first [`Marks::record`].
    file: Mutex<Option<File>>,
}

impl Marks {
    /// Checks the database's mark against the file's and returns the marks of `dir`.
    pub(crate) fn open(dir: &Path, meta: sled::Tree) -> Result<Self, StorageError> {
        let stored = read_mark(&meta)?;
        let path = dir.join(MARK_FILE);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                text.trim()
                    .parse::<u64>()
                    .map_err(|e| StorageError::Corrupt {
                        what: path.display().to_string(),
                        detail: format!("{e}; the file should contain one number"),
                    })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StorageError::Open {
                    path: path.display().to_string(),
                    detail: format!("{e}; check its permissions"),
                });
            }
        };
        let Some(recorded) = recorded else {
            // The file is written at the first open, before any mark, so a database with a
            // mark and no file lost the file: without it, lost writes would go unnoticed.
            if stored > 0 {
                return Err(StorageError::Corrupt {
                    what: format!("storage in {}", dir.display()),
                    detail: format!(
                        "the database has durability mark {stored}, but {} is missing, so \
                         writes the database may have lost cannot be detected; restore the \
                         data directory from a backup, or, if only the file was removed and \
                         the database is known to be whole, write {stored} into it",
                        path.display()
                    ),
                });
            }
            let marks = Self::with_mark(dir, meta, stored);
            marks.record(stored)?;
            return Ok(marks);
        };
        if stored < recorded {
            return Err(StorageError::Corrupt {
                what: format!("storage in {}", dir.display()),
                detail: format!(
                    "the database has lost writes that were on disk: its durability mark is \
                     {stored}, but {} records {recorded}; restore the data directory from a \
                     backup, or, on a node of a cluster, empty it and start the node with \
                     --seeds",
                    path.display()
                ),
            });
        }
        Ok(Self::with_mark(dir, meta, stored))
    }

    fn with_mark(dir: &Path, meta: sled::Tree, stored: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            meta,
            staged: Mutex::new(stored),
            file: Mutex::new(None),
        }
    }

    /// Writes the next mark into the database (not yet flushed) and returns it.
    pub(crate) fn stage(&self) -> Result<u64, StorageError> {
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        *staged += 1;
        self.meta.insert(MARK_KEY, &staged.to_be_bytes())?;
        Ok(*staged)
    }

    /// Records `mark` in the file once a flush that covers it is done. Blocks on one
    /// `fdatasync`, and on a directory sync when it creates the file.
    pub(crate) fn record(&self, mark: u64) -> Result<(), StorageError> {
        let path = self.dir.join(MARK_FILE);
        let failed = |e: std::io::Error| {
            StorageError::FlushFailed(format!("writing {} failed: {e}", path.display()))
        };
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let file = match slot.take() {
            Some(file) => file,
            None => {
                let existed = path.exists();
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(failed)?;
                if !existed {
                    File::open(&self.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(failed)?;
                }
                file
            }
        };
        // Fixed width, so a new mark always covers the whole previous one.
        file.write_all_at(format!("{mark:020}\n").as_bytes(), 0)
            .map_err(failed)?;
        file.sync_data().map_err(failed)?;
        *slot = Some(file);
        Ok(())
    }
}

fn read_mark(meta: &sled::Tree) -> Result<u64, StorageError> {
    let Some(raw) = meta.get(MARK_KEY)? else {
        return Ok(0);
    };
    let bytes = <[u8; 8]>::try_from(raw.as_ref()).map_err(|_| StorageError::Corrupt {
        what: "durability mark".into(),
        detail: format!("{} bytes instead of 8", raw.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Sets the database's mark to `mark`, as a database that lost writes would have it.
#[cfg(test)]
pub(crate) fn set_stored_mark(meta: &sled::Tree, mark: u64) {
    meta.insert(MARK_KEY, &mark.to_be_bytes()).unwrap();
}
