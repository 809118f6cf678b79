//! One listening socket: accepts connections within a process-wide and a
//! per-peer cap, gives each its timeouts (`io`), its TLS handshake (off
//! the accept loop, with its own timeout), and HTTP/1.1 or HTTP/2 (ALPN
//! over TLS, prior knowledge in cleartext) with deliberate limits. The
//! inference listener and the admin listener are two of these.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::io::{CountedBody, Guarded, InFlight, StreamTimeouts};
use super::tls::Tls;
use super::{Phase, State, routes};

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Inference and health, and `/metrics` when there is no admin
    /// listener.
    Inference { metrics: bool },
    /// `/metrics`, `/admin/*` and health.
    Admin,
}

/// Connection limits of a listener.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once on the inference listener (the admin
    /// listener: at most `ADMIN_CONNECTIONS`); past it, a new connection
    /// is closed at once (counted), never left waiting in the backlog.
    pub max_connections: usize,
    /// Connections open at once from one IP address (0: no limit).
    pub max_connections_per_peer: usize,
    /// From accept to the first byte (or TLS handshake) of the client.
    pub first_byte_timeout: Duration,
    /// For the whole TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// With no request in flight, a connection is closed after this.
    pub idle_timeout: Duration,
    /// A response write that makes no progress for this long ends the
    /// connection.
    pub write_timeout: Duration,
    /// Time a client has to send a request head.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; hyper's own cap is twice it (the
    /// exact check, with a JSON 431, is `routes::check_headers`).
    pub max_header_bytes: usize,
    /// Headers per request (431 above).
    pub max_headers: usize,
    pub http2: Http2Limits,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 20_000,
            max_connections_per_peer: 1_000,
            first_byte_timeout: Duration::from_secs(2),
            tls_handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            http2: Http2Limits::default(),
        }
    }
}

/// HTTP/2 settings.
#[derive(Clone, Debug)]
pub struct Http2Limits {
    /// Streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Flow-control window of a stream (bytes a client may send before we
    /// read them).
    pub stream_window_bytes: u32,
    /// Flow-control window of a connection.
    pub connection_window_bytes: u32,
    /// A ping every interval; no answer within the timeout closes the
    /// connection.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// Streams a client reset before we accepted them (rapid reset,
    /// CVE-2023-44487): past it the connection gets GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams we reset because of the client's protocol errors (CVE-2025-
    /// 8671, "MadeYouReset"): past it, GOAWAY.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            stream_window_bytes: 256 << 10,
            connection_window_bytes: 1 << 20,
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
        }
    }
}

/// The address a peer's connections are counted under: an IPv4 address
/// (also when written IPv4-mapped), or an IPv6 /64, the block one host
/// usually has to itself.
pub(super) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Open connections per peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn enter(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = peers.entry(ip).or_default();
        if limit > 0 && *open >= limit {
            return None;
        }
        *open += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = peers.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// A bound listener and what it serves.
pub(crate) struct Listener {
    pub socket: TcpListener,
    pub tls: Option<Arc<Tls>>,
    pub role: Role,
    pub name: &'static str,
}

/// The connections of a listener, waited for at shutdown.
pub(crate) struct Connections {
    slots: Arc<Semaphore>,
    capacity: usize,
}

impl Connections {
    pub(crate) fn new(capacity: usize) -> Self {
        Connections {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Returns when every connection has ended.
    pub(crate) async fn all_closed(&self) {
        let n = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(n).await;
    }
}

fn builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The head timeout is `io::Guarded`'s: hyper's also runs while a
        // keep-alive connection waits, which would make it the idle time.
        .header_read_timeout(None)
        .max_buf_size((limits.max_header_bytes * 2).max(8192))
        .max_headers(limits.max_headers * 2)
        .keep_alive(true);
    let h2 = &limits.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2.max_concurrent_streams)
        // h2 counts 32 bytes per field beyond name and value, and the
        // pseudo-headers: the exact check with its JSON 431 is ours, this
        // is the backstop (twice it, as for HTTP/1).
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes * 2 + 32 * limits.max_headers)
                .unwrap_or(u32::MAX),
        )
        .initial_stream_window_size(h2.stream_window_bytes)
        .initial_connection_window_size(h2.connection_window_bytes)
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams);
    builder
}

