//! `HeadService`: adopts workers (`Reassign`), holds their heartbeat
//! streams, and lists them.
//!
//! Each open stream is a [`HeartbeatBody`], which has no task of its own.

use super::attached::{Admission, Adoption, Attached, NewStream, Secret};
use super::drain::Drain;
use super::heads_view::{self, HeadsView};
use super::heartbeat::{BeatContext, HeartbeatBody};
use super::lease::LeaseState;
use crate::config::validate_id;
use crate::direct::{self, DirectRpc, Inbound, Reply};
use crate::events::Events;
use crate::metrics::METRICS;
use crate::pb::head_service_server::HeadService;
use crate::pb::{
    ClusterEvent, DrainRequest, DrainResponse, EventKind, ListHeadsRequest, ListHeadsResponse,
    ListWorkersRequest, ListWorkersResponse, ReassignReason, ReassignRequest, ReassignResponse,
    WatchEventsRequest, WorkerBeat,
};
use crate::registry::{now_ms, AssignRequest, Claim, Registry, RegistryError};
use crate::server::{OpenStream, MAX_MESSAGE_BYTES};
use crate::shutdown::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// The longest `worker_addr` a worker may report.
const MAX_ADDR_LEN: usize = 256;

/// The longest `instance` a worker may give.
const MAX_INSTANCE_LEN: usize = 64;

/// The most heads a worker may name in `unavailable_heads`.
const MAX_UNAVAILABLE: usize = 64;

/// The response stream of `WatchEvents`.
pub type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ClusterEvent, Status>> + Send>>;

/// What the head service needs to know about its own head.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    /// This head's id.
    pub id: String,
    /// How often beats go out.
    pub interval: Duration,
    /// Silence after which a worker counts as gone.
    pub timeout: Duration,
    /// The lease TTL, also the TTL of this head's worker set.
    pub lease_ttl: Duration,
    /// ε of the load bound, in thousandths.
    pub slack_permille: u32,
    /// Hard cap on attached workers; 0 for none.
    pub capacity: u64,
}

/// The `HeadService` implementation. Cheap to clone.
#[derive(Clone)]
pub struct HeadSvc {
    pub cfg: Arc<HeadConfig>,
    pub registry: Registry,
    /// The open streams.
    pub attached: Arc<Attached>,
    /// Whether the lease is held, whether the head drains.
    pub lease: Arc<LeaseState>,
    /// The drain switch, thrown by the `Drain` RPC.
    pub drain: Arc<Drain>,
    /// What every beat stream needs of this head, built once and shared
    /// (a copy per stream cost an allocation and a dozen words each).
    pub beats: Arc<BeatContext>,
    /// Triggered first at shutdown: refuse new workers and streams.
    pub stopping: Shutdown,
    /// Triggered once the head left the registry: end every stream.
    pub closing: Shutdown,
    /// Membership events, published and watched.
    pub events: Events,
    /// The live heads as last read, for `ListHeads`.
    pub heads: Arc<HeadsView>,
}

impl HeadSvc {
    fn refuse_if_stopping(&self) -> Result<(), Status> {
        if self.stopping.is_triggered() {
            return Err(Status::unavailable(format!(
                "head {} is shutting down; choose another head",
                self.cfg.id
            )));
        }
        Ok(())
    }

    /// Checks the first `WorkerBeat` of a stream against the assignment in
    /// Redis, and marks it streaming. Returns the worker's address.
    async fn claim(&self, first: &WorkerBeat) -> Result<String, Status> {
        let claim = self
            .registry
            .claim(&self.cfg.id, &first.worker_id, first.epoch)
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the assignment: {e}")))?;
        let me = &self.cfg.id;
        match claim {
            Claim::Current { worker_addr } => Ok(worker_addr),
            Claim::NotHere => Err(Status::failed_precondition(format!(
                "worker {:?} is not assigned to this head {me:?} (adopted elsewhere since, or never here); call Reassign first",
                first.worker_id
            ))),
            Claim::OtherEpoch(current) => Err(Status::failed_precondition(format!(
                "epoch {} of worker {:?} is not its current epoch {current}; call Reassign again",
                first.epoch, first.worker_id
            ))),
        }
    }
}

