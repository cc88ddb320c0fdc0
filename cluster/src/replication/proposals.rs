//! The node's shared state on the replicated logs: [`ClusterReplicator`] proposes changes from
//! any node to the log that carries them, and [`SharedState`] applies committed ones to every
//! node's store.
//!
//! Each shard's groups and KeyPackage sets change through the shard's own log, and the
//! directory (devices, the key transparency log, accounts) through one more log. A change
//! reads and writes state of one log only (see `atlas_storage::Change::shard_key`), so the
//! logs need no order between them.

use super::transport::{WriteRefused, forward_write, read_index_from, read_index_here, write_here};
use super::{Applier, Command, CommandResult, Raft, RaftNodeId, encode};
use crate::placement::shard_of;
use atlas_storage::{
    Barrier, Change, ImportedNews, Outcome, Proposal, ReadScope, Refused, Replicator,
    ShardLogStart, SharedPart, StorageError, Store,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Time a node waits for its own replica to apply a change that the leader committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Time a proposal or a read barrier keeps following leadership while it moves, as it does
/// for a few elections when a partition heals.
const LEADER_CHASE: Duration = Duration::from_secs(6);

/// Time a proposal or a read waits for an election to end.
const LEADER_WAIT: Duration = Duration::from_secs(2);

/// A change as a replicated log carries it.
#[derive(Serialize, Deserialize)]
struct Proposed {
    /// Raft id of the node that proposed it.
    origin: RaftNodeId,
    change: Change,
    /// More changes written in the same entry, applied after `change` in order. The result of
    /// an entry that has any is a list of [`Applied`], one per change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more: Vec<Change>,
}

/// Maximum number of appends that one entry of a log carries (see [`AppendQueue`]).
const APPENDS_PER_ENTRY: usize = 64;

/// The result of applying a [`Proposed`] change, as the log returns it to the proposer.
type Applied = Result<Outcome, Refused>;

/// Called on every node but the proposer's for each change it applied.
pub type AppliedHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// Times of one entry of appends that a log's queue wrote (see [`AppendQueue`]), for metrics.
#[derive(Debug)]
pub struct AppendTimes<'a> {
    /// How long each append of the entry waited in the queue, mostly for the entry before
    /// it, in queue order.
    pub waits: &'a [Duration],
    /// The time from proposing the entry to its result: committed on a majority and applied
    /// on the leader, or failed.
    pub write: Duration,
    /// Whether the write failed.
    pub failed: bool,
}

