//! The head's lifecycle driven through the library API (`tether::head`,
//! `tether::worker`) in this process, against a real `redis-server`: no
//! head process, no signals. What needs processes (SIGKILL, SIGSTOP,
//! containers) stays in the other test files.
//!
//! Timing: real time, not tokio's paused clock. These tests talk to a real
//! Redis and to the head over real sockets, and a paused runtime
//! auto-advances its clock to the next timer whenever it waits on that
//! I/O: a loopback round trip that takes a millisecond of real time can
//! let seconds of paused time pass, so the head's 600 ms silence timeout,
//! the registry's 2 s call bound and the tests' own bounds fire while the
//! answer is on its way. Tried: with `start_paused` (on a current-thread
//! runtime, which it needs) 4 to 5 of these 8 tests failed on each run,
//! different ones each time ("Reassign: no answer within 10s" after a few
//! real milliseconds). Some timing also runs on `std::time::Instant`
//! (the heads view's age, the worker's beat gaps), which paused time does
//! not move. So beats come every 200 ms, and every wait is on a condition
//! bounded generously (seconds), so that a loaded 2-core machine passes.

use std::net::SocketAddr;
use std::time::Duration;
use tether::head::{Head, HeadError, HeadSettings};
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::{
    ClusterEvent, EventKind, HeadBeat, ReassignReason, ReassignRequest, ReassignResponse,
    WatchEventsRequest, WorkerBeat,
};
use tether::registry::Registry;
use tether::worker::{Attachment, Worker, WorkerHandle};
use tether_testkit::localcluster::{wait_serving, wait_until, RedisServer};
use tether_testkit::timings::{HEAD_SERVICE, START_TIMEOUT};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

fn redis() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Test timings: beats every 200 ms, a peer is gone after 600 ms, a lease
/// lives 1 s, a drain waits at most 2 s.
fn settings(id: &str) -> HeadSettings {
    let mut s = HeadSettings::new(id);
    s.heartbeat_interval = Duration::from_millis(200);
    s.heartbeat_timeout = Duration::from_millis(600);
    s.lease_ttl = Duration::from_secs(1);
    s.drain_timeout = Duration::from_secs(2);
    s.shutdown_timeout = Duration::from_secs(2);
    s
}

/// A head serving in a task of this runtime, and what stops it.
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), HeadError>>,
}

