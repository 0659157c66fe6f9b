//! Wires a worker together: the attach loop, `WorkerService`, health, and
//! a bounded shutdown.

use crate::status::{self, StatusSvc};
use crate::Args;
use std::time::Duration;
use tether::attach::{self, AttachConfig, Snapshot};
use tether::config::{advertise_addr, default_id};
use tether::discovery::{Discovery, Source};
use tether::pb::worker_service_server::WorkerServiceServer;
use tether::registry::Registry;
use tether::security::{ClientSecurity, ServerSecurity};
use tether::server::{self, MAX_MESSAGE_BYTES};
use tether::shutdown;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Runs the worker; returns the process exit code.
pub async fn run(
    args: Args,
    redis_given: bool,
    server_security: ServerSecurity,
    client_security: ClientSecurity,
) -> i32 {
    let server::Listeners {
        grpc: listener,
        bound,
        metrics: metrics_listener,
    } = match server::bind(args.listen, args.common.metrics_listen).await {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let (advertise, _) = advertise_addr(args.advertise.as_deref(), bound);
    let id = args.id.clone().unwrap_or_else(|| default_id("worker"));
    // Heads first when given; the registry (read one call at a time)
    // when asked for, or when no head is given (as before --heads).
    let mut sources = Vec::new();
    if !args.heads.is_empty() {
        sources.push(Source::Heads(args.heads.clone()));
    }
    if redis_given || args.heads.is_empty() {
        match Registry::new(
            &args.common.registry.redis_url,
            &args.common.registry.namespace,
            2,
        ) {
            Ok(r) => sources.push(Source::Registry(r)),
            Err(e) => {
                error!(error = %e, "cannot set up the registry");
                return 2;
            }
        }
    }
    let via = match (args.heads.is_empty(), sources.len()) {
        (true, _) => "the registry (--redis-url)".to_owned(),
        (false, 1) => format!("ListHeads on {}", args.heads.join(",")),
        (false, _) => format!("ListHeads on {}, then the registry", args.heads.join(",")),
    };
    let discovery = Discovery::new(sources);

    let (health, health_svc) = tonic_health::server::health_reporter();
    let (trigger, stop) = shutdown::channel();
    let (snapshot_tx, snapshot_rx) = watch::channel(Snapshot::default());

    let readiness = tokio::spawn(status::track_readiness(
        snapshot_rx.clone(),
        health.clone(),
        stop.clone(),
    ));
    let attach_task = tokio::spawn(attach::run(
        AttachConfig {
            worker_id: id.clone(),
            worker_addr: advertise.clone(),
            connect_timeout: args.connect_timeout,
            backoff_base: Duration::from_millis(100),
            backoff_max: args.max_backoff,
            security: client_security,
        },
        discovery,
        snapshot_tx,
        stop.clone(),
    ));
    let status_service = WorkerServiceServer::new(StatusSvc::new(id.clone(), snapshot_rx))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = match server::router(
        health_svc,
        &server_security,
        tether::pb::worker_service_server::SERVICE_NAME,
    ) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot set up the gRPC server");
            return 2;
        }
    };
    let mut server_stop = stop.clone();
    let mut server_task = tokio::spawn(
        router
            .add_service(status_service)
            .serve_with_incoming_shutdown(
                server::incoming(
                    listener,
                    args.common.connection_bound(),
                    args.common.idle_connection_timeout,
                ),
                async move {
                    server_stop.wait().await;
                },
            ),
    );
    if let Some(l) = metrics_listener {
        tokio::spawn(tether::metrics::serve(
            l,
            tether::metrics::routes(tether::metrics::Role::Worker),
            stop.clone(),
        ));
    }
    info!(worker = %id, listen = %bound, %advertise, discovery = %via, "worker serving");

    let signal = tokio::select! {
        s = shutdown::signal() => s,
        r = &mut server_task => {
            error!(result = ?r, "the gRPC server stopped on its own");
            return 1;
        }
    };
    info!(worker = %id, ?signal, "shutting down");
    trigger.trigger();
    let graceful = async {
        let _ = attach_task.await;
        let _ = readiness.await;
        let _ = server_task.await;
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(5), graceful) => {
            if r.is_err() {
                warn!("shutdown took longer than 5s; exiting anyway");
            }
        }
        s = shutdown::signal() => warn!(signal = ?s, "second signal; exiting at once"),
    }
    info!(worker = %id, "stopped");
    0
}
