//! The worker side of the protocol: choose a head, `Reassign`, hold the
//! `Heartbeat` stream, notice when the head is gone, and move.
//!
//! Moves come in two kinds. When the head is lost (stream broken, beats
//! stopped) the worker is unattached until another head adopts it
//! (break-before-make: there is nothing left to keep). When the head asks
//! the worker to move (`Redirect`: drain or rebalance) the worker opens the
//! new stream first and closes the old one only once the new head beats
//! (make-before-break), so it misses no beat.
//!
//! It lives in the library so that `tether-worker` and the benchmark's
//! simulated workers behave exactly alike.

use crate::backoff::{Backoff, Jitter};
use crate::discovery::Discovery;
use crate::metrics::METRICS;
use crate::pb::head_service_client::HeadServiceClient;
use crate::pb::{HeadBeat, ReassignReason, ReassignRequest, Redirect, RedirectReason, WorkerBeat};
use crate::placement;
use crate::registry::HeadEntry;
use crate::security::ClientSecurity;
use crate::shutdown::Shutdown;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::{debug, error, info, warn};

/// How a worker attaches. The heartbeat timing is not here: each head
/// dictates it in its `Reassign` answer, so one cluster has one policy.
#[derive(Debug, Clone, Default)]
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
    /// TLS and token to present to heads.
    pub security: ClientSecurity,
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
    /// The longest gap between two `HeadBeat`s since the worker last went
    /// from unattached to attached (handoffs do not reset it).
    pub max_beat_gap: Duration,
    /// When the current attachment began (its first `HeadBeat`), Unix ms.
    pub attached_since_ms: i64,
    /// When the current attachment began, for measuring moves.
    pub attached_at: Option<Instant>,
    /// When the previous head was found lost, if the worker is moving.
    pub lost_at: Option<Instant>,
}

/// An open, beating stream to one head.
struct Link {
    head: HeadEntry,
    epoch: u64,
    interval: Duration,
    timeout: Duration,
    tx: mpsc::Sender<WorkerBeat>,
    inbound: Streaming<HeadBeat>,
    /// The heads version of the head's last beat: while the worker's list
    /// of heads was read at it, a move needs no new list.
    heads_version: u64,
}

/// Why holding a stream ended.
enum Ended {
    Shutdown,
    Lost {
        head_id: String,
        reason: String,
        /// The stream broke (rather than went silent): worth one retry on
        /// the same head if it is still registered.
        retry_same: bool,
        timeout: Duration,
        /// The heads version of the head's last beat.
        heads_version: u64,
    },
}

/// Why one head did not adopt the worker.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// At its load bound: it may take the worker once every head refused
    /// (the worker then names all the others unavailable, which waives the
    /// bound).
    #[error("{0}")]
    Bound(String),
    /// Cannot take the worker now: unreachable, answering under another
    /// id, at capacity, draining, unregistered. It does not count as live
    /// in the next heads' load bound.
    #[error("{0}")]
    Unusable(String),
    /// Another process holds this worker id.
    #[error("{0}")]
    Held(String),
}

/// Why one attempt to attach failed. Both are retried by the attach
/// loop, at different paces, so neither carries `is_retryable`.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    /// No head adopted the worker; the reasons, head by head.
    #[error("{0}")]
    NoHead(String),
    /// Another process holds this worker id: retry slowly.
    #[error("{0}")]
    Held(String),
}

/// The metadata key a head sets on a RESOURCE_EXHAUSTED refusal, saying
/// which limit refused (`load-bound` or `capacity`).
pub const REFUSAL_KEY: &str = "tether-refusal";

/// A fresh token naming this worker process (see `ReassignRequest.instance`).
pub fn new_instance() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        // Only unique per process matters; the clock and pid will do.
        let fallback = (u128::from(std::process::id()) << 64)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
        bytes.copy_from_slice(&fallback.to_le_bytes()[..12]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which heads one attempt tries, in order.
struct Attempt<'a> {
    /// Tried first: a redirect's suggestion, or the head just lost.
    prefer: Option<HeadEntry>,
    /// Try `prefer` only if the registry still lists it.
    prefer_if_listed: bool,
    /// Try nothing but `prefer`.
    only_prefer: bool,
    /// Never try this head (the one being left).
    skip: Option<&'a str>,
    /// Reported to the head as the previous one.
    previous: Option<&'a str>,
    reason: ReassignReason,
    /// The heads version the worker's last head beat: the list of heads
    /// read at that version is reused instead of read again.
    heads_version: Option<u64>,
}

