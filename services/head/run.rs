//! Wires a head together and runs it until told to go, then leaves in an
//! order that loses no worker: drain (redirect every worker, wait until
//! they left), refuse new work, leave the registry, close the streams,
//! stop the server; all bounded in time. The caller decides what "told to
//! go" means (tether-head: SIGTERM/SIGINT; a second signal exits at once,
//! which the binary does by dropping this future).

use super::attached::Attached;
use super::dashboard::Dashboard;
use super::drain::Handoff;
use super::heartbeat::BeatContext;
use super::lease::{LeaseEnd, LeaseLoop, LeaseState};
use super::rebalance::Rebalance;
use super::service::{HeadConfig, HeadSvc};
use super::{Head, HeadError};
use crate::config::{advertise_addr, metrics_advertise_addr};
use crate::pb::head_service_server::HeadServiceServer;
use crate::pb::EventKind;
use crate::registry::{now_ms, LeaseInfo};
use crate::server::TetherRouter as Router;
use crate::server::{self, MAX_MESSAGE_BYTES};
use crate::shutdown;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

/// Runs the head on `listener` (its gRPC router extended by `extend`)
/// until `shutdown` completes or a `Drain` call begins a drain, then
/// leaves.
pub(super) async fn run(
    head: Head,
    listener: TcpListener,
    extend: impl FnOnce(Router) -> Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HeadError> {
    let Head {
        settings: args,
        registry,
        security: server_security,
        client: client_security,
        metrics: metrics_listener,
        drain,
    } = head;
    let bound = listener
        .local_addr()
        .map_err(|e| HeadError::Setup(format!("the listener has no address: {e}")))?;
    let (advertise, guessed) = advertise_addr(args.advertise.as_deref(), bound);
    if guessed {
        warn!(%advertise, "listening on a wildcard address without --advertise; workers on other machines cannot reach {advertise}");
    }
    let metrics_addr = match metrics_listener.as_ref().map(|l| l.local_addr()) {
        Some(Ok(bound)) => metrics_advertise_addr(&advertise, bound),
        Some(Err(e)) => {
            return Err(HeadError::Setup(format!(
                "the metrics listener has no address: {e}"
            )))
        }
        None => String::new(),
    };
    let id = args.id.clone();
    let slack_permille = (args.balance_slack * 1000.0).round() as u32;
    let tasks = tokio_util::task::TaskTracker::new();

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<HeadServiceServer<HeadSvc>>().await;

    // `stopping` makes the head refuse new work and stop its loops;
    // `closing` then ends the streams. Two steps, so that workers never
    // find this head still registered after their stream closed.
    let (stopping_trigger, stopping) = shutdown::channel();
    let (closing_trigger, closing) = shutdown::channel();

    let ticks = super::beat::start(args.heartbeat_interval, closing.clone());
    let closing_for_metrics = closing.clone();
    let lease_state = Arc::new(LeaseState::default());
    let attached = Arc::new(Attached::default());
    let events = crate::events::Events::start(registry.clone(), closing.clone());
    let lease_loop = Arc::new(LeaseLoop {
        events: events.clone(),
        registry: registry.clone(),
        lease: LeaseInfo {
            head_id: id.clone(),
            addr: advertise.clone(),
            ttl: args.lease_ttl,
            started_ms: now_ms(),
            instance: crate::attach::new_instance(),
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
        tasks.spawn(async move { lease_loop.run(stopping).await })
    };
    let rebalance_task = tasks.spawn(
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

    let heads_view = Arc::new(super::heads_view::HeadsView::new(
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
        beats: Arc::new(BeatContext {
            head_id: Arc::from(id.as_str()),
            timeout: args.heartbeat_timeout,
            attached: attached.clone(),
            lease: lease_state.clone(),
            ticks,
            registry: registry.clone(),
            events: events.clone(),
            tasks: tasks.clone(),
        }),
        stopping,
        closing,
        events: events.clone(),
        heads: heads_view.clone(),
    };
    // Heartbeat is served beside tonic's router (crate::direct), the
    // other RPCs through it.
    let direct: Arc<dyn crate::direct::DirectRpc> = Arc::new(svc.clone());
    let head_service = HeadServiceServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = server::router_serving(
        health_svc,
        &server_security,
        crate::pb::head_service_server::SERVICE_NAME,
        Some(direct),
    )
    .map_err(|e| HeadError::Setup(format!("cannot set up the gRPC server: {e}")))?;
    let router = extend(router);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server_task = tokio::spawn(
        router
            .add_service(head_service)
            .serve_with_incoming_shutdown(
                server::incoming(listener, args.max_connections, args.idle_connection_timeout),
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
        let routes = crate::metrics::routes(crate::metrics::Role::Head)
            .merge(super::dashboard::routes(Arc::new(dashboard)));
        tasks.spawn(crate::metrics::serve(l, routes, closing_for_metrics));
        info!(head = %id, dashboard = %format!("http://{metrics_addr}/"), "dashboard and metrics serving");
    }
    let _abort = AbortOnDrop(vec![
        server_task.abort_handle(),
        lease_task.abort_handle(),
        rebalance_task.abort_handle(),
    ]);
    info!(head = %id, listen = %bound, %advertise, "head serving");

    tokio::select! {
        _ = shutdown => {
            info!(head = %id, workers = attached.len(), "draining: asked to shut down");
            drain.begin();
        }
        _ = drain.wait_begun() => {}
        r = &mut server_task => {
            error!(result = ?r, "the gRPC server stopped on its own");
            return Err(HeadError::ServerStopped(format!("{r:?}")));
        }
        r = &mut lease_task => {
            // Liveness reports the loss so an orchestrator restarts us.
            health.set_service_status("", ServingStatus::NotServing).await;
            return Err(match r {
                // Both were logged, in one line, where they were found.
                Ok(LeaseEnd::IdInUse { .. }) => HeadError::IdInUse(id),
                Ok(LeaseEnd::Displaced { .. }) => HeadError::Displaced(id),
                r => {
                    error!(result = ?r, "the lease loop stopped on its own");
                    HeadError::LeaseLoopStopped(format!("{r:?}"))
                }
            });
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
        // The tasks still running (metrics, releases of closed streams):
        // ended by `closing`, or soon; bounded all the same.
        tasks.close();
        let _ = tokio::time::timeout(args.shutdown_timeout, tasks.wait()).await;
    };
    leave.await;
    info!(head = %id, "stopped");
    Ok(())
}

/// Aborts the head's tasks when [`run`] is dropped before it finished (its
/// caller gave up on the head): then nothing of it keeps serving, as when
/// the process exits.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