/// Checks the fields of a `Reassign` that the registry does not.
fn validate_reassign(req: &ReassignRequest) -> Result<(), Status> {
    validate_id("worker_id", &req.worker_id).map_err(Status::invalid_argument)?;
    if req.worker_addr.len() > MAX_ADDR_LEN {
        return Err(Status::invalid_argument(format!(
            "worker_addr is {} bytes long; the limit is {MAX_ADDR_LEN}",
            req.worker_addr.len()
        )));
    }
    if req.previous_head_id.len() > crate::config::MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "previous_head_id is {} bytes long; the limit is {}",
            req.previous_head_id.len(),
            crate::config::MAX_ID_LEN
        )));
    }
    if req.instance.len() > MAX_INSTANCE_LEN
        || !req
            .instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Status::invalid_argument(format!(
            "instance must be at most {MAX_INSTANCE_LEN} ASCII letters, digits, '-', '_' or '.'"
        )));
    }
    if req.unavailable_heads.len() > MAX_UNAVAILABLE {
        return Err(Status::invalid_argument(format!(
            "unavailable_heads names {} heads; the limit is {MAX_UNAVAILABLE}",
            req.unavailable_heads.len()
        )));
    }
    for head in &req.unavailable_heads {
        validate_id("an id in unavailable_heads", head).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

impl HeadSvc {
    /// Adopts the worker of `req` under a new epoch: the work of `Reassign`,
    /// shared by adopt on open (`WorkerBeat.reassign`). `streaming` says
    /// the worker's stream is already open, so the assignment is recorded
    /// streaming at once. Returns the epoch and the assignment's secret;
    /// the adoption stays known (see [`Attached::adopting`]) until the
    /// stream opens or it expires.
    async fn adopt(&self, req: &ReassignRequest, streaming: bool) -> Result<(u64, Secret), Status> {
        validate_reassign(req)?;
        self.refuse_if_stopping()?;
        let me = &self.cfg.id;
        if self.drain.begun() || self.lease.draining() {
            return Err(Status::failed_precondition(format!(
                "head {me} is draining; choose another head"
            )));
        }
        if !self.lease.held() {
            return Err(Status::unavailable(format!(
                "head {me} is not registered right now (registry unreachable or lease lost); choose another head"
            )));
        }
        let reason = ReassignReason::try_from(req.reason).unwrap_or(ReassignReason::Unspecified);
        // The head a worker reports lost, and those it could not use, no
        // longer count as live in the load bound.
        let mut excluded = req.unavailable_heads.clone();
        if reason == ReassignReason::HeadLost && !req.previous_head_id.is_empty() {
            excluded.push(req.previous_head_id.clone());
        }
        let secret = Secret::generate()
            .map_err(|e| Status::internal(format!("cannot draw a random stream secret: {e}")))?;
        // Known before the registry call, so that a reconciliation running
        // meanwhile does not take the fresh assignment for a ghost.
        self.attached.adopting(
            &req.worker_id,
            Adoption {
                epoch: 0,
                secret,
                instance: req.instance.clone(),
                expires: tokio::time::Instant::now() + self.cfg.timeout + self.cfg.interval,
            },
        );
        let assigned = self
            .registry
            .assign(&AssignRequest {
                head_id: me,
                worker_id: &req.worker_id,
                worker_addr: &req.worker_addr,
                lease_ttl: self.cfg.lease_ttl,
                slack_permille: self.cfg.slack_permille,
                capacity: self.cfg.capacity,
                instance: &req.instance,
                excluded: &excluded,
                streaming,
            })
            .await;
        let epoch = match assigned {
            Ok(epoch) => {
                self.attached.adopted(&req.worker_id, secret, epoch);
                epoch
            }
            Err(e) => {
                self.attached.abandon(&req.worker_id, secret);
                return Err(match e {
                    RegistryError::NoLease => Status::unavailable(format!(
                        "head {me} is not registered (its lease is missing); choose another head"
                    )),
                    RegistryError::Draining => Status::failed_precondition(format!(
                        "head {me} is draining; choose another head"
                    )),
                    RegistryError::Full { load, bound } => refusal(
                        "load-bound",
                        format!(
                            "head {me} holds {load} workers, at its load bound of {bound} = ceil((1 + {}) * W / H); try your next head",
                            f64::from(self.cfg.slack_permille) / 1000.0
                        ),
                    ),
                    RegistryError::AtCapacity { load, capacity } => refusal(
                        "capacity",
                        format!("head {me} holds {load} workers, at its capacity of {capacity}; try your next head"),
                    ),
                    RegistryError::Held { head, head_addr, worker_addr } => {
                        warn!(worker = %req.worker_id, holder = %head, "refused a second process under a worker id that streams elsewhere");
                        Status::already_exists(format!(
                            "worker id {:?} is already attached to head {head} at {head_addr} by another process (worker address {worker_addr:?}); worker ids must be unique",
                            req.worker_id
                        ))
                    }
                    other => Status::unavailable(format!("cannot record the assignment: {other}")),
                });
            }
        };
        METRICS.reassignments[reason as usize % METRICS.reassignments.len()].inc();
        if !req.previous_head_id.is_empty() && req.previous_head_id != *me {
            self.events.emit(
                EventKind::WorkerMoved,
                me,
                &req.worker_id,
                epoch,
                &req.previous_head_id,
                reason.as_str_name(),
            );
        }
        info!(
            previous = %req.previous_head_id,
            reason = reason.as_str_name(),
            epoch,
            on_open = streaming,
            "adopted worker"
        );
        Ok((epoch, secret))
    }

    /// What `Reassign` answers for an adoption.
    fn assignment(&self, epoch: u64, secret: Secret) -> ReassignResponse {
        ReassignResponse {
            head_id: self.cfg.id.clone(),
            epoch,
            heartbeat_interval_ms: millis(self.cfg.interval),
            heartbeat_timeout_ms: millis(self.cfg.timeout),
            stream_secret: secret.to_hex(),
        }
    }

    /// Records an open stream whose first beat was admitted, announces it,
    /// and returns its response body.
    fn open_stream<I>(&self, new: NewStream, first: &WorkerBeat, inbound: I) -> HeartbeatBody<I> {
        let stream = self.attached.insert(new, now_ms());
        stream.record(first.sequence, first.load, tokio::time::Instant::now());
        debug!(worker = %stream.worker_id, epoch = stream.epoch, "stream open");
        self.events.emit(
            EventKind::WorkerAttached,
            &self.cfg.id,
            &stream.worker_id,
            stream.epoch,
            "",
            "stream open",
        );
        HeartbeatBody::new(self.beats.clone(), stream, inbound)
    }

    /// Adopt on open: the first beat carries the `Reassign` (see
    /// `WorkerBeat.reassign`). The assignment is recorded streaming in the
    /// same registry call that adopts the worker, so the stream needs no
    /// second call (`CLAIM`) and the worker no second round trip; the
    /// first `HeadBeat` carries what `Reassign` would have answered.
    #[tracing::instrument(skip_all, fields(worker = %req.worker_id))]
    async fn adopt_on_open<I>(
        &self,
        req: ReassignRequest,
        first: WorkerBeat,
        inbound: I,
    ) -> Result<HeartbeatBody<I>, Status> {
        if !first.worker_id.is_empty() && first.worker_id != req.worker_id {
            return Err(Status::invalid_argument(format!(
                "the first WorkerBeat names worker {:?} but its reassign names {:?}",
                first.worker_id, req.worker_id
            )));
        }
        let (epoch, secret) = self.adopt(&req, true).await?;
        let body = self.open_stream(
            NewStream {
                worker_id: req.worker_id,
                epoch,
                worker_addr: req.worker_addr,
                instance: req.instance,
                secret,
            },
            &first,
            inbound,
        );
        Ok(body.with_assignment(self.assignment(epoch, secret)))
    }

    /// Opens a `Heartbeat` stream whose beats come from `inbound`: reads
    /// and checks the first beat, adopts or admits the worker, and returns
    /// the stream's response body.
    async fn open_heartbeat<I>(&self, mut inbound: I) -> Result<HeartbeatBody<I>, Status>
    where
        I: tokio_stream::Stream<Item = Result<WorkerBeat, Status>> + Unpin,
    {
        use tokio_stream::StreamExt;
        self.refuse_if_stopping()?;
        let mut first = tokio::time::timeout(self.cfg.timeout, inbound.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no first WorkerBeat within {:?}",
                    self.cfg.timeout
                ))
            })?
            .transpose()?
            .ok_or_else(|| {
                Status::invalid_argument("the stream ended before its first WorkerBeat")
            })?;
        if let Some(req) = first.reassign.take() {
            return self.adopt_on_open(req, first, inbound).await;
        }
        validate_id("worker_id", &first.worker_id).map_err(Status::invalid_argument)?;
        // The secret first, changing nothing: a forged stream disturbs
        // nobody, not even by a registry write.
        let (instance, secret) = match self.attached.admit(
            &first.worker_id,
            first.epoch,
            &first.stream_secret,
        ) {
            Admission::Adopted(a) => (a.instance, a.secret),
            Admission::Reconnect { instance, secret } => (instance, secret),
            Admission::Denied => {
                METRICS.streams_denied.inc();
                return Err(Status::permission_denied(format!(
                        "the first WorkerBeat of worker {:?} does not carry the stream_secret that Reassign returned for epoch {} on this head",
                        first.worker_id, first.epoch
                    )));
            }
        };
        let worker_addr = self.claim(&first).await?;
        Ok(self.open_stream(
            NewStream {
                worker_id: first.worker_id.clone(),
                epoch: first.epoch,
                worker_addr,
                instance,
                secret,
            },
            &first,
            inbound,
        ))
    }
}