/// Function called once per entry that a log's append queue wrote (see [`AppendTimes`]).
pub type AppendObserver = Arc<dyn Fn(&AppendTimes<'_>) + Send + Sync>;

/// Called on a node that installed a snapshot from the leader, with each group whose log the
/// snapshot extended or that it gave new Welcomes. The entries it carried were never applied
/// here one by one, so the applied-change hook did not see them.
pub type InstalledHook = Arc<dyn Fn(&[ImportedNews]) + Send + Sync>;

/// Called on every node when the directory log applies [`Change::StartShardLogs`].
pub type ShardStartHook = Arc<dyn Fn(&ShardLogStart) + Send + Sync>;

/// Applies the committed changes of one log to this node's store.
pub struct SharedState {
    store: Store,
    node: RaftNodeId,
    /// The part of the shared state that the log carries, for snapshots.
    part: SharedPart,
    /// The index of the last entry applied, written after each change, so that a change
    /// applied just before a crash is not applied twice.
    progress: sled::Tree,
    hook: OnceLock<AppliedHook>,
    installed_hook: OnceLock<InstalledHook>,
    start_hook: OnceLock<ShardStartHook>,
}

const PROGRESS_KEY: &[u8] = b"applied";

impl SharedState {
    pub fn new(
        store: Store,
        node: RaftNodeId,
        log: &str,
        part: SharedPart,
    ) -> Result<Self, StorageError> {
        let progress = store
            .sled_db()
            .open_tree(format!("raft.{log}.shared_progress"))?;
        Ok(Self {
            store,
            node,
            part,
            progress,
            hook: OnceLock::new(),
            installed_hook: OnceLock::new(),
            start_hook: OnceLock::new(),
        })
    }

    /// Sets the function called for changes that other nodes proposed, once they are
    /// applied here. Changes applied before it is set are not reported.
    pub fn set_hook(&self, hook: AppliedHook) {
        if self.hook.set(hook).is_err() {
            tracing::warn!("the applied-change hook was set already; keeping the first");
        }
    }

    /// Sets the function called after a snapshot from the leader brought entries or Welcomes
    /// of groups here (see [`InstalledHook`]).
    pub fn set_installed_hook(&self, hook: InstalledHook) {
        if self.installed_hook.set(hook).is_err() {
            tracing::warn!("the snapshot install hook was set already; keeping the first");
        }
    }

    /// Sets the function called when the shard logs start (see [`ShardStartHook`]).
    pub fn set_start_hook(&self, hook: ShardStartHook) {
        if self.start_hook.set(hook).is_err() {
            tracing::warn!("the shard start hook was set already; keeping the first");
        }
    }

    /// Applies one change of entry `index`, proposed by `origin`, and calls the hooks.
    fn apply_change(&self, index: u64, origin: RaftNodeId, change: &Change) -> Applied {
        let result = self.store.apply(change).map_err(|e| {
            if !matches!(e, StorageError::Conflict(_)) {
                tracing::debug!(index, change = change.name(), error = %e, "replicated change rejected");
            }
            Refused::from(e)
        });
        if result.is_ok()
            && origin != self.node
            && let Some(hook) = self.hook.get()
        {
            hook(change);
        }
        if result.is_ok()
            && let Change::StartShardLogs(start) = change
            && let Some(hook) = self.start_hook.get()
        {
            hook(start);
        }
        result
    }

    fn applied_before(&self, index: u64) -> bool {
        matches!(
            self.progress.get(PROGRESS_KEY),
            Ok(Some(raw)) if raw.as_ref() >= index.to_be_bytes().as_slice()
        )
    }
}

impl Applier for SharedState {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        if self.applied_before(index) {
            // Applied before a crash that kept the state machine from recording it. No proposer
            // waits for this result any more.
            let result: Applied = Err(Refused::Failed(format!(
                "entry {index} was applied before a restart"
            )));
            return encode(&result);
        }
        let result = match rmp_serde::from_slice::<Proposed>(command) {
            Ok(proposed) if proposed.more.is_empty() => {
                encode(&self.apply_change(index, proposed.origin, &proposed.change))
            }
            Ok(proposed) => {
                let results: Vec<Applied> = std::iter::once(&proposed.change)
                    .chain(&proposed.more)
                    .map(|change| self.apply_change(index, proposed.origin, change))
                    .collect();
                encode(&results)
            }
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable entry in a replicated log; skipped");
                let result: Applied =
                    Err(Refused::Failed(format!("undecodable entry {index}: {e}")));
                encode(&result)
            }
        };
        if let Err(e) = self.progress.insert(PROGRESS_KEY, &index.to_be_bytes()) {
            tracing::error!(index, error = %e, "cannot record the applied index");
        }
        result
    }

    fn snapshot(&self, out: &mut std::fs::File) -> Result<(), String> {
        self.store
            .export_shared_to(&self.part, out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn check(&self, input: &mut std::fs::File) -> Result<(), String> {
        self.store
            .check_shared(&self.part, input)
            .map_err(|e| e.to_string())
    }

    fn restore(&self, input: &mut std::fs::File) -> Result<(), String> {
        let news = self
            .store
            .import_shared_from(&self.part, input)
            .map_err(|e| e.to_string())?;
        if !news.is_empty()
            && let Some(hook) = self.installed_hook.get()
        {
            hook(&news);
        }
        Ok(())
    }
}

/// One replicated log as its proposers see it.
#[derive(Clone)]
pub struct LogHandle {
    pub raft: Raft,
    pub name: String,
}

/// Proposes changes to the log that carries them: on its leader directly, elsewhere through
/// the leader's endpoint. A proposal returns once its change is applied on this node too, so
/// a client that reads from this node next reads its own write.
pub struct ClusterReplicator {
    node: RaftNodeId,
    /// Returns why this node may not write or confirm reads now, if it may not.
    check: Option<ReplicationCheck>,
    directory: LogHandle,
    /// The log of each shard, by shard number.
    shards: Vec<LogHandle>,
    /// The appends waiting for the directory log, then for each shard's log.
    appends: Vec<AppendQueue>,
    /// Reports the times of each entry of appends, once set.
    append_observer: Arc<OnceLock<AppendObserver>>,
}

/// A check made before each proposal and read barrier: the reason this node may not write
/// or confirm reads now, or `None`.
pub type ReplicationCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl ClusterReplicator {
    /// Creates the proposer and starts a task per log that writes its appends (see
    /// [`AppendQueue`]); call it inside a Tokio runtime.
    pub fn new(node: RaftNodeId, directory: LogHandle, shards: Vec<LogHandle>) -> Self {
        let append_observer = Arc::new(OnceLock::new());
        let appends = std::iter::once(&directory)
            .chain(&shards)
            .map(|log| AppendQueue::start(node, log.clone(), Arc::clone(&append_observer)))
            .collect();
        Self {
            node,
            check: None,
            directory,
            shards,
            appends,
            append_observer,
        }
    }

    /// Reports the times of every entry of appends to `observer` (see [`AppendTimes`]).
    pub fn with_append_observer(self, observer: AppendObserver) -> Self {
        if self.append_observer.set(observer).is_err() {
            tracing::warn!("the append observer was set already; keeping the first");
        }
        self
    }

    /// Makes every proposal and read barrier fail at once with `StorageError::Unavailable`
    /// while `check` returns a reason, instead of waiting for openraft to give up.
    pub fn with_check(mut self, check: ReplicationCheck) -> Self {
        self.check = Some(check);
        self
    }

    fn refusal(&self) -> Option<StorageError> {
        let reason = self.check.as_ref()?()?;
        Some(StorageError::Unavailable(reason))
    }

    /// Returns the log that carries the changes of shard key `key` (a group or device id).
    fn shard_log(&self, key: &[u8]) -> &LogHandle {
        match self.shard_index(key) {
            Some(shard) => &self.shards[shard],
            None => &self.directory,
        }
    }

    /// Returns the number of the shard of key `key`, `None` without shard logs.
    fn shard_index(&self, key: &[u8]) -> Option<usize> {
        let count = u32::try_from(self.shards.len()).ok().filter(|c| *c > 0)?;
        Some(shard_of(key, count).0 as usize)
    }

    /// Queues `change`, an append, for the log of shard `shard` (the directory log's queue
    /// when there are no shard logs).
    fn queue_append(&self, shard: Option<usize>, change: Change) -> Proposal {
        let queue = &self.appends[shard.map_or(0, |shard| shard + 1)];
        let (done, result) = tokio::sync::oneshot::channel();
        let sent = queue.changes.send((change, done, Instant::now()));
        let log = queue.log.clone();
        Box::pin(async move {
            if sent.is_err() {
                return Err(StorageError::Unavailable(format!(
                    "the writer of log {log} stopped"
                )));
            }
            result.await.unwrap_or_else(|_| {
                Err(StorageError::Unavailable(format!(
                    "the writer of log {log} stopped before the append was written"
                )))
            })
        })
    }
}

/// An append waiting to be written, with the channel of its proposer and the time it was
/// queued.
type QueuedAppend = (
    Change,
    tokio::sync::oneshot::Sender<Result<Outcome, StorageError>>,
    Instant,
);

/// The appends of one log waiting to be written. One task per log writes them in as few
/// entries as it can. While it writes an entry, the appends proposed meanwhile wait and go
/// together into the next one, up to [`APPENDS_PER_ENTRY`]. An append proposed to an idle
/// log goes out at once. Entries keep the order of the proposals, so the appends of a group
/// stay in order. Fewer, larger entries cost the leader and every replica fewer log writes,
/// commits and applied-index updates than one entry per append.
///
/// NOTE: writing up to four entries at once was tried and measured worse. openraft 0.9 stores
/// a log's entries one after another, each with its own flush. At half load the entries then
/// carried 1.2 appends instead of 1.7, and each write took 85 ms instead of 38 ms
/// (`docs/benchmarks.md`).
struct AppendQueue {
    log: String,
    changes: tokio::sync::mpsc::UnboundedSender<QueuedAppend>,
}

impl AppendQueue {
    fn start(node: RaftNodeId, log: LogHandle, observer: Arc<OnceLock<AppendObserver>>) -> Self {
        let (changes, queued) = tokio::sync::mpsc::unbounded_channel();
        let name = log.name.clone();
        tokio::spawn(write_appends(node, log, queued, observer));
        Self { log: name, changes }
    }
}

/// Writes the appends queued for `log` (see [`AppendQueue`]) until every sender is gone.
async fn write_appends(
    node: RaftNodeId,
    log: LogHandle,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<QueuedAppend>,
    observer: Arc<OnceLock<AppendObserver>>,
) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < APPENDS_PER_ENTRY
            && let Ok(next) = queued.try_recv()
        {
            batch.push(next);
        }
        write_entry(node, &log, batch, &observer).await;
    }
}

