//! The TLS side of node-to-node links, run by Atlas rather than by ractor_cluster, so that
//! each link's peer certificate is known: a peer must declare the node name that its
//! certificate was made for.
//!
//! Atlas accepts and dials the TCP connections and runs the mutual TLS 1.3 handshake. It
//! records the common name of the peer's certificate under a label unique to the link. Then
//! it hands the encrypted stream to ractor_cluster's `NodeServer`, which runs its cookie
//! authentication on it.
//!
//! The declared name is checked twice. On an incoming link, the dialling peer's first frame
//! declares its name; Atlas reads that frame itself and closes the link when the name is not
//! the certificate's. ractor_cluster never receives the claim, so it cannot drop a live
//! member's session in favour of it. On an outgoing link the peer's name comes later in the exchange,
//! so once ractor_cluster has authenticated a session, [`PeerCertificates::check`] compares
//! the declared name with the recorded one, and the session is stopped when they differ. ractor_cluster's `NodeServer` always starts its own
//! listener, so that listener runs on a loopback port that no node dials, with a TLS
//! configuration that rejects every client.

use crate::tls::peer_common_name;
use ractor::ActorRef;
use ractor_cluster::{ClusterBidiStream, NodeServerMessage};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Time an incoming link has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Maximum incoming TLS handshakes in progress at once. A cluster's few nodes each dial an
/// address at most once at a time. Connections beyond this are closed at once, so a flood of
/// stalled handshakes costs at most this many tasks.
const MAX_HANDSHAKES: usize = 64;

/// Largest first frame accepted on an incoming link. The name message that opens
/// ractor_cluster's exchange takes well under 1 KiB.
const MAX_FIRST_FRAME: u64 = 16 * 1024;

/// Minimum time between two warnings about connections closed at [`MAX_HANDSHAKES`].
const BUSY_WARNING_PAUSE: Duration = Duration::from_secs(10);

/// Minimum time between two warnings about failed handshakes, so that a flood of bad
/// connections costs one line a second, with the count of those not logged.
const FAILURE_WARNING_PAUSE: Duration = Duration::from_secs(1);

/// A rate limit for one kind of warning: one per pause, with a count of the ones held back.
struct WarningLimit {
    pause: Duration,
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl WarningLimit {
    fn new(pause: Duration) -> Self {
        Self {
            pause,
            state: Mutex::new((None, 0)),
        }
    }

    /// Returns how many warnings were held back since the last one if this one may be
    /// written, `None` if it is held back too.
    fn admit(&self) -> Option<u64> {
        self.admit_at(std::time::Instant::now())
    }

    fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, held) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.pause) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// The common names of the certificates of the open links, by link label. ractor_cluster
/// reports a link's label as the session's peer address.
#[derive(Clone, Default)]
pub(crate) struct PeerCertificates {
    names: Arc<Mutex<HashMap<String, String>>>,
    next_link: Arc<AtomicU64>,
}

/// Outcome of [`PeerCertificates::check`] for a session that ractor_cluster authenticated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NameCheck {
    /// The declared name is the certificate's.
    Matches,
    /// The peer declared `declared`, but its certificate was made for `certificate`.
    Differs {
        declared: String,
        certificate: String,
    },
    /// No certificate is recorded for the link, so it did not come through Atlas's TLS.
    Unknown,
}

impl PeerCertificates {
    /// Records the common name of a new link's peer certificate and returns the link's label.
    fn record(&self, peer: SocketAddr, common_name: String) -> String {
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let label = format!("{peer} (link {link})");
        self.lock().insert(label.clone(), common_name);
        label
    }

    /// Forgets the link labelled `label`, once its session closed.
    pub(crate) fn forget(&self, label: &str) {
        self.lock().remove(label);
    }

