//! Hostile and broken clients cannot take a head or a worker down, make
//! it grow without bound, disturb the workers already attached, or make
//! it touch Redis keys that are not its own: garbage bytes, HTTP/1.1,
//! oversized messages, streams that never read, thousands of idle
//! connections, worker ids shaped like Redis patterns, and arbitrary
//! request messages (proptest).

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tether::pb::{ListWorkersRequest, ReassignRequest, WorkerBeat};
use tether_testkit::localcluster::{head_client, wait_serving, wait_until, Cluster, Probe, Reply};
use tether_testkit::ONE_AT_A_TIME;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

// The resource-measuring tests run one at a time, so that one does not
// measure the other.

/// The heartbeat timeout of `HEAD_ARGS`.
const TIMEOUT: Duration = Duration::from_millis(600);

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}:\n{status}"))
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Asserts that the process `id` still runs, and that its gRPC server
/// answers health with SERVING for `""`.
async fn assert_alive(cluster: &mut Cluster, id: &str, what: &str) {
    let p = cluster.process_mut(id).expect("a process");
    if let Some(status) = p.exit_status() {
        panic!(
            "{id} exited ({status}) after {what}; log:\n{}",
            p.log_tail(30)
        );
    }
    let addr = p.addr;
    let live = Probe::new().health(addr, "").await;
    assert!(
        matches!(live, Ok(ServingStatus::Serving)),
        "{id} liveness after {what}: {live:?}; log:\n{}",
        p.log_tail(30)
    );
}

/// Asserts that no log line of any process reports a panic.
fn assert_no_panic(cluster: &Cluster) {
    for p in cluster.heads().chain(cluster.workers()) {
        let log = std::fs::read_to_string(p.log_path()).unwrap_or_default();
        let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
        assert!(
            panics.is_empty(),
            "{} panicked:\n{}",
            p.id,
            panics.join("\n")
        );
    }
}

