//! Workers that know heads, not Redis: `ListHeads` answers every worker
//! with the live heads in its own preference order, without a Redis
//! command per call; `tether-worker --heads` attaches, follows the heads
//! version and survives the death of the only head it was given; and
//! wrong input gets one clear line each.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tether::pb::{HeadState, ListHeadsRequest};
use tether_testkit::localcluster::{
    head_client, run_to_exit, wait_serving, wait_until, Probe, Reply,
};

/// Bound on a worker re-attaching after its head died: the heartbeat
/// timeout (600 ms) plus retries, generous for a loaded two-core machine.
const REATTACH_TIMEOUT: Duration = Duration::from_secs(15);

/// `ListHeads` on the head at `addr` for `worker`.
async fn list_heads(
    addr: std::net::SocketAddr,
    worker: &str,
) -> Result<tether::pb::ListHeadsResponse, tonic::Status> {
    let mut request = tonic::Request::new(ListHeadsRequest {
        worker_id: worker.to_owned(),
    });
    request.set_timeout(Duration::from_secs(5));
    head_client(addr)
        .list_heads(request)
        .await
        .map(|r| r.into_inner())
}

/// A worker id whose rendezvous choice among `heads` is `want`.
fn worker_preferring(want: &str, heads: &[&str]) -> String {
    (0..10_000)
        .map(|i| format!("worker-{i:02}"))
        .find(|w| *tether::placement::rendezvous_order(w, heads, |h| h)[0] == want)
        .expect("some id prefers every head")
}

