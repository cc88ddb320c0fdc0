//! The group session actor: one per active group. It orders, validates and stores the group's
//! messages and pushes them to online members. Invariants:
//! - sequence numbers are assigned in the actor, one at a time, so the log has one total order;
//! - an acknowledgement leaves only after the entry is durable (see [`Committer`]);
//! - on a storage failure the actor stops, and the next request reloads it from storage, so
//!   memory never runs ahead of disk for longer than one failed request.

use crate::keyring::Keyring;
use crate::metrics::ActorMetrics;
use crate::mls::{MlsError, PublicState, check_welcome};
use crate::{Deliver, GroupError};
use atlas_protocol::receipts::{Receipt, ReceiptFields};
use atlas_protocol::{
    Accepted, ClientMsgId, DeviceId, EntryKind, ErrorCode, GroupId, LogEntry, MAX_FRAME_BYTES,
    PROTOCOL_VERSION, ServerBody, ServerFrame, WelcomeEntry, encode_server,
};
use atlas_storage::{AppendItem, Change, GroupMeta, Outcome as StoreOutcome, StorageError, Store};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Bytes reserved in a sync response for everything but the entries.
const SYNC_FRAME_OVERHEAD: usize = 1024;

/// Upper bound of the encoded size of a log entry beyond its payload.
const ENTRY_OVERHEAD: usize = 128;

/// Submission of a device to a group.
#[derive(Debug, Clone)]
pub enum Submission {
    /// A commit (PublicMessage) and, when it adds devices, their Welcome.
    Commit {
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
    },
    /// An application message (PrivateMessage).
    Application { message: Vec<u8> },
}

/// One page of a group's log.
#[derive(Debug, Clone)]
pub struct SyncPage {
    pub entries: Vec<LogEntry>,
    pub head: u64,
    pub first_available: u64,
}

/// Messages of a group session actor.
pub enum GroupMsg {
    /// Validate, order and store a submission; the reply comes once it is durable.
    Submit {
        sender: DeviceId,
        msg_id: ClientMsgId,
        submission: Submission,
        signing: ReceiptSigning,
        reply: RpcReplyPort<Result<Accepted, GroupError>>,
    },
    /// Read entries after `after` for a member device.
    Sync {
        device: DeviceId,
        after: u64,
        limit: usize,
        reply: RpcReplyPort<Result<SyncPage, GroupError>>,
    },
    /// Store a member device's cursor.
    Ack {
        device: DeviceId,
        seq: u64,
        reply: RpcReplyPort<Result<u64, GroupError>>,
    },
    /// Sign a fresh receipt for a stored entry, for a member device.
    Receipt {
        device: DeviceId,
        seq: u64,
        reply: RpcReplyPort<Result<(ReceiptFields, Receipt), GroupError>>,
    },
    /// An entry another node of the cluster appended, now applied to this node's storage:
    /// catch up with it and push it to the members connected here.
    Replicated {
        entry: LogEntry,
        welcomes: Vec<(DeviceId, WelcomeEntry)>,
    },
    /// The committer wrote this actor's entries up to `through` to the replicated log.
    Committed { through: u64 },
    /// Periodic housekeeping: retention and idle stop.
    Tick,
}

// Group actors are reached on their own node only; their messages never cross the network.
impl ractor::Message for GroupMsg {}

/// Settings shared by all group actors.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Stop an actor after this long without requests.
    pub idle_timeout: Duration,
    /// Interval of housekeeping ticks.
    pub tick_interval: Duration,
    /// Entries older than this are removed even if some member has not acknowledged them.
    pub retention_ttl: Duration,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            tick_interval: Duration::from_secs(30),
            retention_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Arguments to start a group actor with state loaded by the supervisor.
pub struct GroupArgs {
    pub group: GroupId,
    pub meta: GroupMeta,
    pub public_state: Vec<u8>,
    pub store: Store,
    /// Signs the receipt of every accepted entry.
    pub keyring: Arc<Keyring>,
    pub deliver: Arc<dyn Deliver>,
    pub settings: GroupSettings,
    pub metrics: ActorMetrics,
}

/// The group session actor.
pub struct GroupSession;

