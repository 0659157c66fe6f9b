//! Wires a worker together: a [`tether::worker::Worker`] (the library's
//! attach loop, the same one a program embedding Tether runs),
//! `WorkerService`, health, and a bounded shutdown.

use crate::status::{self, StatusSvc};
use crate::Args;
use std::time::Duration;
use tether::config::{advertise_addr, default_id};
use tether::pb::worker_service_server::WorkerServiceServer;
use tether::registry::Registry;
use tether::security::{ClientSecurity, ServerSecurity};
use tether::server::{self, MAX_MESSAGE_BYTES};
use tether::shutdown;
use tether::worker::Worker;
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
    let mut worker = Worker::builder(id.clone())
        .heads(args.heads.iter().cloned())
        .advertise(advertise.clone())
        .connect_timeout(args.connect_timeout)
        .max_backoff(args.max_backoff)
        .security(client_security);
    let use_registry = redis_given || args.heads.is_empty();
    if use_registry {
        match Registry::new(
            &args.common.registry.redis_url,
            &args.common.registry.namespace,
        ) {
            Ok(r) => worker = worker.registry(r),
            Err(e) => {
                error!(error = %e, "cannot set up the registry");
                return 2;
            }
        }
    }
    let via = match (args.heads.is_empty(), use_registry) {
        (true, _) => "the registry (--redis-url)".to_owned(),
        (false, false) => format!("ListHeads on {}", args.heads.join(",")),
        (false, true) => format!("ListHeads on {}, then the registry", args.heads.join(",")),
    };

    let (health, health_svc) = tonic_health::server::health_reporter();
    let (trigger, stop) = shutdown::channel();
    let worker = match worker.spawn() {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot start the worker");
            return 2;
        }
    };

    let readiness = tokio::spawn(status::track_readiness(
        worker.attachment(),
        health.clone(),
        stop.clone(),
    ));
    let status_service =
        WorkerServiceServer::new(StatusSvc::new(id.clone(), worker.status_reader()))
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
        worker.shutdown().await;
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
