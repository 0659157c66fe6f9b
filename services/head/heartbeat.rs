//! One `Heartbeat` stream, served as the response body itself.
//!
//! The body has no task or queue of its own: hyper's per-stream task polls
//! it (through [`crate::direct`], not tonic's router: see there why), and
//! it wakes on the head's beat timer, on the worker's beats, and
//! when the stream is replaced or redirected. A beat is built and encoded
//! only when hyper asks for the next message, so a worker that stops
//! reading never makes the head queue beats beyond HTTP/2 flow control.
//! A spawned task and a channel per stream used to cost a third of the
//! head's CPU at ten thousand workers, and a few KiB each.

use super::attached::Attached;
use super::attached::Stream;
use super::beat::{Beats, Membership, Tick};
use super::lease::LeaseState;
use crate::events::Events;
use crate::metrics::METRICS;
use crate::pb::{EventKind, HeadBeat, ReassignResponse, WorkerBeat};
use crate::registry::now_ms;
use crate::registry::Registry;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tracing::{debug, warn};

/// How a stream ended, which decides whether its assignment is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The worker closed the stream, went silent, or reset it: release the
    /// assignment (unless a newer one replaced it, which the release
    /// script checks).
    WorkerGone(Gone),
    /// A newer stream of the same worker took over: keep the assignment.
    Replaced,
    /// The head is stopping: workers will reassign themselves.
    HeadStopping,
}

/// Why a worker's stream ended on the worker's side. Operators reading
/// `WORKER_LEFT` need to tell a worker that said goodbye (scale-down, a
/// deploy) from one that died or hung (a fault worth a look).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// The worker ended its half of the stream: a clean exit.
    Closed,
    /// No `WorkerBeat` within the heartbeat timeout.
    Silent,
    /// The stream was reset or its connection died (a crash, a kill, a
    /// network fault).
    Reset,
}

impl Gone {
    /// The `detail` of the `WORKER_LEFT` event.
    fn detail(self, timeout: std::time::Duration) -> String {
        match self {
            Gone::Closed => "exited cleanly (closed its stream)".to_owned(),
            Gone::Silent => format!("went silent (no WorkerBeat within {timeout:?})"),
            Gone::Reset => "stream reset or connection lost".to_owned(),
        }
    }
}

/// What a beat stream needs of its head, and nothing more: its id and
/// timeout, the table it leaves when it ends, whether the lease lets it
/// beat, the beat timer, and where to release the assignment and announce
/// the departure. One per head, shared by its streams.
pub struct BeatContext {
    /// This head's id, stamped on every beat.
    pub head_id: Arc<str>,
    /// Silence after which the worker counts as gone.
    pub timeout: std::time::Duration,
    /// The open streams; the stream removes itself when it ends.
    pub attached: Arc<Attached>,
    /// Whether the head may beat (held lease) and the heads version.
    pub lease: Arc<LeaseState>,
    /// The head's beat timer.
    pub ticks: Beats,
    /// Where the assignment is released when the worker goes away.
    pub registry: Registry,
    /// Where `WORKER_LEFT` is announced.
    pub events: Events,
    /// Tracks the release task a closing stream spawns, so that the
    /// head's shutdown waits for it.
    pub tasks: tokio_util::task::TaskTracker,
}

/// The response body of one `Heartbeat` stream, reading the worker's
/// beats from `I` (the head's own decoder, or tonic's `Streaming`).
pub struct HeartbeatBody<I> {
    svc: Arc<BeatContext>,
    stream: Arc<Stream>,
    inbound: I,
    /// The phase of the beat timer this stream beats on; its ticks end
    /// when the head closes its streams.
    ticks: Membership,
    /// The last tick seen, stamped on redirects.
    tick: Tick,
    /// The first beat, sent at once: a moving worker counts as attached
    /// from its first `HeadBeat`, so it must not wait for a tick. Boxed: a
    /// `HeadBeat` is a few hundred bytes that every stream would otherwise
    /// carry for its whole life (the body lives as long as the stream).
    first: Option<Box<HeadBeat>>,
    /// Silence after which the worker counts as gone, measured on the
    /// monotonic clock.
    timeout: std::time::Duration,
    /// Set once the body decided to end; read when it is dropped.
    end: Option<End>,
}

impl<I> HeartbeatBody<I> {
    /// The body of the stream that `stream` records.
    pub fn new(svc: Arc<BeatContext>, stream: Arc<Stream>, inbound: I) -> Self {
        let ticks = svc.ticks.join(stream.clone());
        let tick = ticks.last();
        let timeout = svc.timeout;
        let mut body = Self {
            svc,
            stream,
            inbound,
            ticks,
            tick,
            first: None,
            timeout,
            end: None,
        };
        body.first = Some(Box::new(body.beat()));
        body
    }