/// Writes `bytes` to `addr`, then reads what comes back until the peer
/// closes or a second passes; returns what was read.
fn poke(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    // The peer may close before reading it all; that is its right.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Bytes no protocol would send: a deterministic scramble.
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn garbage_and_http1_on_grpc_ports_leave_head_and_worker_serving() {
    let mut cluster = start_cluster(1, 2).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;

    let http1 = b"GET / HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n".to_vec();
    let post = b"POST /tether.v1.HeadService/ListWorkers HTTP/1.1\r\nHost: tether\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0".to_vec();
    let mut h2_then_garbage = H2_PREFACE.to_vec();
    h2_then_garbage.extend(garbage(4096));
    // A frame header announcing a 16 MiB DATA frame on stream 1, then
    // nothing: the server must not wait for (or allocate) it.
    let mut h2_huge_frame = H2_PREFACE.to_vec();
    h2_huge_frame.extend([0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00]);
    h2_huge_frame.extend([0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("64 KiB of garbage", garbage(64 * 1024)),
        ("an HTTP/1.1 GET", http1),
        ("an HTTP/1.1 POST of a gRPC path", post),
        ("the HTTP/2 preface and garbage", h2_then_garbage),
        ("an HTTP/2 frame header of 16 MiB", h2_huge_frame),
        ("a single NUL byte", vec![0]),
    ];
    let targets: Vec<(String, SocketAddr)> = heads
        .iter()
        .chain(&workers)
        .map(|m| (m.id.clone(), m.addr))
        .collect();
    // And a connection that sends half the preface and then sits there
    // through all of the above.
    let mut half_open = Vec::new();
    for (_, addr) in &targets {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&H2_PREFACE[..10]).expect("write");
        half_open.push(s);
    }
    for (id, addr) in &targets {
        for (what, bytes) in &inputs {
            let answer = poke(*addr, bytes);
            eprintln!(
                "{id} answered {what} with {} bytes: {:?}",
                answer.len(),
                String::from_utf8_lossy(&answer[..answer.len().min(60)])
            );
            assert_alive(&mut cluster, id, what).await;
        }
    }
    drop(half_open);

    // Still serving, and nobody moved.
    let after = settle(&mut probe, &heads, &workers, Duration::from_secs(3)).await;
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch, a.reassignments),
            (&b.head_id, b.epoch, b.reassignments),
            "{} moved\n{before}\n{after}",
            w.id
        );
    }
    assert_no_panic(&cluster);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_head_survives() {
    let mut cluster = start_cluster(1, 0).await;
    let addr = cluster.process("head-0").expect("a head").addr;
    let mut client = head_client(addr);

    // Over the 64 KiB decode limit: tonic refuses it before the handler.
    let huge = ReassignRequest {
        worker_id: "big".into(),
        worker_addr: "a".repeat(70 * 1024),
        ..ReassignRequest::default()
    };
    let r = tokio::time::timeout(Duration::from_secs(5), client.reassign(huge))
        .await
        .expect("an answer within 5s");
    eprintln!("Reassign with a 70 KiB worker_addr: {r:?}");
    match &r {
        // tonic 0.14 says OUT_OF_RANGE for a message over the decode
        // limit (the gRPC spec would say RESOURCE_EXHAUSTED).
        Err(s) if s.code() == Code::OutOfRange && s.message().contains("too large") => {}
        other => panic!("Reassign with a 70 KiB worker_addr: expected OUT_OF_RANGE, got {other:?}"),
    }

    // A first beat over the limit on the stream: refused the same way.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WorkerBeat {
        worker_id: "b".repeat(70 * 1024),
        ..WorkerBeat::default()
    })
    .await
    .expect("the receiver is alive");
    let call = client.heartbeat(ReceiverStream::new(rx));
    let r = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("an answer within 5s");
    let code = match r {
        Ok(mut stream) => tokio::time::timeout(Duration::from_secs(5), stream.get_mut().message())
            .await
            .expect("an answer within 5s")
            .err()
            .map(|s| (s.code(), s.message().to_owned())),
        Err(s) => Some((s.code(), s.message().to_owned())),
    };
    eprintln!("Heartbeat with a 70 KiB first beat: {code:?}");
    assert!(
        matches!(&code, Some((Code::OutOfRange, m)) if m.contains("too large")),
        "Heartbeat with a 70 KiB first beat: expected OUT_OF_RANGE, got {code:?}"
    );
    drop(tx);

    // Under the transport limit but over the protocol's: the handler's
    // own check answers.
    let long_addr = ReassignRequest {
        worker_id: "addr".into(),
        worker_addr: "a".repeat(257),
        ..ReassignRequest::default()
    };
    let r = client.reassign(long_addr).await;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::InvalidArgument && s.message().contains("257")),
        "Reassign with a 257-byte worker_addr: {r:?}"
    );

    // The head survives and still adopts a well-formed worker.
    assert_alive(&mut cluster, "head-0", "oversized messages").await;
    let r = client
        .reassign(ReassignRequest {
            worker_id: "fine".into(),
            worker_addr: "127.0.0.1:1".into(),
            ..ReassignRequest::default()
        })
        .await;
    assert!(
        r.is_ok(),
        "a normal Reassign after the oversized ones: {r:?}"
    );
    assert_no_panic(&cluster);
}