    /// Compares the node name a peer declared on the link labelled `label`,
    /// `name@host` as ractor_cluster carries it, with its certificate's common name.
    pub(crate) fn check(&self, label: &str, declared: &str) -> NameCheck {
        let declared = node_name(declared);
        match self.lock().get(label) {
            None => NameCheck::Unknown,
            Some(certificate) if certificate == declared => NameCheck::Matches,
            Some(certificate) => NameCheck::Differs {
                declared: declared.to_owned(),
                certificate: certificate.clone(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Returns the node name of `declared`, written `name@host` by ractor_cluster.
fn node_name(declared: &str) -> &str {
    declared.split('@').next().unwrap_or(declared)
}

/// The fields of ractor_cluster's first frame on a link that the name check reads.
/// ractor_cluster 0.16 sends each message as a big-endian u64 length and a protobuf
/// `NetworkMessage`. Its field 1 is an `AuthenticationMessage`, whose field 1 is the dialling
/// node's `NameMessage`, whose field 1 is the name as `name@host`. Decoding skips every other
/// field.
#[derive(Clone, PartialEq, prost::Message)]
struct FirstFrame {
    #[prost(message, optional, tag = "1")]
    auth: Option<FirstFrameAuth>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FirstFrameAuth {
    #[prost(message, optional, tag = "1")]
    name: Option<FirstFrameName>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FirstFrameName {
    #[prost(string, tag = "1")]
    name: String,
}

/// Reads the first frame of an incoming link. Returns its bytes, length prefix included, and
/// the node name it declares, or the reason it cannot be the name message of ractor_cluster.
async fn read_first_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Vec<u8>, String), String> {
    let length = stream
        .read_u64()
        .await
        .map_err(|e| format!("reading its first frame failed: {e}"))?;
    if length > MAX_FIRST_FRAME {
        return Err(format!(
            "its first frame has {length} bytes, more than the {MAX_FIRST_FRAME} allowed for a \
             name message"
        ));
    }
    // At most MAX_FIRST_FRAME, so the length fits a usize.
    let mut frame = vec![0; 8 + length as usize];
    frame[..8].copy_from_slice(&length.to_be_bytes());
    stream
        .read_exact(&mut frame[8..])
        .await
        .map_err(|e| format!("reading its first frame failed: {e}"))?;
    let declared = <FirstFrame as prost::Message>::decode(&frame[8..])
        .ok()
        .and_then(|first| first.auth?.name)
        .map(|name| name.name)
        .filter(|name| !name.is_empty())
        .ok_or("its first frame is not a node name message")?;
    Ok((frame, declared))
}

/// A stream whose reads return `prefix` first, then what `inner` reads. It gives back to
/// ractor_cluster the first frame that the name check read.
struct Replay<S> {
    prefix: Vec<u8>,
    consumed: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An encrypted link, as ractor_cluster takes it.
struct Link<S> {
    stream: S,
    label: String,
}

impl<S> ClusterBidiStream for Link<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn split(self: Box<Self>) -> (ractor_cluster::BoxRead, ractor_cluster::BoxWrite) {
        let (read, write) = tokio::io::split(self.stream);
        (Box::new(read), Box::new(write))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

/// Accepts node-to-node links on `listener` until the node server stops: each connection
/// that completes the handshake, with a client certificate of the cluster CA, goes to
/// `server` as an incoming session.
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    server: ActorRef<NodeServerMessage>,
    certificates: PeerCertificates,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let busy = WarningLimit::new(BUSY_WARNING_PAUSE);
    let failures = Arc::new(WarningLimit::new(FAILURE_WARNING_PAUSE));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a cluster connection failed; accepting the next");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if server.get_status() > ractor::ActorStatus::Running {
            return;
        }
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
            if let Some(held) = busy.admit() {
                tracing::warn!(%peer, also_closed = held, limit = MAX_HANDSHAKES, "cluster connections closed: too many TLS handshakes in progress");
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        let certificates = certificates.clone();
        let failures = Arc::clone(&failures);
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            // The handshake and the first frame share one deadline and one permit.
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let handshake = tokio::time::timeout_at(deadline, acceptor.accept(socket)).await;
            let mut stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    if let Some(held) = failures.admit() {
                        tracing::warn!(%peer, error = %e, not_logged = held, "cluster peer refused: the TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    if let Some(held) = failures.admit() {
                        tracing::warn!(%peer, timeout_s = HANDSHAKE_TIMEOUT.as_secs(), not_logged = held, "cluster peer refused: no TLS handshake in time");
                    }
                    return;
                }
            };
            let Some(name) = link_common_name(stream.get_ref().1) else {
                tracing::warn!(%peer, "cluster peer refused: its certificate has no common name");
                return;
            };
            let first = tokio::time::timeout_at(deadline, read_first_frame(&mut stream)).await;
            drop(permit);
            let (frame, declared) = match first {
                Ok(Ok(first)) => first,
                Ok(Err(reason)) => {
                    if let Some(held) = failures.admit() {
                        tracing::warn!(%peer, certificate = %name, not_logged = held, "cluster peer refused: {reason}");
                    }
                    return;
                }
                Err(_) => {
                    if let Some(held) = failures.admit() {
                        tracing::warn!(%peer, certificate = %name, timeout_s = HANDSHAKE_TIMEOUT.as_secs(), not_logged = held, "cluster peer refused: timed out waiting for the frame with its node name");
                    }
                    return;
                }
            };
            if node_name(&declared) != name {
                if let Some(held) = failures.admit() {
                    tracing::error!(
                        %peer,
                        declared = %node_name(&declared),
                        certificate = %name,
                        not_logged = held,
                        "cluster peer refused before its session started: it declares a node \
                         name other than the one its certificate was made for; give each node \
                         the certificate of its own name (`atlas cert node NAME`)"
                    );
                }
                return;
            }
            let label = certificates.record(peer, name);
            let stream = Replay {
                prefix: frame,
                consumed: 0,
                inner: stream,
            };
            let link = Box::new(Link { stream, label });
            if server
                .cast(NodeServerMessage::ConnectionOpenedExternal {
                    stream: link,
                    is_server: true,
                })
                .is_err()
            {
                tracing::debug!(%peer, "the node server stopped; dropping an incoming cluster link");
            }
        });
    }
}

/// An address this node dials, with the name its peer should present and those it may not.
pub(crate) struct DialedPeer {
    pub addr: SocketAddr,
    /// The member last heard at this address; `None` for a seed no member announced.
    pub expected: Option<String>,
    /// Names of the members heard recently (at other addresses, since live members are not
    /// dialled), this node's own included.
    pub live_names: Arc<std::collections::HashSet<String>>,
}

/// Failure of a dial.
#[derive(Debug)]
pub(crate) enum DialError {
    /// No TLS link came up (connection refused, failed handshake, stopped node server).
    Failed(String),
    /// The peer's certificate names another node than the address may have.
    Refused(String),
}

/// Dials `peer`, runs the TLS handshake with `connector` and hands the link to `server` as
/// an outgoing session.
///
/// The link is refused before ractor_cluster receives it when the peer's certificate names
/// another member than the one last heard at the address, or a member heard at another
/// address. ractor_cluster keeps one session per name, so such a link would displace the
/// live member's session. Its own name check on dialled links comes only after
/// authentication.
pub(crate) async fn dial(
    server: &ActorRef<NodeServerMessage>,
    peer: &DialedPeer,
    connector: tokio_rustls::TlsConnector,
    certificates: &PeerCertificates,
) -> Result<(), DialError> {
    let addr = peer.addr;
    let socket = TcpStream::connect(addr)
        .await
        .map_err(|e| DialError::Failed(format!("cannot connect: {e}")))?;
    let _ = socket.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = connector
        .connect(name, socket)
        .await
        .map_err(|e| DialError::Failed(format!("the TLS handshake failed: {e}")))?;
    let common_name = link_common_name(stream.get_ref().1).ok_or_else(|| {
        DialError::Refused("the peer's certificate has no common name".to_owned())
    })?;
    check_dialed_name(peer, &common_name).map_err(DialError::Refused)?;
    let label = certificates.record(addr, common_name);
    server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: Box::new(Link { stream, label }),
            is_server: false,
        })
        .map_err(|e| DialError::Failed(format!("the node server stopped: {e}")))
}

/// Returns why a dialled peer presenting a certificate for `common_name` is refused, if it is.
fn check_dialed_name(peer: &DialedPeer, common_name: &str) -> Result<(), String> {
    if let Some(expected) = &peer.expected
        && expected != common_name
    {
        return Err(format!(
            "the peer presents the certificate of {common_name}, but {expected} was the \
             member at this address"
        ));
    }
    if peer.live_names.contains(common_name) {
        return Err(format!(
            "the peer presents the certificate of {common_name}, a node heard at another \
             address; two processes hold that certificate"
        ));
    }
    Ok(())
}

/// Returns the common name of the certificate the peer presented on a TLS link.
fn link_common_name(link: &rustls::CommonState) -> Option<String> {
    peer_common_name(link.peer_certificates()?.first()?)
}

/// Builds the TLS configuration of ractor_cluster's own listener: the certificate of
/// `server_tls`, and a client verifier that rejects every client.
pub(crate) fn reject_all_clients(
    server_tls: &rustls::ServerConfig,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(RejectAll))
        .with_cert_resolver(Arc::clone(&server_tls.cert_resolver));
    Ok(Arc::new(config))
}