/// The path of `HeadService.Heartbeat`, which the head serves itself.
pub(crate) const HEARTBEAT_PATH: &str = "/tether.v1.HeadService/Heartbeat";

impl DirectRpc for HeadSvc {
    fn path(&self) -> &'static str {
        HEARTBEAT_PATH
    }

    fn call(
        &self,
        request: tonic::codegen::http::Request<tonic::body::Body>,
        open: Option<OpenStream>,
    ) -> Reply {
        let svc = self.clone();
        Box::pin(async move {
            let inbound = Inbound::<WorkerBeat>::new(request.into_body(), MAX_MESSAGE_BYTES);
            direct::respond(svc.open_heartbeat(inbound).await, open, MAX_MESSAGE_BYTES)
        })
    }
}

#[tonic::async_trait]
impl HeadService for HeadSvc {
    #[tracing::instrument(skip_all, fields(worker = %request.get_ref().worker_id))]
    async fn reassign(
        &self,
        request: Request<ReassignRequest>,
    ) -> Result<Response<ReassignResponse>, Status> {
        let req = request.into_inner();
        let (epoch, secret) = self.adopt(&req, false).await?;
        Ok(Response::new(self.assignment(epoch, secret)))
    }

    /// The head's server answers this path before tonic's router (see
    /// [`DirectRpc`]), so no call arrives here; the generated trait needs
    /// the method, and it runs the same code should one ever arrive.
    type HeartbeatStream = HeartbeatBody<Streaming<WorkerBeat>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<WorkerBeat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        self.open_heartbeat(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let (workers, next_page_token) = crate::listing::page(request.get_ref(), |after, limit| {
            self.attached.list(after, limit)
        })
        .map_err(Status::invalid_argument)?;
        Ok(Response::new(ListWorkersResponse {
            head_id: self.cfg.id.clone(),
            workers,
            next_page_token,
        }))
    }

