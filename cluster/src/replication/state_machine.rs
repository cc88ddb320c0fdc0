//! The state machine side of a replicated log: hands committed commands to the [`Applier`],
//! and keeps in sled the last applied log id, the membership and the latest snapshot.

use super::{Applier, CommandResult, LogDisk, RaftNodeId, TypeConfig, any, encode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const APPLIED_KEY: &[u8] = b"applied";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
/// Marks a snapshot whose import into the applier began and has not ended.
const INSTALLING_KEY: &[u8] = b"installing";

/// Progress of the state machine, written after every applied batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<RaftNodeId>>,
    membership: StoredMembership<RaftNodeId, BasicNode>,
}

/// The latest snapshot: its metadata and the name of its file in the log's snapshot
/// directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftNodeId, BasicNode>,
    file: String,
}

/// A snapshot as versions before snapshot files stored it: its data inside the record.
#[derive(Deserialize)]
struct InlineSnapshot {
    meta: SnapshotMeta<RaftNodeId, BasicNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// Returns a file name for the snapshot with id `id`, made by `origin` (`built` or
/// `installed`): the id's letters, digits and dashes, with any other character as `_`.
fn snapshot_file_name(origin: &str, id: &str) -> String {
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{origin}-{id}.snap")
}

/// Start of every snapshot file, before the snapshot's metadata and the applier's data.
const FILE_MAGIC: &[u8; 8] = b"ATLRAFT1";

/// Largest metadata a snapshot file's header may name, in bytes.
const MAX_HEADER: u32 = 1 << 20;

/// Writes the header of a snapshot file: [`FILE_MAGIC`], then `meta` with a u32 big-endian
/// length. The applier's data follows.
fn write_header(
    out: &mut std::fs::File,
    meta: &SnapshotMeta<RaftNodeId, BasicNode>,
) -> Result<(), String> {
    let meta = encode(meta);
    let mut header = FILE_MAGIC.to_vec();
    header.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    header.extend_from_slice(&meta);
    std::io::Write::write_all(out, &header).map_err(|e| format!("cannot write: {e}"))
}

/// Checks a received snapshot file in full against the metadata it was sent under.
pub(super) type SnapshotCheck = Arc<
    dyn Fn(&SnapshotMeta<RaftNodeId, BasicNode>, &mut std::fs::File) -> Result<(), String>
        + Send
        + Sync,
>;

/// Returns the check that an install makes (the header, then `applier`'s data), for the
/// endpoint to make before it hands a received snapshot to openraft.
pub(super) fn snapshot_check(applier: Arc<dyn Applier>) -> SnapshotCheck {
    Arc::new(move |meta, file| read_header(file, meta).and_then(|()| applier.check(file)))
}

/// Reads the header of a snapshot file from its start, checks that it names the snapshot
/// `expected`, and leaves the file at the applier's data.
fn read_header(
    file: &mut std::fs::File,
    expected: &SnapshotMeta<RaftNodeId, BasicNode>,
) -> Result<(), String> {
    use std::io::{Read, Seek};
    file.rewind().map_err(|e| format!("cannot read: {e}"))?;
    let mut start = [0u8; 12];
    file.read_exact(&mut start)
        .map_err(|e| format!("cannot read its header: {e}"))?;
    if &start[..8] != FILE_MAGIC {
        return Err("it does not start with the snapshot file mark".into());
    }
    let len = u32::from_be_bytes([start[8], start[9], start[10], start[11]]);
    if len > MAX_HEADER {
        return Err(format!("its header claims {len} bytes"));
    }
    let mut raw = vec![0u8; len as usize];
    file.read_exact(&mut raw)
        .map_err(|e| format!("cannot read its header: {e}"))?;
    let found: SnapshotMeta<RaftNodeId, BasicNode> =
        rmp_serde::from_slice(&raw).map_err(|e| format!("its header does not decode: {e}"))?;
    if found != *expected {
        return Err(format!(
            "it contains snapshot {} (last entry {:?}), not {} (last entry {:?})",
            found.snapshot_id,
            found.last_log_id.map(|id| id.index),
            expected.snapshot_id,
            expected.last_log_id.map(|id| id.index)
        ));
    }
    Ok(())
}

/// State machine of one replicated log.
pub struct SledStateMachine {
    tree: sled::Tree,
    disk: LogDisk,
    applier: Arc<dyn Applier>,
    applied: Applied,
    /// Directory of this log's snapshot files.
    dir: PathBuf,
    /// Snapshots built by this replica so far, for unique snapshot ids.
    built: u64,
    /// File that the snapshot being received goes to.
    receiving: Option<PathBuf>,
    /// Files of snapshots that openraft builds in a task of its own and has not recorded yet.
    /// An install that ends meanwhile keeps them.
    building: Arc<Mutex<HashSet<String>>>,
}

impl SledStateMachine {
    /// Opens the state machine of the log named `name` in `disk`, whose commands go to
    /// `applier`. A stored snapshot is not given to the applier again: it must keep its own
    /// state across restarts, up to the last applied index. A snapshot whose import a crash
    /// interrupted is imported again first.
    pub fn open(disk: &LogDisk, name: &str, applier: Arc<dyn Applier>) -> sled::Result<Self> {
        let tree = disk.db.open_tree(format!("raft-sm-{name}"))?;
        let damaged = |what: &str, e: &dyn std::fmt::Display| {
            sled::Error::Unsupported(format!("{what} of log {name}: {e}"))
        };
        let applied = match tree.get(APPLIED_KEY)? {
            Some(raw) => {
                rmp_serde::from_slice(&raw).map_err(|e| damaged("state machine record", &e))?
            }
            None => Applied::default(),
        };
        let dir = disk.snapshots.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| damaged(&format!("snapshot directory {}", dir.display()), &e))?;
        let mut machine = Self {
            tree,
            disk: disk.clone(),
            applier,
            applied,
            dir,
            built: 0,
            receiving: None,
            building: Arc::default(),
        };
        machine
            .finish_install()
            .map_err(|e| damaged("interrupted snapshot install", &e))?;
        machine
            .migrate_inline()
            .map_err(|e| damaged("stored snapshot", &e))?;
        machine.remove_other_files(true);
        Ok(machine)
    }

