//! What every gRPC server of Tether shares: health, reflection, transport
//! limits and socket options. Heads and workers build on [`router`] and add
//! their own service.

use crate::direct::DirectRpc;
use crate::security::{AuthLayer, ServerSecurity};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};
use tracing::warn;

/// The largest message any Tether server accepts or sends. Beats and
/// requests are tiny; a large message is a bug or an attack.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Concurrent streams allowed on one HTTP/2 connection. A worker needs two
/// (a call and its heartbeat stream); operators a few more.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The router type every Tether server uses: the auth layer on top, then
/// the count of open streams per connection (see [`StreamsLayer`]).
pub type TetherRouter = Router<Stack<StreamsLayer, Stack<AuthLayer, Identity>>>;

/// A server builder with the limits, keepalives and security every Tether
/// port uses, and health plus reflection (v1 and v1alpha) already routed.
pub fn router(
    health: HealthServer<impl Health>,
    security: &ServerSecurity,
    service_name: &str,
) -> Result<TetherRouter, String> {
    router_serving(health, security, service_name, None)
}

/// [`router`], with `direct` served beside tonic's router (see
/// [`crate::direct`]).
pub(crate) fn router_serving(
    health: HealthServer<impl Health>,
    security: &ServerSecurity,
    service_name: &str,
    direct: Option<Arc<dyn DirectRpc>>,
) -> Result<TetherRouter, String> {
    // One descriptor set holds both Tether services; reflection advertises
    // only what this process serves.
    let reflection = || {
        [
            service_name,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .into_iter()
        .fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };
    let v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let mut builder = Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder
            .tls_config(tls.clone())
            .map_err(|e| format!("invalid TLS settings: {e}"))?;
    }
    Ok(builder
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // No HTTP/2 keepalive: dead workers are found by the heartbeat
        // protocol, and idle operator connections by TCP keepalive (see
        // `incoming`). HTTP/2 pings put a timer on every connection's hot
        // path (see docs/BENCHMARKS.md).
        .layer(AuthLayer::new(security.token.clone()))
        .layer(StreamsLayer { direct })
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha))
}

/// The sockets a Tether process serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port.
    pub grpc: TcpListener,
    /// Its bound address (the real port when 0 was asked for).
    pub bound: std::net::SocketAddr,
    /// The metrics port, when `--metrics-listen` is set.
    pub metrics: Option<TcpListener>,
}

/// Binds the gRPC port and, if asked, the metrics port. The error says
/// which address failed and why.
pub async fn bind(
    listen: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
) -> Result<Listeners, String> {
    let grpc = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = grpc
        .local_addr()
        .map_err(|e| format!("cannot read the address bound for {listen}: {e}"))?;
    let metrics = match metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    Ok(Listeners {
        grpc,
        bound,
        metrics,
    })
}

/// Accepted connections with Nagle off (a beat must not wait for the next
/// one) and TCP keepalive on (a peer gone silent is dropped after about
/// 60 + 3 x 10 s), at most `max_connections` at once.
/// Server-level `tcp_*` settings are ignored by `serve_with_incoming*`, so
/// they are set here.
///
/// A connection must greet within [`HANDSHAKE_TIMEOUT`]: send its first
/// [`GREETING_BYTES`] bytes (the HTTP/2 preface, or a TLS ClientHello,
/// which is longer). One that does not is closed, so connections that
/// never speak cannot hold the bound for ever.
///
/// Past the bound, a new connection takes the place of the oldest one
/// that has not greeted yet (closed at once), so that a storm of silent
/// connections cannot lock out a liveness probe or a worker, which greet
/// within a round trip. Only when every connection has greeted (or too
/// many evicted ones are still closing) is a new connection closed at
/// once, before any HTTP/2 or TLS work, so a flood cannot exhaust
/// descriptors or memory and the streams already open keep beating. An
/// accept error (descriptors exhausted anyway) pauses accepting for a
/// moment instead of spinning.
///
/// A connection that greeted but has had no open stream (RPC) for
/// `idle_timeout` is closed too (see [`StreamsLayer`]), so that HTTP/2
/// clients that connect and then sit idle cannot hold the bound for ever
/// either. Heartbeat and WatchEvents streams are open streams: the
/// connections that carry them are never closed for idleness.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    idle_timeout: Duration,
) -> impl Stream<Item = std::io::Result<Limited<TcpStream>>> {
    let max = max_connections.max(1);
    Bounded {
        inner: TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)))
            .with_keepalive_interval(Some(Duration::from_secs(10)))
            .with_keepalive_retries(Some(3)),
        permits: Arc::new(Semaphore::new(max)),
        max,
        quiet: VecDeque::new(),
        closing: Arc::new(AtomicUsize::new(0)),
        pause: None,
        refused: 0,
        evicted: 0,
        idle_timeout,
    }
}