#[tokio::test]
async fn heartbeat_streams_that_never_read_are_dropped_after_the_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster(1, 0).await;
    let head = cluster.process("head-0").expect("a head");
    let (addr, pid) = (head.addr, head.pid());
    let rss_before = rss_kib(pid);

    // 200 clients adopt themselves properly, open their stream with a
    // valid first beat, and then neither beat nor read again.
    const SILENT: usize = 200;
    let mut held = Vec::new();
    for i in 0..SILENT {
        let mut client = head_client(addr);
        let id = format!("silent-{i:03}");
        let adopted = client
            .reassign(ReassignRequest {
                worker_id: id.clone(),
                ..ReassignRequest::default()
            })
            .await
            .unwrap_or_else(|s| panic!("Reassign of {id}: {s:?}"))
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WorkerBeat {
            worker_id: id.clone(),
            epoch: adopted.epoch,
            stream_secret: adopted.stream_secret,
            ..WorkerBeat::default()
        })
        .await
        .expect("the receiver is alive");
        let stream = client
            .heartbeat(ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|s| panic!("Heartbeat of {id}: {s:?}"));
        // Kept, never polled.
        held.push((tx, stream, client));
    }
    let opened = Instant::now();
    let listed = Probe::new()
        .list_workers(addr)
        .await
        .map(|l| l.workers.len());
    let rss_open = rss_kib(pid);

    // Within the timeout plus slack, the head closed every one of them,
    // and released their assignments in Redis.
    let mut probe = Probe::new();
    let mut left = usize::MAX;
    let dropped = wait_until(
        TIMEOUT + Duration::from_secs(2),
        Duration::from_millis(50),
        async || {
            left = probe
                .list_workers(addr)
                .await
                .map_or(usize::MAX, |l| l.workers.len());
            left == 0
        },
    )
    .await;
    let took = opened.elapsed();
    assert!(
        dropped,
        "{left} of {SILENT} silent streams still listed {took:?} after they opened (listed at first: {listed:?}); log:\n{}",
        cluster.process("head-0").expect("a head").log_tail(10)
    );
    let keys = wait_until(
        Duration::from_secs(2),
        Duration::from_millis(50),
        async || {
            cluster
                .redis()
                .command(&["HLEN", "{tether}:assigned:head-0"])
                .ok()
                == Some(Reply::Integer(0))
        },
    )
    .await;
    let rss_after = rss_kib(pid);
    eprintln!(
        "{SILENT} silent streams (listed at first: {listed:?}) dropped {took:?} after opening; head RSS {rss_before} KiB before, {rss_open} KiB open, {rss_after} KiB after"
    );
    assert!(
        keys,
        "assignments of silent workers left in Redis: {:?}",
        cluster
            .redis()
            .command(&["HKEYS", "{tether}:assigned:head-0"])
    );
    assert!(
        rss_open < rss_before + 64 * 1024 && rss_after < rss_before + 64 * 1024,
        "head RSS grew too much: {rss_before} KiB before, {rss_open} KiB with {SILENT} silent streams, {rss_after} KiB after"
    );
    drop(held);
    assert_alive(&mut cluster, "head-0", "silent streams").await;
    assert_no_panic(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_do_not_disturb_attached_workers() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // The head serves at most MAX_CONNECTIONS connections; the flood asks
    // for more than that.
    const MAX_CONNECTIONS: usize = 3000;
    let cap = MAX_CONNECTIONS.to_string();
    let mut cluster = start_cluster_with(1, &["--max-connections", &cap], 6).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = View::take(&mut probe, &heads, &workers).await;
    let head = cluster.process("head-0").expect("a head");
    let (addr, pid) = (head.addr, head.pid());
    let (rss_before, fds_before) = (rss_kib(pid), fds(pid));

    // 5000 connections at once: most idle, every third after the HTTP/2
    // preface; plus 100 real clients calling ListWorkers in a loop.
    const CONNECTIONS: usize = 5000;
    let mut connects = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        connects.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            if i % 3 == 0 {
                tokio::io::AsyncWriteExt::write_all(&mut s, H2_PREFACE).await?;
            }
            Ok::<_, std::io::Error>(s)
        });
    }
    let mut open = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = connects.join_next().await {
        match r.expect("the connect task") {
            Ok(s) => open.push(s),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let stop = stop.clone();
        callers.spawn(async move {
            let mut client = head_client(addr);
            let mut answered = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let call = client.list_workers(ListWorkersRequest::default());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                    answered += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answered
        });
    }

    // For three seconds under that load, every worker keeps its stream.
    let start = Instant::now();
    let mut rss_peak = rss_before;
    let mut fds_peak = fds_before;
    while start.elapsed() < Duration::from_secs(3) {
        let view = View::take(&mut probe, &heads, &workers).await;
        rss_peak = rss_peak.max(rss_kib(pid));
        fds_peak = fds_peak.max(fds(pid));
        for w in &workers {
            let (b, n) = (before.status(&w.id).unwrap(), view.status(&w.id));
            assert!(
                n.is_some_and(|n| n.attached
                    && n.epoch == b.epoch
                    && n.reassignments == b.reassignments),
                "{} disturbed {:?} into {} connections:\n{view}",
                w.id,
                start.elapsed(),
                open.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    while let Some(r) = callers.join_next().await {
        answered += r.expect("a caller task");
    }
    let held = open.len();
    drop(open);

    // Closing them gives the descriptors back.
    let mut fds_now = usize::MAX;
    let released = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        async || {
            fds_now = fds(pid);
            fds_now < fds_before + 50
        },
    )
    .await;
    let rss_after = rss_kib(pid);
    eprintln!(
        "{held} connections held ({} failed: {:?}), {answered} ListWorkers answered; head fds {fds_before} -> peak {fds_peak} -> {fds_now}; RSS {rss_before} -> peak {rss_peak} -> {rss_after} KiB",
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        held >= CONNECTIONS * 9 / 10,
        "only {held} of {CONNECTIONS} connections opened: {failed:?}"
    );
    // The callers came after the flood filled the bound, so they may all
    // have been refused: that is the bound working, not a failure.
    assert!(
        fds_peak <= MAX_CONNECTIONS + 150,
        "the head held {fds_peak} descriptors with --max-connections {MAX_CONNECTIONS}"
    );
    assert!(
        released,
        "the head still holds {fds_now} descriptors after the clients closed (before: {fds_before})"
    );
    assert!(
        rss_peak < rss_before + 256 * 1024,
        "head RSS grew from {rss_before} KiB to {rss_peak} KiB with {held} connections"
    );
    assert_alive(&mut cluster, "head-0", "thousands of connections").await;
    let after = settle(&mut probe, &heads, &workers, Duration::from_secs(3)).await;
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch),
            (&b.head_id, b.epoch),
            "{} moved",
            w.id
        );
    }
    assert_no_panic(&cluster);
}