/// Writes `batch` as one entry of `log` and sends each append its result.
async fn write_entry(
    node: RaftNodeId,
    log: &LogHandle,
    batch: Vec<QueuedAppend>,
    observer: &OnceLock<AppendObserver>,
) {
    let proposed_at = Instant::now();
    let mut changes = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    let mut waits = Vec::with_capacity(batch.len());
    for (change, done, queued_at) in batch {
        changes.push(change);
        waiting.push(done);
        waits.push(proposed_at.duration_since(queued_at));
    }

    let mut changes = changes.into_iter();
    let Some(change) = changes.next() else {
        return;
    };
    let proposed = Proposed {
        origin: node,
        change,
        more: changes.collect(),
    };
    let single = proposed.more.is_empty();
    let written = write(&log.raft, &log.name, Command(encode(&proposed))).await;
    if let Some(observer) = observer.get() {
        observer(&AppendTimes {
            waits: &waits,
            write: proposed_at.elapsed(),
            failed: written.is_err(),
        });
    }

    let results = append_results(&log.name, written, single, waiting.len());
    for (done, result) in waiting.into_iter().zip(results) {
        // A proposer that stopped waiting no longer needs the result.
        let _ = done.send(result);
    }
}

/// Returns the result of each of the `count` appends that one entry of log `log` carried.
fn append_results(
    log: &str,
    written: Result<(u64, CommandResult), StorageError>,
    single: bool,
    count: usize,
) -> Vec<Result<Outcome, StorageError>> {
    match written {
        Err(e) => (0..count).map(|_| Err(copy_failure(&e))).collect(),
        Ok((index, result)) if single => vec![decode_applied(index, &result)],
        Ok((index, result)) => match rmp_serde::from_slice::<Vec<Applied>>(&result.0) {
            Ok(applied) if applied.len() == count => applied
                .into_iter()
                .map(|a| a.map_err(StorageError::from))
                .collect(),
            _ => (0..count)
                .map(|_| {
                    Err(StorageError::Replication(format!(
                        "undecodable results of entry {index} of log {log}"
                    )))
                })
                .collect(),
        },
    }
}