/// Runs the attach loop of one worker until `shutdown`. Never returns on
/// its own: with no head available it keeps retrying, with backoff.
/// `discovery` is where it learns the heads (a `Registry` will do).
pub async fn run(
    cfg: AttachConfig,
    discovery: impl Into<Discovery>,
    status: watch::Sender<Snapshot>,
    mut shutdown: Shutdown,
) {
    let discovery: Discovery = discovery.into();
    let discovery = &discovery;
    let seed = placement::hash_str(&cfg.worker_id);
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max, seed);
    let mut jitter = Jitter::new(seed);
    let instance = new_instance();
    // How many attempts in a row found the id held by another process.
    let mut held = 0u32;
    // The head just lost: excluded for a while (its lease may outlive it),
    // or retried once first if its stream merely broke.
    let mut lost: Option<(String, Instant, bool)> = None;
    let mut previous: Option<String> = None;
    // The heads version of the lost head's last beat.
    let mut last_version: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let fresh_loss = lost
            .as_ref()
            .filter(|(_, until, _)| Instant::now() < *until);
        let (skip, prefer) = match fresh_loss {
            Some((id, _, true)) if failures == 0 => (None, Some(id.clone())),
            Some((id, _, _)) => (Some(id.as_str()), None),
            None => (None, None),
        };
        let attempt = Attempt {
            prefer: prefer.map(|id| HeadEntry {
                id,
                addr: String::new(),
                state: crate::pb::HeadState::Ready,
                ..HeadEntry::default()
            }),
            prefer_if_listed: true,
            only_prefer: false,
            skip,
            previous: previous.as_deref(),
            reason: match &previous {
                None => ReassignReason::Startup,
                Some(_) => ReassignReason::HeadLost,
            },
            // Only the first attempt after a loss: once every head
            // refused, the list is read again.
            heads_version: last_version.filter(|_| failures == 0),
        };
        let link = tokio::select! {
            l = establish(&cfg, &instance, discovery, attempt) => l,
            _ = shutdown.wait() => return,
        };
        let link = match link {
            Ok(l) => l,
            Err(AttachError::Held(why)) => {
                // A configuration error, not a fault: say it once, clearly,
                // then retry slowly, so that this process takes over if the
                // other one goes away.
                held += 1;
                let delay = cfg.backoff_max;
                if held == 1 {
                    error!(worker = %cfg.worker_id, retry_every = ?delay, "another process runs under this worker id; worker ids must be unique: {why}");
                } else {
                    debug!(worker = %cfg.worker_id, attempts = held, "worker id still held by another process: {why}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.wait() => return,
                }
            }
            Err(AttachError::NoHead(why)) => {
                failures += 1;
                let delay = backoff.next_delay();
                // The first failures are normal during a failover; keep
                // the log calm until it persists.
                if failures >= 3 {
                    warn!(worker = %cfg.worker_id, attempts = failures, retry_in = ?delay, "no head available: {why}");
                } else {
                    debug!(worker = %cfg.worker_id, retry_in = ?delay, "no head available: {why}");
                }
                if failures > 1 {
                    // Past the first retry, the lost head may be back.
                    lost = None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        failures = 0;
        held = 0;
        backoff.reset();
        let reason = if previous.is_some() {
            ReassignReason::HeadLost
        } else {
            ReassignReason::Startup
        };
        METRICS.reassignments[reason as usize].inc();
        METRICS.workers_attached.add(1);
        if let Some(lost_at) = status.borrow().lost_at {
            METRICS.failover.observe(lost_at.elapsed());
        }
        publish_attached(&status, &link, true);
        info!(worker = %cfg.worker_id, head = %link.head.id, epoch = link.epoch, "attached");
        let ended = hold(&cfg, &instance, discovery, link, &status, &mut shutdown).await;
        METRICS.workers_attached.add(-1);
        match ended {
            Ended::Shutdown => return,
            Ended::Lost {
                head_id,
                reason,
                retry_same,
                timeout,
                heads_version,
            } => {
                last_version = Some(heads_version);
                let now = Instant::now();
                status.send_modify(|s| {
                    s.attached = false;
                    s.lost_at = Some(now);
                });
                warn!(worker = %cfg.worker_id, head = %head_id, %reason, "lost head; moving");
                lost = Some((head_id.clone(), now + timeout, retry_same));
                previous = Some(head_id);
                // A small jitter keeps the workers of one dead head from
                // hitting the discovery source and the survivors in one burst.
                let spread = jitter.up_to(Duration::from_millis(20));
                tokio::select! {
                    _ = tokio::time::sleep(spread) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}

/// Records a new attachment. `from_unattached` resets the gap measure; a
/// handoff keeps it, so a gap during the handoff shows.
fn publish_attached(status: &watch::Sender<Snapshot>, link: &Link, from_unattached: bool) {
    let now = Instant::now();
    status.send_modify(|s| {
        if !s.head_id.is_empty() {
            s.reassignments += 1;
        }
        if from_unattached {
            s.max_beat_gap = Duration::ZERO;
        } else if let Some(last) = s.last_head_beat {
            s.max_beat_gap = s.max_beat_gap.max(now.duration_since(last));
        }
        s.head_id = link.head.id.clone();
        s.head_addr = link.head.addr.clone();
        s.epoch = link.epoch;
        s.attached = true;
        s.attached_since_ms = crate::registry::now_ms();
        s.attached_at = Some(now);
        s.last_head_beat = Some(now);
    });
}

/// Tries the heads of `attempt` in order until one adopts the worker and
/// beats on a new stream.
async fn establish(
    cfg: &AttachConfig,
    instance: &str,
    discovery: &Discovery,
    attempt: Attempt<'_>,
) -> Result<Link, AttachError> {
    let mut order: Vec<HeadEntry> = Vec::new();
    let needs_registry = !attempt.only_prefer || attempt.prefer_if_listed;
    // The head being left (or lost) is not asked for the list.
    let known = attempt.heads_version.and_then(|v| discovery.known_at(v));
    let listed = if let (true, Some(known)) = (needs_registry, known) {
        known
    } else if needs_registry {
        discovery
            .list(cfg, None, attempt.skip.or(attempt.previous))
            .await
            .map_err(AttachError::NoHead)?
    } else {
        Vec::new()
    };
    if let Some(p) = &attempt.prefer {
        if attempt.prefer_if_listed {
            if let Some(h) = listed
                .iter()
                .find(|h| h.id == p.id && h.state != crate::pb::HeadState::Draining)
            {
                order.push(h.clone());
            }
        } else {
            order.push(p.clone());
        }
    }
    if !attempt.only_prefer {
        // Already in preference order (ready heads by rendezvous, stale
        // ones last): keep it.
        let rest: Vec<HeadEntry> = listed
            .into_iter()
            .filter(|h| {
                h.state != crate::pb::HeadState::Draining
                    && Some(h.id.as_str()) != attempt.skip
                    && !order.iter().any(|o| o.id == h.id)
            })
            .collect();
        order.extend(rest);
    }
    if order.is_empty() {
        return Err(AttachError::NoHead("no live head is listed".into()));
    }
    let mut refusals = Vec::new();
    // Heads that cannot take the worker (and the one it lost) do not
    // count as live in the next heads' load bound.
    let mut unavailable: Vec<String> = Vec::new();
    if attempt.reason == ReassignReason::HeadLost {
        unavailable.extend(attempt.previous.map(str::to_owned));
    }
    let mut at_bound = Vec::new();
    for head in &order {
        match open(
            cfg,
            instance,
            head,
            attempt.previous,
            attempt.reason,
            &unavailable,
        )
        .await
        {
            Ok(link) => return Ok(link),
            Err(Refusal::Held(why)) => return Err(AttachError::Held(why)),
            Err(refusal) => {
                debug!(worker = %cfg.worker_id, head = %head.id, error = %refusal, "head refused");
                refusals.push(format!("{}: {refusal}", head.id));
                match refusal {
                    Refusal::Bound(_) => at_bound.push(head),
                    _ => unavailable.push(head.id.clone()),
                }
            }
        }
        unavailable.truncate(MAX_UNAVAILABLE);
    }
    // Every head refused: availability comes before balance. Ask the
    // heads that refused only for their load bound again, naming all the
    // others unavailable, which waives the bound; rebalancing evens the
    // load out later.
    for head in at_bound {
        let others: Vec<String> = order
            .iter()
            .filter(|h| h.id != head.id)
            .map(|h| h.id.clone())
            .take(MAX_UNAVAILABLE)
            .collect();
        match open(
            cfg,
            instance,
            head,
            attempt.previous,
            attempt.reason,
            &others,
        )
        .await
        {
            Ok(link) => {
                info!(worker = %cfg.worker_id, head = %head.id, "every head was at its load bound; adopted over it");
                return Ok(link);
            }
            Err(Refusal::Held(why)) => return Err(AttachError::Held(why)),
            Err(refusal) => refusals.push(format!("{} (over its bound): {refusal}", head.id)),
        }
    }
    Err(AttachError::NoHead(format!(
        "every head tried refused ({})",
        refusals.join("; ")
    )))
}

/// The most heads a `Reassign` may name unavailable.
const MAX_UNAVAILABLE: usize = 64;

/// Dials one head, has it adopt the worker and waits for the head's first
/// beat on a new `Heartbeat` stream: in one exchange (adopt on open, see
/// [`open_adopting`]), or, with a head older than that, `Reassign` then
/// `Heartbeat` on the same connection.
async fn open(
    cfg: &AttachConfig,
    instance: &str,
    head: &HeadEntry,
    previous: Option<&str>,
    reason: ReassignReason,
    unavailable: &[String],
) -> Result<Link, Refusal> {
    let channel = cfg
        .security
        .endpoint(&head.addr)
        .map_err(Refusal::Unusable)?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Refusal::Unusable(format!("cannot connect to {}: {e}", head.addr)))?;
    let mut client = HeadServiceClient::new(channel);
    let reassign = ReassignRequest {
        worker_id: cfg.worker_id.clone(),
        worker_addr: cfg.worker_addr.clone(),
        previous_head_id: previous.unwrap_or_default().to_owned(),
        reason: reason as i32,
        instance: instance.to_owned(),
        unavailable_heads: unavailable.to_vec(),
    };
    match open_adopting(cfg, &mut client, head, reassign.clone()).await {
        Ok(link) => return Ok(link),
        Err(OnOpen::Refused(refused)) => return Err(refused),
        Err(OnOpen::Unsupported) => {
            debug!(worker = %cfg.worker_id, head = %head.id, "the head predates adopt on open; calling Reassign");
        }
    }
    let mut request = tonic::Request::new(reassign);
    request.set_timeout(cfg.connect_timeout * 2);
    cfg.security.authorize(&mut request);
    let answer = client
        .reassign(request)
        .await
        .map_err(refusal)?
        .into_inner();
    if answer.head_id != head.id {
        // Another head answers at this address (a misconfigured
        // --advertise): it must not count as a placement target.
        return Err(Refusal::Unusable(format!(
            "answered as head {:?}, registry says {:?}",
            answer.head_id, head.id
        )));
    }
    let (interval, timeout) = timing(&answer);
    let epoch = answer.epoch;

    // Two slots: the first beat, and one tick. If the head stops reading,
    // beats are dropped rather than queued.
    let (tx, rx) = mpsc::channel::<WorkerBeat>(2);
    let _ = tx.try_send(WorkerBeat {
        worker_id: cfg.worker_id.clone(),
        epoch,
        sequence: 0,
        load: None,
        stream_secret: answer.stream_secret,
        reassign: None,
    });
    let first = async {
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        cfg.security.authorize(&mut request);
        let response = client
            .heartbeat(request)
            .await
            .map_err(|s| format!("stream refused: {:?}: {}", s.code(), s.message()))?;
        let mut inbound = response.into_inner();
        match inbound.message().await {
            Ok(Some(beat)) => match mismatch(&beat, &head.id, epoch) {
                Some(why) => Err(why),
                None => Ok((inbound, beat.heads_version)),
            },
            Ok(None) => Err("the head ended the stream before its first beat".to_owned()),
            Err(s) => Err(format!("stream error: {:?}: {}", s.code(), s.message())),
        }
    };
    let (inbound, heads_version) = tokio::time::timeout(timeout, first)
        .await
        .map_err(|_| Refusal::Unusable(format!("no first HeadBeat within {timeout:?}")))?
        .map_err(Refusal::Unusable)?;
    Ok(Link {
        head: head.clone(),
        epoch,
        interval,
        timeout,
        tx,
        inbound,
        heads_version,
    })
}

/// Why adopt on open did not give a stream.
enum OnOpen {
    /// The head predates `WorkerBeat.reassign` (it answered
    /// PERMISSION_DENIED, having found no secret): use `Reassign`.
    Unsupported,
    /// The head refused, as `Reassign` would have.
    Refused(Refusal),
}

/// Adopt on open: the first `WorkerBeat` of a new stream carries the
/// `Reassign`, and the head's first `HeadBeat` its answer. One call and
/// one round trip instead of two, and one registry call on the head
/// instead of two. Bounded like the `Reassign` it replaces.
async fn open_adopting(
    cfg: &AttachConfig,
    client: &mut HeadServiceClient<tonic::transport::Channel>,
    head: &HeadEntry,
    reassign: ReassignRequest,
) -> Result<Link, OnOpen> {
    let (tx, rx) = mpsc::channel::<WorkerBeat>(2);
    let _ = tx.try_send(WorkerBeat {
        worker_id: cfg.worker_id.clone(),
        reassign: Some(reassign),
        ..WorkerBeat::default()
    });
    let opened = async {
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        cfg.security.authorize(&mut request);
        let mut inbound = match client.heartbeat(request).await {
            Ok(response) => response.into_inner(),
            Err(s) if s.code() == tonic::Code::PermissionDenied => return Err(OnOpen::Unsupported),
            Err(s) => return Err(OnOpen::Refused(refusal(s))),
        };
        let unusable = |why: String| OnOpen::Refused(Refusal::Unusable(why));
        let beat = match inbound.message().await {
            Ok(Some(beat)) => beat,
            Ok(None) => {
                return Err(unusable(
                    "the head ended the stream before its first beat".into(),
                ))
            }
            Err(s) if s.code() == tonic::Code::PermissionDenied => return Err(OnOpen::Unsupported),
            Err(s) => return Err(OnOpen::Refused(refusal(s))),
        };
        let Some(answer) = beat.assignment.clone() else {
            return Err(unusable(
                "the head's first beat carries no assignment".into(),
            ));
        };
        if answer.head_id != head.id {
            // As with `Reassign`: another head answers at this address.
            // Dropping the stream makes that head release the adoption.
            return Err(unusable(format!(
                "answered as head {:?}, registry says {:?}",
                answer.head_id, head.id
            )));
        }
        if let Some(why) = mismatch(&beat, &head.id, answer.epoch) {
            return Err(unusable(why));
        }
        let (interval, timeout) = timing(&answer);
        Ok(Link {
            head: head.clone(),
            epoch: answer.epoch,
            interval,
            timeout,
            tx,
            inbound,
            heads_version: beat.heads_version,
        })
    };
    let bound = cfg.connect_timeout * 2;
    tokio::time::timeout(bound, opened)
        .await
        .unwrap_or_else(|_| {
            Err(OnOpen::Refused(Refusal::Unusable(format!(
                "no first HeadBeat within {bound:?}"
            ))))
        })
}

/// How a head's refusal of `Reassign` (or of adopt on open) is taken.
fn refusal(s: tonic::Status) -> Refusal {
    let why = format!("{:?}: {}", s.code(), s.message());
    let limit = s.metadata().get(REFUSAL_KEY).and_then(|v| v.to_str().ok());
    match (s.code(), limit) {
        (tonic::Code::AlreadyExists, _) => Refusal::Held(why),
        (tonic::Code::ResourceExhausted, Some("load-bound")) => Refusal::Bound(why),
        _ => Refusal::Unusable(why),
    }
}

/// The heartbeat interval and timeout a head dictates.
fn timing(answer: &crate::pb::ReassignResponse) -> (Duration, Duration) {
    let interval = Duration::from_millis(u64::from(answer.heartbeat_interval_ms.max(1)));
    let timeout = Duration::from_millis(u64::from(answer.heartbeat_timeout_ms)).max(interval * 2);
    (interval, timeout)
}

/// How long a stopping worker waits for its head to acknowledge the end
/// of the stream. Short: a head that does not answer will see the
/// connection close anyway.
const GOODBYE: Duration = Duration::from_millis(500);

/// Ends the stream cleanly: the head then reports a clean exit
/// (`WORKER_LEFT`, "exited cleanly") rather than a lost connection, and
/// releases the assignment at once instead of after a timeout.
async fn goodbye(link: Link) {
    let Link {
        tx, mut inbound, ..
    } = link;
    // Dropping the sender ends the request stream (END_STREAM); the head
    // answers by ending its half.
    drop(tx);
    let _ = tokio::time::timeout(GOODBYE, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

type Move<'a> = Pin<Box<dyn Future<Output = Result<Link, String>> + Send + 'a>>;

type Refresh<'a> = Pin<Box<dyn Future<Output = Result<Vec<HeadEntry>, String>> + Send + 'a>>;

/// Holds the stream until the head is lost or shutdown, following the
/// head's redirects make-before-break.
async fn hold(
    cfg: &AttachConfig,
    instance: &str,
    discovery: &Discovery,
    mut link: Link,
    status: &watch::Sender<Snapshot>,
    shutdown: &mut Shutdown,
) -> Ended {
    let deadline = tokio::time::sleep(link.timeout);
    tokio::pin!(deadline);
    let mut ticks = beat_timer(link.interval);
    let mut sequence = 0u64;
    let mut moving: Option<Move<'_>> = None;
    let mut moving_since = Instant::now();
    let mut moving_reason = ReassignReason::Rebalance;
    // A `ListHeads` under way because a beat carried a new heads
    // version, and the version last asked about (asked once per version,
    // so a failing refresh is not repeated every beat).
    let mut refreshing: Option<Refresh<'_>> = None;
    let mut asked_version = 0u64;
    // Set when the old stream died while a move was under way: the move
    // decides the outcome.
    let mut old_dead = false;
    loop {
        tokio::select! {
            _ = shutdown.wait() => {
                if !old_dead {
                    goodbye(link).await;
                }
                return Ended::Shutdown;
            }
            _ = &mut deadline, if !old_dead => {
                if moving.is_some() {
                    old_dead = true;
                } else {
                    return lost(&link, format!("no HeadBeat within {:?}", link.timeout), false);
                }
            }
            _ = ticks.tick(), if !old_dead => {
                sequence += 1;
                let beat = WorkerBeat { sequence, ..WorkerBeat::default() };
                // Full means the head is not reading; its silence will
                // show up as missing HeadBeats, so dropping is safe.
                if link.tx.try_send(beat).is_ok() {
                    METRICS.beats_sent.inc();
                }
            }
            message = link.inbound.message(), if !old_dead => match message {
                Ok(Some(beat)) => {
                    if let Some(why) = mismatch(&beat, &link.head.id, link.epoch) {
                        return lost(&link, why, false);
                    }
                    deadline.as_mut().reset(tokio::time::Instant::now() + link.timeout);
                    link.heads_version = beat.heads_version;
                    let now = Instant::now();
                    METRICS.beats_received.inc();
                    status.send_modify(|s| {
                        if let Some(last) = s.last_head_beat {
                            let gap = now.duration_since(last);
                            s.max_beat_gap = s.max_beat_gap.max(gap);
                            if gap > link.interval * 3 / 2 {
                                let missed = (gap.as_secs_f64() / link.interval.as_secs_f64()).round() as u64;
                                METRICS.missed_beats.add(missed.saturating_sub(1).max(1));
                            }
                        }
                        s.last_head_beat = Some(now);
                    });
                    if refreshing.is_none()
                        && beat.heads_version != asked_version
                        && discovery.outdated(beat.heads_version)
                    {
                        asked_version = beat.heads_version;
                        let head = link.head.clone();
                        refreshing = Some(Box::pin(async move {
                            discovery.list(cfg, Some(&head), None).await
                        }));
                    }
                    if let (Some(redirect), None) = (beat.redirect, &moving) {
                        moving_since = Instant::now();
                        moving_reason = match redirect.reason() {
                            RedirectReason::Drain => ReassignReason::HeadDraining,
                            _ => ReassignReason::Rebalance,
                        };
                        info!(worker = %cfg.worker_id, head = %link.head.id, to = %redirect.suggested_head_id, reason = redirect.reason().as_str_name(), "head asks us to move");
                        moving = Some(Box::pin(follow(cfg, instance, discovery, redirect, link.head.id.clone(), link.heads_version)));
                    }
                }
                Ok(None) | Err(_) if moving.is_some() => old_dead = true,
                Ok(None) => return lost(&link, "the head ended the stream", true),
                Err(s) => return lost(&link, format!("stream error: {:?}: {}", s.code(), s.message()), true),
            },
            listed = async { refreshing.as_mut().expect("guarded").await }, if refreshing.is_some() => {
                refreshing = None;
                match listed {
                    Ok(heads) => debug!(worker = %cfg.worker_id, heads = heads.len(), version = asked_version, "heads version changed; list refreshed"),
                    Err(e) => debug!(worker = %cfg.worker_id, error = %e, "heads version changed; cannot refresh the list"),
                }
            }
            result = async { moving.as_mut().expect("guarded").await }, if moving.is_some() => {
                moving = None;
                match result {
                    Ok(new_link) => {
                        info!(worker = %cfg.worker_id, from = %link.head.id, to = %new_link.head.id, epoch = new_link.epoch, "moved");
                        publish_attached(status, &new_link, false);
                        METRICS.handoff.observe(moving_since.elapsed());
                        METRICS.reassignments[moving_reason as usize].inc();
                        // Dropping the old link closes the old stream, now
                        // that the new head beats.
                        link = new_link;
                        old_dead = false;
                        deadline.as_mut().reset(tokio::time::Instant::now() + link.timeout);
                        ticks = beat_timer(link.interval);
                        sequence = 0;
                    }
                    Err(e) if old_dead => return lost(&link, format!("stream lost during a move that failed: {e}"), false),
                    Err(e) => {
                        // Stay: a draining head asks again, a rebalance
                        // is not worth forcing.
                        debug!(worker = %cfg.worker_id, error = %e, "move failed; staying for now");
                    }
                }
            }
        }
    }
}

/// Carries out a redirect: the suggested head first; for a drain, then
/// any other head in rendezvous order.
async fn follow(
    cfg: &AttachConfig,
    instance: &str,
    discovery: &Discovery,
    redirect: Redirect,
    current: String,
    heads_version: u64,
) -> Result<Link, String> {
    let draining = redirect.reason() == RedirectReason::Drain;
    let prefer = (!redirect.suggested_head_id.is_empty()).then(|| HeadEntry {
        id: redirect.suggested_head_id.clone(),
        addr: redirect.suggested_head_addr.clone(),
        state: crate::pb::HeadState::Ready,
        ..HeadEntry::default()
    });
    if prefer.is_none() && !draining {
        return Err("a rebalance without a suggested head".into());
    }
    establish(
        cfg,
        instance,
        discovery,
        Attempt {
            prefer,
            prefer_if_listed: false,
            only_prefer: !draining,
            skip: Some(&current),
            previous: Some(&current),
            reason: if draining {
                ReassignReason::HeadDraining
            } else {
                ReassignReason::Rebalance
            },
            heads_version: Some(heads_version),
        },
    )
    .await
    .map_err(|e| e.to_string())
}

fn beat_timer(interval: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

fn lost(link: &Link, reason: impl Into<String>, retry_same: bool) -> Ended {
    Ended::Lost {
        head_id: link.head.id.clone(),
        reason: reason.into(),
        retry_same,
        timeout: link.timeout,
        heads_version: link.heads_version,
    }
}

/// A beat from another head or another epoch means the stream is not
/// what the worker thinks it is; treat it as lost rather than trust it.
fn mismatch(beat: &HeadBeat, head_id: &str, epoch: u64) -> Option<String> {
    if beat.head_id != head_id {
        return Some(format!(
            "beat from head {:?}, expected {head_id:?}",
            beat.head_id
        ));
    }
    if beat.epoch != epoch {
        return Some(format!("beat for epoch {}, expected {epoch}", beat.epoch));
    }
    None
}