/// State of a running group actor.
pub struct GroupState {
    group: GroupId,
    meta: GroupMeta,
    mls: PublicState,
    store: Store,
    keyring: Arc<Keyring>,
    settings: GroupSettings,
    metrics: ActorMetrics,
    committer: mpsc::Sender<Pending>,
    last_request: Instant,
    /// Highest sequence number stored; in a cluster, entries above it up to `meta.last_seq`
    /// are validated but wait for the committer to write them.
    committed_seq: u64,
    /// Acknowledgements of entries waiting for the committer, by sender and message id, so a
    /// retry that arrives meanwhile gets the same sequence number.
    in_flight: HashMap<(DeviceId, ClientMsgId), Unsigned>,
}

/// Attempts of a submission that lost its sequence number to another node's append.
const CONFLICT_ATTEMPTS: usize = 3;

/// A submitter's reply port, its acknowledgement, and the signer of its receipt.
type Reply = (
    RpcReplyPort<Result<Accepted, GroupError>>,
    Unsigned,
    ReceiptSigning,
);

/// An accepted entry waiting for durability before its acknowledgement and pushes go out.
struct Pending {
    /// The submitter's reply port and acknowledgement; none for entries of other nodes.
    reply: Option<Reply>,
    /// In a cluster, the entry for the committer to write, batched with the entries queued
    /// next to it; none when it is written already or is not new.
    append: Option<AppendItem>,
    push: Option<(Vec<DeviceId>, bytes::Bytes)>,
    welcomes: Vec<(DeviceId, bytes::Bytes)>,
}