/// Returns the failure of a write as the error of one of the appends it carried.
fn copy_failure(e: &StorageError) -> StorageError {
    match e {
        StorageError::Unavailable(detail) => StorageError::Unavailable(detail.clone()),
        other => StorageError::Unavailable(other.to_string()),
    }
}

impl Replicator for ClusterReplicator {
    fn propose(&self, change: Change) -> Proposal {
        // The shard logs start before any client writes, from a node that may not have
        // heard from every voter yet.
        if !matches!(change, Change::StartShardLogs(_))
            && let Some(refused) = self.refusal()
        {
            return Box::pin(async move { Err(refused) });
        }
        // Appends go through the log's queue and return once committed. Their group actor
        // keeps the state they lead to in memory, so they need no copy applied here. Readers
        // on this node wait with a read barrier instead.
        if let Change::AppendBatch { group, .. } = &change {
            let shard = self.shard_index(group.as_bytes());
            return self.queue_append(shard, change);
        }
        let LogHandle { raft, name: log } = match change.shard_key() {
            Some(key) => self.shard_log(key).clone(),
            None => self.directory.clone(),
        };
        let command = Command(encode(&Proposed {
            origin: self.node,
            change,
            more: Vec::new(),
        }));
        Box::pin(async move {
            let (index, result) = write(&raft, &log, command).await?;
            raft.wait(Some(APPLY_WAIT))
                .applied_index_at_least(Some(index), "proposal applied on this node")
                .await
                .map_err(|_| not_applied_yet(&raft, &log, index))?;
            decode_applied(index, &result)
        })
    }

    fn barrier(&self, scope: ReadScope) -> Barrier {
        if let Some(refused) = self.refusal() {
            return Box::pin(async move { Err(refused) });
        }
        let logs: Vec<LogHandle> = match &scope {
            ReadScope::Directory => vec![self.directory.clone()],
            ReadScope::Group(group) => vec![self.shard_log(group.as_bytes()).clone()],
            ReadScope::Everything => std::iter::once(self.directory.clone())
                .chain(self.shards.iter().cloned())
                .collect(),
        };
        Box::pin(async move {
            if let [log] = logs.as_slice() {
                return barrier_on(log.clone()).await;
            }
            let mut waits = tokio::task::JoinSet::new();
            for log in logs {
                waits.spawn(barrier_on(log));
            }
            while let Some(done) = waits.join_next().await {
                done.map_err(|e| {
                    StorageError::Replication(format!("a read barrier task failed: {e}"))
                })??;
            }
            Ok(())
        })
    }
}

