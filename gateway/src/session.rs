//! One WebSocket connection: login, then requests and pushes until either side closes.
//!
//! Three parties move frames: the read loop (this function), a writer task that drains the
//! connection's bounded queue into the socket, and request tasks that await group actors and
//! queue their responses. A full queue closes the connection as a slow consumer.

use crate::GatewayState;
use actix_ws::{CloseReason, Item, Message, MessageStream, ProtocolError, Session};
use atlas_actors::{GroupError, GroupMsg, LoginError, ReceiptSigning, Submission};
use atlas_cluster::{Outbound, Presence, SessionHandle};
use atlas_protocol::{
    ClientBody, CloseCode, DecodeError, DeviceInfo, ErrorCode, MAX_FRAME_BYTES,
    MAX_KEY_PACKAGES_PER_UPLOAD, MAX_MLS_MESSAGE_BYTES, MAX_SYNC_ENTRIES, PROTOCOL_VERSION,
    ServerBody, ServerFrame, decode_client, encode_server,
};
use atlas_storage::{DeviceRecord, ReadScope};
use futures_util::FutureExt as _;
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

const TEXT_FRAME_ERROR: &str = "text frames are not accepted, send MessagePack in binary frames";

/// Keeps the first Welcomes whose encoded size fits in one frame. The rest follow in a later
/// request, after the device has acknowledged the groups it joined. One always fits, because
/// a Welcome is at most an MLS message.
fn fit_in_frame(
    mut welcomes: Vec<atlas_protocol::WelcomeEntry>,
) -> Vec<atlas_protocol::WelcomeEntry> {
    let mut budget = MAX_FRAME_BYTES - 1024;
    let fits = welcomes
        .iter()
        .position(|w| {
            let size = w.welcome.len() + w.group.as_bytes().len() + 64;
            let over = size > budget;
            budget = budget.saturating_sub(size);
            over
        })
        .unwrap_or(welcomes.len());
    welcomes.truncate(fits.max(1));
    welcomes
}

/// Maximum number of fragments of one message; bounds memory against floods of empty
/// continuation frames.
const MAX_FRAGMENTS: usize = 64;

pub(crate) async fn run(
    state: Arc<GatewayState>,
    session: Session,
    stream: MessageStream,
    peer: Option<SocketAddr>,
) {
    let conn_id = state.presence.next_conn_id();
    let span =
        tracing::info_span!("conn", conn_id, peer = ?peer, device_id = tracing::field::Empty);
    state.metrics.connections_open.inc();
    let serve = Connection::new(Arc::clone(&state), session, stream, conn_id)
        .serve()
        .instrument(span.clone());
    // A panic in one session must not take the gauge, the presence entry or the socket with
    // it: the guard inside `serve` cleans up, and the panic is logged here.
    let reason = match std::panic::AssertUnwindSafe(serve).catch_unwind().await {
        Ok(reason) => reason,
        Err(_) => {
            span.in_scope(|| tracing::error!("session task panicked; connection dropped"));
            Ended { label: "panic" }
        }
    };
    state.metrics.connections_open.dec();
    state
        .metrics
        .closes
        .with_label_values(&[reason.label])
        .inc();
    span.in_scope(|| tracing::debug!(reason = reason.label, "connection closed"));
}

/// Counts a connection as waiting to log in for as long as it lives, also when the session
/// panics.
struct WaitingGuard {
    count: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections that were waiting before this one.
    before: usize,
}