/// Accepts until the phase reaches `Closing`.
pub(crate) async fn accept_loop(
    listener: Listener,
    connections: Arc<Connections>,
    state: Arc<State>,
    mut phase: watch::Receiver<Phase>,
) {
    let limits = state.config.connections.clone();
    let builder = Arc::new(builder(&limits));
    let peers = Arc::new(Peers::default());
    let telemetry = state.pipeline.telemetry();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of
                    // spinning. Anything else (a connection reset before
                    // it was accepted) concerns that connection only.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        tracing::warn!(listener = listener.name, error = %e, "accept failed; pausing 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            _ = super::reached(&mut phase, Phase::Closing) => break,
        };
        // Over a cap, the connection is closed at once: a client waiting
        // in the backlog behind silent connections is worse off than one
        // told to retry.
        let Ok(slot) = connections.slots.clone().try_acquire_owned() else {
            telemetry.record_connection_refused(listener.name, "max_connections");
            continue;
        };
        let Some(peer_slot) = peers.enter(peer_key(peer.ip()), limits.max_connections_per_peer)
        else {
            telemetry.record_connection_refused(listener.name, "max_connections_per_peer");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            (slot, peer_slot),
            listener.tls.clone(),
            listener.role,
            builder.clone(),
            state.clone(),
            phase.clone(),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _slots: (OwnedSemaphorePermit, PeerSlot),
    tls: Option<Arc<Tls>>,
    role: Role,
    builder: Arc<auto::Builder<TokioExecutor>>,
    state: Arc<State>,
    phase: watch::Receiver<Phase>,
) {
    let limits = &state.config.connections;
    let in_flight = InFlight::new();
    let timeouts = StreamTimeouts {
        first_byte: limits.first_byte_timeout,
        head: limits.header_read_timeout,
        idle: limits.idle_timeout,
        write: limits.write_timeout,
    };
    let io = Guarded::new(stream, timeouts, in_flight.clone(), tls.is_none());
    let service = {
        let state = state.clone();
        let in_flight = in_flight.clone();
        service_fn(move |request| {
            let state = state.clone();
            let guard = in_flight.enter();
            async move {
                let (mut response, bytes) = routes::handle(&state, role, peer, request).await;
                if state
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    // Draining: HTTP/1 clients reconnect (elsewhere, once
                    // the endpoint is gone); HTTP/2 drops the header.
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                // Counted until the body is sent or dropped.
                let progress = guard.watch_answer();
                Ok::<_, Infallible>(
                    response.map(|body| CountedBody::new(body, guard, bytes, progress)),
                )
            }
        })
    };
    match tls {
        None => serve(&builder, io, service, phase).await,
        Some(tls) => {
            let handshake =
                tokio::time::timeout(limits.tls_handshake_timeout, tls.acceptor().accept(io)).await;
            match handshake {
                Ok(Ok(tls)) => {
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        in_flight.set_http2();
                    }
                    serve(&builder, tls, service, phase).await
                }
                Ok(Err(e)) => {
                    state.pipeline.telemetry().record_tls_handshake_failure();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    state.pipeline.telemetry().record_tls_handshake_failure();
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        }
    }
}

/// Serves one connection; when the phase reaches `Closing`, asks it to
/// end gracefully (HTTP/2 GOAWAY, HTTP/1 `Connection: close` after the
/// request in flight) and lets it finish.
async fn serve<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    mut phase: watch::Receiver<Phase>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<CountedBody<http_body_util::Full<bytes::Bytes>>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = super::reached(&mut phase, Phase::Closing) => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                // Past the grace period: dropped with what it was doing.
                _ = super::reached(&mut phase, Phase::Stopped) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