/// Waits until this node has applied every entry of `log` committed before the call.
async fn barrier_on(log: LogHandle) -> Result<(), StorageError> {
    let index = read_index(&log.raft, &log.name).await?;
    log.raft
        .wait(Some(APPLY_WAIT))
        .applied_index_at_least(Some(index), "read barrier")
        .await
        .map_err(|_| not_applied_yet(&log.raft, &log.name, index))?;
    Ok(())
}

/// Returns the error of a wait for entry `index` of `log` that timed out after
/// [`APPLY_WAIT`]. It names the last entry applied, since openraft's error prints all metrics.
fn not_applied_yet(raft: &Raft, log: &str, index: u64) -> StorageError {
    let applied = raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |id| id.index);
    StorageError::Unavailable(format!(
        "entry {index} of log {log} is committed, but this node applied only up to entry \
         {applied} within {} s",
        APPLY_WAIT.as_secs()
    ))
}

/// Returns the log index that a linearizable read must wait for, from the current leader.
async fn read_index(raft: &Raft, log: &str) -> Result<u64, StorageError> {
    // A read index changes nothing, so a failed request is simply asked again.
    at_leader(raft, true, |leader| async move {
        if leader == raft_id_of(raft) {
            read_index_here(raft).await
        } else {
            tokio::select! {
                biased;
                result = read_index_from(log, leader) => result,
                refused = replaced(raft, leader) => refused,
            }
        }
    })
    .await
}

