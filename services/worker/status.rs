//! `WorkerService`: lets operators and tests ask a worker where it is
//! attached, and keeps the worker's readiness in health in step with it.

use std::time::Instant;
use tether::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tether::pb::{StatusRequest, WorkerStatus};
use tether::shutdown::Shutdown;
use tether::worker::{Attachment, StatusReader};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;

/// Serves `Status` from the worker's state, read at each call.
#[derive(Debug, Clone)]
pub struct StatusSvc {
    worker_id: String,
    status: StatusReader,
}

impl StatusSvc {
    /// A service reporting `status` for `worker_id`.
    pub fn new(worker_id: String, status: StatusReader) -> Self {
        Self { worker_id, status }
    }
}

#[tonic::async_trait]
impl WorkerService for StatusSvc {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<WorkerStatus>, Status> {
        let s = self.status.status();
        let a = s.attachment;
        Ok(Response::new(WorkerStatus {
            worker_id: self.worker_id.clone(),
            head_id: a.head_id,
            head_addr: a.head_addr,
            epoch: a.epoch,
            attached: a.attached,
            reassignments: a.reassignments,
            last_head_beat_age_ms: s
                .last_head_beat
                .map(|t| Instant::now().duration_since(t).as_millis() as u64)
                .unwrap_or(0),
            attached_since_ms: a.attached_since_ms,
            max_head_beat_gap_ms: s.max_head_beat_gap.as_millis() as u64,
        }))
    }
}

/// Keeps `tether.v1.WorkerService` SERVING exactly while attached.
pub async fn track_readiness(
    mut attachment: watch::Receiver<Attachment>,
    health: HealthReporter,
    mut shutdown: Shutdown,
) {
    let mut serving = None;
    loop {
        let attached = attachment.borrow_and_update().attached;
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
            r = attachment.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
