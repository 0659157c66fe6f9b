//! `WorkerService`: lets operators and tests ask a worker where it is
//! attached, and keeps the worker's readiness in health in step with it.

use std::time::Instant;
use tether::attach::Snapshot;
use tether::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tether::pb::{StatusRequest, WorkerStatus};
use tether::shutdown::Shutdown;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;

/// Serves `Status` from the attach loop's published snapshot.
#[derive(Debug, Clone)]
pub struct StatusSvc {
    worker_id: String,
    snapshot: watch::Receiver<Snapshot>,
}

impl StatusSvc {
    /// A service reporting `snapshot` for `worker_id`.
    pub fn new(worker_id: String, snapshot: watch::Receiver<Snapshot>) -> Self {
        Self {
            worker_id,
            snapshot,
        }
    }
}

#[tonic::async_trait]
impl WorkerService for StatusSvc {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<WorkerStatus>, Status> {
        let s = self.snapshot.borrow().clone();
        Ok(Response::new(WorkerStatus {
            worker_id: self.worker_id.clone(),
            head_id: s.head_id,
            head_addr: s.head_addr,
            epoch: s.epoch,
            attached: s.attached,
            reassignments: s.reassignments,
            last_head_beat_age_ms: s
                .last_head_beat
                .map(|t| Instant::now().duration_since(t).as_millis() as u64)
                .unwrap_or(0),
            attached_since_ms: if s.attached { s.attached_since_ms } else { 0 },
            max_head_beat_gap_ms: s.max_beat_gap.as_millis() as u64,
        }))
    }
}

/// Keeps `tether.v1.WorkerService` SERVING exactly while attached.
pub async fn track_readiness(
    mut snapshot: watch::Receiver<Snapshot>,
    health: HealthReporter,
    mut shutdown: Shutdown,
) {
    let mut serving = None;
    loop {
        let attached = snapshot.borrow_and_update().attached;
        if serving != Some(attached) {
            if attached {
                health.set_serving::<WorkerServiceServer<StatusSvc>>().await;
            } else {
                health
                    .set_not_serving::<WorkerServiceServer<StatusSvc>>()
                    .await;
            }
            serving = Some(attached);
        }
        tokio::select! {
            r = snapshot.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