impl Actor for GroupSession {
    type Msg = GroupMsg;
    type State = GroupState;
    type Arguments = GroupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GroupArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mls = PublicState::from_bytes(args.group.as_bytes(), &args.public_state)?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(
            Committer {
                store: args.store.clone(),
                deliver: args.deliver,
                keyring: Arc::clone(&args.keyring),
                group: args.group.clone(),
                actor: myself.clone(),
            }
            .run(rx),
        );
        myself.send_interval(args.settings.tick_interval, || GroupMsg::Tick);
        args.metrics.group_actors_alive.inc();
        tracing::debug!(group_id = %args.group, epoch = args.meta.epoch, "group actor started");
        Ok(GroupState {
            group: args.group,
            meta: args.meta,
            mls,
            store: args.store,
            keyring: args.keyring,
            settings: args.settings,
            metrics: args.metrics,
            committer: tx,
            last_request: Instant::now(),
            committed_seq: args.meta.last_seq,
            in_flight: HashMap::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.metrics.group_actors_alive.dec();
        tracing::debug!(group_id = %state.group, "group actor stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GroupMsg::Submit {
                sender,
                msg_id,
                submission,
                signing,
                reply,
            } => {
                state.last_request = Instant::now();
                match state.submit_with_retries(sender, msg_id, submission).await {
                    Ok(Outcome::Duplicate(accepted)) => {
                        // The original may still wait for its flush, so the retry's reply goes
                        // through the committer, after that flush and never before the original.
                        let pending = Pending {
                            reply: Some((reply, accepted, signing)),
                            append: None,
                            push: None,
                            welcomes: Vec::new(),
                        };
                        state.commit(pending).await;
                    }
                    Ok(Outcome::Stored(parts)) => {
                        let pending = Pending {
                            reply: Some((reply, parts.accepted, signing)),
                            append: parts.append,
                            push: parts.push,
                            welcomes: parts.welcomes,
                        };
                        state.commit(pending).await;
                    }
                    Err(e) => {
                        // A storage failure, or a replicated append whose fate is unknown.
                        let fatal = matches!(e, GroupError::Storage(_));
                        let _ = reply.send(Err(e));
                        if fatal {
                            // Memory may now be ahead of disk: stop, and reload on next use.
                            myself.stop(Some("storage failure".into()));
                        }
                    }
                }
            }
            GroupMsg::Sync {
                device,
                after,
                limit,
                reply,
            } => {
                state.last_request = Instant::now();
                let _ = reply.send(state.sync(&device, after, limit));
            }
            GroupMsg::Ack { device, seq, reply } => {
                state.last_request = Instant::now();
                let _ = reply.send(state.ack(&device, seq).await);
            }
            GroupMsg::Committed { through } => {
                state.committed_seq = state.committed_seq.max(through);
                state
                    .in_flight
                    .retain(|_, unsigned| unsigned.fields.seq > through);
            }
            GroupMsg::Replicated { entry, welcomes } => {
                if let Err(e) = state.catch_up(&entry) {
                    tracing::error!(group_id = %state.group, seq = entry.seq, error = %e, "cannot follow an entry from another node; reloading");
                    myself.stop(Some("lost track of the replicated log".into()));
                    return Ok(());
                }
                let pending = state.pending_push(entry, welcomes);
                state.commit(pending).await;
            }
            GroupMsg::Receipt { device, seq, reply } => {
                state.last_request = Instant::now();
                let _ = reply.send(state.receipt(&device, seq));
            }
            GroupMsg::Tick => {
                match state.apply_retention().await {
                    Ok(()) => {}
                    // A log without a reachable leader: the next tick tries again.
                    Err(
                        e @ (GroupError::Unavailable
                        | GroupError::Storage(StorageError::Unavailable(_))),
                    ) => {
                        tracing::warn!(group_id = %state.group, error = %e, "retention waits for the group's log to have a leader");
                    }
                    Err(e) => {
                        tracing::error!(group_id = %state.group, error = %e, "retention failed");
                    }
                }
                if state.last_request.elapsed() >= state.settings.idle_timeout {
                    tracing::debug!(group_id = %state.group, "stopping idle group actor");
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

/// The signer of the receipt of an accepted submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptSigning {
    /// This node: its reply goes to the client.
    Sign,
    /// The node that forwarded the submission, with its own key, whose JWKS its client
    /// fetched. The reply carries an empty receipt, which that node replaces.
    ByForwarder,
}

enum Outcome {
    Duplicate(Unsigned),
    Stored(Box<PendingParts>),
}

/// An acknowledgement before its receipt is signed, which happens once the entry is durable.
#[derive(Clone)]
struct Unsigned {
    epoch: u64,
    duplicate: bool,
    fields: ReceiptFields,
}

impl Unsigned {
    fn sign(self, keyring: &Keyring, signing: ReceiptSigning) -> Result<Accepted, GroupError> {
        let receipt = match signing {
            ReceiptSigning::Sign => keyring
                .sign_receipt(&self.fields)
                .map_err(|e| GroupError::Internal(format!("signing a receipt failed: {e}")))?,
            ReceiptSigning::ByForwarder => Receipt {
                signature_input: String::new(),
                signature: String::new(),
            },
        };
        Ok(Accepted {
            group: self.fields.group,
            seq: self.fields.seq,
            epoch: self.epoch,
            accepted_at_ms: self.fields.accepted_at_ms,
            duplicate: self.duplicate,
            receipt,
        })
    }
}

/// A [`Pending`] without its reply port, built before the port is attached.
struct PendingParts {
    accepted: Unsigned,
    append: Option<AppendItem>,
    push: Option<(Vec<DeviceId>, bytes::Bytes)>,
    welcomes: Vec<(DeviceId, bytes::Bytes)>,
}

impl GroupState {
    /// Hands an accepted entry to the committer, which acknowledges it once it is durable.
    async fn commit(&self, pending: Pending) {
        if let Err(e) = self.committer.send(pending).await
            && let Some((reply, _, _)) = e.0.reply
        {
            let _ = reply.send(Err(GroupError::Unavailable));
        }
    }

    /// Submits, and when another node's append took the sequence number first (a cluster
    /// only), reloads the group from storage and validates the submission again.
    async fn submit_with_retries(
        &mut self,
        sender: DeviceId,
        msg_id: ClientMsgId,
        submission: Submission,
    ) -> Result<Outcome, GroupError> {
        let mut attempt = 1;
        loop {
            match self.submit(sender, msg_id, submission.clone()).await {
                Err(GroupError::Storage(StorageError::Conflict(what)))
                    if attempt < CONFLICT_ATTEMPTS =>
                {
                    tracing::debug!(group_id = %self.group, attempt, conflict = %what, "another node appended first; reloading");
                    self.reload()?;
                    attempt += 1;
                }
                Err(GroupError::Storage(StorageError::Conflict(what))) => {
                    self.reload()?;
                    return Err(GroupError::Busy(what));
                }
                other => return other,
            }
        }
    }

    /// Reads the group's meta and public state from storage again.
    fn reload(&mut self) -> Result<(), GroupError> {
        let (meta, public_state) = self
            .store
            .load_group(&self.group)?
            .ok_or_else(|| GroupError::NotFound(self.group.to_string()))?;
        self.mls = PublicState::from_bytes(self.group.as_bytes(), &public_state)
            .map_err(|e| GroupError::Internal(format!("stored public state: {e}")))?;
        self.meta = meta;
        self.committed_seq = meta.last_seq;
        Ok(())
    }

    /// Brings the in-memory state up to an entry applied from the replicated log.
    fn catch_up(&mut self, entry: &LogEntry) -> Result<(), GroupError> {
        if entry.seq <= self.meta.last_seq {
            return Ok(());
        }
        if entry.kind == EntryKind::Application && entry.seq == self.meta.last_seq + 1 {
            self.meta.last_seq = entry.seq;
            self.committed_seq = self.committed_seq.max(entry.seq);
            return Ok(());
        }
        self.reload()
    }

    /// Builds the pushes of an entry appended by another node.
    fn pending_push(&self, entry: LogEntry, welcomes: Vec<(DeviceId, WelcomeEntry)>) -> Pending {
        let recipients: Vec<DeviceId> = self
            .mls
            .member_devices()
            .filter(|d| **d != entry.sender)
            .copied()
            .collect();
        let push = encode_push(ServerBody::Push {
            group: self.group.clone(),
            entry,
        });
        Pending {
            reply: None,
            append: None,
            push: Some((recipients, push)),
            welcomes: welcomes
                .into_iter()
                .map(|(device, w)| (device, encode_push(ServerBody::WelcomePush(w))))
                .collect(),
        }
    }

    async fn submit(
        &mut self,
        sender: DeviceId,
        msg_id: ClientMsgId,
        submission: Submission,
    ) -> Result<Outcome, GroupError> {
        // A retry of a stored message, or of one waiting for the committer, returns the
        // original acknowledgement.
        if let Some(unsigned) = self.in_flight.get(&(sender, msg_id)) {
            return Ok(Outcome::Duplicate(Unsigned {
                duplicate: true,
                ..unsigned.clone()
            }));
        }
        if let Some(seq) = self.store.dedupe(&self.group, &sender, &msg_id)? {
            let entry = self.store.entry(&self.group, seq)?.ok_or_else(|| {
                GroupError::Internal(format!(
                    "dedupe id points at missing entry {seq} of group {}",
                    self.group
                ))
            })?;
            return Ok(Outcome::Duplicate(Unsigned {
                epoch: entry.epoch,
                duplicate: true,
                fields: ReceiptFields::new(
                    self.group.clone(),
                    seq,
                    sender,
                    entry.accepted_at_ms,
                    &entry.payload,
                ),
            }));
        }

        let now_ms = now_ms();
        let seq = self.meta.last_seq + 1;
        let (kind, sent_epoch, payload, state_bytes, welcomes, departed) = match submission {
            Submission::Application { message } => {
                let epoch = self
                    .mls
                    .check_application(&message, &sender)
                    .map_err(self.mls_error())?;
                (
                    EntryKind::Application,
                    epoch,
                    message,
                    None,
                    Vec::new(),
                    Vec::new(),
                )
            }
            Submission::Commit { commit, welcome } => {
                let sent_epoch = self.mls.epoch();
                if let Some(welcome) = &welcome {
                    check_welcome(welcome).map_err(self.mls_error())?;
                }
                // Validate on a copy so a rejected commit leaves the live state untouched.
                let mut next = PublicState::from_bytes(self.group.as_bytes(), &self.mls.to_bytes())
                    .map_err(|e| GroupError::Internal(e.to_string()))?;
                let outcome = next
                    .apply_commit(&commit, &sender)
                    .map_err(self.mls_error())?;
                self.check_added_devices(&outcome.added)?;
                let welcomes = match (&welcome, outcome.added.is_empty()) {
                    (Some(w), false) => outcome
                        .added
                        .iter()
                        .map(|d| {
                            (
                                *d,
                                WelcomeEntry {
                                    group: self.group.clone(),
                                    seq,
                                    welcome: w.clone(),
                                },
                            )
                        })
                        .collect(),
                    (None, false) => {
                        return Err(GroupError::Mls(MlsError::Unexpected(
                            "commit adds members but carries no Welcome".into(),
                        )));
                    }
                    (Some(_), true) => {
                        return Err(GroupError::Mls(MlsError::Unexpected(
                            "Welcome given for a commit that adds no members".into(),
                        )));
                    }
                    (None, true) => Vec::new(),
                };
                let bytes = next.to_bytes();
                (
                    EntryKind::Commit,
                    sent_epoch,
                    commit,
                    Some((bytes, next)),
                    welcomes,
                    outcome.removed,
                )
            }
        };

        let entry = LogEntry {
            seq,
            kind,
            epoch: sent_epoch,
            sender,
            msg_id,
            accepted_at_ms: now_ms,
            payload,
        };
        let (state_bytes, next) = state_bytes.unzip();
        let meta = GroupMeta {
            epoch: next.as_ref().map_or(self.mls.epoch(), |n| n.epoch()),
            last_seq: seq,
            ..self.meta
        };
        // Only commits change more of the meta than `last_seq`, which the log itself records.
        let meta_change = (kind == EntryKind::Commit).then_some(meta);
        let item = AppendItem {
            entry: entry.clone(),
            meta: meta_change,
            public_state: state_bytes,
            welcomes: welcomes.clone(),
            departed,
        };
        // In a cluster, the committer writes the entry through the replicated log in one
        // batch with the entries validated next to it; this actor goes on validating with
        // the state the entry leads to. On one node the entry is written here and the
        // committer waits for its flush.
        let append = if self.store.is_replicated() {
            Some(item)
        } else {
            self.store
                .write(Change::Append {
                    group: self.group.clone(),
                    entry: item.entry,
                    meta: item.meta,
                    public_state: item.public_state,
                    welcomes: item.welcomes,
                    departed: item.departed,
                })
                .await?;
            self.committed_seq = seq;
            None
        };
        if let Some(next) = next {
            self.mls = next;
        }
        self.meta = meta;
        let fields = ReceiptFields::new(self.group.clone(), seq, sender, now_ms, &entry.payload);
        self.metrics
            .messages_accepted
            .with_label_values(&[kind_label(kind)])
            .inc();

        let recipients: Vec<DeviceId> = self
            .mls
            .member_devices()
            .filter(|d| **d != sender)
            .copied()
            .collect();
        let push = encode_push(ServerBody::Push {
            group: self.group.clone(),
            entry,
        });
        let welcomes = welcomes
            .into_iter()
            .map(|(device, w)| (device, encode_push(ServerBody::WelcomePush(w))))
            .collect();
        let accepted = Unsigned {
            epoch: self.meta.epoch,
            duplicate: false,
            fields,
        };
        if append.is_some() {
            self.in_flight.insert((sender, msg_id), accepted.clone());
        }
        Ok(Outcome::Stored(Box::new(PendingParts {
            accepted,
            append,
            push: Some((recipients, push)),
            welcomes,
        })))
    }

    /// Rejects a commit that adds a device the directory does not list as active, such as a
    /// revoked one.
    fn check_added_devices(&self, added: &[DeviceId]) -> Result<(), GroupError> {
        for device in added {
            match self.store.device(device)? {
                Some(record) if record.revoked_at_ms.is_none() => {}
                Some(_) => {
                    return Err(GroupError::Invalid(
                        ErrorCode::DeviceRevoked,
                        format!("device {device} is revoked and cannot be added to a group"),
                    ));
                }
                None => {
                    return Err(GroupError::Invalid(
                        ErrorCode::DeviceNotFound,
                        format!("device {device} is not registered and cannot be added"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn mls_error(&self) -> impl Fn(MlsError) -> GroupError + '_ {
        |e| match e {
            MlsError::WrongEpoch { current, .. } => GroupError::StaleEpoch { current },
            MlsError::NotMember(d) => GroupError::NotMember(d, self.mls.epoch()),
            other => GroupError::Mls(other),
        }
    }

    fn sync(
        &mut self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<SyncPage, GroupError> {
        let page = self.store.read_log_page(&self.group, after, limit)?;
        // In a cluster, a snapshot installed on this node, like the prunes of other nodes,
        // changes the stored log past this actor.
        if page.newest_seq > self.meta.last_seq {
            tracing::debug!(group_id = %self.group, stored = page.newest_seq, seen = self.meta.last_seq, "the store is ahead of the group's actor; reloading");
            self.reload()?;
        }
        // A device removed from the group still reads what was sent while it was a member,
        // up to the commit that removed it.
        let until = if self.mls.is_member(device) {
            None
        } else {
            match self.departed_window(device)? {
                Some((from, until)) if after < until && after + 1 >= from => Some(until),
                _ => return Err(GroupError::NotMember(*device, self.mls.epoch())),
            }
        };
        let mut entries = page.entries;
        if let Some(until) = until {
            entries.retain(|e| e.seq <= until);
        }
        // Keep the response frame under the frame limit; one entry always fits, because MLS
        // messages are capped well below it.
        let mut budget = MAX_FRAME_BYTES - SYNC_FRAME_OVERHEAD;
        let fits = entries
            .iter()
            .position(|e| {
                let size = e.payload.len() + ENTRY_OVERHEAD;
                let over = size > budget;
                budget = budget.saturating_sub(size);
                over
            })
            .unwrap_or(entries.len());
        entries.truncate(fits.max(1));
        // The stored number rather than `self.meta`'s, which misses the changes past this
        // actor. A stale number would report removed entries as available, and a device that
        // read one of them would take the gap for lost messages.
        Ok(SyncPage {
            entries,
            head: until.unwrap_or(self.committed_seq),
            first_available: page.first_seq,
        })
    }

    /// Returns the first and last entries that `device`, no longer a member, may still read.
    /// The window starts at its acknowledged cursor, or at the commit that added it if it
    /// never acknowledged one, and ends at the commit that removed it. `None` when the store
    /// records no such window.
    fn departed_window(&self, device: &DeviceId) -> Result<Option<(u64, u64)>, GroupError> {
        let Some(until) = self.store.departure(&self.group, device)? else {
            return Ok(None);
        };
        let cursor = self.store.cursor(device, &self.group)?;
        let from = if cursor > 0 {
            Some(cursor)
        } else {
            self.store
                .welcomes(device)?
                .into_iter()
                .find(|w| w.group == self.group)
                .map(|w| w.seq)
        };
        Ok(from.map(|from| (from, until)))
    }

    /// Signs a receipt for entry `seq` with the current key. Entries removed by retention have
    /// no receipt any more.
    fn receipt(&self, device: &DeviceId, seq: u64) -> Result<(ReceiptFields, Receipt), GroupError> {
        if !self.mls.is_member(device) {
            return Err(GroupError::NotMember(*device, self.mls.epoch()));
        }
        let entry = self.store.entry(&self.group, seq)?.ok_or_else(|| {
            GroupError::Invalid(
                ErrorCode::InvalidRequest,
                format!("group {} has no stored entry {seq}", self.group),
            )
        })?;
        let fields = ReceiptFields::new(
            self.group.clone(),
            seq,
            entry.sender,
            entry.accepted_at_ms,
            &entry.payload,
        );
        let receipt = self
            .keyring
            .sign_receipt(&fields)
            .map_err(|e| GroupError::Internal(format!("signing a receipt failed: {e}")))?;
        Ok((fields, receipt))
    }

    async fn ack(&self, device: &DeviceId, seq: u64) -> Result<u64, GroupError> {
        let head = if self.mls.is_member(device) {
            self.committed_seq
        } else {
            // A removed device acknowledges what it read of its window (see `sync`).
            match self.departed_window(device)? {
                Some((_, until)) => until.min(self.committed_seq),
                None => return Err(GroupError::NotMember(*device, self.mls.epoch())),
            }
        };
        let change = Change::Acknowledge {
            device: *device,
            group: self.group.clone(),
            seq: seq.min(head),
        };
        match self.store.write(change).await? {
            StoreOutcome::Cursor(stored) => Ok(stored),
            other => Err(GroupError::Internal(format!(
                "acknowledge returned {other:?}"
            ))),
        }
    }

    /// Removes entries every member device has acknowledged, and entries older than the TTL.
    async fn apply_retention(&mut self) -> Result<(), GroupError> {
        let mut through = u64::MAX;
        for device in self.mls.member_devices() {
            through = through.min(self.store.cursor(device, &self.group)?);
        }
        let ttl_ms = self.settings.retention_ttl.as_millis() as u64;
        if let Some(old) = self
            .store
            .last_seq_before(&self.group, now_ms().saturating_sub(ttl_ms))?
        {
            through = if through == u64::MAX {
                old
            } else {
                through.max(old)
            };
        }
        let through = through.min(self.committed_seq);
        if through < self.meta.first_seq || through == u64::MAX {
            return Ok(());
        }
        let change = Change::Prune {
            group: self.group.clone(),
            through_seq: through,
        };
        let StoreOutcome::Pruned { removed, first_seq } = self.store.write(change).await? else {
            return Err(GroupError::Internal(
                "prune returned another outcome".into(),
            ));
        };
        self.meta.first_seq = first_seq;
        tracing::debug!(group_id = %self.group, removed, first_seq, "retention removed entries");
        Ok(())
    }
}

fn kind_label(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Commit => "commit",
        EntryKind::Application => "application",
    }
}

fn encode_push(body: ServerBody) -> bytes::Bytes {
    bytes::Bytes::from(encode_server(&ServerFrame {
        v: PROTOCOL_VERSION,
        id: 0,
        body,
    }))
}

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends acknowledgements and pushes once entries are durable. One per group actor, fed in
/// sequence order, so pushes leave in sequence order; each batch shares one flush.
struct Committer {
    store: Store,
    deliver: Arc<dyn Deliver>,
    keyring: Arc<Keyring>,
    group: GroupId,
    actor: ActorRef<GroupMsg>,
}

/// Reason the committer could not confirm a batch.
enum BatchFailure {
    /// A local flush failed.
    Flush,
    /// Another node appended first (a conflict); the actor reloads.
    Busy(String),
    /// The replicated log did not commit the batch; its fate may be unknown.
    Unavailable(String),
}

impl BatchFailure {
    fn error(&self) -> GroupError {
        match self {
            Self::Flush => GroupError::Unavailable,
            Self::Busy(why) => GroupError::Busy(why.clone()),
            Self::Unavailable(why) => GroupError::Storage(StorageError::Unavailable(why.clone())),
        }
    }
}

impl Committer {
    /// Makes the batch durable: in a cluster, writes its new entries through the replicated
    /// log as one change; on one node, where they are written already, flushes them.
    async fn write(&self, batch: &mut [Pending]) -> Result<(), BatchFailure> {
        let items: Vec<AppendItem> = batch.iter_mut().filter_map(|p| p.append.take()).collect();
        if !self.store.is_replicated() {
            return self.store.durable().await.map_err(|e| {
                tracing::error!(group_id = %self.group, error = %e, "entries not acknowledged: flush failed");
                BatchFailure::Flush
            });
        }
        let Some(through) = items.last().map(|item| item.entry.seq) else {
            return Ok(());
        };
        let change = Change::AppendBatch {
            group: self.group.clone(),
            items,
        };
        match self.store.write(change).await {
            Ok(_) => {
                let _ = self.actor.send_message(GroupMsg::Committed { through });
                Ok(())
            }
            Err(StorageError::Conflict(why)) => {
                tracing::debug!(group_id = %self.group, conflict = %why, "another node appended first");
                Err(BatchFailure::Busy(why))
            }
            Err(e) => {
                tracing::warn!(group_id = %self.group, error = %e, "replicated write failed");
                // The detail alone: the refusal becomes an `Unavailable` error again, whose
                // message would otherwise repeat.
                Err(BatchFailure::Unavailable(match e {
                    StorageError::Unavailable(detail) => detail,
                    other => other.to_string(),
                }))
            }
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let mut batch = Vec::new();
        let mut failed = false;
        while rx.recv_many(&mut batch, 256).await > 0 {
            let durable = if failed {
                // Entries after a failed write were validated against state that was never
                // stored: none of them may be written.
                Err(BatchFailure::Busy(
                    "an earlier write of the group failed".into(),
                ))
            } else {
                self.write(&mut batch).await
            };
            if durable.is_err() && self.store.is_replicated() && !failed {
                failed = true;
                // The actor's state is ahead of the log: stop it, and reload on next use.
                self.actor.stop(Some("replicated write failed".into()));
            }
            for pending in batch.drain(..) {
                match &durable {
                    Ok(()) => {
                        // Signing after the flush keeps it off the actor's path; the receipt
                        // only states facts that are already durable.
                        if let Some((reply, accepted, signing)) = pending.reply {
                            let _ = reply.send(accepted.sign(&self.keyring, signing));
                        }
                        if let Some((devices, frame)) = pending.push {
                            self.deliver.push(&devices, frame);
                        }
                        for (device, frame) in pending.welcomes {
                            self.deliver.push(&[device], frame);
                        }
                    }
                    Err(failure) => {
                        if let Some((reply, _, _)) = pending.reply {
                            let _ = reply.send(Err(failure.error()));
                        }
                    }
                }
            }
        }
    }
}