    /// Puts what `Reassign` would have answered into the first beat (adopt
    /// on open, see `HeadBeat.assignment`), in the body itself rather than
    /// in a wrapper that every later beat would pass through.
    pub fn with_assignment(mut self, assignment: ReassignResponse) -> Self {
        if let Some(first) = self.first.as_mut() {
            first.assignment = Some(assignment);
        }
        self
    }

    fn beat(&self) -> HeadBeat {
        HeadBeat {
            head_id: self.svc.head_id.to_string(),
            sequence: self.tick.sequence,
            sent_at_ms: now_ms(),
            epoch: self.stream.epoch,
            redirect: None,
            heads_version: self.svc.lease.heads_version(),
            assignment: None,
        }
    }

    /// Ends the stream: with `status` as its final message, or cleanly.
    fn finish(
        &mut self,
        end: End,
        status: Option<Status>,
    ) -> Poll<Option<Result<HeadBeat, Status>>> {
        self.end = Some(end);
        Poll::Ready(status.map(Err))
    }
}

impl<I> tokio_stream::Stream for HeartbeatBody<I>
where
    I: tokio_stream::Stream<Item = Result<WorkerBeat, Status>> + Unpin,
{
    type Item = Result<HeadBeat, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.end.is_some() {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            METRICS.beats_sent.inc();
            return Poll::Ready(Some(Ok(*first)));
        }
        this.stream.register(cx.waker());
        if this.stream.is_replaced() {
            return this.finish(
                End::Replaced,
                Some(Status::aborted(
                    "a newer Heartbeat stream of this worker replaced this one",
                )),
            );
        }
        // Everything the worker sent; bounded by HTTP/2 flow control.
        loop {
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(beat))) => {
                    METRICS.beats_received.inc();
                    this.stream
                        .record(beat.sequence, beat.load, tokio::time::Instant::now());
                }
                Poll::Ready(None) => return this.finish(End::WorkerGone(Gone::Closed), None),
                Poll::Ready(Some(Err(_))) => {
                    return this.finish(End::WorkerGone(Gone::Reset), None)
                }
                Poll::Pending => break,
            }
        }
        if let Some(redirect) = this.stream.take_redirect() {
            let mut beat = this.beat();
            beat.redirect = Some(redirect);
            return Poll::Ready(Some(Ok(beat)));
        }
        loop {
            match this.ticks.poll_tick() {
                Poll::Ready(Some(tick)) => {
                    this.tick = tick;
                    if this.stream.silent_at(tick.at, this.timeout) {
                        warn!(worker = %this.stream.worker_id, "no WorkerBeat within the heartbeat timeout; closing its stream");
                        let status = Status::deadline_exceeded(format!(
                            "no WorkerBeat within {:?}",
                            this.svc.timeout
                        ));
                        return this.finish(End::WorkerGone(Gone::Silent), Some(status));
                    }
                    // While the lease lapsed and ownership is being
                    // rechecked, stay silent until it is.
                    if this.svc.lease.may_beat() {
                        METRICS.beats_sent.inc();
                        return Poll::Ready(Some(Ok(this.beat())));
                    }
                }
                Poll::Ready(None) => {
                    let status = Status::unavailable(format!(
                        "head {} is shutting down; reassign to another head",
                        this.svc.head_id
                    ));
                    return this.finish(End::HeadStopping, Some(status));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<I> Drop for HeartbeatBody<I> {
    fn drop(&mut self) {
        // Dropped without deciding: hyper gave up on the stream because the
        // worker reset it or its connection died.
        let end = self.end.unwrap_or(End::WorkerGone(Gone::Reset));
        let svc = &self.svc;
        let s = &self.stream;
        svc.attached.remove(s);
        debug!(worker = %s.worker_id, epoch = s.epoch, ?end, "stream closed");
        let End::WorkerGone(gone) = end else {
            return;
        };
        let detail = gone.detail(svc.timeout);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (svc, s) = (svc.clone(), s.clone());
        let tasks = svc.tasks.clone();
        tasks.spawn_on(async move {
            // A worker that moved on (handoff) is not "left": only report
            // it when its assignment here was still current.
            match svc
                .registry
                .release(&svc.head_id, &s.worker_id, s.epoch)
                .await
            {
                Ok(true) => svc.events.emit(
                    EventKind::WorkerLeft,
                    &svc.head_id,
                    &s.worker_id,
                    s.epoch,
                    "",
                    &detail,
                ),
                Ok(false) => {}
                Err(e) => {
                    debug!(worker = %s.worker_id, error = %e, "could not release the assignment")
                }
            }
        }, &runtime);
    }
}
