//! Keeps this head's lease alive in Redis and reports readiness from it.
//!
//! Readiness (`tether.v1.HeadService` in health) is SERVING only while the
//! last refresh succeeded; liveness (`""`) is not touched here, so a Redis
//! outage never gets every head restarted at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::pb::head_service_server::HeadServiceServer;
use tether::registry::{LeaseInfo, Registry};
use tether::shutdown::Shutdown;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

/// Shared flag: does this head currently hold its lease?
#[derive(Debug, Default)]
pub struct LeaseState {
    held: AtomicBool,
}

impl LeaseState {
    /// True while the last refresh succeeded.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

/// Refreshes the lease every `every` until `shutdown`. Does not deregister:
/// the caller does that at the right moment of the shutdown sequence.
pub async fn run(
    registry: Registry,
    lease: LeaseInfo,
    every: Duration,
    state: Arc<LeaseState>,
    health: HealthReporter,
    mut shutdown: Shutdown,
) {
    let mut failures = 0u64;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        match registry.refresh_lease(&lease, "ready").await {
            Ok(existed) => {
                let was_held = state.held.swap(true, Ordering::Relaxed);
                if !was_held {
                    info!(head = %lease.head_id, addr = %lease.addr, ttl = ?lease.ttl, "registered in the registry");
                } else if !existed {
                    warn!(head = %lease.head_id, "lease had expired (paused or cut off longer than the TTL); registered again");
                }
                if !was_held && !shutdown.is_triggered() {
                    health.set_serving::<HeadServiceServer<crate::service::HeadSvc>>().await;
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                let was_held = state.held.swap(false, Ordering::Relaxed);
                if was_held || failures == 1 {
                    error!(head = %lease.head_id, error = %e, "cannot refresh the lease; readiness NOT_SERVING, retrying every {every:?}");
                    health.set_not_serving::<HeadServiceServer<crate::service::HeadSvc>>().await;
                } else if failures % 30 == 0 {
                    warn!(head = %lease.head_id, error = %e, failures, "registry still unreachable; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
    }
}
