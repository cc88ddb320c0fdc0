//! The connection of each logged-in device, and the bounded outbound queue of each connection.

use atlas_actors::Deliver;
use atlas_protocol::{CloseCode, DeviceId};
use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, watch};

/// An item for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// An encoded server frame.
    Frame(bytes::Bytes),
}

/// Presence entry of one connection.
#[derive(Clone)]
pub struct SessionHandle {
    /// Process-unique connection id.
    pub conn_id: u64,
    /// The connection's bounded outbound queue.
    pub queue: mpsc::Sender<Outbound>,
    /// Set to ask the connection's task to close with the given code.
    pub close: watch::Sender<Option<CloseCode>>,
}

impl SessionHandle {
    /// Queues a frame without waiting; a full queue closes the connection as a slow consumer.
    /// Returns false when the frame was not queued.
    pub fn offer(&self, frame: bytes::Bytes) -> bool {
        match self.queue.try_send(Outbound::Frame(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close.send_replace(Some(CloseCode::SlowConsumer));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
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
                && !handle.queue.is_closed()
            {
                self.slow_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(conn_id = handle.conn_id, device_id = %device, "closing slow consumer");
            }
        }
    }
}
