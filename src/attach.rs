//! The worker side of the protocol: choose a head, `Reassign`, hold the
//! `Heartbeat` stream, notice when the head is gone, and move.
//!
//! It lives in the library so that `tether-worker` and the benchmark's
//! simulated workers behave exactly alike.

use crate::backoff::{Backoff, Jitter};
use crate::pb::head_service_client::HeadServiceClient;
use crate::pb::{HeadBeat, ReassignReason, ReassignRequest, WorkerBeat};
use crate::placement;
use crate::registry::{HeadEntry, Registry};
use crate::shutdown::Shutdown;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

/// How a worker attaches. The heartbeat timing is not here: each head
/// dictates it in its `Reassign` answer, so one cluster has one policy.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// The worker's id.
    pub worker_id: String,
    /// Where the worker serves `WorkerService`, reported to heads.
    pub worker_addr: String,
    /// Bound on dialing a head and on each unary call to it.
    pub connect_timeout: Duration,
    /// First retry delay when no head could be reached.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
}

/// What a worker knows about its attachment, published on every change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The head of the current or last attachment.
    pub head_id: String,
    /// That head's address.
    pub head_addr: String,
    /// The epoch of the current or last assignment.
    pub epoch: u64,
    /// True from the first `HeadBeat` of a stream until the stream is lost.
    pub attached: bool,
    /// Attachments after the first one.
    pub reassignments: u64,
    /// When the last `HeadBeat` arrived.
    pub last_head_beat: Option<Instant>,
    /// When the current attachment began (its first `HeadBeat`), Unix ms.
    pub attached_since_ms: i64,
    /// When the current attachment began, for measuring moves.
    pub attached_at: Option<Instant>,
    /// When the previous head was found lost, if the worker is moving.
    pub lost_at: Option<Instant>,
}

/// Why holding a stream ended.
enum Ended {
    Shutdown,
    Lost { reason: String },
}

/// A head that accepted the worker.
struct Session {
    head: HeadEntry,
    channel: Channel,
    epoch: u64,
    interval: Duration,
    timeout: Duration,
}

