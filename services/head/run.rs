//! Wires a head together and runs it until told to go, then leaves in an
//! order that loses no worker: drain (redirect every worker, wait until
//! they left), refuse new work, leave the registry, close the streams,
//! stop the server; all bounded in time. A second signal exits at once;
//! a first signal during a drain that a `Drain` call began does not.

use crate::attached::Attached;
use crate::dashboard::Dashboard;
use crate::drain::{Drain, Handoff};
use crate::lease::{LeaseEnd, LeaseLoop, LeaseState};
use crate::rebalance::Rebalance;
use crate::service::{HeadConfig, HeadSvc};
use crate::Args;
use std::sync::Arc;
use tether::config::{advertise_addr, default_id, metrics_advertise_addr};
use tether::pb::head_service_server::HeadServiceServer;
use tether::pb::EventKind;
use tether::registry::{now_ms, LeaseInfo, Registry};
use tether::security::{ClientSecurity, ServerSecurity};
use tether::server::{self, MAX_MESSAGE_BYTES};
use tether::shutdown;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

/// Runs the head; returns the process exit code.
pub async fn run(
    args: Args,
    server_security: ServerSecurity,
    client_security: ClientSecurity,
) -> i32 {
    // Listening from the start: a SIGTERM right after a `Drain` call must
    // be counted, not lost between two waits.
    let mut signals = match shutdown::Signals::listen() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install the signal handlers");
            return 1;
        }
    };
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
    let (advertise, guessed) = advertise_addr(args.advertise.as_deref(), bound);
    if guessed {
        warn!(%advertise, "listening on a wildcard address without --advertise; workers on other machines cannot reach {advertise}");
    }
    let metrics_addr = match metrics_listener.as_ref().map(|l| l.local_addr()) {
        Some(Ok(bound)) => metrics_advertise_addr(&advertise, bound),
        Some(Err(e)) => {
            error!(error = %e, "cannot read the metrics port's address");
            return 1;
        }
        None => String::new(),
    };
    let id = args.id.clone().unwrap_or_else(|| default_id("head"));
    let registry = match Registry::new(
        &args.common.registry.redis_url,
        &args.common.registry.namespace,
        16,
    ) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot set up the registry");
            return 2;
        }
    };
    let slack_permille = (args.balance_slack * 1000.0).round() as u32;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<HeadServiceServer<HeadSvc>>().await;

    // `stopping` makes the head refuse new work and stop its loops;
    // `closing` then ends the streams. Two steps, so that workers never
    // find this head still registered after their stream closed.
    let (stopping_trigger, stopping) = shutdown::channel();
    let (closing_trigger, closing) = shutdown::channel();

    let ticks = crate::beat::start(args.heartbeat_interval, closing.clone());
    let closing_for_metrics = closing.clone();
    let lease_state = Arc::new(LeaseState::default());
    let attached = Arc::new(Attached::default());
    let drain = Arc::new(Drain::new(args.drain_timeout));
    let events = tether::events::Events::start(registry.clone(), closing.clone());
    let lease_loop = Arc::new(LeaseLoop {
        events: events.clone(),
        registry: registry.clone(),
        lease: LeaseInfo {
            head_id: id.clone(),
            addr: advertise.clone(),
            ttl: args.lease_ttl,
            started_ms: now_ms(),
            instance: tether::attach::new_instance(),
            capacity: args.capacity,
            metrics_addr: metrics_addr.clone(),
        },
        every: args.heartbeat_interval,
        state: lease_state.clone(),
        attached: attached.clone(),
        health: health.clone(),
    });
    let mut lease_task = {
        let lease_loop = lease_loop.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move { lease_loop.run(stopping).await })
    };
    let rebalance_task = tokio::spawn(
        Rebalance {
            head_id: id.clone(),
            registry: registry.clone(),
            attached: attached.clone(),
            lease: lease_state.clone(),
            interval: args.heartbeat_interval,
            quiet_every: args.lease_ttl.max(args.heartbeat_interval),
            rate: args.rebalance_rate,
            cooldown: args.rebalance_cooldown,
            slack_permille,
        }
        .run(stopping.clone()),
    );

    let heads_view = Arc::new(crate::heads_view::HeadsView::new(
        registry.clone(),
        lease_state.heads_changes(),
        args.lease_ttl,
    ));
    let svc = HeadSvc {
        cfg: Arc::new(HeadConfig {
            id: id.clone(),
            interval: args.heartbeat_interval,
            timeout: args.heartbeat_timeout,
            lease_ttl: args.lease_ttl,
            slack_permille,
            capacity: args.capacity,
        }),
        registry: registry.clone(),
        attached: attached.clone(),
        lease: lease_state.clone(),
        drain: drain.clone(),
        ticks,
        stopping,
        closing,
        events: events.clone(),
        heads: heads_view.clone(),
    };
    let head_service = HeadServiceServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = match server::router(
        health_svc,
        &server_security,
        tether::pb::head_service_server::SERVICE_NAME,
    ) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot set up the gRPC server");
            return 2;
        }
    };
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server_task = tokio::spawn(
        router
            .add_service(head_service)
            .serve_with_incoming_shutdown(
                server::incoming(
                    listener,
                    args.common.connection_bound(),
                    args.common.idle_connection_timeout,
                ),
                async {
                    let _ = server_stopped.await;
                },
            ),
    );
    if let Some(l) = metrics_listener {
        let (watchers, proxied) = Dashboard::limits();
        let dashboard = Dashboard {
            head_id: id.clone(),
            metrics_addr: metrics_addr.clone(),
            slack_permille,
            capacity: args.capacity,
            snapshot_every: args.heartbeat_interval,
            heads: heads_view,
            attached: attached.clone(),
            events: events.clone(),
            lease: lease_state.clone(),
            token: server_security.token.clone(),
            client: client_security,
            watchers,
            proxied,
            closing: closing_for_metrics.clone(),
        };
        let routes = tether::metrics::routes(tether::metrics::Role::Head)
            .merge(crate::dashboard::routes(Arc::new(dashboard)));
        tokio::spawn(tether::metrics::serve(l, routes, closing_for_metrics));
        info!(head = %id, dashboard = %format!("http://{metrics_addr}/"), "dashboard and metrics serving");
    }
    info!(head = %id, listen = %bound, %advertise, "head serving");

    // A signal that begins the drain is the first; one that arrives while
    // a `Drain` call's drain runs (Kubernetes: a preStop hook calls Drain,
    // then the kubelet sends SIGTERM) is the first too, and must not cut
    // the handoff short. Only the signal after that exits at once.
    let mut first_signal = false;
    tokio::select! {
        s = signals.next() => {
            info!(head = %id, signal = ?s, workers = attached.len(), "draining on signal");
            drain.begin();
            first_signal = true;
        }
        _ = drain.wait_begun() => {}
        r = &mut server_task => {
            error!(result = ?r, "the gRPC server stopped on its own");
            return 1;
        }
        r = &mut lease_task => {
            // Liveness reports the loss so an orchestrator restarts us.
            health.set_service_status("", ServingStatus::NotServing).await;
            return match r {
                // Both were logged, in one line, where they were found.
                Ok(LeaseEnd::IdInUse { .. }) => 2,
                Ok(LeaseEnd::Displaced { .. }) => 1,
                r => {
                    error!(result = ?r, "the lease loop stopped on its own");
                    1
                }
            };
        }
    }

    let leave = async {
        // Drain: advertise it at once, then hand every worker over.
        lease_state.start_draining();
        events.emit(EventKind::HeadDraining, &id, "", 0, "", "");
        lease_loop.refresh_once(&mut 0).await;
        let not_handed_over = Handoff {
            head_id: id.clone(),
            registry: registry.clone(),
            attached: attached.clone(),
            interval: args.heartbeat_interval,
            slack_permille,
        }
        .run(&drain)
        .await;
        // Leave: refuse new work, stop the loops, deregister, close.
        stopping_trigger.trigger();
        let _ = lease_task.await;
        let _ = rebalance_task.await;
        match registry.deregister(&id).await {
            Ok(()) => {
                info!(head = %id, "left the registry");
                // One HEAD_GONE, from the head itself, saying how it went;
                // the sweep never sees a deregistered head.
                let detail = match not_handed_over {
                    0 => "left after drain".to_owned(),
                    n => format!(
                        "left after drain; {n} workers not handed over before the drain timeout"
                    ),
                };
                events.emit(EventKind::HeadGone, &id, "", 0, "", &detail);
            }
            Err(e) => {
                warn!(head = %id, error = %e, "could not leave the registry; the lease will expire by itself")
            }
        }
        closing_trigger.trigger();
        let _ = stop_server.send(());
        let _ = tokio::time::timeout(args.shutdown_timeout, server_task).await;
    };
    let second_signal = async {
        if !first_signal {
            let s = signals.next().await;
            info!(head = %id, signal = ?s, workers = attached.len(), "signal during a drain begun by a Drain call; the drain goes on (another signal exits at once)");
        }
        signals.next().await
    };
    tokio::select! {
        _ = leave => {}
        s = second_signal => {
            warn!(head = %id, signal = ?s, "second signal; exiting at once");
            return 1;
        }
    }
    info!(head = %id, "stopped");
    0
}
