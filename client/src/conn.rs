//! The client's WebSocket connection: a writer task, a reader task that matches responses to
//! requests by id, and a channel of pushes.

use crate::ClientError;
use atlas_protocol::{
    ClientBody, ClientFrame, MAX_FRAME_BYTES, PROTOCOL_VERSION, ServerBody, ServerFrame,
    decode_server, encode_client,
};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerBody>>>>;

/// Close code and reason the server sent, if any.
pub type CloseInfo = Option<(u16, String)>;

pub(crate) struct Connection {
    outgoing: mpsc::Sender<Message>,
    waiters: Waiters,
    next_id: AtomicU64,
    pub(crate) pushes: mpsc::UnboundedReceiver<ServerBody>,
    pub(crate) closed: watch::Receiver<Option<CloseInfo>>,
    /// While true the reader task stops reading the socket (flow-control tests).
    pub(crate) paused: watch::Sender<bool>,
    request_timeout: Duration,
}

impl Connection {
    /// Connects and returns the connection and the server's challenge.
    /// `dpop` is the DPoP proof sent with the upgrade request.
    pub(crate) async fn open(
        url: &str,
        tls: rustls::ClientConfig,
        request_timeout: Duration,
        dpop: &str,
    ) -> Result<(Self, ServerBody), ClientError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::Connect(format!("invalid URL {url}: {e}")))?;
        let proof = dpop
            .parse()
            .map_err(|_| ClientError::Connect("DPoP proof is not a valid header value".into()))?;
        request.headers_mut().insert("DPoP", proof);
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME_BYTES * 2);
        config.max_frame_size = Some(MAX_FRAME_BYTES * 2);
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
        let (ws, _) = tokio::time::timeout(
            request_timeout,
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(config),
                true,
                Some(connector),
            ),
        )
        .await
        .map_err(|_| ClientError::Connect(format!("connecting to {url} timed out")))?
        .map_err(|e| match e {
            // The server rejected the upgrade with an HTTP error, such as a DPoP failure.
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                ClientError::Http(Box::new(crate::accounts::http_failure(
                    url,
                    response.status().as_u16(),
                    response.body().as_deref().unwrap_or_default(),
                    header("www-authenticate"),
                    header("dpop-nonce"),
                    header("date"),
                )))
            }
            other => ClientError::Connect(format!("cannot connect to {url}: {other}")),
        })?;
        let (mut sink, mut stream) = ws.split();

        let (outgoing, mut rx) = mpsc::channel::<Message>(256);
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let waiters: Waiters = Arc::default();
        let (push_tx, pushes) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(None);
        let (challenge_tx, challenge_rx) = oneshot::channel();
        let reader_waiters = Arc::clone(&waiters);
        let (paused, mut paused_rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut challenge_tx = Some(challenge_tx);
            let mut close = None;
            loop {
                if paused_rx.wait_for(|p| !*p).await.is_err() {
                    break;
                }
                let Some(message) = stream.next().await else {
                    break;
                };
                let bytes = match message {
                    Ok(Message::Binary(bytes)) => bytes,
                    Ok(Message::Close(frame)) => {
                        close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "connection read failed");
                        break;
                    }
                };
                let frame: ServerFrame = match decode_server(&bytes) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::warn!(error = %e, "server sent an undecodable frame");
                        continue;
                    }
                };
                if frame.id == 0 {
                    if let ServerBody::Challenge { .. } = frame.body
                        && let Some(tx) = challenge_tx.take()
                    {
                        let _ = tx.send(frame.body);
                        continue;
                    }
                    let _ = push_tx.send(frame.body);
                    continue;
                }
                let waiter = reader_waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&frame.id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(frame.body);
                    }
                    None => tracing::debug!(id = frame.id, "response to an unknown request id"),
                }
            }
            // Mark the connection closed before failing the waiters, so that a request
            // registered after this point finds the mark instead of waiting for a timeout.
            let _ = closed_tx.send(Some(close));
            reader_waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        });

        let challenge = tokio::time::timeout(request_timeout, challenge_rx)
            .await
            .map_err(|_| ClientError::Connect("server sent no login challenge".into()))?
            .map_err(|_| {
                // The reader stored the close frame, if any, before it dropped the sender.
                let close = closed.borrow().clone().flatten();
                let detail = match close {
                    Some((code, reason)) => format!(" (close code {code}: {reason})"),
                    None => String::new(),
                };
                ClientError::Connect(format!(
                    "connection closed before the login challenge{detail}"
                ))
            })?;
        let conn = Self {
            outgoing,
            waiters,
            next_id: AtomicU64::new(1),
            pushes,
            closed,
            paused,
            request_timeout,
        };
        Ok((conn, challenge))
    }

    /// Sends a request and waits for its response. Error frames become [`ClientError::Server`].
    pub(crate) async fn request(&self, body: ClientBody) -> Result<ServerBody, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_client(&ClientFrame {
            v: PROTOCOL_VERSION,
            id,
            body,
        });
        self.request_raw(id, bytes).await
    }

    /// Sends pre-encoded frame bytes registered under request `id`.
    pub(crate) async fn request_raw(
        &self,
        id: u64,
        bytes: Vec<u8>,
    ) -> Result<ServerBody, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if self.closed.borrow().is_some() {
            self.waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(ClientError::Disconnected(self.close_info()));
        }
        self.outgoing
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|_| ClientError::Disconnected(self.close_info()))?;
        let body = tokio::time::timeout(self.request_timeout, rx)
            .await
            .map_err(|_| {
                self.waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                ClientError::Timeout(id)
            })?
            .map_err(|_| ClientError::Disconnected(self.close_info()))?;
        match body {
            ServerBody::Error {
                code,
                message,
                epoch,
            } => Err(ClientError::Server {
                code,
                message,
                epoch,
            }),
            other => Ok(other),
        }
    }

    /// Sends raw bytes as one binary WebSocket message without waiting for a response.
    pub(crate) async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.outgoing
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|_| ClientError::Disconnected(self.close_info()))
    }

    /// Allocates a request id for [`Connection::request_raw`].
    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Returns the close code and reason, once the connection has closed.
    pub(crate) fn close_info(&self) -> CloseInfo {
        self.closed.borrow().clone().flatten()
    }
}