/// Every key in Redis, sorted, but the load digest: one key per
/// namespace that comes and goes with each lease TTL (the refresh that
/// finds it gone sweeps and writes it again).
fn all_keys(cluster: &Cluster) -> BTreeSet<String> {
    let mut keys = string_set("KEYS *", ok(cluster.redis().command(&["KEYS", "*"])));
    keys.remove("{tether}:loads");
    keys
}

#[tokio::test]
async fn worker_ids_shaped_like_redis_patterns_touch_only_their_own_keys() {
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), HEAD_ARGS));
    }
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    // Decoys: keys a pattern or hash-tag mix-up would hit.
    let redis = cluster.redis();
    for args in [
        &[
            "HSET",
            "{tether}:worker:decoy",
            "head",
            "nobody",
            "epoch",
            "1",
        ][..],
        &["SET", "{x}", "decoy"],
        &["SET", "{other}:worker:a", "decoy"],
        &["SADD", "{tether}:workers-of:nobody", "decoy"],
        &["HSET", "{tether}:assigned:nobody", "decoy", "1|x|s|"],
    ] {
        assert!(
            !matches!(ok(redis.command(args)), Reply::Error(_)),
            "{args:?}"
        );
    }
    let decoys = all_keys(&cluster);

    let ids = [
        "*",
        "{x}",
        "a:b",
        "?",
        "[",
        "w*",
        "{tether}",
        "x]",
        "h:*:workers",
    ];
    for id in ids {
        ok(cluster.spawn_worker(id, WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let view = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;

    // Exactly the decoys plus the keys these heads and workers own.
    let mut expected = decoys.clone();
    expected.insert("{tether}:heads".into());
    expected.insert("{tether}:epoch".into());
    for h in &heads {
        expected.insert(format!("{{tether}}:head:{}", h.id));
        if !view.workers_of(&h.id).is_empty() {
            expected.insert(format!("{{tether}}:assigned:{}", h.id));
        }
    }
    let keys = all_keys(&cluster);
    assert_eq!(
        keys, expected,
        "Redis keys after the workers attached\n{view}"
    );
    for h in &heads {
        let set = assigned_key(&h.id);
        let members = string_set("HKEYS", ok(cluster.redis().command(&["HKEYS", &set])));
        let want: BTreeSet<String> = view.workers_of(&h.id).into_iter().collect();
        assert_eq!(members, want, "{set}\n{view}");
    }

    // The worker called `*` crashes: its head releases the field `*` of
    // its own hash (that one field, literally), and nothing else.
    let star = cluster.process_mut("*").expect("a worker");
    star.kill().unwrap_or_else(|e| panic!("{e}"));
    star.wait_exit(Duration::from_secs(2));
    let star_head = view.status("*").expect("settled").head_id.clone();
    let star_hash = format!("{{tether}}:assigned:{star_head}");
    let released = wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        async || {
            cluster.redis().command(&["HEXISTS", &star_hash, "*"]).ok() == Some(Reply::Integer(0))
        },
    )
    .await;
    assert!(released, "field `*` of {star_hash} still there");
    let mut want = expected.clone();
    // The head of `*` may have lost its last worker, and with it its hash.
    if view.workers_of(&star_head).len() == 1 {
        want.remove(&star_hash);
    }
    let now = all_keys(&cluster);
    assert_eq!(
        now, want,
        "after worker `*` left, only its own field may go"
    );
    let others = view.workers_of(&star_head).len() - 1;
    assert_eq!(
        ok(cluster.redis().command(&["HLEN", &star_hash])),
        Reply::Integer(others as i64),
        "the other workers of {star_head} stay assigned"
    );
    for (key, kind) in [
        ("{tether}:worker:decoy", "hash"),
        ("{x}", "string"),
        ("{tether}:workers-of:nobody", "set"),
    ] {
        assert_eq!(
            ok(cluster.redis().command(&["TYPE", key])),
            Reply::Simple(kind.into()),
            "decoy {key}"
        );
    }
    assert_no_panic(&cluster);
}

/// Text a fuzzer would try: any characters, with Redis pattern and
/// hash-tag characters, controls and very long strings over-represented.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[*?\\[\\]{}:a-z\\\\]{1,20}",
        "[\\x00-\\x1f\\x7f ]{0,5}",
        ".{120,300}",
        Just(String::new()),
    ]
}

