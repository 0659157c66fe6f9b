//! What every gRPC server of Tether shares: health, reflection, transport
//! limits and socket options. Heads and workers build on [`router`] and add
//! their own service.

use crate::security::{AuthLayer, ServerSecurity};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
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

/// The router type every Tether server uses: the auth layer on top.
pub type TetherRouter = Router<Stack<AuthLayer, Identity>>;

/// A server builder with the limits, keepalives and security every Tether
/// port uses, and health plus reflection (v1 and v1alpha) already routed.
pub fn router(
    health: HealthServer<impl Health>,
    security: &ServerSecurity,
    service_name: &str,
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
/// Past the bound a new connection is closed at once, before any HTTP/2
/// or TLS work, so a flood cannot exhaust descriptors or memory and the
/// streams already open keep beating. An accept error (descriptors
/// exhausted anyway) pauses accepting for a moment instead of spinning.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
) -> impl Stream<Item = std::io::Result<Limited<TcpStream>>> {
    Bounded {
        inner: TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)))
            .with_keepalive_interval(Some(Duration::from_secs(10)))
            .with_keepalive_retries(Some(3)),
        permits: Arc::new(Semaphore::new(max_connections.max(1))),
        pause: None,
        refused: 0,
    }
}

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

/// A connection that holds one permit of the bound until it closes.
#[derive(Debug)]
pub struct Limited<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

struct Bounded {
    inner: TcpIncoming,
    permits: Arc<Semaphore>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Connections refused since the last log line about it.
    refused: u64,
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
                Poll::Ready(Some(Ok(io))) => match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        return Poll::Ready(Some(Ok(Limited {
                            io,
                            _permit: permit,
                        })))
                    }
                    Err(_) => {
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
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