/// Connections closed because they had no open stream for too long.
static IDLE_CLOSED: AtomicU64 = AtomicU64::new(0);

/// How long a new connection may take to send its first
/// [`GREETING_BYTES`]. Real clients send them in the same round trip as
/// the TCP handshake; a few seconds leave room for a slow network.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bytes that count as a greeting: the length of the HTTP/2 client
/// connection preface (`PRI * HTTP/2.0...`). Any TLS ClientHello is longer.
pub const GREETING_BYTES: usize = 24;

/// Evicted connections still closing, at most: each holds a descriptor
/// outside the bound until its task runs, and the descriptors the default
/// bound leaves free ([`RESERVED_DESCRIPTORS`]) are shared with the rest
/// of the process.
const MAX_CLOSING: usize = 16;

/// Connections closed because they did not greet in time, for the log.
static HANDSHAKES_TIMED_OUT: AtomicU64 = AtomicU64::new(0);

/// The connection bound to use when none is configured: the process's
/// open-file limit, minus room for everything else the process holds: the
/// listeners, one shared Redis connection (two while it is remade), the
/// event subscription, the runtime's epoll and wakers, stdio. That is
/// about 15; [`RESERVED_DESCRIPTORS`] leaves four times as much.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    soft.saturating_sub(RESERVED_DESCRIPTORS).max(64)
}

/// Descriptors the default connection bound leaves for the rest.
pub const RESERVED_DESCRIPTORS: usize = 64;

/// A connection that holds one permit of the bound until it closes (or
/// until a newer connection takes its place, see [`incoming`]).
#[derive(Debug)]
pub struct Limited<IO> {
    io: IO,
    slot: Arc<Slot>,
    /// Greeting bytes still due.
    due: usize,
    /// Until the connection greeted: when it must have.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Evicted connections not yet closed (see [`MAX_CLOSING`]).
    closing: Arc<AtomicUsize>,
    /// The streams open on this connection, counted by [`StreamsLayer`].
    streams: Arc<Streams>,
    /// See [`incoming`].
    idle_timeout: Duration,
    /// Once the connection greeted: when to look at `streams` next.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The timer's deadline, kept beside the socket so that a parked read
    /// need not touch the timer (see `poll_read`).
    idle_due: tokio::time::Instant,
    /// The task the timer wakes: the one that last polled it.
    idle_waker: Option<Waker>,
    /// Closed for idleness: every read from now on is end of file.
    idle_closed: bool,
}

/// What the acceptor and a connection share.
#[derive(Debug)]
struct Slot {
    /// [`QUIET`], [`GREETED`] or [`EVICTED`]; a connection leaves
    /// `QUIET` once, by whichever of the two sides gets there first.
    state: AtomicU8,
    /// The permit of the bound; taken by the connection that evicts this.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    /// Wakes the connection's task when it is evicted.
    waker: Mutex<Option<Waker>>,
}

/// Accepted, greeting bytes still due.
const QUIET: u8 = 0;
/// Sent its greeting: never evicted.
const GREETED: u8 = 1;
/// Gave its permit to a newer connection; closes on its next read.
const EVICTED: u8 = 2;

struct Bounded {
    inner: TcpIncoming,
    permits: Arc<Semaphore>,
    /// The bound, to keep `quiet` in proportion.
    max: usize,
    /// Connections that may not have greeted yet, oldest first: the ones a
    /// newcomer past the bound may evict. Entries of closed or greeted
    /// connections are skipped when met and pruned when the queue grows.
    quiet: VecDeque<Weak<Slot>>,
    closing: Arc<AtomicUsize>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Connections refused since the last log line about it.
    refused: u64,
    /// Connections evicted, for the log.
    evicted: u64,
    /// See [`incoming`].
    idle_timeout: Duration,
}