    /// Imports again a snapshot whose import was interrupted, and records it as applied.
    fn finish_install(&mut self) -> Result<(), String> {
        let Some(raw) = self.tree.get(INSTALLING_KEY).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let stored: StoredSnapshot = rmp_serde::from_slice(&raw).map_err(|e| e.to_string())?;
        let path = self.dir.join(&stored.file);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            // The marker is written before the file takes its name: the import never began.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(snapshot = %stored.meta.snapshot_id, "a crash ended a snapshot install before its import began; the leader sends it again");
                self.tree
                    .remove(INSTALLING_KEY)
                    .and_then(|_| self.disk.db.flush())
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        tracing::warn!(snapshot = %stored.meta.snapshot_id, file = %path.display(), "importing again a snapshot whose import a crash interrupted");
        read_header(&mut file, &stored.meta)
            .and_then(|()| self.applier.restore(&mut file))
            .map_err(|e| {
                format!(
                    "the snapshot file {} of an interrupted install cannot be imported again \
                     ({e}), so this log's part of the state is half replaced. Stop the node, \
                     empty its data directory and start it again: it rejoins as a new member \
                     and catches up",
                    path.display()
                )
            })?;
        self.applied = Applied {
            last_applied: stored.meta.last_log_id,
            membership: stored.meta.last_membership.clone(),
        };
        self.tree
            .insert(SNAPSHOT_KEY, encode(&stored))
            .and_then(|_| self.tree.insert(APPLIED_KEY, encode(&self.applied)))
            .and_then(|_| self.tree.remove(INSTALLING_KEY))
            .and_then(|_| self.disk.db.flush())
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Moves a snapshot that an earlier version kept inside its record to a file.
    fn migrate_inline(&mut self) -> Result<(), String> {
        let Some(raw) = self.tree.get(SNAPSHOT_KEY).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if rmp_serde::from_slice::<StoredSnapshot>(&raw).is_ok() {
            return Ok(());
        }
        let inline: InlineSnapshot = rmp_serde::from_slice(&raw).map_err(|e| e.to_string())?;
        let file = snapshot_file_name("built", &inline.meta.snapshot_id);
        self.write_file(&file, |out| {
            write_header(out, &inline.meta)?;
            std::io::Write::write_all(out, &inline.data).map_err(|e| e.to_string())
        })?;
        let stored = StoredSnapshot {
            meta: inline.meta,
            file,
        };
        self.tree
            .insert(SNAPSHOT_KEY, encode(&stored))
            .and_then(|_| self.disk.db.flush())
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Opens the file of the snapshot `stored` and checks it in full: its header and the
    /// applier's data. Returns it at its start, ready to send.
    fn checked_file(&self, stored: &StoredSnapshot) -> Result<std::fs::File, String> {
        let path = self.dir.join(&stored.file);
        let mut file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        read_header(&mut file, &stored.meta)
            .and_then(|()| self.applier.check(&mut file))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::io::Seek::rewind(&mut file).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(file)
    }

    /// Writes the file `name` in the snapshot directory with `fill`, through a temporary
    /// name, and makes it durable.
    fn write_file(
        &self,
        name: &str,
        fill: impl FnOnce(&mut std::fs::File) -> Result<(), String>,
    ) -> Result<(), String> {
        let building = self.dir.join(format!("{name}.building"));
        let mut file = std::fs::File::create(&building)
            .map_err(|e| format!("cannot create {}: {e}", building.display()))?;
        fill(&mut file)?;
        file.sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", building.display()))?;
        self.place(&building, name)
    }

    /// Renames `from` to `name` in the snapshot directory and syncs the directory.
    fn place(&self, from: &Path, name: &str) -> Result<(), String> {
        let to = self.dir.join(name);
        std::fs::rename(from, &to)
            .map_err(|e| format!("cannot rename {} to {}: {e}", from.display(), to.display()))?;
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", self.dir.display()))
    }

    /// Removes the files in the snapshot directory other than those of the recorded snapshot
    /// and of one being installed, and with `unfinished` also `.building` and `.part` files.
    /// Failures are logged only.
    fn remove_other_files(&self, unfinished: bool) {
        let mut keep: Vec<String> = self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for key in [SNAPSHOT_KEY, INSTALLING_KEY] {
            if let Ok(Some(raw)) = self.tree.get(key)
                && let Ok(stored) = rmp_serde::from_slice::<StoredSnapshot>(&raw)
            {
                keep.push(stored.file);
            }
        }
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "listing the snapshot files to remove old ones failed");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let finished = name.ends_with(".snap");
            if keep.contains(&name) || (!finished && !unfinished) {
                continue;
            }
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "removing an old snapshot file failed");
            }
        }
    }

    fn record_applied(&self) -> Result<(), StorageError<RaftNodeId>> {
        self.tree
            .insert(APPLIED_KEY, encode(&self.applied))
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        Ok(())
    }
}