/// Total commands Redis has processed so far.
fn redis_commands(cluster: &tether_testkit::localcluster::Cluster) -> u64 {
    match ok(cluster.redis().command(&["INFO", "stats"])) {
        Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO stats has total_commands_processed"),
        other => panic!("INFO stats answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_heads_gives_each_worker_its_rendezvous_order_without_a_redis_command_per_call() {
    let cluster = start_cluster(3, 0).await;
    let ids = ["head-0", "head-1", "head-2"];
    let addr = cluster.process("head-1").unwrap().addr;
    for w in ["a", "worker-07", "w-x"] {
        let answer = list_heads(addr, w).await.expect("ListHeads answers");
        let got: Vec<&str> = answer.heads.iter().map(|h| h.head_id.as_str()).collect();
        let want: Vec<&str> = tether::placement::rendezvous_order(w, &ids, |h| h)
            .into_iter()
            .copied()
            .collect();
        assert_eq!(got, want, "order for {w}: {answer:?}");
        assert!(answer.version > 0, "no heads version: {answer:?}");
        assert_eq!(answer.head_id, "head-1");
        for h in &answer.heads {
            assert_eq!(h.state(), HeadState::Ready, "{h:?}");
            let process = cluster.process(&h.head_id).expect("a listed head exists");
            assert_eq!(h.addr, process.addr.to_string());
        }
    }

    // 500 calls at once: the registry is read at most a few times (once
    // per lease TTL), not 500 times. The heads' own lease refreshes run
    // meanwhile, so compare with a quiet window as long as the burst.
    let quiet_start = redis_commands(&cluster);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = redis_commands(&cluster) - quiet_start;
    let quiet_rate = quiet as f64 / t.elapsed().as_secs_f64();
    let before = redis_commands(&cluster);
    let t = Instant::now();
    // Ten connections of fifty calls, under the head's 64 concurrent
    // streams per connection.
    let channels: Vec<_> = (0..10)
        .map(|_| tether_testkit::localcluster::channel(addr))
        .collect();
    let calls = (0..500).map(|i| {
        let mut client =
            tether::pb::head_service_client::HeadServiceClient::new(channels[i % 10].clone());
        async move {
            client
                .list_heads(ListHeadsRequest {
                    worker_id: format!("burst-{i}"),
                })
                .await
        }
    });
    let answers = futures_util_join_all(calls).await;
    let took = t.elapsed();
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            a.as_ref()
                .err()
                .map(|s| format!("{:?}: {}", s.code(), s.message()))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} ListHeads calls failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let used = redis_commands(&cluster) - before;
    let expected = quiet_rate * took.as_secs_f64();
    assert!(
        (used as f64) < expected * 2.0 + 20.0,
        "500 ListHeads calls in {took:?} cost {used} Redis commands; the heads' own traffic is about {expected:.0} in that time"
    );
}

/// `join_all` without another dependency: spawn each and await in turn.
async fn futures_util_join_all<F, T>(calls: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("call task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_only_the_head_that_dies_reattaches_elsewhere_without_redis() {
    let mut cluster = start_cluster(3, 0).await;
    let ids = ["head-0", "head-1", "head-2"];
    let worker = worker_preferring("head-1", &ids);
    let bootstrap = cluster.process("head-1").unwrap().addr.to_string();
    let mut args = vec!["--heads", bootstrap.as_str()];
    args.extend(WORKER_ARGS);
    ok(cluster.spawn_worker(&worker, &args));
    let w = cluster.process(&worker).unwrap();
    let waddr = w.addr;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let view = settle(&mut Probe::new(), &heads, &[Member::from(w)], START_TIMEOUT).await;
    assert_eq!(
        view.status(&worker).map(|s| s.head_id.as_str()),
        Some("head-1"),
        "{view}"
    );

    ok(cluster.process_mut("head-1").unwrap().kill());
    let killed = Instant::now();
    let mut probe = Probe::new();
    let mut last = None;
    let moved = wait_until(REATTACH_TIMEOUT, Duration::from_millis(20), async || {
        let s = probe.worker_status(waddr).await.ok();
        let done = s
            .as_ref()
            .is_some_and(|s| s.attached && s.head_id != "head-1");
        last = s;
        done
    })
    .await;
    let took = killed.elapsed();
    let log = cluster.process(&worker).unwrap().log_tail(30);
    assert!(
        moved,
        "not re-attached within {REATTACH_TIMEOUT:?}: {last:?}\n{log}"
    );
    println!(
        "re-attached to {} {took:?} after the SIGKILL",
        last.unwrap().head_id
    );
    let rest: Vec<Member> = cluster
        .heads()
        .filter(|h| h.id != "head-1")
        .map(Member::from)
        .collect();
    let w = Member::from(cluster.process(&worker).unwrap());
    settle(&mut Probe::new(), &rest, &[w], START_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_learns_a_new_head_from_the_heads_version_and_fails_over_to_it() {
    let mut cluster = cluster();
    ok(cluster.spawn_head("head-0", HEAD_ARGS));
    let h0 = cluster.process("head-0").unwrap().addr;
    ok(wait_serving(h0, HEAD_SERVICE, START_TIMEOUT).await);
    // Prefers head-0 over head-1, so no rebalance moves it: it knows
    // head-1 only from the list it refreshes when the version changes.
    let worker = worker_preferring("head-0", &["head-0", "head-1"]);
    let bootstrap = h0.to_string();
    let mut args = vec!["--heads", bootstrap.as_str()];
    args.extend(WORKER_ARGS);
    ok(cluster.spawn_worker(&worker, &args));
    let waddr = cluster.process(&worker).unwrap().addr;
    let mut probe = Probe::new();
    assert!(
        wait_until(START_TIMEOUT, Duration::from_millis(20), async || {
            probe.worker_status(waddr).await.is_ok_and(|s| s.attached)
        })
        .await,
        "the worker did not attach:\n{}",
        cluster.process(&worker).unwrap().log_tail(20)
    );
    ok(cluster.spawn_head("head-1", HEAD_ARGS));
    let h1 = cluster.process("head-1").unwrap().addr;
    ok(wait_serving(h1, HEAD_SERVICE, START_TIMEOUT).await);
    // Give the version time to reach the worker: a lease refresh on
    // head-0 (one interval) and one beat (one interval), with room.
    let v1 = list_heads(h1, "").await.expect("ListHeads").version;
    assert!(
        wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
            list_heads(h0, "")
                .await
                .is_ok_and(|a| a.version >= v1 && a.heads.len() == 2)
        })
        .await,
        "head-0 never listed head-1"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    ok(cluster.process_mut("head-0").unwrap().kill());
    let mut last = None;
    let moved = wait_until(REATTACH_TIMEOUT, Duration::from_millis(20), async || {
        let s = probe.worker_status(waddr).await.ok();
        let done = s
            .as_ref()
            .is_some_and(|s| s.attached && s.head_id == "head-1");
        last = s;
        done
    })
    .await;
    assert!(
        moved,
        "did not move to head-1: {last:?}\n{}",
        cluster.process(&worker).unwrap().log_tail(30)
    );
}

#[test]
fn a_heads_entry_that_is_not_host_port_exits_2_with_one_line() {
    for bad in ["head-1", "http://head-1:7070", "head-1:x", "head-1:7070,:9"] {
        let out = ok(run_to_exit(
            binaries().of(tether_testkit::localcluster::Role::Worker),
            &["--heads", bad],
            Duration::from_secs(10),
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
        assert!(
            err.contains("--heads") && err.contains("is not host:port"),
            "{bad}: {err}"
        );
    }
}

/// Waits until the process log of `id` contains `text`.
async fn wait_log(cluster: &tether_testkit::localcluster::Cluster, id: &str, text: &str) -> bool {
    wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        std::fs::read_to_string(cluster.process(id).unwrap().log_path())
            .is_ok_and(|l| l.contains(text))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bootstrap_list_and_an_old_head_each_get_a_clear_line() {
    let mut cluster = cluster();
    let nobody = format!(
        "127.0.0.1:{}",
        ok(tether_testkit::localcluster::free_port())
    );
    let mut args = vec!["--heads", nobody.as_str()];
    args.extend(WORKER_ARGS);
    ok(cluster.spawn_worker("lonely", &args));
    let line = format!("no head answered ListHeads (bootstrap {nobody})");
    assert!(
        wait_log(&cluster, "lonely", &line).await,
        "no line saying {line:?}:\n{}",
        cluster.process("lonely").unwrap().log_tail(20)
    );

    // A server that is not a head of this version: a worker serves no
    // HeadService at all, so ListHeads answers UNIMPLEMENTED, as an old
    // head's would.
    let old = cluster.process("lonely").unwrap().addr.to_string();
    let mut args = vec!["--heads", old.as_str()];
    args.extend(WORKER_ARGS);
    ok(cluster.spawn_worker("misled", &args));
    let line = format!("the head at {old} does not implement ListHeads");
    assert!(
        wait_log(&cluster, "misled", &line).await,
        "no line saying {line:?}:\n{}",
        cluster.process("misled").unwrap().log_tail(20)
    );
    let log = std::fs::read_to_string(cluster.process("misled").unwrap().log_path()).unwrap();
    assert!(
        log.contains("ERROR"),
        "the old head is not an error:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_heads_reports_every_heads_capacity_from_its_lease() {
    let mut cluster = cluster();
    ok(cluster.spawn_head("head-0", HEAD_ARGS));
    let mut capped: Vec<&str> = HEAD_ARGS.to_vec();
    capped.extend(["--capacity", "7"]);
    ok(cluster.spawn_head("head-1", &capped));
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    // Asked of the head without a cap: the other's cap comes from its lease.
    let addr = cluster.process("head-0").unwrap().addr;
    let answer = list_heads(addr, "w").await.expect("ListHeads answers");
    let caps: Vec<(&str, u64)> = answer
        .heads
        .iter()
        .map(|h| (h.head_id.as_str(), h.capacity))
        .collect();
    assert!(
        caps.contains(&("head-1", 7)) && caps.contains(&("head-0", 0)),
        "{caps:?}"
    );
}
