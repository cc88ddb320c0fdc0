//! The connection of each logged-in device, and the bounded outbound queue of each connection.

use atlas_actors::Deliver;
use atlas_protocol::{CloseCode, DeviceId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};

/// An item for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// An encoded server frame.
    Frame(bytes::Bytes),
    /// Close the connection with this code once the frames queued before it are written.
    Close(CloseCode),
}

/// The sending side of one connection's outbound queue, shared by pushes and responses.
/// The queue is bounded in frames and in bytes. A frame that does not fit closes the
/// connection as a slow consumer instead of waiting, so no producer ever blocks on a client.
#[derive(Clone)]
pub struct SessionHandle {
    /// Process-unique connection id.
    pub conn_id: u64,
    queue: mpsc::Sender<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Set to ask the connection's task to close with the given code.
    pub close: watch::Sender<Option<CloseCode>>,
}

/// The receiving side of a connection's outbound queue, owned by its writer.
pub struct OutboundReceiver {
    queue: mpsc::Receiver<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
}

impl OutboundReceiver {
    /// Waits for the next item; `None` once every handle is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let item = self.queue.recv().await?;
        if let Outbound::Frame(frame) = &item {
            self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        }
        Some(item)
    }
}

impl SessionHandle {
    /// Creates a queue of at most `capacity` frames and `max_bytes` bytes, and the watch that
    /// requests the connection to close.
    pub fn new(
        conn_id: u64,
        capacity: usize,
        max_bytes: usize,
    ) -> (Self, OutboundReceiver, watch::Receiver<Option<CloseCode>>) {
        let (queue, rx) = mpsc::channel(capacity.max(1));
        let (close, close_rx) = watch::channel(None);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let handle = Self {
            conn_id,
            queue,
            queued_bytes: Arc::clone(&queued_bytes),
            max_bytes,
            close,
        };
        (
            handle,
            OutboundReceiver {
                queue: rx,
                queued_bytes,
            },
            close_rx,
        )
    }

    /// Queues a frame without waiting. A full queue (frames or bytes) closes the connection
    /// as a slow consumer. Returns false when the frame was not queued.
    pub fn offer(&self, frame: bytes::Bytes) -> bool {
        let len = frame.len();
        let queued = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if queued + len > self.max_bytes && queued > 0 {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close.send_replace(Some(CloseCode::SlowConsumer));
            return false;
        }
        match self.queue.try_send(Outbound::Frame(frame)) {
            Ok(()) => true,
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if let mpsc::error::TrySendError::Full(_) = e {
                    self.close.send_replace(Some(CloseCode::SlowConsumer));
                }
                false
            }
        }
    }

    /// Asks the writer to close the connection with `code` after the frames already queued,
    /// so a response queued before is delivered first. A full queue closes at once instead.
    pub fn close_after_queued(&self, code: CloseCode) {
        if self.queue.try_send(Outbound::Close(code)).is_err() {
            self.close.send_replace(Some(code));
        }
    }

    /// True once the writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

/// Device-to-connection registry of this node. A device has at most one connection: a new
/// login replaces the older one, which is closed with [`CloseCode::Replaced`].
#[derive(Default)]
pub struct Presence {
    sessions: RwLock<HashMap<DeviceId, SessionHandle>>,
    next_conn: AtomicU64,
    slow_closed: AtomicU64,
}

impl Presence {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates a connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a logged-in connection for `device`, closing any older one.
    pub fn attach(&self, device: DeviceId, handle: SessionHandle) {
        let old = self.write().insert(device, handle);
        if let Some(old) = old {
            old.close.send_replace(Some(CloseCode::Replaced));
        }
    }

    /// Removes the device's entry if it still belongs to connection `conn_id`.
    pub fn detach(&self, device: &DeviceId, conn_id: u64) {
        let mut sessions = self.write();
        if sessions.get(device).is_some_and(|h| h.conn_id == conn_id) {
            sessions.remove(device);
        }
    }

    /// Asks connection `conn_id` to close with `code`.
    pub fn close_conn(&self, conn_id: u64, code: CloseCode) {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = sessions.values().find(|h| h.conn_id == conn_id) {
            handle.close.send_replace(Some(code));
        }
    }

    /// Asks the connection of `device`, if any, to close with `code`.
    pub fn close_device(&self, device: &DeviceId, code: CloseCode) {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = sessions.get(device) {
            handle.close.send_replace(Some(code));
        }
    }

    /// Number of devices with a connection.
    pub fn online(&self) -> usize {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Asks every connection to close with `code`.
    pub fn close_all(&self, code: CloseCode) {
        for handle in self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            handle.close.send_replace(Some(code));
        }
    }

    /// Connections closed because their queue filled.
    pub fn slow_consumers_closed(&self) -> u64 {
        self.slow_closed.load(Ordering::Relaxed)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<DeviceId, SessionHandle>> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Deliver for Presence {
    fn push(&self, devices: &[DeviceId], frame: bytes::Bytes) {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        for device in devices {
            if let Some(handle) = sessions.get(device)
                && !handle.offer(frame.clone())
                && !handle.is_closed()
            {
                self.slow_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(conn_id = handle.conn_id, device_id = %device, "closing slow consumer");
            }
        }
    }
}