/// Opens the snapshot file `path` for openraft.
async fn open_snapshot_file(path: &Path) -> Result<tokio::fs::File, StorageError<RaftNodeId>> {
    tokio::fs::File::open(path).await.map_err(|e| {
        StorageIOError::read_snapshot(
            None,
            any(std::io::Error::new(
                e.kind(),
                format!("snapshot file {}: {e}", path.display()),
            )),
        )
        .into()
    })
}

/// A snapshot whose file [`SledStateMachine::get_snapshot_builder`] wrote in the state
/// machine's task, before any later command was applied. Building it only records the file.
pub struct SnapshotBuilder {
    tree: sled::Tree,
    disk: LogDisk,
    dir: PathBuf,
    snapshot: StoredSnapshot,
    /// Reason the snapshot file could not be written, if it failed.
    failure: Option<String>,
    /// The state machine's files of builds in progress, this one's included until it ends.
    building: Arc<Mutex<HashSet<String>>>,
}

impl Drop for SnapshotBuilder {
    fn drop(&mut self) {
        self.building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.snapshot.file);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftNodeId>> {
        let signature = Some(self.snapshot.meta.signature());
        if let Some(failure) = &self.failure {
            return Err(StorageIOError::write_snapshot(
                signature,
                any(std::io::Error::other(failure.clone())),
            )
            .into());
        }
        // A snapshot installed from the leader while this one was built may be newer: it
        // stays the recorded one, and openraft ignores this older build.
        let recorded = self
            .tree
            .get(SNAPSHOT_KEY)
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), any(e)))?
            .and_then(|raw| rmp_serde::from_slice::<StoredSnapshot>(&raw).ok());
        let newer_recorded =
            recorded.is_some_and(|stored| stored.meta.last_log_id > self.snapshot.meta.last_log_id);
        if !newer_recorded {
            self.tree
                .insert(SNAPSHOT_KEY, encode(&self.snapshot))
                .map_err(|e| StorageIOError::write_snapshot(signature.clone(), any(e)))?;
        }
        self.disk
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature, any(e)))?;
        Ok(Snapshot {
            meta: self.snapshot.meta.clone(),
            snapshot: Box::new(open_snapshot_file(&self.dir.join(&self.snapshot.file)).await?),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<RaftNodeId>>,
            StoredMembership<RaftNodeId, BasicNode>,
        ),
        StorageError<RaftNodeId>,
    > {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<RaftNodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::default(),
                EntryPayload::Normal(command) => {
                    CommandResult(self.applier.apply(entry.log_id.index, &command.0))
                }
                EntryPayload::Membership(membership) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandResult::default()
                }
            };
            results.push(result);
        }
        // No fsync here: the entries are durable in the log already. sled recovers a prefix of
        // its writes after a crash, so the applied state it recovers matches the changes it
        // recovers, and openraft applies the rest again from the log. The next log append,
        // or a snapshot, flushes the whole database.
        self.record_applied()?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.built += 1;
        let last = self.applied.last_applied;
        let snapshot_id = match last {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.built),
            None => format!("none-{}", self.built),
        };
        // Files are removed and written here, in the state machine's own task, so no command
        // is applied while the applier exports its state, and no install runs meanwhile. The
        // file of the snapshot recorded last stays until the next one is recorded.
        self.remove_other_files(false);
        let file = snapshot_file_name("built", &snapshot_id);
        self.building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file.clone());
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.applied.membership.clone(),
            snapshot_id,
        };
        let applier = Arc::clone(&self.applier);
        let failure = self
            .write_file(&file, |out| {
                write_header(out, &meta)?;
                applier.snapshot(out)
            })
            .err();
        SnapshotBuilder {
            tree: self.tree.clone(),
            disk: self.disk.clone(),
            dir: self.dir.clone(),
            failure,
            snapshot: StoredSnapshot { meta, file },
            building: Arc::clone(&self.building),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<RaftNodeId>> {
        // A transfer that ended without an install left its file behind.
        if let Some(earlier) = self.receiving.take()
            && let Err(e) = std::fs::remove_file(&earlier)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %earlier.display(), error = %e, "cannot remove the file of an abandoned snapshot transfer");
        }
        self.built += 1;
        let path = self.dir.join(format!("receiving-{}.part", self.built));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(
                    None,
                    any(std::io::Error::new(
                        e.kind(),
                        format!("cannot create {}: {e}", path.display()),
                    )),
                )
            })?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<RaftNodeId>> {
        let signature = Some(meta.signature());
        let failed = |e: String| -> StorageError<RaftNodeId> {
            StorageIOError::write_snapshot(signature.clone(), any(std::io::Error::other(e))).into()
        };
        let Some(received) = self.receiving.take() else {
            return Err(failed("no snapshot is being received".into()));
        };
        let mut file = *snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| failed(format!("cannot write {}: {e}", received.display())))?;
        let mut file = file.into_std().await;
        file.sync_all()
            .map_err(|e| failed(format!("cannot sync {}: {e}", received.display())))?;
        // Checked in full before anything changes. openraft stops the log on this error,
        // and a restart of the node starts it again without the file.
        if let Err(e) = read_header(&mut file, meta).and_then(|()| self.applier.check(&mut file)) {
            let _ = std::fs::remove_file(&received);
            tracing::error!(snapshot = %meta.snapshot_id, error = %e, "rejected a damaged snapshot from the leader; this log stops until the node restarts");
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                any(std::io::Error::other(format!(
                    "the received snapshot is damaged: {e}"
                ))),
            )
            .into());
        }
        // From the marker on, a crash leaves the import to be done again at the next open.
        // The marker goes first, so a file it names exists unless the import never started.
        let name = snapshot_file_name("installed", &meta.snapshot_id);
        let stored = StoredSnapshot {
            meta: meta.clone(),
            file: name.clone(),
        };
        self.tree
            .insert(INSTALLING_KEY, encode(&stored))
            .map_err(|e| failed(e.to_string()))?;
        self.disk.flush().await.map_err(|e| failed(e.to_string()))?;
        // openraft hands back the file this node created for the transfer, unless a caller
        // replaced it (as openraft's storage tests do): that one is copied instead.
        let created = file.metadata().ok().zip(std::fs::metadata(&received).ok());
        if created
            .is_some_and(|(given, made)| given.ino() == made.ino() && given.dev() == made.dev())
        {
            self.place(&received, &name).map_err(failed)?;
        } else {
            std::io::Seek::rewind(&mut file).map_err(|e| failed(e.to_string()))?;
            self.write_file(&name, |out| {
                std::io::copy(&mut file, out)
                    .map(|_| ())
                    .map_err(|e| format!("cannot copy the received snapshot: {e}"))
            })
            .map_err(failed)?;
            let _ = std::fs::remove_file(&received);
        }
        read_header(&mut file, meta).map_err(failed)?;
        if let Err(e) = self.applier.restore(&mut file) {
            // The marker stays: the next open imports the file again.
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                any(std::io::Error::other(e)),
            )
            .into());
        }
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.tree
            .insert(SNAPSHOT_KEY, encode(&stored))
            .and_then(|_| self.tree.insert(APPLIED_KEY, encode(&self.applied)))
            .and_then(|_| self.tree.remove(INSTALLING_KEY))
            .map_err(|e| failed(e.to_string()))?;
        self.disk.flush().await.map_err(|e| failed(e.to_string()))?;
        self.remove_other_files(false);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftNodeId>> {
        let Some(raw) = self
            .tree
            .get(SNAPSHOT_KEY)
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            rmp_serde::from_slice(&raw).map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
        // Checked before it is sent or trusted: a damaged file would stop the log of the node
        // that receives it. The applied state is newer than the snapshot, so a new snapshot
        // of it replaces a damaged one.
        match self.checked_file(&stored) {
            Ok(file) => Ok(Some(Snapshot {
                meta: stored.meta,
                snapshot: Box::new(tokio::fs::File::from_std(file)),
            })),
            Err(e) => {
                tracing::error!(snapshot = %stored.meta.snapshot_id, error = %e, "the latest snapshot file is damaged or missing; building a new snapshot from the applied state");
                let mut builder = self.get_snapshot_builder().await;
                let rebuilt = builder.build_snapshot().await?;
                // The damaged file was the recorded one, so the build kept it.
                self.remove_other_files(false);
                Ok(Some(rebuilt))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Command;
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};
    use std::sync::Mutex;

    /// An applier whose state is the bytes of the commands it applied, one after the other.
    #[derive(Default)]
    struct BytesApplier(Mutex<Vec<u8>>);

    impl Applier for BytesApplier {
        fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
            self.0.lock().unwrap().extend_from_slice(command);
            Vec::new()
        }

        fn snapshot(&self, out: &mut std::fs::File) -> Result<(), String> {
            std::io::Write::write_all(out, &self.0.lock().unwrap()).map_err(|e| e.to_string())
        }

        fn check(&self, _input: &mut std::fs::File) -> Result<(), String> {
            Ok(())
        }

        fn restore(&self, input: &mut std::fs::File) -> Result<(), String> {
            let mut state = Vec::new();
            std::io::Read::read_to_end(input, &mut state).map_err(|e| e.to_string())?;
            *self.0.lock().unwrap() = state;
            Ok(())
        }
    }

    fn disk_in(dir: &Path) -> LogDisk {
        let db = sled::open(dir.join("db")).unwrap();
        LogDisk::new(
            db.clone(),
            atlas_storage::Flusher::start(db),
            dir.join("snapshots"),
        )
    }

    /// Returns a state machine whose applier applied `commands`, with a snapshot of them.
    async fn machine_with_snapshot(
        dir: &Path,
        commands: &[&[u8]],
    ) -> (SledStateMachine, Snapshot<TypeConfig>) {
        let applier = Arc::new(BytesApplier::default());
        let mut machine = SledStateMachine::open(&disk_in(dir), "shard-0", applier).unwrap();
        let entries: Vec<Entry<TypeConfig>> = commands
            .iter()
            .enumerate()
            .map(|(i, command)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
                payload: EntryPayload::Normal(Command(command.to_vec())),
            })
            .collect();
        machine.apply(entries).await.unwrap();
        let mut builder = machine.get_snapshot_builder().await;
        let snapshot = builder.build_snapshot().await.unwrap();
        (machine, snapshot)
    }

    #[tokio::test]
    async fn snapshot_file_installs_on_another_replica() {
        let dir = tempfile::tempdir().unwrap();
        let (mut source, mut snapshot) =
            machine_with_snapshot(&dir.path().join("a"), &[b"one ", b"two"]).await;
        assert_eq!(snapshot.meta.last_log_id.map(|id| id.index), Some(2));
        // Building a snapshot removes the files older than the last recorded one.
        let first = snapshot_file_name("built", &snapshot.meta.snapshot_id);
        assert!(source.dir.join(&first).is_file());
        for _ in 0..2 {
            let mut builder = source.get_snapshot_builder().await;
            builder.build_snapshot().await.unwrap();
        }
        assert!(!source.dir.join(&first).exists());
        let files = std::fs::read_dir(&source.dir).unwrap().count();
        assert_eq!(files, 2);

        let applier = Arc::new(BytesApplier::default());
        let target_dir = dir.path().join("b");
        let mut target =
            SledStateMachine::open(&disk_in(&target_dir), "shard-0", applier.clone()).unwrap();
        let mut receiving = target.begin_receiving_snapshot().await.unwrap();
        tokio::io::copy(&mut snapshot.snapshot, &mut *receiving)
            .await
            .unwrap();
        target
            .install_snapshot(&snapshot.meta, receiving)
            .await
            .unwrap();
        assert_eq!(*applier.0.lock().unwrap(), b"one two");
        let (applied, _) = target.applied_state().await.unwrap();
        assert_eq!(applied, snapshot.meta.last_log_id);
        let current = target.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);
    }

    #[tokio::test]
    async fn install_during_a_build_keeps_both() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut newer) =
            machine_with_snapshot(&dir.path().join("a"), &[b"one ", b"two"]).await;
        let (mut target, _) = machine_with_snapshot(&dir.path().join("b"), &[b"one "]).await;

        // openraft builds in a task of its own: the file is written, not yet recorded, when
        // the leader's newer snapshot installs.
        let mut builder = target.get_snapshot_builder().await;
        let mut receiving = target.begin_receiving_snapshot().await.unwrap();
        tokio::io::copy(&mut newer.snapshot, &mut *receiving)
            .await
            .unwrap();
        target
            .install_snapshot(&newer.meta, receiving)
            .await
            .unwrap();
        let built = builder.build_snapshot().await.unwrap();
        assert!(built.meta.last_log_id < newer.meta.last_log_id);

        // The install stays the recorded snapshot.
        let current = target.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, newer.meta);
    }

    #[tokio::test]
    async fn interrupted_install_is_completed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, mut snapshot) =
            machine_with_snapshot(&dir.path().join("a"), &[b"kept"]).await;

        // A crash after the marker and before the end of the import: the file is in place,
        // the marker recorded, and the applier's state and applied index are old.
        let disk = disk_in(&dir.path().join("b"));
        {
            let applier = Arc::new(BytesApplier::default());
            let target = SledStateMachine::open(&disk, "shard-0", applier).unwrap();
            let name = snapshot_file_name("installed", &snapshot.meta.snapshot_id);
            let mut file = tokio::fs::File::create(target.dir.join(&name))
                .await
                .unwrap();
            tokio::io::copy(&mut snapshot.snapshot, &mut file)
                .await
                .unwrap();
            let stored = StoredSnapshot {
                meta: snapshot.meta.clone(),
                file: name,
            };
            target.tree.insert(INSTALLING_KEY, encode(&stored)).unwrap();
            target.disk.db.flush().unwrap();
        }

        // The state machine opens again on the same database, as after a restart.
        let applier = Arc::new(BytesApplier::default());
        let mut target = SledStateMachine::open(&disk, "shard-0", applier.clone()).unwrap();
        assert_eq!(*applier.0.lock().unwrap(), b"kept");
        let (applied, _) = target.applied_state().await.unwrap();
        assert_eq!(applied, snapshot.meta.last_log_id);
        assert!(target.tree.get(INSTALLING_KEY).unwrap().is_none());
        let current = target.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);
    }

    #[tokio::test]
    async fn install_marker_without_its_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (_source, snapshot) = machine_with_snapshot(&dir.path().join("a"), &[b"sent"]).await;
        let disk = disk_in(&dir.path().join("b"));
        {
            let applier = Arc::new(BytesApplier::default());
            let target = SledStateMachine::open(&disk, "shard-0", applier).unwrap();
            let stored = StoredSnapshot {
                meta: snapshot.meta.clone(),
                file: snapshot_file_name("installed", &snapshot.meta.snapshot_id),
            };
            target.tree.insert(INSTALLING_KEY, encode(&stored)).unwrap();
        }

        let applier = Arc::new(BytesApplier::default());
        let mut target = SledStateMachine::open(&disk, "shard-0", applier.clone()).unwrap();
        assert!(applier.0.lock().unwrap().is_empty());
        assert!(target.tree.get(INSTALLING_KEY).unwrap().is_none());
        let (applied, _) = target.applied_state().await.unwrap();
        assert_eq!(applied, None);
    }

    #[tokio::test]
    async fn damaged_or_missing_file_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (mut machine, snapshot) = machine_with_snapshot(dir.path(), &[b"one ", b"two"]).await;
        let path = machine
            .dir
            .join(snapshot_file_name("built", &snapshot.meta.snapshot_id));
        type Damage = fn(&Path);
        let damages: [(&str, Damage); 2] = [
            ("overwritten", |path| {
                std::fs::write(path, b"not a snapshot").unwrap()
            }),
            ("deleted", |path| std::fs::remove_file(path).unwrap()),
        ];
        let mut previous = snapshot.meta;
        let mut path = path;
        for (case, damage) in damages {
            damage(&path);
            let mut rebuilt = machine.get_current_snapshot().await.unwrap().unwrap();
            assert_ne!(rebuilt.meta.snapshot_id, previous.snapshot_id, "{case}");
            assert_eq!(rebuilt.meta.last_log_id, previous.last_log_id, "{case}");
            let mut data = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut rebuilt.snapshot, &mut data)
                .await
                .unwrap();
            assert!(data.ends_with(b"one two"), "{case}");
            let files: Vec<_> = std::fs::read_dir(&machine.dir)
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .collect();
            assert_eq!(files.len(), 1, "{case}: the damaged file stays: {files:?}");
            path = machine
                .dir
                .join(snapshot_file_name("built", &rebuilt.meta.snapshot_id));
            previous = rebuilt.meta;
        }
    }

    #[tokio::test]
    async fn snapshot_of_another_index_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (_old, mut stale) = machine_with_snapshot(&dir.path().join("a"), &[b"old"]).await;
        let (_new, current) =
            machine_with_snapshot(&dir.path().join("b"), &[b"old", b" new"]).await;

        // The file of the older snapshot arrives under the newer snapshot's metadata.
        let applier = Arc::new(BytesApplier::default());
        let mut target =
            SledStateMachine::open(&disk_in(&dir.path().join("c")), "shard-0", applier.clone())
                .unwrap();
        let mut receiving = target.begin_receiving_snapshot().await.unwrap();
        tokio::io::copy(&mut stale.snapshot, &mut *receiving)
            .await
            .unwrap();
        let result = target.install_snapshot(&current.meta, receiving).await;
        let error = result.unwrap_err().to_string();
        assert!(error.contains("damaged"), "{error}");
        assert!(applier.0.lock().unwrap().is_empty());
        assert!(target.tree.get(INSTALLING_KEY).unwrap().is_none());
        let (applied, _) = target.applied_state().await.unwrap();
        assert_eq!(applied, None);
        let files = std::fs::read_dir(&target.dir).unwrap().count();
        assert_eq!(files, 0);
    }
}