impl Bounded {
    /// A permit for a new connection: a free one, or that of the oldest
    /// connection that has not greeted.
    fn permit(&mut self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.closing.load(Ordering::Relaxed) >= MAX_CLOSING {
            return None;
        }
        while let Some(oldest) = self.quiet.pop_front() {
            let Some(slot) = oldest.upgrade() else {
                continue;
            };
            if slot
                .state
                .compare_exchange(QUIET, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            self.closing.fetch_add(1, Ordering::Relaxed);
            if let Some(waker) = lock(&slot.waker).take() {
                waker.wake();
            }
            self.evicted += 1;
            if self.evicted.is_power_of_two() {
                warn!(
                    evicted = self.evicted,
                    "connection limit reached; closing connections that sent nothing to make room"
                );
            }
            return lock(&slot.permit).take();
        }
        None
    }

    /// Wraps an accepted connection holding `permit`.
    fn admit(&mut self, io: TcpStream, permit: OwnedSemaphorePermit) -> Limited<TcpStream> {
        let slot = Arc::new(Slot {
            state: AtomicU8::new(QUIET),
            permit: Mutex::new(Some(permit)),
            waker: Mutex::new(None),
        });
        if self.quiet.len() >= 2 * self.max {
            self.quiet.retain(|w| {
                w.upgrade()
                    .is_some_and(|s| s.state.load(Ordering::Relaxed) == QUIET)
            });
        }
        self.quiet.push_back(Arc::downgrade(&slot));
        Limited {
            io,
            slot,
            due: GREETING_BYTES,
            deadline: Some(Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT))),
            closing: self.closing.clone(),
            streams: Arc::new(Streams::default()),
            idle_timeout: self.idle_timeout,
            idle_timer: None,
            idle_due: tokio::time::Instant::now(),
            idle_waker: None,
            idle_closed: false,
        }
    }
}

/// Locks `m`, and takes it over if another holder panicked: a server's
/// connections and streams go on rather than panic in turn.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<IO> Drop for Limited<IO> {
    fn drop(&mut self) {
        if self.slot.state.load(Ordering::Acquire) == EVICTED {
            self.closing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Stream for Bounded {
    type Item = std::io::Result<Limited<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => match self.permit() {
                    Some(permit) => return Poll::Ready(Some(Ok(self.admit(io, permit)))),
                    None => {
                        drop(io);
                        self.refused += 1;
                        if self.refused.is_power_of_two() {
                            warn!(
                                refused = self.refused,
                                "connection limit reached; refusing new connections"
                            );
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    warn!(error = %e, "accept failed; pausing accepts for 50ms");
                    self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(deadline) = this.deadline.as_mut() else {
            if this.idle_closed {
                return Poll::Ready(Ok(()));
            }
            let read = Pin::new(&mut this.io).poll_read(cx, buf);
            // The timer is looked at only when the connection parks (no
            // bytes to read), never per message; it fires once per
            // `idle_timeout` at most, whatever the traffic. And it is
            // polled only when due or when another task parks here (the
            // TLS handshake's, then the connection's): the poll that
            // registered this task's waker stands until it fires, and a
            // poll per parked read touched the timer's memory once per
            // beat (0.8 % of a head's samples at 10,000 workers).
            if read.is_pending()
                && (!matches!(&this.idle_waker, Some(w) if w.will_wake(cx.waker()))
                    || tokio::time::Instant::now() >= this.idle_due)
            {
                if let Some(timer) = this.idle_timer.as_mut() {
                    this.idle_waker = Some(cx.waker().clone());
                    while timer.as_mut().poll(cx).is_ready() {
                        match this.streams.next_check(this.idle_timeout) {
                            Some(at) => {
                                this.idle_due = at;
                                timer.as_mut().reset(at);
                            }
                            None => {
                                this.idle_closed = true;
                                let n = IDLE_CLOSED.fetch_add(1, Ordering::Relaxed) + 1;
                                if n.is_power_of_two() {
                                    warn!(
                                        idle_closed = n,
                                        "closed connections that had no open stream for {:?}",
                                        this.idle_timeout
                                    );
                                }
                                // End of file: hyper closes the connection,
                                // which has no stream to lose.
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                }
            }
            return read;
        };
        let evicted = || {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection limit reached and this connection had sent nothing",
            )))
        };
        if this.slot.state.load(Ordering::Acquire) == EVICTED {
            return evicted();
        }
        *lock(&this.slot.waker) = Some(cx.waker().clone());
        if deadline.as_mut().poll(cx).is_ready() {
            let n = HANDSHAKES_TIMED_OUT.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(
                    timed_out = n,
                    "closed connections that did not send a greeting within {HANDSHAKE_TIMEOUT:?}"
                );
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no HTTP/2 preface or TLS hello in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.due = this.due.saturating_sub(buf.filled().len() - before);
            if this.due == 0 {
                if this
                    .slot
                    .state
                    .compare_exchange(QUIET, GREETED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return evicted();
                }
                this.deadline = None;
                lock(&this.slot.waker).take();
                this.streams.mark_idle();
                this.idle_due = tokio::time::Instant::now() + this.idle_timeout;
                this.idle_timer = Some(Box::pin(tokio::time::sleep_until(this.idle_due)));
            }
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = ConnInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.io.connect_info(),
            streams: self.streams.clone(),
        }
    }
}

/// What a request learns of its connection (in its extensions): the
/// socket's own information, and the connection's stream count.
#[derive(Debug, Clone)]
pub struct ConnInfo<T> {
    /// The socket's information (addresses).
    pub inner: T,
    streams: Arc<Streams>,
}

/// The streams open on one connection and since when there are none.
/// Changed only when a stream opens or ends, never per message.
#[derive(Debug, Default)]
struct Streams {
    open: AtomicUsize,
    /// When `open` last dropped to zero, in milliseconds since [`epoch`].
    idle_since: AtomicU64,
}

/// The origin of [`Streams::idle_since`].
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64
}

impl Streams {
    fn mark_idle(&self) {
        self.idle_since
            .fetch_max(millis_since_epoch(Instant::now()), Ordering::AcqRel);
    }

    /// When to look again, or `None` when the connection has had no
    /// stream for `idle_timeout` and must close.
    fn next_check(&self, idle_timeout: Duration) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        if self.open.load(Ordering::Acquire) > 0 {
            return Some((now + idle_timeout).into());
        }
        let since = epoch() + Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        let due = since + idle_timeout;
        (due > now).then(|| due.into())
    }
}

/// One open stream; ends when dropped.
#[derive(Debug)]
pub(crate) struct OpenStream(Arc<Streams>);

impl OpenStream {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Self(streams.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.mark_idle();
        }
    }
}

/// A tower layer that counts the streams (RPCs) open on each connection
/// accepted by [`incoming`]: a stream opens when its request arrives and
/// ends when its response body ends or is dropped (a reset stream, a
/// cancelled call). A Heartbeat or WatchEvents stream is open for its
/// whole life; a health check for a round trip.
///
/// It also serves the one RPC a head hands it (`Heartbeat`, see
/// [`crate::direct`]) itself, below the token check and beside tonic's
/// router.
#[derive(Clone, Default)]
pub struct StreamsLayer {
    direct: Option<Arc<dyn DirectRpc>>,
}

impl std::fmt::Debug for StreamsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamsLayer")
            .field("direct", &self.direct.as_ref().map(|d| d.path()))
            .finish()
    }
}

