//! A head told to go (SIGTERM) leaves the registry itself instead of
//! waiting for its lease to run out, hands its workers to another head,
//! and exits with code 0.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{wait_until, Probe, Reply};

/// A lease ten times longer than the time the test allows for the head
/// to leave, so that a key that disappears in time cannot have expired.
const LONG_LEASE: &str = "30s";

/// How soon after SIGTERM the lease key must be gone: the drain and the
/// deregistration take tens of milliseconds on a quiet machine (see the
/// printed time); 3 s holds on a loaded one and is still a tenth of the
/// lease.
const LEAVES_WITHIN: Duration = Duration::from_secs(3);

#[tokio::test]
async fn sigterm_removes_the_registry_entry_at_once_and_workers_move() {
    let mut cluster = cluster();
    let args = head_args(&["--lease-ttl", LONG_LEASE]);
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), &args));
    }
    for h in cluster.heads() {
        ok(tether_testkit::localcluster::wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    for i in 0..6 {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;

    // The head with workers leaves, so the test also sees them move.
    let victim = if before.workers_of("head-0").is_empty() {
        "head-1"
    } else {
        "head-0"
    };
    let survivor = if victim == "head-0" {
        "head-1"
    } else {
        "head-0"
    };
    let orphans = before.workers_of(victim);
    let key = format!("{{tether}}:head:{victim}");
    let exists = |cluster: &tether_testkit::localcluster::Cluster| {
        cluster.redis().command(&["EXISTS", &key])
    };
    assert_eq!(
        ok(exists(&cluster)),
        Reply::Integer(1),
        "{key} should exist while {victim} runs"
    );

    let sent_at = Instant::now();
    let head = cluster.process_mut(victim).expect("a head");
    ok(head.terminate());
    let gone = wait_until(LEAVES_WITHIN, Duration::from_millis(5), async || {
        matches!(exists(&cluster), Ok(Reply::Integer(0)))
    })
    .await;
    let took = sent_at.elapsed();
    let head = cluster.process_mut(victim).expect("a head");
    assert!(
        gone && took < LEAVES_WITHIN,
        "{key} still there {took:?} after SIGTERM (lease {LONG_LEASE}); log of {victim}:\n{}",
        head.log_tail(30)
    );
    eprintln!(
        "{key} gone {took:?} after SIGTERM; {} workers moved",
        orphans.len()
    );

    let status = head.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{victim} should exit 0 after SIGTERM, got {status:?}; log:\n{}",
        head.log_tail(30)
    );

    // Its workers are on the survivor under newer epochs, and the
    // survivor is the only head left in the registry.
    let rest: Vec<Member> = heads.iter().filter(|h| h.id == survivor).cloned().collect();
    let after = settle(&mut probe, &rest, &workers, START_TIMEOUT).await;
    for w in &orphans {
        let (b, a) = (before.status(w).unwrap(), after.status(w).unwrap());
        assert!(
            a.head_id == survivor && a.epoch > b.epoch,
            "{w} did not move to {survivor} under a newer epoch\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    let members = ok(cluster.redis().command(&["SMEMBERS", "{tether}:heads"]));
    assert_eq!(
        members,
        Reply::Array(Some(vec![Reply::Bulk(Some(survivor.as_bytes().to_vec()))])),
        "registry heads set after {victim} left"
    );
}

/// Head timings with a drain that outlasts the test: a drain that ends
/// before its workers moved can only be the process giving up.
fn drain_args(drain_timeout: &'static str) -> Vec<&'static str> {
    HEAD_ARGS
        .iter()
        .copied()
        .chain(["--drain-timeout", drain_timeout])
        .collect()
}

/// Calls `Drain` on the head at `addr`.
async fn call_drain(addr: std::net::SocketAddr) {
    let mut client = tether_testkit::localcluster::head_client(addr);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.drain(tether::pb::DrainRequest {}),
    )
    .await;
    assert!(
        matches!(answer, Ok(Ok(_))),
        "Drain on {addr} failed: {answer:?}"
    );
}

/// Kubernetes' scale-down: a preStop hook calls `Drain`, then the kubelet
/// sends SIGTERM. The SIGTERM must not cut the drain short: the head
/// hands every worker over and exits 0.
#[tokio::test]
async fn drain_rpc_then_sigterm_finishes_the_handoff_and_exits_0() {
    let mut cluster = cluster();
    let args = drain_args("20s");
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), &args));
    }
    for h in cluster.heads() {
        ok(tether_testkit::localcluster::wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    for i in 0..6 {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    let (victim, survivor) = if before.workers_of("head-0").is_empty() {
        ("head-1", "head-0")
    } else {
        ("head-0", "head-1")
    };
    let orphans = before.workers_of(victim);

    let addr = cluster.process(victim).expect("a head").addr;
    call_drain(addr).await;
    let head = cluster.process_mut(victim).expect("a head");
    ok(head.terminate());
    let sent_at = Instant::now();
    let status = head.wait_exit(Duration::from_secs(15));
    let took = sent_at.elapsed();
    let log = std::fs::read_to_string(head.log_path()).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{victim} should finish its drain and exit 0 after Drain + SIGTERM, got {status:?} after {took:?}; log:\n{}",
        head.log_tail(30)
    );
    assert!(
        log.contains("drained: every worker moved"),
        "{victim} exited without handing its workers over; log:\n{}",
        head.log_tail(30)
    );
    eprintln!(
        "Drain + SIGTERM: {victim} handed {} workers over and exited 0 {took:?} after SIGTERM",
        orphans.len()
    );

    let rest: Vec<Member> = heads.iter().filter(|h| h.id == survivor).cloned().collect();
    let after = settle(&mut probe, &rest, &workers, Duration::from_secs(5)).await;
    for w in &orphans {
        let (b, a) = (before.status(w).unwrap(), after.status(w).unwrap());
        assert!(
            a.head_id == survivor && a.epoch > b.epoch,
            "{w} did not move to {survivor} under a newer epoch\nbefore:\n{before}\nafter:\n{after}"
        );
    }
}

/// A drain that cannot finish (no other head to take the workers) keeps
/// going through one SIGTERM, whether the drain began with `Drain` or with
/// a SIGTERM; only the next signal exits early (code 1).
#[tokio::test]
async fn during_a_drain_only_a_second_signal_exits_early() {
    let mut cluster = cluster();
    let args = drain_args("60s");
    for (i, by_rpc) in [(0, true), (1, false)] {
        let id = head_id(i);
        ok(cluster.spawn_head(&id, &args));
        let addr = cluster.process(&id).expect("a head").addr;
        ok(tether_testkit::localcluster::wait_serving(addr, HEAD_SERVICE, START_TIMEOUT).await);
        let worker = worker_id(i);
        ok(cluster.spawn_worker(&worker, WORKER_ARGS));
        let heads = vec![Member::from(cluster.process(&id).expect("a head"))];
        let workers = vec![Member::from(cluster.process(&worker).expect("a worker"))];
        settle(&mut Probe::new(), &heads, &workers, START_TIMEOUT).await;

        let first = if by_rpc {
            call_drain(addr).await;
            let head = cluster.process_mut(&id).expect("a head");
            ok(head.terminate());
            "Drain then SIGTERM"
        } else {
            ok(cluster.process_mut(&id).expect("a head").terminate());
            "SIGTERM"
        };
        // The drain goes on: the head still runs, and says it is draining.
        let head = cluster.process_mut(&id).expect("a head");
        let early = head.wait_exit(Duration::from_secs(2));
        assert!(
            early.is_none(),
            "{id} exited ({early:?}) within 2 s of {first}, its drain unfinished; log:\n{}",
            head.log_tail(30)
        );
        ok(head.terminate());
        let sent_at = Instant::now();
        let status = head.wait_exit(Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.code() == Some(1)),
            "{id}: the signal after {first} should exit at once with 1, got {status:?} after {:?}; log:\n{}",
            sent_at.elapsed(),
            head.log_tail(30)
        );
        eprintln!(
            "{first}, then a signal: {id} exited 1 {:?} after it",
            sent_at.elapsed()
        );
        cluster.remove(&worker);
    }
}