fn reassign_requests() -> impl Strategy<Value = ReassignRequest> {
    (
        text(),
        text(),
        text(),
        any::<i32>(),
        text(),
        proptest::collection::vec(text(), 0..4),
    )
        .prop_map(
            |(worker_id, worker_addr, previous_head_id, reason, instance, unavailable_heads)| {
                ReassignRequest {
                    worker_id,
                    worker_addr,
                    previous_head_id,
                    reason,
                    instance,
                    unavailable_heads,
                }
            },
        )
}

fn worker_beats() -> impl Strategy<Value = WorkerBeat> {
    (
        text(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(proptest::num::f64::ANY),
        text(),
        // Adopt on open: the first beat may carry a `Reassign` of its own.
        proptest::option::of(reassign_requests()),
    )
        .prop_map(
            |(worker_id, epoch, sequence, load, stream_secret, reassign)| WorkerBeat {
                worker_id,
                epoch,
                sequence,
                load,
                stream_secret,
                reassign,
            },
        )
}

/// OK, or a status with a message.
fn answered<T>(what: &str, r: &Result<T, tonic::Status>) -> Result<(), TestCaseError> {
    match r {
        Err(s) if s.message().is_empty() => Err(TestCaseError::fail(format!(
            "{what}: {:?} with an empty message",
            s.code()
        ))),
        _ => Ok(()),
    }
}

#[test]
fn arbitrary_requests_never_crash_the_head() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Channels spawn their connection tasks on the current runtime.
    let _entered = runtime.enter();
    let mut cluster = runtime.block_on(start_cluster(1, 0));
    let addr = cluster.process("head-0").expect("a head").addr;
    let client = head_client(addr);
    let config = Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    };
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let codes = std::sync::Mutex::new(&mut codes);
    let note = |what: &str, code: Option<Code>| {
        let key = format!("{what}: {}", code.map_or("OK".into(), |c| format!("{c:?}")));
        *codes.lock().expect("not poisoned").entry(key).or_default() += 1;
    };

    TestRunner::new(config.clone())
        .run(&reassign_requests(), |request| {
            let mut client = client.clone();
            let r = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), client.reassign(request.clone())).await
            });
            let r = r.map_err(|_| TestCaseError::fail(format!("no answer to {request:?}")))?;
            note("Reassign", r.as_ref().err().map(|s| s.code()));
            answered(&format!("Reassign({request:?})"), &r)?;
            let listed = runtime.block_on(client.list_workers(ListWorkersRequest::default()));
            note("ListWorkers", listed.as_ref().err().map(|s| s.code()));
            prop_assert!(listed.is_ok(), "ListWorkers after {request:?}: {listed:?}");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("Reassign: {e}"));

    TestRunner::new(config)
        .run(&(worker_beats(), any::<bool>()), |(first, send_any)| {
            let mut client = client.clone();
            let outcome = runtime.block_on(async {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                if send_any {
                    tx.send(first.clone()).await.expect("the receiver is alive");
                } else {
                    // A stream that ends before any beat.
                    drop(tx);
                }
                let call = client.heartbeat(ReceiverStream::new(rx));
                let r = tokio::time::timeout(Duration::from_secs(5), call)
                    .await
                    .ok()?;
                Some(match r {
                    Ok(mut stream) => {
                        match tokio::time::timeout(
                            Duration::from_secs(5),
                            stream.get_mut().message(),
                        )
                        .await
                        {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(s)) => Err(s),
                            Err(_) => Err(tonic::Status::unknown("(no message within 5s)")),
                        }
                    }
                    Err(s) => Err(s),
                })
            });
            let r =
                outcome.ok_or_else(|| TestCaseError::fail(format!("no answer to {first:?}")))?;
            note("Heartbeat", r.as_ref().err().map(|s| s.code()));
            answered(&format!("Heartbeat(first {first:?}, sent {send_any})"), &r)
        })
        .unwrap_or_else(|e| panic!("Heartbeat: {e}"));

    let codes = codes.into_inner().expect("not poisoned");
    eprintln!("answers: {codes:?}");
    runtime.block_on(assert_alive(&mut cluster, "head-0", "arbitrary requests"));
    let ready = runtime.block_on(Probe::new().health(addr, HEAD_SERVICE));
    assert!(
        matches!(ready, Ok(ServingStatus::Serving)),
        "readiness after fuzzing: {ready:?}"
    );
    assert_no_panic(&cluster);
}