impl<S> tower::Layer<S> for StreamsLayer {
    type Service = CountStreams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountStreams {
            inner,
            direct: self.direct.clone(),
        }
    }
}

/// The service made by [`StreamsLayer`].
#[derive(Clone)]
pub struct CountStreams<S> {
    inner: S,
    direct: Option<Arc<dyn DirectRpc>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for CountStreams<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountStreams")
            .field("inner", &self.inner)
            .field("direct", &self.direct.as_ref().map(|d| d.path()))
            .finish()
    }
}

/// The boxed future of [`CountStreams`]: one allocation per RPC, not per
/// message.
type CountFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for CountStreams<S>
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let ext = request.extensions();
        let streams = ext
            .get::<ConnInfo<TcpConnectInfo>>()
            .or_else(|| {
                ext.get::<TlsConnectInfo<ConnInfo<TcpConnectInfo>>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .map(|info| OpenStream::new(&info.streams));
        if let Some(direct) = &self.direct {
            if request.uri().path() == direct.path() {
                let reply = direct.call(request, streams);
                return Box::pin(async move { Ok(reply.await) });
            }
        }
        let response = self.inner.call(request);
        match streams {
            None => Box::pin(response),
            Some(open) => Box::pin(async move {
                let response = response.await?;
                Ok(response.map(|body| {
                    tonic::body::Body::new(CountedBody {
                        inner: body,
                        open: Some(open),
                    })
                }))
            }),
        }
    }
}

/// A response body that holds its stream open until it ends.
struct CountedBody {
    inner: tonic::body::Body,
    open: Option<OpenStream>,
}

impl http_body::Body for CountedBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.open = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
