//! Wires a head together and runs it until a signal, then stops in an
//! order that loses no worker: refuse new work, leave the registry, close
//! the streams, stop the server, all bounded in time.

use crate::attached::Attached;
use crate::lease::{self, LeaseState};
use crate::service::{HeadConfig, HeadSvc};
use crate::Args;
use std::sync::Arc;
use tether::config::{advertise_addr, default_id};
use tether::pb::head_service_server::HeadServiceServer;
use tether::registry::{now_ms, LeaseInfo, Registry};
use tether::server::{self, MAX_MESSAGE_BYTES};
use tether::shutdown;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

/// Runs the head; returns the process exit code.
pub async fn run(args: Args) -> i32 {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %args.listen, error = %e, "cannot listen");
            return 1;
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "cannot read the bound address");
            return 1;
        }
    };
    let (advertise, guessed) = advertise_addr(args.advertise.as_deref(), bound);
    if guessed {
        warn!(%advertise, "listening on a wildcard address without --advertise; workers on other machines cannot reach {advertise}");
    }
    let id = args.id.clone().unwrap_or_else(|| default_id("head"));
    let registry = match Registry::new(&args.common.redis_url, &args.common.namespace, 16) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot set up the registry");
            return 2;
        }
    };

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<HeadServiceServer<HeadSvc>>().await;

    // `stopping` makes the head refuse new work and stop its lease;
    // `closing` then ends the streams. Two steps, so that workers never
    // find this head still registered after their stream closed.
    let (stopping_trigger, stopping) = shutdown::channel();
    let (closing_trigger, closing) = shutdown::channel();

    let ticks = crate::beat::start(args.heartbeat_interval, closing.clone());
    let lease_state = Arc::new(LeaseState::default());
    let lease_info = LeaseInfo {
        head_id: id.clone(),
        addr: advertise.clone(),
        ttl: args.lease_ttl,
        started_ms: now_ms(),
    };
    let mut lease_task = tokio::spawn(lease::run(
        registry.clone(),
        lease_info,
        args.heartbeat_interval,
        lease_state.clone(),
        health.clone(),
        stopping.clone(),
    ));

    let attached = Arc::new(Attached::default());
    let svc = HeadSvc::new(
        HeadConfig {
            id: id.clone(),
            interval: args.heartbeat_interval,
            timeout: args.heartbeat_timeout,
            lease_ttl: args.lease_ttl,
        },
        registry.clone(),
        attached.clone(),
        lease_state,
        ticks,
        stopping,
        closing,
    );
    let head_service = HeadServiceServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server_task = tokio::spawn(
        server::router(health_svc)
            .add_service(head_service)
            .serve_with_incoming_shutdown(server::incoming(listener), async {
                let _ = server_stopped.await;
            }),
    );
    info!(head = %id, listen = %bound, %advertise, "head serving");

    let signal = tokio::select! {
        s = shutdown::signal() => s,
        r = &mut server_task => {
            error!(result = ?r, "the gRPC server stopped on its own");
            return 1;
        }
        r = &mut lease_task => {
            // Liveness reports the loss so an orchestrator restarts us.
            health.set_service_status("", ServingStatus::NotServing).await;
            error!(result = ?r, "the lease loop stopped on its own");
            return 1;
        }
    };
    info!(head = %id, ?signal, workers = attached.len(), "shutting down");

    let graceful = async {
        health.set_not_serving::<HeadServiceServer<HeadSvc>>().await;
        stopping_trigger.trigger();
        let _ = lease_task.await;
        match registry.deregister(&id).await {
            Ok(()) => info!(head = %id, "left the registry"),
            Err(e) => warn!(head = %id, error = %e, "could not leave the registry; the lease will expire by itself"),
        }
        closing_trigger.trigger();
        let _ = stop_server.send(());
        let _ = server_task.await;
    };
    tokio::select! {
        _ = tokio::time::timeout(args.shutdown_timeout, graceful) => {}
        s = shutdown::signal() => warn!(signal = ?s, "second signal; exiting at once"),
    }
    info!(head = %id, "stopped");
    0
}