/// The repro of a head under `prlimit --nofile=1024`, scaled down: a head
/// bounded to 64 connections, then 600 TCP connections that never send a
/// byte. Liveness (`grpc.health.v1.Health/Check`) still answers while they
/// are held, every one of them is closed by the head within the handshake
/// timeout (plus slack for a loaded machine), and the workers streaming to
/// the head are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_fill_the_bound_and_are_closed_after_the_handshake_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const MAX_CONNECTIONS: &str = "64";
    const IDLE: usize = 600;
    let mut cluster = start_cluster_with(1, &["--max-connections", MAX_CONNECTIONS], 4).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = View::take(&mut probe, &heads, &workers).await;
    let head = cluster.process("head-0").expect("a head");
    let (addr, pid) = (head.addr, head.pid());
    let fds_before = fds(pid);

    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {} failed: {e}", idle.len()),
        }
    }
    let storm_took = opened.elapsed();

    // Liveness answers while the idle connections are still open: each
    // check on a fresh connection, as a kubelet probe would.
    let mut last = None;
    let live = wait_until(
        Duration::from_secs(3),
        Duration::from_millis(100),
        async || {
            let answer = Probe::new().health(addr, "").await;
            let serving = matches!(answer, Ok(ServingStatus::Serving));
            last = Some(answer);
            serving
        },
    )
    .await;
    let live_after = opened.elapsed();
    assert!(
        live,
        "liveness did not answer within 3 s with {IDLE} idle connections open (bound {MAX_CONNECTIONS}): {last:?}; log:\n{}",
        cluster.process("head-0").expect("a head").log_tail(20)
    );

    // Every idle connection is closed by the head (EOF or reset). The
    // head may send its own HTTP/2 settings first: read past them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut open_after_deadline = 0;
    let mut last_closed = Duration::ZERO;
    for s in &mut idle {
        let mut bytes = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(s, &mut bytes))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    last_closed = last_closed.max(opened.elapsed());
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => {
                    open_after_deadline += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(
        open_after_deadline, 0,
        "{open_after_deadline} of {IDLE} idle connections still open 15 s after they were opened"
    );
    let fds_after = fds(pid);
    eprintln!(
        "{IDLE} idle connections opened in {storm_took:?}; liveness answered {live_after:?} after the first; the last closed {last_closed:?} after it; head fds {fds_before} -> {fds_after}"
    );
    drop(idle);

    assert_alive(&mut cluster, "head-0", "idle connections").await;
    let after = settle(&mut probe, &heads, &workers, Duration::from_secs(3)).await;
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch, a.reassignments),
            (&b.head_id, b.epoch, b.reassignments),
            "{} was disturbed by the idle connections",
            w.id
        );
    }
    assert_no_panic(&cluster);
}