fn internal_listener_error() -> rustls::Error {
    rustls::Error::General("cluster links go to the node's cluster address".into())
}

/// A client certificate verifier that rejects every certificate.
#[derive(Debug)]
struct RejectAll;

impl rustls::server::danger::ClientCertVerifier for RejectAll {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        tracing::warn!(
            "a connection reached the unused internal cluster listener and was rejected"
        );
        Err(internal_listener_error())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(internal_listener_error())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_limit_counts_held_back() {
        let limit = WarningLimit::new(Duration::from_secs(1));
        let start = std::time::Instant::now();
        assert_eq!(limit.admit_at(start), Some(0));
        assert_eq!(limit.admit_at(start + Duration::from_millis(10)), None);
        assert_eq!(limit.admit_at(start + Duration::from_millis(900)), None);
        assert_eq!(limit.admit_at(start + Duration::from_secs(1)), Some(2));
        assert_eq!(limit.admit_at(start + Duration::from_millis(1500)), None);
    }

    /// ractor_cluster's own first frame on a link it dials, read by `read_first_frame`: the
    /// check depends on ractor_cluster's wire format, so this fails if an upgrade changes it.
    #[tokio::test]
    async fn first_frame_gives_declared_name() {
        let server = ractor_cluster::NodeServer::new(
            0,
            "cookie".into(),
            "node-q".into(),
            "127.0.0.1".into(),
            None,
            None,
        )
        .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
        let (server, handle) = ractor::Actor::spawn(None, server, ()).await.unwrap();
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream: Box::new(Link {
                    stream: ours,
                    label: "test link".into(),
                }),
                is_server: false,
            })
            .unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), read_first_frame(&mut theirs));
        let (frame, declared) = read.await.unwrap().unwrap();
        assert_eq!(node_name(&declared), "node-q", "declared {declared:?}");
        assert_eq!(
            frame.len(),
            8 + u64::from_be_bytes(frame[..8].try_into().unwrap()) as usize
        );

        // The replayed stream gives the same frame back first, then the rest.
        let mut replay = Replay {
            prefix: frame.clone(),
            consumed: 0,
            inner: &b"after"[..],
        };
        let mut everything = Vec::new();
        replay.read_to_end(&mut everything).await.unwrap();
        assert_eq!(&everything[..frame.len()], &frame[..]);
        assert_eq!(&everything[frame.len()..], b"after");
        server.stop(None);
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn first_frame_rejects_other_frames() {
        let mut too_long = &(MAX_FIRST_FRAME + 1).to_be_bytes()[..];
        let refused = read_first_frame(&mut too_long).await.unwrap_err();
        assert!(refused.contains("more than the"), "{refused}");

        // A well-formed frame whose message is not a name message.
        let mut other = 3u64.to_be_bytes().to_vec();
        other.extend_from_slice(&[0x18, 0x01, 0x00]);
        let refused = read_first_frame(&mut &other[..]).await.unwrap_err();
        assert!(refused.contains("not a node name message"), "{refused}");

        // A frame cut short.
        let mut short = 10u64.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        let refused = read_first_frame(&mut &short[..]).await.unwrap_err();
        assert!(
            refused.contains("reading its first frame failed"),
            "{refused}"
        );
    }

    #[test]
    fn dialed_peer_must_hold_the_address_name() {
        let peer = |expected: Option<&str>| DialedPeer {
            addr: "127.0.0.1:7003".parse().unwrap(),
            expected: expected.map(str::to_owned),
            live_names: Arc::new(["node-a", "node-b"].map(str::to_owned).into()),
        };
        assert_eq!(check_dialed_name(&peer(Some("node-c")), "node-c"), Ok(()));
        // A seed that no member announced may be any node that is not heard elsewhere.
        assert_eq!(check_dialed_name(&peer(None), "node-d"), Ok(()));
        let other = check_dialed_name(&peer(Some("node-c")), "node-d").unwrap_err();
        assert!(other.contains("node-c was the member"), "{other}");
        let live = check_dialed_name(&peer(None), "node-b").unwrap_err();
        assert!(live.contains("heard at another address"), "{live}");
        let own = check_dialed_name(&peer(Some("node-a")), "node-a").unwrap_err();
        assert!(own.contains("heard at another address"), "{own}");
    }

    #[test]
    fn declared_name_must_be_the_certificates() {
        let certificates = PeerCertificates::default();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let label = certificates.record(peer, "node-b".into());
        assert_eq!(
            certificates.check(&label, "node-b@127.0.0.1"),
            NameCheck::Matches
        );
        assert_eq!(
            certificates.check(&label, "node-a@127.0.0.1"),
            NameCheck::Differs {
                declared: "node-a".into(),
                certificate: "node-b".into(),
            }
        );
        // Two links from one address have their own labels.
        let other = certificates.record(peer, "node-c".into());
        assert_ne!(label, other);
        assert_eq!(
            certificates.check(&other, "node-c@127.0.0.1"),
            NameCheck::Matches
        );
        certificates.forget(&label);
        assert_eq!(
            certificates.check(&label, "node-b@127.0.0.1"),
            NameCheck::Unknown
        );
    }
}
