//! What Tether tells an operator, end to end with real heads, real
//! workers and a real Redis (issue 12, item 5): a drained head is
//! announced gone once, as "left after drain" (not also as an expired
//! lease); a worker that exited cleanly, one that was killed and one that
//! went silent are told apart in their `WORKER_LEFT`; a head that cannot
//! reach Redis names the Redis it tried (never its password) and keeps
//! saying so, at a slowing rate.

mod common;

use common::*;
use std::time::Duration;
use tether::pb::{ClusterEvent, EventKind};
use tether_testkit::localcluster::wait_until;
use tonic::Streaming;

use std::process::{Command, Stdio};

/// Generous: a debug build on a loaded two-core machine.
const WITHIN: Duration = Duration::from_secs(15);

/// Reads events until one matches `pred` or `within` passes; returns the
/// match and every event read on the way.
async fn read_until(
    events: &mut Streaming<ClusterEvent>,
    within: Duration,
    pred: impl Fn(&ClusterEvent) -> bool,
) -> (Option<ClusterEvent>, Vec<ClusterEvent>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        if pred(&e) {
            return (Some(e), seen);
        }
        seen.push(e);
    }
    (None, seen)
}

fn is(e: &ClusterEvent, kind: EventKind) -> bool {
    e.kind == kind as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_head_is_announced_gone_once_as_left_after_drain() {
    let mut cluster = start_cluster(3, 6).await;
    let addr = cluster.process("head-0").expect("a head").addr;
    let mut events = watch_events(addr).await;

    ok(cluster.process_mut("head-2").expect("a head").terminate());
    let (gone, seen) = read_until(&mut events, WITHIN, |e| {
        is(e, EventKind::HeadGone) && e.head_id == "head-2"
    })
    .await;
    let gone =
        gone.unwrap_or_else(|| panic!("no HEAD_GONE for head-2 within {WITHIN:?}; saw {seen:?}"));
    assert_eq!(
        gone.detail, "left after drain",
        "the drained head's HEAD_GONE: {gone:?}"
    );
    assert!(
        seen.iter()
            .any(|e| is(e, EventKind::HeadDraining) && e.head_id == "head-2"),
        "no HEAD_DRAINING before HEAD_GONE: {seen:?}"
    );
    let status = cluster
        .process_mut("head-2")
        .expect("a head")
        .wait_exit(WITHIN);
    assert!(
        status.is_some_and(|s| s.success()),
        "head-2 after SIGTERM: {status:?}"
    );

    // Three lease TTLs (1 s each) and as many sweeps: a second
    // announcement ("lease expired") would come within them.
    let (again, _) = read_until(&mut events, Duration::from_secs(3), |e| {
        is(e, EventKind::HeadGone) && e.head_id == "head-2"
    })
    .await;
    assert!(
        again.is_none(),
        "head-2 was announced gone twice; the second: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_a_kill_and_a_silent_worker_are_told_apart() {
    let mut cluster = start_cluster(2, 3).await;
    let addr = cluster.process("head-0").expect("a head").addr;
    let mut events = watch_events(addr).await;

    let left_of = |worker: &'static str| {
        move |e: &ClusterEvent| is(e, EventKind::WorkerLeft) && e.worker_id == worker
    };

    // SIGTERM: the worker ends its stream and waits for the head's answer.
    let w = cluster.process_mut("worker-00").expect("a worker");
    ok(w.terminate());
    let (left, seen) = read_until(&mut events, WITHIN, left_of("worker-00")).await;
    let left = left.unwrap_or_else(|| panic!("no WORKER_LEFT for worker-00; saw {seen:?}"));
    assert_eq!(
        left.detail, "exited cleanly (closed its stream)",
        "{left:?}"
    );
    let status = w.wait_exit(WITHIN);
    assert!(status.is_some_and(|s| s.success()), "worker-00: {status:?}");

    // SIGKILL: the kernel closes the connection under the stream.
    ok(cluster.process_mut("worker-01").expect("a worker").kill());
    let (left, seen) = read_until(&mut events, WITHIN, left_of("worker-01")).await;
    let left = left.unwrap_or_else(|| panic!("no WORKER_LEFT for worker-01; saw {seen:?}"));
    assert_eq!(left.detail, "stream reset or connection lost", "{left:?}");

    // SIGSTOP: the connection stays open, the beats stop.
    let w = cluster.process_mut("worker-02").expect("a worker");
    ok(w.stop());
    let (left, seen) = read_until(&mut events, WITHIN, left_of("worker-02")).await;
    ok(cluster.process_mut("worker-02").expect("a worker").cont());
    let left = left.unwrap_or_else(|| panic!("no WORKER_LEFT for worker-02; saw {seen:?}"));
    assert!(
        left.detail.starts_with("went silent (no WorkerBeat within"),
        "{left:?}"
    );

    // And the resumed worker is attached again.
    let waddr = cluster.process("worker-02").expect("a worker").addr;
    let attached = wait_until(WITHIN, Duration::from_millis(50), async || {
        tether_testkit::localcluster::worker_status(waddr)
            .await
            .is_ok_and(|s| s.attached)
    })
    .await;
    assert!(
        attached,
        "worker-02 not attached again within {WITHIN:?} of SIGCONT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_without_redis_names_what_it_tried_without_the_password_and_repeats_it() {
    // A port nothing listens on, and a password that must never show.
    let port = ok(tether_testkit::localcluster::free_port());
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("tether-no-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let log_path = dir.join("head.log");
    let log = std::fs::File::create(&log_path).expect("a log file");
    let listen = format!(
        "127.0.0.1:{}",
        ok(tether_testkit::localcluster::free_port())
    );
    let mut head = Command::new(binaries().of(tether_testkit::localcluster::Role::Head))
        .args(["--id", "head-0", "--listen", &listen, "--redis-url", &url])
        .args(HEAD_ARGS)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a log handle"))
        .stderr(log)
        .spawn()
        .expect("tether-head starts");

    let expected = format!("redis unavailable at redis://127.0.0.1:{port} (password hidden)");
    // Refreshes every 333 ms (lease 1 s): logged after 1, 2, 4 and 8
    // failures, so four lines within about 3 s; 20 s is for a loaded
    // machine.
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let repeated = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || read().matches(&expected).count() >= 4,
    )
    .await;
    let _ = head.kill();
    let _ = head.wait();
    let text = read();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        repeated,
        "expected {expected:?} at least 4 times; the head's log:\n{text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked:\n{text}");
    // Slowed: repeated after 2, 4, 8... failures, not after each one.
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.contains(&expected))
        .filter_map(|l| l.split("failures=").nth(1))
        .filter_map(|n| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    eprintln!("repeats at failures {counts:?}");
    assert!(
        counts.iter().all(|n| n.is_power_of_two() || n % 32 == 0),
        "repeated at failures {counts:?}: not slowing; the log:\n{text}"
    );
}
