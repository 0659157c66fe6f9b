//! Redis is needed to join and to move, not to stay attached: a head may
//! start before Redis and registers once it is up, and a Redis outage
//! turns heads unready without breaking a single heartbeat stream.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{wait_serving, wait_until, Cluster, Probe, RedisServer, Reply};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn head_started_before_redis_registers_once_redis_is_up() {
    // Nothing listens on the Redis port yet.
    let redis = ok(RedisServer::stopped());
    let mut cluster = ok(Cluster::with_redis(binaries(), redis));
    let head = ok(cluster.spawn_head("head-0", HEAD_ARGS)).addr;
    let mut probe = Probe::new();

    // For a while (several lease refreshes): alive, not ready.
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        let live = probe.health(head, "").await;
        let ready = probe.health(head, HEAD_SERVICE).await;
        assert!(
            matches!(live, Ok(ServingStatus::Serving))
                && matches!(ready, Ok(ServingStatus::NotServing)),
            "without Redis: liveness {live:?}, readiness {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    ok(cluster.redis_mut().restart());
    if let Err(e) = wait_serving(head, HEAD_SERVICE, Duration::from_secs(5)).await {
        panic!(
            "{e}\nlog of head-0:\n{}",
            cluster.process("head-0").unwrap().log_tail(20)
        );
    }
    let key = ok(cluster.redis().command(&["EXISTS", "{tether}:head:head-0"]));
    assert_eq!(
        key,
        Reply::Integer(1),
        "the head's lease after Redis came up"
    );

    ok(cluster.spawn_worker("worker-00", WORKER_ARGS));
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let view = settle(&mut probe, &heads, &workers, Duration::from_secs(5)).await;
    assert_eq!(
        view.workers_of("head-0"),
        vec!["worker-00".to_owned()],
        "{view}"
    );
}

#[tokio::test]
async fn redis_outage_keeps_streams_and_only_turns_heads_unready() {
    let mut cluster = start_cluster(2, 4).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;

    cluster.redis_mut().kill();
    let outage = Instant::now();

    // Every head notices within a few refreshes (and the registry's 2 s
    // operation timeout), but stays alive.
    for h in &heads {
        let mut last = None;
        let unready = wait_until(
            Duration::from_secs(4),
            Duration::from_millis(20),
            async || {
                last = Some(
                    probe
                        .health(h.addr, HEAD_SERVICE)
                        .await
                        .map_err(|e| e.to_string()),
                );
                matches!(last, Some(Ok(ServingStatus::NotServing)))
            },
        )
        .await;
        assert!(unready, "{} readiness during the outage: {last:?}", h.id);
        let live = probe.health(h.addr, "").await;
        assert!(
            matches!(live, Ok(ServingStatus::Serving)),
            "{} liveness during the outage: {live:?}",
            h.id
        );
    }

    // Streams need no Redis: for longer than the heartbeat timeout and the
    // lease, every worker stays attached where it was, under the same
    // epoch, and no one moves.
    while outage.elapsed() < Duration::from_millis(2500) {
        let view = View::take(&mut probe, &heads, &workers).await;
        assert!(
            view.problems().is_empty(),
            "during the outage: {:?}\n{view}",
            view.problems()
        );
        for w in &workers {
            let (b, n) = (before.status(&w.id).unwrap(), view.status(&w.id).unwrap());
            assert!(
                n.head_id == b.head_id && n.epoch == b.epoch && n.reassignments == b.reassignments,
                "{} changed during the outage\nbefore:\n{before}\nnow:\n{view}",
                w.id
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // Redis comes back (empty: it runs without persistence) and the heads
    // register again.
    ok(cluster.redis_mut().restart());
    for h in &heads {
        if let Err(e) = wait_serving(h.addr, HEAD_SERVICE, Duration::from_secs(5)).await {
            panic!(
                "{e}\nlog of {}:\n{}",
                h.id,
                cluster.process(&h.id).unwrap().log_tail(20)
            );
        }
    }
    let after = View::take(&mut probe, &heads, &workers).await;
    assert!(
        after.problems().is_empty(),
        "after the outage: {:?}\n{after}",
        after.problems()
    );
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch),
            (&b.head_id, b.epoch),
            "{} moved\n{before}\n{after}",
            w.id
        );
    }
}