/// A connection that completed the HTTP/2 handshake but has no open
/// stream is closed once it has had none for `--idle-connection-timeout`
/// (2 s here): a raw client that sent the preface and its SETTINGS, and
/// tonic channels that made one health check and then sat idle. The
/// connections that carry a worker's Heartbeat stream and a WatchEvents
/// stream stay open well past the timeout, and a channel whose connection
/// was closed makes its next call on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_open_streams_are_closed_after_the_idle_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
    const CHANNELS: usize = 20;
    let mut cluster = cluster();
    let head_args: Vec<&str> = HEAD_ARGS
        .iter()
        .copied()
        .chain(["--idle-connection-timeout", "2s"])
        .collect();
    ok(cluster.spawn_head(&head_id(0), &head_args));
    let head = cluster.process("head-0").expect("a head");
    let (addr, pid) = (head.addr, head.pid());
    ok(wait_serving(addr, HEAD_SERVICE, START_TIMEOUT).await);
    ok(cluster.spawn_worker(&worker_id(0), WORKER_ARGS));
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let before = settle(&mut Probe::new(), &heads, &workers, START_TIMEOUT).await;

    // A WatchEvents stream on its own connection, read until it ends.
    let mut events = head_client(addr)
        .watch_events(tether::pb::WatchEventsRequest {})
        .await
        .unwrap_or_else(|e| panic!("WatchEvents: {e}"))
        .into_inner();
    let watch = tokio::spawn(async move {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                end => return format!("{end:?}"),
            }
        }
    });
    let streams_opened = Instant::now();
    // The probe connections of `settle` may still be open: wait until
    // they are gone (or, before the idle timeout existed, for ever).
    tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(1)).await;
    let fds_base = fds(pid);

    // A raw HTTP/2 client: the preface and an empty SETTINGS frame, then
    // nothing.
    let mut raw = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::io::AsyncWriteExt::write_all(
        &mut raw,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .await
    .unwrap_or_else(|e| panic!("preface: {e}"));
    let raw_greeted = Instant::now();
    // Tonic channels that make one call each and then sit idle.
    let mut idle = Vec::new();
    for i in 0..CHANNELS {
        let mut p = Probe::new();
        let answer = p.health(addr, "").await;
        assert!(
            matches!(answer, Ok(ServingStatus::Serving)),
            "health check {i}: {answer:?}"
        );
        idle.push(p);
    }
    let fds_open = fds(pid);

    // The raw client is closed by the head (end of file or reset), after
    // about the timeout; the head's SETTINGS come first.
    let mut bytes = [0u8; 256];
    let raw_closed = loop {
        match tokio::time::timeout(
            Duration::from_secs(15),
            tokio::io::AsyncReadExt::read(&mut raw, &mut bytes),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(raw_greeted.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => break None,
        }
    };
    let raw_closed = raw_closed.unwrap_or_else(|| {
        panic!("a handshaken connection with no stream was still open 15 s later (idle timeout {IDLE_TIMEOUT:?})")
    });
    assert!(
        raw_closed >= IDLE_TIMEOUT - Duration::from_millis(100)
            && raw_closed <= IDLE_TIMEOUT + Duration::from_secs(3),
        "the idle raw connection closed {raw_closed:?} after its greeting; expected about {IDLE_TIMEOUT:?}"
    );
    // So are the idle channels' connections: the head's descriptors go
    // back to what the worker's and the watcher's connections hold.
    let mut fds_now = fds_open;
    let released = wait_until(
        IDLE_TIMEOUT + Duration::from_secs(5),
        Duration::from_millis(100),
        async || {
            fds_now = fds(pid);
            fds_now <= fds_base
        },
    )
    .await;
    let released_after = raw_greeted.elapsed();
    assert!(
        released,
        "head fds {fds_base} before {CHANNELS} idle channels, {fds_open} with them, still {fds_now} {released_after:?} later"
    );
    // A closed channel makes its next call on a new connection.
    let again = idle[0].health(addr, "").await;
    assert!(
        matches!(again, Ok(ServingStatus::Serving)),
        "a call on a channel whose idle connection was closed: {again:?}"
    );

    // The streams stay open past three timeouts.
    let until = streams_opened + 3 * IDLE_TIMEOUT + Duration::from_secs(1);
    tokio::time::sleep_until(until.into()).await;
    assert!(
        !watch.is_finished(),
        "the WatchEvents stream ended after {:?}: {}",
        streams_opened.elapsed(),
        watch.await.unwrap_or_default()
    );
    let after = settle(&mut Probe::new(), &heads, &workers, Duration::from_secs(3)).await;
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch, a.reassignments, a.attached),
            (&b.head_id, b.epoch, b.reassignments, true),
            "{}'s Heartbeat stream was closed by the idle timeout",
            w.id
        );
    }
    eprintln!(
        "idle timeout {IDLE_TIMEOUT:?}: raw HTTP/2 connection closed {raw_closed:?} after its greeting; head fds {fds_base} -> {fds_open} with {CHANNELS} idle channels -> {fds_now} {released_after:?} later; WatchEvents and Heartbeat streams open after {:?}",
        streams_opened.elapsed()
    );
    watch.abort();
    assert_no_panic(&cluster);
}
