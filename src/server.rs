//! What every gRPC server of Tether shares: health, reflection, transport
//! limits and socket options. Heads and workers build on [`router`] and add
//! their own service.

use crate::security::{AuthLayer, ServerSecurity};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};

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
        // Dead peers behind a silent network are found by the heartbeat
        // protocol; HTTP/2 pings only clean up idle operator connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(AuthLayer::new(security.token.clone()))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha))
}

/// Accepted connections with Nagle off (a beat must not wait for the next
/// one) and TCP keepalive on. Server-level `tcp_*` settings are ignored by
/// `serve_with_incoming*`, so they are set here.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}