impl WaitingGuard {
    fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        let before = count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self { count, before }
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Reason a connection ended, for metrics and logs.
struct Ended {
    label: &'static str,
}

struct Connection {
    state: Arc<GatewayState>,
    session: Session,
    reader: Reader,
    conn_id: u64,
    last_seen: Instant,
}

enum Incoming {
    Binary(Vec<u8>),
    Text,
    Pong,
    Close,
    Broken(CloseCode, String),
}

/// Reads whole messages, reassembling fragments within [`MAX_FRAME_BYTES`] and [`MAX_FRAGMENTS`].
struct Reader {
    stream: MessageStream,
    partial: Option<Vec<u8>>,
    fragments: usize,
    /// True while the fragmented message being reassembled is a text message.
    text: bool,
}

impl Reader {
    async fn next(&mut self, session: &mut Session) -> Option<Incoming> {
        loop {
            let message = match self.stream.recv().await? {
                Ok(m) => m,
                Err(ProtocolError::Overflow) => {
                    return Some(Incoming::Broken(
                        CloseCode::TooBig,
                        format!("frame exceeds {MAX_FRAME_BYTES} bytes"),
                    ));
                }
                Err(e) => {
                    return Some(Incoming::Broken(
                        CloseCode::ProtocolViolation,
                        e.to_string(),
                    ));
                }
            };
            match message {
                Message::Binary(bytes) => return Some(Incoming::Binary(bytes.to_vec())),
                Message::Text(_) => return Some(Incoming::Text),
                Message::Ping(payload) => {
                    let _ = session.pong(&payload).await;
                    return Some(Incoming::Pong);
                }
                Message::Pong(_) => return Some(Incoming::Pong),
                Message::Close(_) => return Some(Incoming::Close),
                Message::Nop => continue,
                Message::Continuation(item) => {
                    self.fragments += 1;
                    if self.fragments > MAX_FRAGMENTS {
                        return Some(Incoming::Broken(
                            CloseCode::ProtocolViolation,
                            format!("message split into more than {MAX_FRAGMENTS} fragments"),
                        ));
                    }
                    let (chunk, first, last) = match item {
                        Item::FirstText(b) => {
                            self.text = true;
                            (b, true, false)
                        }
                        Item::FirstBinary(b) => {
                            self.text = false;
                            (b, true, false)
                        }
                        Item::Continue(b) => (b, false, false),
                        Item::Last(b) => (b, false, true),
                    };
                    if first {
                        self.partial = Some(Vec::new());
                    }
                    let Some(partial) = self.partial.as_mut() else {
                        return Some(Incoming::Broken(
                            CloseCode::ProtocolViolation,
                            "continuation frame without a first fragment".into(),
                        ));
                    };
                    if partial.len() + chunk.len() > MAX_FRAME_BYTES {
                        return Some(Incoming::Broken(
                            CloseCode::TooBig,
                            format!("message exceeds {MAX_FRAME_BYTES} bytes"),
                        ));
                    }
                    partial.extend_from_slice(&chunk);
                    if last {
                        self.fragments = 0;
                        let whole = self.partial.take().unwrap_or_default();
                        if self.text {
                            return Some(Incoming::Text);
                        }
                        return Some(Incoming::Binary(whole));
                    }
                }
            }
        }
    }
}

impl Connection {
    fn new(
        state: Arc<GatewayState>,
        session: Session,
        stream: MessageStream,
        conn_id: u64,
    ) -> Self {
        let reader = Reader {
            stream: stream.max_frame_size(MAX_FRAME_BYTES),
            partial: None,
            fragments: 0,
            text: false,
        };
        Self {
            state,
            session,
            reader,
            conn_id,
            last_seen: Instant::now(),
        }
    }