/// Runs the attach loop of one worker until `shutdown`. Never returns on
/// its own: with no head available it keeps retrying, with backoff.
pub async fn run(
    cfg: AttachConfig,
    registry: Registry,
    status: watch::Sender<Snapshot>,
    mut shutdown: Shutdown,
) {
    let seed = placement::hash_str(&cfg.worker_id);
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max, seed);
    let mut jitter = Jitter::new(seed);
    // The head we just lost stays excluded for a while: its lease may
    // outlive it by up to one TTL.
    let mut excluded: Option<(String, Instant)> = None;
    let mut previous: Option<String> = None;
    let mut attempts_failed = 0u32;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let skip = excluded
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(id, _)| id.as_str());
        let reason = match &previous {
            None => ReassignReason::Startup,
            Some(_) => ReassignReason::HeadLost,
        };
        let session = tokio::select! {
            s = choose(&cfg, &registry, skip, previous.as_deref(), reason) => s,
            _ = shutdown.wait() => return,
        };
        let session = match session {
            Ok(s) => s,
            Err(why) => {
                attempts_failed += 1;
                let delay = backoff.next_delay();
                // The first failures are normal during a failover; keep
                // the log calm until it persists.
                if attempts_failed >= 3 {
                    warn!(worker = %cfg.worker_id, attempts = attempts_failed, retry_in = ?delay, "no head available: {why}");
                } else {
                    debug!(worker = %cfg.worker_id, retry_in = ?delay, "no head available: {why}");
                }
                if attempts_failed > 1 {
                    // Past the first retry, the excluded head may be back.
                    excluded = None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        attempts_failed = 0;
        let head_id = session.head.id.clone();
        let timeout = session.timeout;
        match hold(&cfg, session, &status, &mut shutdown).await {
            Ended::Shutdown => return,
            Ended::Lost { reason } => {
                let now = Instant::now();
                status.send_modify(|s| {
                    s.attached = false;
                    s.lost_at = Some(now);
                });
                warn!(worker = %cfg.worker_id, head = %head_id, %reason, "lost head; moving");
                excluded = Some((head_id.clone(), now + timeout));
                previous = Some(head_id);
                backoff.reset();
                // A small jitter keeps the workers of one dead head from
                // hitting the registry and the survivors in one burst.
                let spread = jitter.up_to(Duration::from_millis(20));
                tokio::select! {
                    _ = tokio::time::sleep(spread) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}

/// Reads the live heads and asks them, best first, to adopt the worker.
async fn choose(
    cfg: &AttachConfig,
    registry: &Registry,
    skip: Option<&str>,
    previous: Option<&str>,
    reason: ReassignReason,
) -> Result<Session, String> {
    let heads = registry
        .live_heads()
        .await
        .map_err(|e| format!("cannot read the registry: {e}"))?;
    let candidates: Vec<HeadEntry> = heads
        .into_iter()
        .filter(|h| h.state != "draining" && Some(h.id.as_str()) != skip)
        .collect();
    if candidates.is_empty() {
        return Err("the registry lists no live head".into());
    }
    let order = placement::rendezvous_order(&cfg.worker_id, &candidates, |h| h.id.as_str());
    let mut refusals = Vec::new();
    for head in order {
        match reassign(cfg, head, previous, reason).await {
            Ok(session) => return Ok(session),
            Err(e) => {
                debug!(worker = %cfg.worker_id, head = %head.id, error = %e, "head refused");
                refusals.push(format!("{}: {e}", head.id));
            }
        }
    }
    Err(format!("every live head refused ({})", refusals.join("; ")))
}

/// Dials one head and calls `Reassign` on it.
async fn reassign(
    cfg: &AttachConfig,
    head: &HeadEntry,
    previous: Option<&str>,
    reason: ReassignReason,
) -> Result<Session, String> {
    let channel = Endpoint::from_shared(format!("http://{}", head.addr))
        .map_err(|e| format!("bad address {:?}: {e}", head.addr))?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", head.addr))?;
    let mut client = HeadServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(ReassignRequest {
        worker_id: cfg.worker_id.clone(),
        worker_addr: cfg.worker_addr.clone(),
        previous_head_id: previous.unwrap_or_default().to_owned(),
        reason: reason as i32,
    });
    request.set_timeout(cfg.connect_timeout * 2);
    let answer = client
        .reassign(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    if answer.head_id != head.id {
        return Err(format!(
            "answered as head {:?}, registry says {:?}",
            answer.head_id, head.id
        ));
    }
    let interval = Duration::from_millis(u64::from(answer.heartbeat_interval_ms.max(1)));
    let timeout = Duration::from_millis(u64::from(answer.heartbeat_timeout_ms)).max(interval * 2);
    Ok(Session {
        head: head.clone(),
        channel,
        epoch: answer.epoch,
        interval,
        timeout,
    })
}

/// Holds the `Heartbeat` stream until the head is lost or shutdown.
async fn hold(
    cfg: &AttachConfig,
    session: Session,
    status: &watch::Sender<Snapshot>,
    shutdown: &mut Shutdown,
) -> Ended {
    let Session {
        head,
        channel,
        epoch,
        interval,
        timeout,
    } = session;
    // Two slots: the first beat, and one tick. If the head stops reading,
    // beats are dropped rather than queued.
    let (tx, rx) = mpsc::channel::<WorkerBeat>(2);
    let _ = tx.try_send(WorkerBeat {
        worker_id: cfg.worker_id.clone(),
        epoch,
        sequence: 0,
        load: None,
    });
    let mut client = HeadServiceClient::new(channel);
    let opened = tokio::select! {
        r = tokio::time::timeout(timeout, client.heartbeat(ReceiverStream::new(rx))) => r,
        _ = shutdown.wait() => return Ended::Shutdown,
    };
    let mut inbound = match opened {
        Err(_) => return lost("the stream did not open within the heartbeat timeout"),
        Ok(Err(status)) => {
            return lost(format!(
                "stream refused: {:?}: {}",
                status.code(),
                status.message()
            ))
        }
        Ok(Ok(response)) => response.into_inner(),
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut beats = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return Ended::Shutdown,
            _ = &mut deadline => return lost(format!("no HeadBeat within {timeout:?}")),
            _ = ticks.tick() => {
                sequence += 1;
                let beat = WorkerBeat { sequence, ..WorkerBeat::default() };
                // Full means the head is not reading; its silence will
                // show up as missing HeadBeats, so dropping is safe.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(beat) {
                    return lost("the stream closed");
                }
            }
            message = inbound.message() => match message {
                Ok(Some(beat)) => {
                    if let Some(why) = mismatch(&beat, &head.id, epoch) {
                        return lost(why);
                    }
                    deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                    beats += 1;
                    let now = Instant::now();
                    if beats == 1 {
                        status.send_modify(|s| {
                            if !s.head_id.is_empty() {
                                s.reassignments += 1;
                            }
                            s.head_id = head.id.clone();
                            s.head_addr = head.addr.clone();
                            s.epoch = epoch;
                            s.attached = true;
                            s.attached_since_ms = crate::registry::now_ms();
                            s.attached_at = Some(now);
                            s.last_head_beat = Some(now);
                        });
                        info!(worker = %cfg.worker_id, head = %head.id, epoch, "attached");
                    } else {
                        status.send_modify(|s| s.last_head_beat = Some(now));
                    }
                }
                Ok(None) => return lost("the head ended the stream"),
                Err(status) => return lost(format!("stream error: {:?}: {}", status.code(), status.message())),
            },
        }
    }
}

fn lost(reason: impl Into<String>) -> Ended {
    Ended::Lost {
        reason: reason.into(),
    }
}

/// A beat from another head or another epoch means the stream is not
/// what the worker thinks it is; treat it as lost rather than trust it.
fn mismatch(beat: &HeadBeat, head_id: &str, epoch: u64) -> Option<String> {
    if beat.head_id != head_id {
        return Some(format!("beat from head {:?}, expected {head_id:?}", beat.head_id));
    }
    if beat.epoch != epoch {
        return Some(format!("beat for epoch {}, expected {epoch}", beat.epoch));
    }
    None
}