async fn serve(redis: &RedisServer, id: &str) -> Running {
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let head = Head::builder(settings(id))
        .registry(registry)
        .build()
        .expect("valid settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(head.serve(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Attachment>,
    what: &str,
    within: Duration,
    done: impl Fn(&Attachment) -> bool,
) -> Attachment {
    let seen = tokio::time::timeout(within, async {
        match rx.wait_for(|a| done(a)).await {
            Ok(a) => Some(a.clone()),
            Err(_) => None,
        }
    })
    .await;
    match seen {
        Ok(Some(a)) => a,
        _ => panic!(
            "{what} not seen within {within:?}; last: {:?}",
            *rx.borrow()
        ),
    }
}

#[test]
fn settings_are_checked_in_one_place() {
    let mut s = settings("h");
    s.heartbeat_timeout = s.heartbeat_interval;
    let e = s.validate().expect_err("timeout equal to the interval");
    assert!(e.to_string().contains("timeout"), "{e}");
    let mut s = settings("h");
    s.lease_ttl = Duration::from_millis(300);
    assert!(s.validate().is_err(), "a lease TTL under 2.5 intervals");
    let e = Head::builder(settings("h"))
        .build()
        .err()
        .expect("no registry");
    assert!(matches!(e, HeadError::Setup(_)), "{e:?}");
    // Fails before it spawns anything, so no runtime is needed.
    assert!(matches!(
        Worker::builder("w").spawn(),
        Err(tether::worker::WorkerError::NoHeads)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_head_hands_its_worker_over_and_ends_with_ok() {
    let redis = redis();
    let mut heads = vec![
        ("head-a", serve(&redis, "head-a").await),
        ("head-b", serve(&redis, "head-b").await),
    ];
    for (_, h) in &heads {
        wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let worker = Worker::builder("w-1")
        .heads([heads[0].1.addr.to_string()])
        .connect_timeout(Duration::from_millis(500))
        .max_backoff(Duration::from_millis(500))
        .spawn()
        .expect("worker");
    let mut rx = worker.attachment();
    let first = wait_for(&mut rx, "attached", START_TIMEOUT, |a| a.attached).await;

    // Drain the head it chose (the shutdown future completes); the drain
    // redirects the worker to the other head.
    let k = heads
        .iter()
        .position(|(id, _)| *id == first.head_id)
        .unwrap_or_else(|| panic!("attached to an unknown head: {first:?}"));
    let (drained, mut running) = heads.remove(k);
    let other = heads[0].0;
    let _ = running.stop.take().expect("once").send(());
    let moved = wait_for(&mut rx, "the move", Duration::from_secs(5), |a| {
        a.attached && a.head_id == other
    })
    .await;
    assert!(moved.epoch > first.epoch, "{first:?} -> {moved:?}");
    let exit = tokio::time::timeout(Duration::from_secs(10), &mut running.task)
        .await
        .unwrap_or_else(|_| panic!("{drained} did not stop within 10 s"))
        .expect("no panic");
    assert!(exit.is_ok(), "a drained head ends with Ok: {exit:?}");
    // It left the registry on its way out.
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let live: Vec<String> = registry
        .live_heads()
        .await
        .expect("live heads")
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(live, vec![other.to_owned()], "live heads after the drain");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_head_under_a_live_heads_id_ends_with_id_in_use() {
    let redis = redis();
    let first = serve(&redis, "head-x").await;
    wait_serving(first.addr, HEAD_SERVICE, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let second = serve(&redis, "head-x").await;
    let exit = tokio::time::timeout(Duration::from_secs(10), second.task)
        .await
        .expect("the second head gives up")
        .expect("no panic");
    assert!(
        matches!(exit, Err(HeadError::IdInUse(ref id)) if id == "head-x"),
        "{exit:?}"
    );
    let _ = first;
}

/// A head serving and ready (its lease held).
async fn serve_ready(redis: &RedisServer, id: &str) -> Running {
    let head = serve(redis, id).await;
    wait_serving(head.addr, HEAD_SERVICE, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{id}: {e}"));
    head
}

async fn client(addr: SocketAddr) -> HeadServiceClient<Channel> {
    HeadServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// How long a step that takes a few beats may take on a loaded machine.
const STEP: Duration = Duration::from_secs(10);

/// A hand-made worker's beat interval: the head's (200 ms in `settings`).
const BEATING: Option<Duration> = Some(Duration::from_millis(200));

/// `Reassign` of worker `worker` (process `instance`) on the head at `addr`.
async fn reassign(addr: SocketAddr, worker: &str, instance: &str) -> ReassignResponse {
    let req = ReassignRequest {
        worker_id: worker.to_owned(),
        worker_addr: String::new(),
        previous_head_id: String::new(),
        reason: ReassignReason::Startup as i32,
        instance: instance.to_owned(),
        unavailable_heads: Vec::new(),
    };
    tokio::time::timeout(STEP, client(addr).await.reassign(req))
        .await
        .unwrap_or_else(|_| panic!("Reassign of {worker} on {addr}: no answer within {STEP:?}"))
        .unwrap_or_else(|e| panic!("Reassign of {worker} on {addr}: {e}"))
        .into_inner()
}

fn worker_beat(worker: &str, assigned: &ReassignResponse, sequence: u64) -> WorkerBeat {
    WorkerBeat {
        worker_id: worker.to_owned(),
        epoch: assigned.epoch,
        sequence,
        load: None,
        stream_secret: assigned.stream_secret.clone(),
        reassign: None,
    }
}

/// A worker's `Heartbeat` stream made by hand: what the worker sends, and
/// what the head answers.
struct HandMade {
    worker: String,
    epoch: u64,
    secret: String,
    sequence: u64,
    beats: mpsc::Sender<WorkerBeat>,
    inbound: Streaming<HeadBeat>,
}

impl HandMade {
    /// Opens the stream of `worker` under the assignment `assigned`, with
    /// its first beat.
    async fn open(addr: SocketAddr, worker: &str, assigned: &ReassignResponse) -> Self {
        let (beats, rx) = mpsc::channel(16);
        // The head answers with headers only after the first beat.
        let _ = beats.send(worker_beat(worker, assigned, 1)).await;
        let mut head = client(addr).await;
        let inbound = tokio::time::timeout(STEP, head.heartbeat(ReceiverStream::new(rx)))
            .await
            .unwrap_or_else(|_| panic!("Heartbeat of {worker}: no answer within {STEP:?}"))
            .unwrap_or_else(|e| panic!("Heartbeat of {worker}: {e}"))
            .into_inner();
        Self {
            worker: worker.to_owned(),
            epoch: assigned.epoch,
            secret: assigned.stream_secret.clone(),
            sequence: 1,
            beats,
            inbound,
        }
    }

    async fn beat(&mut self) {
        self.sequence += 1;
        let beat = WorkerBeat {
            worker_id: self.worker.clone(),
            epoch: self.epoch,
            sequence: self.sequence,
            load: None,
            stream_secret: self.secret.clone(),
            reassign: None,
        };
        // The head may have ended the stream already; the next read says.
        let _ = self.beats.send(beat).await;
    }

    /// Reads until the head ends the stream, beating every `beat_every`
    /// meanwhile (200 ms is what the head asks for), or never with `None`
    /// (a silent worker). Returns how it ended: `Ok(())` for a clean end,
    /// or the status; panics if it did not end `within`.
    async fn until_end(
        &mut self,
        beat_every: Option<Duration>,
        within: Duration,
    ) -> Result<(), tonic::Status> {
        let ended = tokio::time::timeout(within, async {
            // Never ticks when not beating: the branch is off.
            let mut every = tokio::time::interval(beat_every.unwrap_or(within));
            loop {
                tokio::select! {
                    _ = every.tick(), if beat_every.is_some() => self.beat().await,
                    m = self.inbound.message() => match m {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        Err(status) => return Err(status),
                    },
                }
            }
        })
        .await;
        ended.unwrap_or_else(|_| {
            panic!(
                "the stream of {} did not end within {within:?}",
                self.worker
            )
        })
    }
}

/// The cluster's events as the head at `addr` streams them, from now on.
async fn watch_events(addr: SocketAddr) -> Streaming<ClusterEvent> {
    tokio::time::timeout(STEP, client(addr).await.watch_events(WatchEventsRequest {}))
        .await
        .expect("WatchEvents answers")
        .expect("WatchEvents")
        .into_inner()
}

/// Waits for the first event of `kind` about `worker`, and returns it.
async fn next_event(
    events: &mut Streaming<ClusterEvent>,
    kind: EventKind,
    worker: &str,
) -> ClusterEvent {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(STEP, async {
        loop {
            match events.message().await {
                Ok(Some(e)) if e.kind == kind as i32 && e.worker_id == worker => return Some(e),
                Ok(Some(e)) => seen.push(format!("{:?} {} {:?}", e.kind(), e.worker_id, e.detail)),
                _ => return None,
            }
        }
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        _ => panic!("no {kind:?} of {worker} within {STEP:?}; saw {seen:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_gets_deadline_exceeded_and_leaves_as_gone_silent() {
    let redis = redis();
    let head = serve_ready(&redis, "head-a").await;
    let mut events = watch_events(head.addr).await;
    let assigned = reassign(head.addr, "w-silent", "i-1").await;
    let mut stream = HandMade::open(head.addr, "w-silent", &assigned).await;
    // One beat (the first), then nothing: the head's 600 ms timeout.
    let end = stream.until_end(None, STEP).await;
    let status = end.expect_err("a silent worker's stream ends with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let left = next_event(&mut events, EventKind::WorkerLeft, "w-silent").await;
    assert!(left.detail.starts_with("went silent"), "{left:?}");
    assert_eq!(left.epoch, assigned.epoch, "{left:?}");
    assert_eq!(left.head_id, "head-a", "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_its_stream_ends_cleanly_and_leaves_as_exited_cleanly() {
    let redis = redis();
    let head = serve_ready(&redis, "head-a").await;
    let mut events = watch_events(head.addr).await;
    let assigned = reassign(head.addr, "w-clean", "i-1").await;
    let mut stream = HandMade::open(head.addr, "w-clean", &assigned).await;
    next_event(&mut events, EventKind::WorkerAttached, "w-clean").await;
    // Ending the request stream ends the worker's half: a clean close.
    let (closed, _) = mpsc::channel(1);
    drop(std::mem::replace(&mut stream.beats, closed));
    let end = stream.until_end(None, STEP).await;
    assert!(
        end.is_ok(),
        "a closed stream ends cleanly (status OK): {end:?}"
    );
    let left = next_event(&mut events, EventKind::WorkerLeft, "w-clean").await;
    assert_eq!(
        left.detail, "exited cleanly (closed its stream)",
        "{left:?}"
    );
    // It released its assignment.
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let held = registry
        .assignments_of("head-a")
        .await
        .expect("assignments");
    assert!(held.is_empty(), "assignments after a clean exit: {held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replaced_by_a_newer_one_of_the_same_worker_gets_aborted() {
    let redis = redis();
    let head = serve_ready(&redis, "head-a").await;
    let mut events = watch_events(head.addr).await;
    let assigned = reassign(head.addr, "w-twice", "i-1").await;
    let mut first = HandMade::open(head.addr, "w-twice", &assigned).await;
    // The same worker reconnects under the same epoch and secret (its
    // connection broke, as far as it knows).
    let mut second = HandMade::open(head.addr, "w-twice", &assigned).await;
    let end = first.until_end(BEATING, STEP).await;
    let status = end.expect_err("the replaced stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    // The newer one beats on, and the worker did not "leave".
    let beat = tokio::time::timeout(STEP, second.inbound.message())
        .await
        .expect("a beat on the newer stream")
        .expect("the newer stream is open")
        .expect("a beat");
    assert_eq!(beat.epoch, assigned.epoch, "{beat:?}");
    second.beat().await;
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let held = registry
        .assignments_of("head-a")
        .await
        .expect("assignments");
    assert_eq!(
        held,
        vec![("w-twice".to_owned(), assigned.epoch)],
        "assignments"
    );
    drop(second);
    // The worker leaves when its newer stream goes (the replaced one
    // released nothing: the assignment was still held above).
    let left = next_event(&mut events, EventKind::WorkerLeft, "w-twice").await;
    assert_eq!(left.epoch, assigned.epoch, "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_adopted_by_another_head_under_a_newer_epoch_is_fenced_off_the_first() {
    let redis = redis();
    let a = serve_ready(&redis, "head-a").await;
    let b = serve_ready(&redis, "head-b").await;
    let on_a = reassign(a.addr, "w-fenced", "i-1").await;
    assert_eq!(on_a.head_id, "head-a");
    let mut stream_a = HandMade::open(a.addr, "w-fenced", &on_a).await;
    // The worker moves to head-b without closing its stream on head-a (as
    // a worker cut off from head-a would): head-b records a newer epoch.
    let on_b = reassign(b.addr, "w-fenced", "i-1").await;
    assert_eq!(on_b.head_id, "head-b");
    assert!(on_b.epoch > on_a.epoch, "{on_a:?} -> {on_b:?}");
    let mut stream_b = HandMade::open(b.addr, "w-fenced", &on_b).await;
    // head-a hears of it at a lease refresh (every 200 ms) and closes its
    // stream, although the worker keeps beating on it.
    let end = stream_a.until_end(BEATING, STEP).await;
    let status = end.expect_err("the fenced stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    // head-b keeps it, under the newer epoch.
    let beat = tokio::time::timeout(STEP, stream_b.inbound.message())
        .await
        .expect("a beat from head-b")
        .expect("head-b's stream is open")
        .expect("a beat");
    assert_eq!((beat.head_id.as_str(), beat.epoch), ("head-b", on_b.epoch));
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let on_a_now = registry
        .assignments_of("head-a")
        .await
        .expect("assignments");
    assert!(on_a_now.is_empty(), "head-a still holds {on_a_now:?}");
    let mut listed = Vec::new();
    let gone = wait_until(STEP, Duration::from_millis(50), async || {
        listed = tether_testkit::localcluster::list_workers(a.addr)
            .await
            .map(|l| l.workers.into_iter().map(|w| w.worker_id).collect())
            .unwrap_or_default();
        listed.is_empty()
    })
    .await;
    assert!(gone, "head-a still lists {listed:?}");
}

/// A worker attached through the library, and the head it chose.
async fn attached_worker(
    head: &Running,
    id: &str,
) -> (WorkerHandle, watch::Receiver<Attachment>, Attachment) {
    let worker = Worker::builder(id)
        .heads([head.addr.to_string()])
        .connect_timeout(Duration::from_millis(500))
        .max_backoff(Duration::from_millis(500))
        .spawn()
        .expect("worker");
    let mut rx = worker.attachment();
    let first = wait_for(&mut rx, "attached", START_TIMEOUT, |a| a.attached).await;
    (worker, rx, first)
}

/// Waits until the registry lists `head` as live and holds `worker` on it
/// under `epoch`; says what it saw otherwise.
async fn wait_registered(redis: &RedisServer, head: &str, worker: &str, epoch: u64, what: &str) {
    let registry = Registry::new(&redis.url(), "tether").expect("registry");
    let mut seen = String::new();
    let back = wait_until(STEP, Duration::from_millis(50), async || {
        let live = registry
            .live_heads()
            .await
            .map(|h| h.into_iter().map(|h| h.id).collect::<Vec<_>>());
        let held = registry.assignments_of(head).await;
        seen = format!("live {live:?}, {head} holds {held:?}");
        matches!(&live, Ok(l) if l.iter().any(|h| h == head))
            && matches!(&held, Ok(h) if h.iter().any(|(w, e)| w == worker && *e == epoch))
    })
    .await;
    assert!(back, "{what}: not re-registered within {STEP:?}; {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_whose_registry_data_is_lost_re_registers_and_keeps_its_worker() {
    let redis = redis();
    let head = serve_ready(&redis, "head-a").await;
    let (worker, rx, first) = attached_worker(&head, "w-1").await;
    wait_registered(&redis, "head-a", "w-1", first.epoch, "before").await;
    // Redis loses everything: the lease, the assignment, the epochs.
    redis.command(&["FLUSHALL"]).expect("FLUSHALL");
    wait_registered(&redis, "head-a", "w-1", first.epoch, "after FLUSHALL").await;
    let now = rx.borrow().clone();
    assert_eq!(now, first, "the worker stayed where it was");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_redis_stalls_past_its_lease_ttl_stays_registered_and_keeps_its_worker() {
    let redis = redis();
    let head = serve_ready(&redis, "head-a").await;
    let (worker, rx, first) = attached_worker(&head, "w-1").await;
    wait_registered(&redis, "head-a", "w-1", first.epoch, "before").await;
    // Redis hangs for 1.5 s, past the 1 s lease: the lease runs out while
    // the head cannot refresh it (whether a refresh queued meanwhile
    // recreates it depends on timing; the FLUSHALL test above is the one
    // where the head surely re-records its worker). The head keeps beating
    // its worker meanwhile, so the worker stays.
    let port = redis.port();
    tokio::task::spawn_blocking(move || {
        tether_testkit::localcluster::redis_command(port, &["DEBUG", "SLEEP", "1.5"])
    })
    .await
    .expect("no panic")
    .expect("DEBUG SLEEP");
    wait_registered(&redis, "head-a", "w-1", first.epoch, "after DEBUG SLEEP").await;
    let now = rx.borrow().clone();
    assert_eq!(now, first, "the worker stayed where it was");
    worker.shutdown().await;
}