    async fn serve(mut self) -> Ended {
        // Connections that have not logged in are bounded, since public key transparency
        // requests keep them open without an account.
        let waiting = WaitingGuard::new(Arc::clone(&self.state.unauthenticated));
        let before = waiting.before;
        let login = if before >= self.state.settings.max_unauthenticated {
            tracing::info!(waiting = before, "too many connections waiting to log in");
            Err(Some((
                CloseCode::TryAgainLater,
                "too many connections waiting to log in, retry later".to_owned(),
            )))
        } else {
            self.login().await
        };
        drop(waiting);
        let device = match login {
            Ok(device) => device,
            Err(Some((code, why))) => return self.close(code, &why, "protocol").await,
            Err(None) => {
                return self
                    .close(CloseCode::AuthFailed, "login failed", "auth_failed")
                    .await;
            }
        };
        tracing::Span::current().record("device_id", tracing::field::display(device.device));
        tracing::debug!(account = %device.account, "device logged in");

        let settings = &self.state.settings;
        let (queue, mut outbound, mut close_rx) = SessionHandle::new(
            self.conn_id,
            settings.queue_capacity,
            settings.queue_max_bytes,
        );
        self.state.presence.attach(device.device, queue.clone());

        // The writer owns the socket's send side; it may block on a slow client without
        // stopping the read loop from noticing a close request.
        let mut writer_session = self.session.clone();
        let writer = actix_web::rt::spawn(async move {
            while let Some(item) = outbound.recv().await {
                match item {
                    Outbound::Frame(frame) => {
                        if writer_session.binary(frame).await.is_err() {
                            break;
                        }
                    }
                    Outbound::Close(code) => {
                        let reason = CloseReason {
                            code: actix_ws::CloseCode::Other(code.as_u16()),
                            description: Some(close_reason(code).0.into()),
                        };
                        let _ = writer_session.close(Some(reason)).await;
                        break;
                    }
                }
            }
        });
        let _guard = SessionGuard {
            presence: Arc::clone(&self.state.presence),
            device: device.device,
            conn_id: self.conn_id,
            writer,
        };

        let in_flight = Arc::new(Semaphore::new(self.state.settings.max_in_flight));
        // Request tasks signal here when they release their permit, so that a read loop that
        // stopped reading at the in-flight limit resumes at once.
        let released = Arc::new(Notify::new());
        let mut shutdown = self.state.shutdown.clone();
        let mut ping = tokio::time::interval(self.state.settings.ping_interval);
        ping.tick().await;
        let mut invalid = 0u32;

        loop {
            tokio::select! {
                _ = close_rx.changed() => {
                    let code = (*close_rx.borrow()).unwrap_or(CloseCode::Normal);
                    break self.close_code(code).await;
                }
                _ = shutdown.changed() => {
                    break self.close(CloseCode::GoingAway, "server shutting down", "shutdown").await;
                }
                _ = released.notified(), if in_flight.available_permits() == 0 => {}
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > self.state.settings.idle_timeout {
                        break self.close(CloseCode::KeepaliveTimeout, "keepalive timeout", "keepalive").await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.session.ping(b"")).await;
                }
                incoming = self.reader.next(&mut self.session), if in_flight.available_permits() > 0 => {
                    self.last_seen = Instant::now();
                    let bytes = match incoming {
                        None | Some(Incoming::Close) => break Ended { label: "client" },
                        Some(Incoming::Pong) => continue,
                        Some(Incoming::Broken(code, why)) => {
                            tracing::debug!(reason = %why, "closing broken connection");
                            break self.close(code, &why, "protocol").await;
                        }
                        Some(Incoming::Text) => {
                            self.state.metrics.frames_in.with_label_values(&["invalid"]).inc();
                            let body = error_body(ErrorCode::MalformedFrame, TEXT_FRAME_ERROR.into());
                            self.respond(&queue, 0, body);
                            invalid += 1;
                            if invalid >= self.state.settings.max_invalid_frames {
                                break self.close_after_queued(&queue, CloseCode::ProtocolViolation).await;
                            }
                            continue;
                        }
                        Some(Incoming::Binary(bytes)) => bytes,
                    };
                    match decode_client(&bytes) {
                        Ok(frame) => {
                            invalid = 0;
                            self.state.metrics.frames_in.with_label_values(&[frame.body.type_name()]).inc();
                            let tasks = Tasks { queue: &queue, in_flight: &in_flight, released: &released };
                            self.dispatch(&device, &tasks, frame.id, frame.body);
                        }
                        Err((id, error)) => {
                            self.state.metrics.frames_in.with_label_values(&["invalid"]).inc();
                            tracing::debug!(error = %error, "invalid frame");
                            self.respond(&queue, id, decode_error_body(&error));
                            invalid += 1;
                            if invalid >= self.state.settings.max_invalid_frames {
                                break self.close_after_queued(&queue, CloseCode::ProtocolViolation).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends the challenge and waits for a valid login. A failed login gets an error frame and
    /// returns `Err(None)`; a broken connection returns its close code.
    async fn login(&mut self) -> Result<DeviceRecord, Option<(CloseCode, String)>> {
        let mut nonce = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let challenge = ServerBody::Challenge {
            nonce: nonce.clone(),
            server_name: self.state.settings.server_name.clone(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        };
        self.send_now(0, challenge).await.map_err(|_| None)?;

        let frame = loop {
            let bytes = match self.next_login_frame().await {
                Ok(bytes) => bytes,
                Err(reason) => return Err(reason),
            };
            let frame = match decode_client(&bytes) {
                Ok(frame) => frame,
                Err((id, error)) => {
                    let _ = self.send_now(id, decode_error_body(&error)).await;
                    return Err(None);
                }
            };
            self.state
                .metrics
                .frames_in
                .with_label_values(&[frame.body.type_name()])
                .inc();
            // Key transparency readers such as auditors need no account: serve public
            // requests and keep waiting for a login.
            if frame.body.is_public() {
                let body = crate::keys::public_request(&self.state, frame.body).await;
                self.send_now(frame.id, body).await.map_err(|_| None)?;
                continue;
            }
            break frame;
        };
        let ClientBody::Login {
            account,
            device_key,
            signature,
        } = frame.body
        else {
            let body = error_body(
                ErrorCode::NotAuthenticated,
                "log in before any other request".into(),
            );
            let _ = self.send_now(frame.id, body).await;
            return Err(None);
        };
        let open_registration = self.state.settings.open_registration;
        match self
            .state
            .directory
            .login(&account, &device_key, &signature, &nonce, open_registration)
            .await
        {
            Ok((record, registered)) => {
                if registered && let Err(e) = self.state.store.durable().await {
                    tracing::error!(error = %e, "flush failed; registration not confirmed");
                    let body = error_body(
                        ErrorCode::StorageFailure,
                        format!("storage flush failed: {e}"),
                    );
                    let _ = self.send_now(frame.id, body).await;
                    return Err(None);
                }
                let body = ServerBody::LoggedIn {
                    device: record.device,
                    account: record.account.clone(),
                    registered,
                };
                self.send_now(frame.id, body).await.map_err(|_| None)?;
                Ok(record)
            }
            Err(e) => {
                tracing::info!(error = %e, "login rejected");
                let _ = self
                    .send_now(frame.id, login_error_body(&self.state, &e))
                    .await;
                Err(None)
            }
        }
    }

    /// Waits up to the login timeout for the next binary frame of a connection that has not
    /// logged in.
    async fn next_login_frame(&mut self) -> Result<Vec<u8>, Option<(CloseCode, String)>> {
        let deadline = self.state.settings.login_timeout;
        let mut shutdown = self.state.shutdown.clone();
        let reader = &mut self.reader;
        let session = &mut self.session;
        let incoming = tokio::time::timeout(deadline, async {
            loop {
                tokio::select! {
                    // A shutdown also ends connections that have not logged in yet.
                    _ = shutdown.wait_for(|stop| *stop) => {
                        return Some(Incoming::Broken(CloseCode::GoingAway, "server shutting down".into()));
                    }
                    next = reader.next(session) => match next {
                        Some(Incoming::Pong) => continue,
                        other => return other,
                    },
                }
            }
        })
        .await;
        match incoming {
            Ok(Some(Incoming::Binary(bytes))) => Ok(bytes),
            Ok(Some(Incoming::Broken(code, why))) => Err(Some((code, why))),
            Ok(Some(Incoming::Text)) => {
                let body = error_body(ErrorCode::MalformedFrame, TEXT_FRAME_ERROR.into());
                let _ = self.send_now(0, body).await;
                Err(None)
            }
            Ok(_) => Err(None),
            Err(_) => {
                tracing::debug!("login timed out");
                Err(None)
            }
        }
    }

    /// Handles one request: group requests run in their own task, the rest inline. Requests
    /// that change state are refused while the write gate says so.
    fn dispatch(&self, device: &DeviceRecord, tasks: &Tasks<'_>, id: u64, body: ClientBody) {
        let state = &self.state;
        if changes_state(&body)
            && let Some(reason) = state.write_gate.as_ref().and_then(|gate| gate.refusal())
        {
            self.respond(tasks.queue, id, error_body(ErrorCode::Unavailable, reason));
            return;
        }
        let inline = match body {
            ClientBody::Login { .. } => error_body(
                ErrorCode::Unsupported,
                "this connection is already logged in".into(),
            ),
            ClientBody::UploadKeyPackages {
                key_packages,
                last_resort,
            } => {
                if key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
                    error_body(
                        ErrorCode::TooLarge,
                        format!(
                            "{} key packages in one upload, the limit is {MAX_KEY_PACKAGES_PER_UPLOAD}",
                            key_packages.len()
                        ),
                    )
                } else {
                    let one_time: Vec<Vec<u8>> =
                        key_packages.into_iter().map(|b| b.into_vec()).collect();
                    let (state, device) = (Arc::clone(state), device.clone());
                    self.spawn_response(tasks, id, None, async move {
                        let uploaded = state
                            .directory
                            .upload_key_packages(
                                &device,
                                &one_time,
                                last_resort.as_ref().map(|b| b.as_slice()),
                            )
                            .await;
                        match uploaded {
                            Ok((stored, available)) => {
                                durable(&state, ServerBody::KeyPackagesStored { stored, available })
                                    .await
                            }
                            Err(e) => login_error_body(&state, &e),
                        }
                    });
                    return;
                }
            }
            ClientBody::ListDevices { account } => {
                let state = Arc::clone(state);
                self.spawn_response(tasks, id, None, async move {
                    if let Err(e) = state.store.read_barrier(ReadScope::Directory).await {
                        return barrier_error_body(&e);
                    }
                    match state.directory.devices(&account) {
                        Ok(devices) => ServerBody::Devices {
                            account,
                            devices: devices
                                .into_iter()
                                .map(|d| DeviceInfo {
                                    device: d.device,
                                    key: d.public_key,
                                })
                                .collect(),
                        },
                        Err(e) => login_error_body(&state, &e),
                    }
                });
                return;
            }
            ClientBody::ClaimKeyPackage { device: target } => {
                let state = Arc::clone(state);
                self.spawn_response(tasks, id, None, async move {
                    crate::keys::claim(&state, target).await
                });
                return;
            }
            ClientBody::RevokeDevice {
                device: target,
                time_ms,
                signature,
            } => {
                let (state, signer) = (Arc::clone(state), device.clone());
                // A device that revoked itself may do nothing more: close after the response.
                let close = (target == device.device).then_some(CloseCode::Normal);
                self.spawn_response(tasks, id, close, async move {
                    crate::keys::revoke(&state, &signer, target, time_ms, &signature).await
                });
                return;
            }
            enrollment @ ClientBody::EnrollDevice { .. } => {
                let (state, signer) = (Arc::clone(state), device.clone());
                self.spawn_response(tasks, id, None, async move {
                    crate::keys::add_device(&state, &signer, enrollment).await
                });
                return;
            }
            rotation @ ClientBody::RotateDeviceKey { .. } => {
                let (state, signer) = (Arc::clone(state), device.clone());
                // The old key is revoked, so the connection ends after the response.
                self.spawn_response(tasks, id, Some(CloseCode::Normal), async move {
                    crate::keys::add_device(&state, &signer, rotation).await
                });
                return;
            }
            public if public.is_public() => {
                let state = Arc::clone(state);
                self.spawn_response(tasks, id, None, async move {
                    crate::keys::public_request(&state, public).await
                });
                return;
            }
            ClientBody::CreateGroup { group, group_info } => {
                if let Err(e) = group.validate() {
                    error_body(ErrorCode::MalformedFrame, e.to_string())
                } else {
                    let (state, creator) = (Arc::clone(state), device.device);
                    self.spawn_response(tasks, id, None, async move {
                        let created =
                            atlas_actors::create_group(&state.store, &group, &group_info, &creator)
                                .await;
                        match created {
                            Ok(epoch) => {
                                tracing::info!(group_id = %group, epoch, "group created");
                                durable(&state, ServerBody::GroupCreated { group, epoch }).await
                            }
                            Err(e) => group_error_body(&state, &e),
                        }
                    });
                    return;
                }
            }
            ClientBody::Welcomes => {
                let (state, device) = (Arc::clone(state), device.device);
                self.spawn_response(tasks, id, None, async move {
                    if let Err(e) = state.store.read_barrier(ReadScope::Everything).await {
                        return barrier_error_body(&e);
                    }
                    match state.store.welcomes(&device) {
                        Ok(welcomes) => ServerBody::Welcomes {
                            welcomes: fit_in_frame(welcomes),
                        },
                        Err(e) => {
                            tracing::error!(error = %e, "reading welcomes failed");
                            error_body(
                                ErrorCode::StorageFailure,
                                "cannot read welcomes, retry later".into(),
                            )
                        }
                    }
                });
                return;
            }
            group_request => {
                self.spawn_group_request(device, tasks, id, group_request);
                return;
            }
        };
        self.respond(tasks.queue, id, inline);
    }

    /// Runs a request in its own task and queues its response, then closes the connection with
    /// `close_after` if given.
    fn spawn_response(
        &self,
        tasks: &Tasks<'_>,
        id: u64,
        close_after: Option<CloseCode>,
        request: impl Future<Output = ServerBody> + 'static,
    ) {
        let Ok(permit) = Arc::clone(tasks.in_flight).try_acquire_owned() else {
            // The read loop only reads while a permit is free, and only it takes permits.
            unreachable!("request read without a free in-flight permit");
        };
        let state = Arc::clone(&self.state);
        let queue = tasks.queue.clone();
        let released = Arc::clone(tasks.released);
        let task = async move {
            let body = request.await;
            let succeeded = !matches!(body, ServerBody::Error { .. });
            send_response(&state, &queue, id, body);
            if let Some(code) = close_after
                && succeeded
            {
                queue.close_after_queued(code);
            }
            drop(permit);
            released.notify_one();
        };
        actix_web::rt::spawn(task.in_current_span());
    }

    fn spawn_group_request(
        &self,
        device: &DeviceRecord,
        tasks: &Tasks<'_>,
        id: u64,
        body: ClientBody,
    ) {
        let Ok(permit) = Arc::clone(tasks.in_flight).try_acquire_owned() else {
            // The read loop only reads while a permit is free, and only it takes permits.
            unreachable!("request read without a free in-flight permit");
        };
        let state = Arc::clone(&self.state);
        let queue = tasks.queue.clone();
        let released = Arc::clone(tasks.released);
        let sender = device.device;
        let task = async move {
            let body = match group_request(&state, sender, body).await {
                Ok(body) => body,
                Err(e) => group_error_body(&state, &e),
            };
            send_response(&state, &queue, id, body);
            drop(permit);
            released.notify_one();
        };
        actix_web::rt::spawn(task.in_current_span());
    }

    /// Queues a response from the read loop without waiting.
    fn respond(&self, queue: &SessionHandle, id: u64, body: ServerBody) {
        send_response(&self.state, queue, id, body);
    }

    async fn send_now(&mut self, id: u64, body: ServerBody) -> Result<(), actix_ws::Closed> {
        let frame = encode_response(&self.state, id, body);
        self.session.binary(frame).await
    }

    async fn close_code(&mut self, code: CloseCode) -> Ended {
        let (why, label) = close_reason(code);
        self.close(code, why, label).await
    }

    /// Closes with `code` once the frames queued before are sent, so that the client gets
    /// the error frames that led to the close. Gives up after the same 2 s as
    /// [`Self::close`].
    async fn close_after_queued(&mut self, queue: &SessionHandle, code: CloseCode) -> Ended {
        queue.close_after_queued(code);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !queue.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        Ended {
            label: close_reason(code).1,
        }
    }

    async fn close(&mut self, code: CloseCode, why: &str, label: &'static str) -> Ended {
        let reason = CloseReason {
            code: actix_ws::CloseCode::Other(code.as_u16()),
            description: Some(why.to_owned()),
        };
        // A client that does not read cannot take the close frame either: give up after a
        // moment and drop the connection.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.session.clone().close(Some(reason)),
        )
        .await;
        Ended { label }
    }
}

/// Returns the close reason sent with `code` after login, and the label of the metric that
/// counts it.
fn close_reason(code: CloseCode) -> (&'static str, &'static str) {
    match code {
        CloseCode::SlowConsumer => (
            "outbound queue full, resync from your cursor",
            "slow_consumer",
        ),
        CloseCode::Replaced => ("device logged in on another connection", "replaced"),
        CloseCode::GoingAway => ("server shutting down", "shutdown"),
        CloseCode::ProtocolViolation => ("too many invalid frames", "protocol"),
        CloseCode::AuthFailed => ("device revoked", "revoked"),
        _ => ("closed by server", "server"),
    }
}

/// Returns `body` once the changes made before it are on disk, so that a crash cannot hand
/// out a claimed KeyPackage again or forget a group whose creation was confirmed.
async fn durable(state: &GatewayState, body: ServerBody) -> ServerBody {
    match state.store.durable().await {
        Ok(()) => body,
        Err(e) => {
            tracing::error!(error = %e, "flush failed; change not confirmed");
            error_body(
                ErrorCode::StorageFailure,
                format!("storage flush failed: {e}"),
            )
        }
    }
}

/// Queues a response without waiting. A client that does not read its responses fills its
/// queue like one that does not read pushes, and is closed as a slow consumer.
fn send_response(state: &GatewayState, queue: &SessionHandle, id: u64, body: ServerBody) {
    queue.offer(encode_response(state, id, body).into());
}

/// Counts a response in the metrics and encodes it.
fn encode_response(state: &GatewayState, id: u64, body: ServerBody) -> Vec<u8> {
    if let ServerBody::Error { code, .. } = &body {
        state.metrics.errors.with_label_values(&[code.name()]).inc();
    }
    state
        .metrics
        .frames_out
        .with_label_values(&[body_type(&body)])
        .inc();
    encode_server(&ServerFrame {
        v: PROTOCOL_VERSION,
        id,
        body,
    })
}

/// Handles a request task needs: the connection's queue and in-flight limit.
struct Tasks<'a> {
    queue: &'a SessionHandle,
    in_flight: &'a Arc<Semaphore>,
    released: &'a Arc<Notify>,
}

/// Removes a connection's presence entry and stops its writer, also when the session panics.
struct SessionGuard {
    presence: Arc<Presence>,
    device: atlas_protocol::DeviceId,
    conn_id: u64,
    writer: actix_web::rt::task::JoinHandle<()>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.presence.detach(&self.device, self.conn_id);
        self.writer.abort();
    }
}

async fn group_request(
    state: &GatewayState,
    sender: atlas_protocol::DeviceId,
    body: ClientBody,
) -> Result<ServerBody, GroupError> {
    // In a cluster, sends and commits go to the node that owns the group.
    if let ClientBody::Commit { group, .. } | ClientBody::Send { group, .. } = &body
        && let Some(owners) = &state.owners
        && group.validate().is_ok()
        && let Some(owner) = owners.owner(group.as_bytes())
    {
        match crate::forward::submit_at_owner(state, owners, &owner, group, sender, &body).await {
            Ok(reply) => return Ok(reply),
            Err(e) => {
                tracing::warn!(group_id = %group, owner, error = %e, "forwarding to the group's owner failed; validating here");
            }
        }
    }
    group_request_here(state, sender, body, ReceiptSigning::Sign).await
}

/// Handles a group request on this node.
pub(crate) async fn group_request_here(
    state: &GatewayState,
    sender: atlas_protocol::DeviceId,
    body: ClientBody,
    signing: ReceiptSigning,
) -> Result<ServerBody, GroupError> {
    match body {
        ClientBody::Commit {
            group,
            msg_id,
            commit,
            welcome,
        } => {
            check_group_and_size(
                &group,
                commit.len() + welcome.as_ref().map_or(0, |w| w.len()),
            )?;
            let submission = Submission::Commit {
                commit,
                welcome: welcome.map(|w| w.into_vec()),
            };
            submit(state, &group, sender, msg_id, submission, signing).await
        }
        ClientBody::Send {
            group,
            msg_id,
            message,
        } => {
            check_group_and_size(&group, message.len())?;
            let submission = Submission::Application { message };
            submit(state, &group, sender, msg_id, submission, signing).await
        }
        ClientBody::Sync {
            group,
            after,
            limit,
        } => {
            check_group_and_size(&group, 0)?;
            // A sync must return every entry acknowledged through any node before it.
            state
                .store
                .read_barrier(ReadScope::Group(group.clone()))
                .await?;
            let limit = limit.clamp(1, MAX_SYNC_ENTRIES) as usize;
            let page = state
                .router
                .request(&group, |reply| GroupMsg::Sync {
                    device: sender,
                    after,
                    limit,
                    reply,
                })
                .await?;
            Ok(ServerBody::Entries {
                group,
                entries: page.entries,
                head: page.head,
                first_available: page.first_available,
            })
        }
        ClientBody::Ack { group, seq } => {
            check_group_and_size(&group, 0)?;
            let stored = state
                .router
                .request(&group, |reply| GroupMsg::Ack {
                    device: sender,
                    seq,
                    reply,
                })
                .await?;
            Ok(ServerBody::Acked { group, seq: stored })
        }
        ClientBody::Receipt { group, seq } => {
            check_group_and_size(&group, 0)?;
            let (fields, receipt) = state
                .router
                .request(&group, |reply| GroupMsg::Receipt {
                    device: sender,
                    seq,
                    reply,
                })
                .await?;
            Ok(ServerBody::Receipt { fields, receipt })
        }
        other => Err(GroupError::Internal(format!(
            "{} is not a group request",
            other.type_name()
        ))),
    }
}

async fn submit(
    state: &GatewayState,
    group: &atlas_protocol::GroupId,
    sender: atlas_protocol::DeviceId,
    msg_id: atlas_protocol::ClientMsgId,
    submission: Submission,
    signing: ReceiptSigning,
) -> Result<ServerBody, GroupError> {
    let request = |submission: Submission| {
        state.router.request(group, |reply| GroupMsg::Submit {
            sender,
            msg_id,
            submission,
            signing,
            reply,
        })
    };
    let accepted = match request(submission.clone()).await {
        // In a cluster the group may have been created through another node that this one
        // has not caught up with yet: wait until it has, and look again.
        Err(GroupError::NotFound(_)) if state.store.is_replicated() => {
            state
                .store
                .read_barrier(ReadScope::Group(group.clone()))
                .await?;
            request(submission).await?
        }
        other => other?,
    };
    Ok(ServerBody::Accepted(accepted))
}

fn check_group_and_size(group: &atlas_protocol::GroupId, size: usize) -> Result<(), GroupError> {
    group
        .validate()
        .map_err(|e| GroupError::Invalid(ErrorCode::MalformedFrame, e.to_string()))?;
    if size > MAX_MLS_MESSAGE_BYTES {
        return Err(GroupError::Invalid(
            ErrorCode::TooLarge,
            format!(
                "MLS message of {size} bytes exceeds the limit of {MAX_MLS_MESSAGE_BYTES} bytes"
            ),
        ));
    }
    Ok(())
}

/// Returns the error reply to a read that could not wait for the cluster's latest changes.
pub(crate) fn barrier_error_body(error: &atlas_storage::StorageError) -> ServerBody {
    tracing::debug!(error = %error, "read barrier failed");
    error_body(ErrorCode::Unavailable, error.to_string())
}

pub(crate) fn error_body(code: ErrorCode, message: String) -> ServerBody {
    ServerBody::Error {
        code,
        message,
        epoch: None,
    }
}

fn decode_error_body(error: &DecodeError) -> ServerBody {
    error_body(error.code(), error.to_string())
}

pub(crate) fn login_error_body(_state: &GatewayState, error: &LoginError) -> ServerBody {
    if let LoginError::Storage(e) = error {
        tracing::error!(error = %e, "directory storage failed");
    }
    error_body(error.code(), error.to_string())
}

pub(crate) fn group_error_body(_state: &GatewayState, error: &GroupError) -> ServerBody {
    match error {
        GroupError::Storage(atlas_storage::StorageError::Unavailable(e)) => {
            tracing::debug!(error = %e, "group request not committed");
        }
        GroupError::Storage(e) => tracing::error!(error = %e, "group storage failed"),
        GroupError::Internal(e) => tracing::error!(error = %e, "group request failed"),
        other => tracing::debug!(error = %other, "group request rejected"),
    }
    let epoch = match error {
        GroupError::StaleEpoch { current } | GroupError::NotMember(_, current) => Some(*current),
        _ => None,
    };
    ServerBody::Error {
        code: error.code(),
        message: error.to_string(),
        epoch,
    }
}

fn body_type(body: &ServerBody) -> &'static str {
    match body {
        ServerBody::Challenge { .. } => "challenge",
        ServerBody::LoggedIn { .. } => "logged_in",
        ServerBody::KeyPackagesStored { .. } => "key_packages_stored",
        ServerBody::Devices { .. } => "devices",
        ServerBody::KeyPackage { .. } => "key_package",
        ServerBody::GroupCreated { .. } => "group_created",
        ServerBody::Accepted(_) => "accepted",
        ServerBody::Entries { .. } => "entries",
        ServerBody::Acked { .. } => "acked",
        ServerBody::Welcomes { .. } => "welcomes",
        ServerBody::Pong => "pong",
        ServerBody::Error { .. } => "error",
        ServerBody::Push { .. } => "push",
        ServerBody::WelcomePush(_) => "welcome_push",
        ServerBody::DeviceRevoked { .. } => "device_revoked",
        ServerBody::DeviceEnrolled { .. } => "device_enrolled",
        ServerBody::KeyRotated { .. } => "key_rotated",
        ServerBody::Jwks(_) => "jwks",
        ServerBody::KtHead(_) => "kt_head",
        ServerBody::KtEntries { .. } => "kt_entries",
        ServerBody::KtConsistency(_) => "kt_consistency",
        ServerBody::Receipt { .. } => "receipt",
    }
}

/// Returns whether a request changes stored state, so that a node cut off from the majority
/// rejects it. Reads, acknowledgements of a device's own cursor and pings do not count.
fn changes_state(body: &ClientBody) -> bool {
    matches!(
        body,
        ClientBody::UploadKeyPackages { .. }
            | ClientBody::ClaimKeyPackage { .. }
            | ClientBody::RevokeDevice { .. }
            | ClientBody::EnrollDevice { .. }
            | ClientBody::RotateDeviceKey { .. }
            | ClientBody::CreateGroup { .. }
            | ClientBody::Commit { .. }
            | ClientBody::Send { .. }
    )
}