    async fn list_heads(
        &self,
        request: Request<ListHeadsRequest>,
    ) -> Result<Response<ListHeadsResponse>, Status> {
        let worker = &request.get_ref().worker_id;
        if !worker.is_empty() {
            validate_id("worker_id", worker).map_err(Status::invalid_argument)?;
        }
        self.refuse_if_stopping()?;
        let snapshot = self.heads.snapshot().await.map_err(|e| {
            Status::unavailable(format!(
                "head {} cannot list the heads: {e}; ask another head",
                self.cfg.id
            ))
        })?;
        let heads = heads_view::preference(
            worker,
            &snapshot.heads,
            self.cfg.slack_permille,
            (&self.cfg.id, self.cfg.capacity),
        );
        Ok(Response::new(ListHeadsResponse {
            heads,
            version: snapshot.version,
            head_id: self.cfg.id.clone(),
            age_ms: snapshot.read_at.elapsed().as_millis() as u64,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.refuse_if_stopping()?;
        // Subscribed before the response starts, so that a watcher sees
        // every event that follows it.
        let mut events = self.events.watch(Duration::from_secs(2)).await;
        let mut closing = self.closing.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = closing.wait() => return,
                    _ = tx.closed() => return,
                    event = events.recv() => match event {
                        Ok(event) => {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::resource_exhausted(format!(
                                "this watcher fell {n} events behind; reconnect to continue"
                            )))).await;
                            return;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as EventStream
        ))
    }

    async fn drain(
        &self,
        _request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let workers = u32::try_from(self.attached.len()).unwrap_or(u32::MAX);
        let deadline_ms = self.drain.begin();
        info!(head = %self.cfg.id, workers, "drain requested over gRPC");
        Ok(Response::new(DrainResponse {
            head_id: self.cfg.id.clone(),
            workers,
            deadline_ms,
        }))
    }
}

/// RESOURCE_EXHAUSTED, naming the limit in metadata so that a worker can
/// tell a load bound (waived when every head refuses) from a hard cap.
fn refusal(limit: &'static str, message: String) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        crate::attach::REFUSAL_KEY,
        tonic::metadata::MetadataValue::from_static(limit),
    );
    Status::with_metadata(tonic::Code::ResourceExhausted, message, metadata)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head serves `Heartbeat` itself only on this path: were it to
    /// drift from the generated service's, every stream would silently go
    /// the slower way through tonic's router.
    #[test]
    fn the_direct_path_is_the_generated_services() {
        assert_eq!(
            HEARTBEAT_PATH,
            format!(
                "/{}/Heartbeat",
                crate::pb::head_service_server::SERVICE_NAME
            )
        );
    }
}