/// Runs `request` against the log's current leader, following leadership as it moves for up
/// to [`LEADER_CHASE`]. A request that failed otherwise is tried again only if
/// `retry_failed`.
async fn at_leader<T, F, Fut>(
    raft: &Raft,
    retry_failed: bool,
    request: F,
) -> Result<T, StorageError>
where
    F: Fn(RaftNodeId) -> Fut,
    Fut: Future<Output = Result<T, WriteRefused>>,
{
    let deadline = tokio::time::Instant::now() + LEADER_CHASE;
    let mut pause = Duration::from_millis(50);
    // The leader that the last refusal named, tried before this node's own view.
    let mut named = None;
    loop {
        let last = match named.take().or(known_leader(raft).await) {
            None => format!("no leader known after {} s", LEADER_WAIT.as_secs()),
            Some(leader) => match request(leader).await {
                Ok(done) => return Ok(done),
                Err(WriteRefused::NotLeader { leader: next }) => {
                    named = next.filter(|next| *next != leader);
                    format!("leadership moved (new leader: {next:?})")
                }
                // Nothing was sent, so nothing was written: wait for the next leader.
                Err(WriteRefused::Unsent { leader }) => format!(
                    "no link to the leader {}, which may be down, and no other leader yet",
                    node_name(raft, leader)
                ),
                Err(WriteRefused::Failed(detail)) if retry_failed => detail,
                // The outcome of a failed write is unknown: it may still commit. The caller
                // decides whether to retry, which changes guarded by sequence numbers, client
                // message ids or account records make safe.
                Err(WriteRefused::Failed(detail)) => return Err(StorageError::Unavailable(detail)),
            },
        };
        if tokio::time::Instant::now() + pause > deadline {
            return Err(StorageError::Unavailable(last));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Decodes the result of applying entry `index`.
fn decode_applied(index: u64, result: &CommandResult) -> Result<Outcome, StorageError> {
    let applied: Applied = rmp_serde::from_slice(&result.0).map_err(|e| {
        StorageError::Replication(format!("undecodable result of entry {index}: {e}"))
    })?;
    applied.map_err(StorageError::from)
}

/// Writes `command` through the current leader, following leadership as it moves.
async fn write(
    raft: &Raft,
    log: &str,
    command: Command,
) -> Result<(u64, CommandResult), StorageError> {
    at_leader(raft, false, |leader| {
        let command = command.clone();
        async move {
            if leader == raft_id_of(raft) {
                write_here(raft, command).await
            } else {
                tokio::select! {
                    biased;
                    result = forward_write(log, leader, command) => result,
                    refused = replaced(raft, leader) => refused,
                }
            }
        }
    })
    .await
}

/// Returns the current leader, waiting up to [`LEADER_WAIT`] while an election runs.
async fn known_leader(raft: &Raft) -> Option<RaftNodeId> {
    if let Some(leader) = raft.current_leader().await {
        return Some(leader);
    }
    raft.wait(Some(LEADER_WAIT))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .ok()
        .and_then(|m| m.current_leader)
}

/// Fails [`REPLACED_GRACE`] after this node hears of a new leader of the log, other than
/// `leader` and than the one it knew at the call, so that a request forwarded to `leader`
/// (paused, or cut off with a minority) stops waiting for its reply then. A `leader` that
/// runs replies within the grace: after a handover it rejects the writes it held as no
/// longer the leader, and they go to the new one. Waits at most [`REPLACED_WAIT`], longer
/// than such a request may take.
///
/// A forwarded write that stops waiting this way has an unknown outcome, as one that timed
/// out: `leader` may have replicated it before the others elected a new leader.
async fn replaced<T>(raft: &Raft, leader: RaftNodeId) -> Result<T, WriteRefused> {
    // The metrics change with every applied entry, and every waiting request wakes up then.
    // Each wake-up only reads the leader: openraft's own `wait` clones the whole metrics and
    // sets a new timer each time, which under load cost a clone per request per entry.
    let mut changes = raft.metrics();
    let known = changes.borrow().current_leader;
    let deadline = tokio::time::sleep(REPLACED_WAIT);
    tokio::pin!(deadline);
    loop {
        let current = changes.borrow_and_update().current_leader;
        if current.is_some_and(|l| l != leader && Some(l) != known) {
            break;
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            () = &mut deadline => return std::future::pending().await,
        }
    }
    tokio::time::sleep(REPLACED_GRACE).await;
    let current = raft.metrics().borrow().current_leader;
    let next = current.map_or_else(String::new, |id| node_name(raft, id));
    Err(WriteRefused::Failed(format!(
        "{} stopped leading the log (now {next}) while the request waited for its answer",
        node_name(raft, leader)
    )))
}

/// Returns the name of the node with raft id `id` in the log's membership, or the id.
fn node_name(raft: &Raft, id: RaftNodeId) -> String {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .map_or_else(|| format!("raft node {id}"), |node| node.addr.clone())
}

/// The longest [`replaced`] waits: more than a forwarded request's own time limit.
const REPLACED_WAIT: Duration = Duration::from_secs(10);

/// The time [`replaced`] leaves the old leader to reply once a new one is known. It equals
/// the longest time a handover keeps writes waiting (1 s).
const REPLACED_GRACE: Duration = Duration::from_secs(1);

fn raft_id_of(raft: &Raft) -> RaftNodeId {
    raft.metrics().borrow().id
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_protocol::GroupId;
    use atlas_storage::GroupMeta;

    fn create(group: &[u8]) -> Change {
        Change::CreateGroup {
            group: GroupId::new(group.to_vec()).unwrap(),
            meta: GroupMeta {
                epoch: 0,
                last_seq: 0,
                first_seq: 1,
                created_at_ms: 1,
            },
            public_state: vec![1, 2, 3],
        }
    }

    #[tokio::test]
    async fn multi_change_entry_gives_a_result_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = SharedState::new(store.clone(), 1, "test", SharedPart::Directory).unwrap();

        // The second change creates a group that the first created: it alone fails.
        let entry = Proposed {
            origin: 1,
            change: create(b"group-a"),
            more: vec![create(b"group-a"), create(b"group-b")],
        };
        let results: Vec<Applied> =
            rmp_serde::from_slice(&state.apply(1, &encode(&entry))).unwrap();
        assert_eq!(results.len(), 3, "{results:?}");
        assert!(results[0].is_ok(), "{results:?}");
        assert!(results[1].is_err(), "{results:?}");
        assert!(results[2].is_ok(), "{results:?}");
        for group in [&b"group-a"[..], b"group-b"] {
            let id = GroupId::new(group.to_vec()).unwrap();
            assert!(store.load_group(&id).unwrap().is_some());
        }

        // An entry with one change keeps the format of a single result.
        let single = Proposed {
            origin: 1,
            change: create(b"group-c"),
            more: Vec::new(),
        };
        let result: Applied = rmp_serde::from_slice(&state.apply(2, &encode(&single))).unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}
