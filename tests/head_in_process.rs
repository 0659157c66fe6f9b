//! The head's lifecycle driven through the library API (`tether::head`,
//! `tether::worker`) in this process, against a real `redis-server`: no
//! head process, no signals. What needs processes (SIGKILL, SIGSTOP,
//! containers) stays in the other test files.

use std::net::SocketAddr;
use std::time::Duration;
use tether::head::{Head, HeadError, HeadSettings};
use tether::registry::Registry;
use tether::worker::{Attachment, Worker};
use tether_testkit::localcluster::{wait_serving, RedisServer};
use tether_testkit::timings::{HEAD_SERVICE, START_TIMEOUT};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    let registry = Registry::new(&redis.url(), "tether", 4).expect("registry");
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
    let registry = Registry::new(&redis.url(), "tether", 1).expect("registry");
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
