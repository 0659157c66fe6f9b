//! Redis holds who may join and who moved, never whether a worker stays
//! attached: when Redis is down, hung, emptied or slow, no worker moves,
//! heads report themselves unready but alive, and once Redis answers
//! again the heads rebuild the registry from their open streams within
//! one lease.
//!
//! These tests measure time, so they run one at a time.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether::pb::ReassignRequest;
use tether_testkit::localcluster::{head_client, wait_until, Cluster, Probe, Reply};
use tether_testkit::ONE_AT_A_TIME;
use tonic_health::pb::health_check_response::ServingStatus;

/// The lease TTL of `HEAD_ARGS`.
const LEASE: Duration = Duration::from_secs(1);

/// Slack on top of "within one lease" for a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// How long the outage tests keep Redis away.
const OUTAGE: Duration = Duration::from_secs(6);

/// A heartbeat timeout of 2 s instead of 600 ms for the tests that assert
/// no worker moves: a Redis fault must not stop a beat, and a head that
/// did stop beating would still be caught within the 6 s fault, while a
/// loaded machine's scheduling stalls (seen: 700 ms at load 20) are not
/// mistaken for it.
const STEADY: &[&str] = &["--heartbeat-timeout", "2s"];

struct Members {
    heads: Vec<Member>,
    workers: Vec<Member>,
}

fn members(cluster: &Cluster) -> Members {
    Members {
        heads: cluster.heads().map(Member::from).collect(),
        workers: cluster.workers().map(Member::from).collect(),
    }
}

/// Workers whose head, epoch or move count differ between two views, or
/// that are not attached in `now`.
fn moved(before: &View, now: &View) -> Vec<String> {
    let mut out = Vec::new();
    for (w, b) in &before.statuses {
        let b = b.as_ref().expect("settled views have statuses");
        match now.status(w) {
            Some(n)
                if n.attached
                    && n.head_id == b.head_id
                    && n.epoch == b.epoch
                    && n.reassignments == b.reassignments => {}
            Some(n) => out.push(format!(
                "{w}: was head={} epoch={} moves={}, now head={} epoch={} moves={} attached={}",
                b.head_id,
                b.epoch,
                b.reassignments,
                n.head_id,
                n.epoch,
                n.reassignments,
                n.attached
            )),
            None => out.push(format!("{w}: did not answer Status")),
        }
    }
    out
}

/// Samples the cluster for `span`: every worker stays where `before` saw
/// it, and (if `unready` is set) every head turns NOT_SERVING within
/// `unready` while liveness stays SERVING throughout.
async fn hold_still(
    probe: &mut Probe,
    m: &Members,
    before: &View,
    span: Duration,
    unready: Option<Duration>,
) {
    let start = Instant::now();
    let mut readiness: BTreeMap<String, Option<Duration>> =
        m.heads.iter().map(|h| (h.id.clone(), None)).collect();
    let mut samples = 0;
    while start.elapsed() < span {
        let view = View::take(probe, &m.heads, &m.workers).await;
        samples += 1;
        let moves = moved(before, &view);
        assert!(
            moves.is_empty() && view.problems().is_empty(),
            "{:?} into the fault, workers moved or the cluster disagrees:\n{}\n{:?}\nbefore:\n{before}\nnow:\n{view}",
            start.elapsed(),
            moves.join("\n"),
            view.problems()
        );
        for h in &m.heads {
            let live = probe.health(h.addr, "").await;
            assert!(
                matches!(live, Ok(ServingStatus::Serving)),
                "{} liveness {:?} into the fault: {live:?}",
                h.id,
                start.elapsed()
            );
            if unready.is_some() {
                let ready = probe.health(h.addr, HEAD_SERVICE).await;
                if matches!(ready, Ok(ServingStatus::NotServing)) {
                    readiness
                        .get_mut(&h.id)
                        .expect("known head")
                        .get_or_insert(start.elapsed());
                } else if let Some(since) = readiness[&h.id] {
                    panic!(
                        "{} readiness went back to {ready:?} {:?} into the fault (NOT_SERVING since {since:?})",
                        h.id,
                        start.elapsed()
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    if let Some(limit) = unready {
        for (head, at) in &readiness {
            assert!(
                at.is_some_and(|t| t <= limit),
                "{head} readiness not NOT_SERVING within {limit:?} of the fault: {readiness:?}"
            );
        }
    }
    if unready.is_some() {
        eprintln!("{samples} samples over {span:?}: no worker moved; readiness NOT_SERVING after {readiness:?}");
    } else {
        eprintln!("{samples} samples over {span:?}: no worker moved");
    }
}

/// What the registry is missing compared with what the heads and
/// workers say, for every worker and head of `view`.
fn registry_gaps(cluster: &Cluster, view: &View) -> Vec<String> {
    let redis = cluster.redis();
    let mut gaps = Vec::new();
    let mut per_head: BTreeMap<String, i64> = BTreeMap::new();
    for (w, s) in &view.statuses {
        let Ok(s) = s else {
            gaps.push(format!("{w} did not answer"));
            continue;
        };
        *per_head.entry(s.head_id.clone()).or_default() += 1;
        let hash = assigned_key(&s.head_id);
        match redis.command(&["HGET", &hash, w]) {
            Ok(Reply::Bulk(Some(v))) if assignment_epoch(&v) == Some(s.epoch) => {}
            other => gaps.push(format!(
                "{w} in {hash}: {other:?}, worker says epoch {}",
                s.epoch
            )),
        }
    }
    for head in view.listings.keys() {
        let key = format!("{{tether}}:head:{head}");
        match redis.command(&["EXISTS", &key]) {
            Ok(Reply::Integer(1)) => {}
            other => gaps.push(format!("{key}: {other:?}")),
        }
        let hash = assigned_key(head);
        let want = per_head.get(head).copied().unwrap_or(0);
        match redis.command(&["HLEN", &hash]) {
            Ok(Reply::Integer(n)) if n == want => {}
            other => gaps.push(format!("HLEN {hash}: {other:?}, {want} workers say {head}")),
        }
    }
    gaps
}

/// Waits until the registry matches `view` again; returns how long it
/// took, or panics with what is missing after `within`.
async fn wait_rebuilt(
    cluster: &Cluster,
    view: &View,
    since: Instant,
    within: Duration,
) -> Duration {
    let mut gaps = Vec::new();
    let rebuilt = wait_until(within, Duration::from_millis(20), async || {
        gaps = registry_gaps(cluster, view);
        gaps.is_empty()
    })
    .await;
    let took = since.elapsed();
    assert!(
        rebuilt,
        "the registry was not rebuilt within {within:?}:\n{}\nheads' logs:\n{}",
        gaps.join("\n"),
        cluster
            .heads()
            .map(|h| format!("--- {}\n{}", h.id, h.log_tail(10)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    took
}

/// The pid of the running redis-server, from `INFO server`.
fn redis_pid(cluster: &Cluster) -> u32 {
    let info = ok(cluster.redis().command(&["INFO", "server"]));
    let Reply::Bulk(Some(text)) = info else {
        panic!("INFO server answered {info:?}");
    };
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("INFO server names process_id")
}

fn kill(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("the kill command runs");
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

#[tokio::test]
async fn redis_down_for_seconds_moves_no_worker_and_heads_rebuild_within_one_lease() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster_with(3, STEADY, 12).await;
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;
    assert!(
        registry_gaps(&cluster, &before).is_empty(),
        "before the outage"
    );

    // Connection refused for six seconds: readiness turns off at the
    // first failed refresh (every 200 ms), liveness never does.
    cluster.redis_mut().kill();
    hold_still(
        &mut probe,
        &m,
        &before,
        OUTAGE,
        Some(Duration::from_secs(2)),
    )
    .await;

    // Back, empty (no persistence): within one lease every head holds its
    // lease again and has re-recorded its workers.
    ok(cluster.redis_mut().restart());
    let back = Instant::now();
    let took = wait_rebuilt(&cluster, &before, back, LEASE + SLACK).await;
    eprintln!("registry rebuilt {took:?} after Redis came back");
    for h in &m.heads {
        ok(tether_testkit::localcluster::wait_serving(h.addr, HEAD_SERVICE, LEASE + SLACK).await);
    }
    hold_still(&mut probe, &m, &before, Duration::from_secs(1), None).await;
}

#[tokio::test]
async fn redis_hung_for_seconds_moves_no_worker_and_heads_rebuild_within_one_lease() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster_with(3, STEADY, 12).await;
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;

    // A hung Redis (SIGSTOP): connections open, nothing answers. Every
    // registry call hits its 2 s timeout instead of failing at once, so
    // readiness may take a refresh plus that timeout to turn off.
    let pid = redis_pid(&cluster);
    kill("-STOP", pid);
    // Should this panic, dropping the cluster SIGKILLs the stopped Redis.
    hold_still(
        &mut probe,
        &m,
        &before,
        OUTAGE,
        Some(Duration::from_secs(4)),
    )
    .await;
    kill("-CONT", pid);

    // Redis kept its data, but the leases and worker sets expired while
    // it hung (expiry follows the wall clock): the heads notice the lapsed
    // lease and re-record their workers.
    let back = Instant::now();
    let took = wait_rebuilt(&cluster, &before, back, LEASE + SLACK).await;
    eprintln!("registry rebuilt {took:?} after Redis resumed");
    hold_still(&mut probe, &m, &before, Duration::from_secs(1), None).await;
}

#[tokio::test]
async fn redis_restarted_empty_moves_no_worker_and_registry_is_rebuilt() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster_with(3, STEADY, 12).await;
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;

    // A crash and an immediate restart: everything Redis held is gone.
    let restarted = Instant::now();
    ok(cluster.redis_mut().restart());
    let keys = ok(cluster.redis().command(&["DBSIZE"]));
    eprintln!("DBSIZE right after the restart: {keys:?}");
    let took = wait_rebuilt(&cluster, &before, restarted, LEASE + SLACK).await;
    eprintln!("registry rebuilt {took:?} after the restart");
    hold_still(&mut probe, &m, &before, Duration::from_secs(2), None).await;
}

#[tokio::test]
async fn flushall_moves_no_worker_and_registry_is_rebuilt_within_one_lease() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster_with(3, STEADY, 12).await;
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;

    let flushed = Instant::now();
    let reply = ok(cluster.redis().command(&["FLUSHALL"]));
    assert_eq!(reply, Reply::Simple("OK".into()), "FLUSHALL");
    let took = wait_rebuilt(&cluster, &before, flushed, LEASE + SLACK).await;
    eprintln!("registry rebuilt {took:?} after FLUSHALL");
    hold_still(&mut probe, &m, &before, Duration::from_secs(2), None).await;
}

/// Blocks the Redis on `port` for `millis`: `DEBUG SLEEP` when the
/// server allows it (Redis 7 refuses DEBUG unless started with
/// `--enable-debug-command`), else a Lua script that spins as long, which
/// blocks the server just the same. Returns which one it used.
fn stall_redis(port: u16, millis: u64) -> &'static str {
    let seconds = format!("{:.3}", millis as f64 / 1000.0);
    if raw_command(port, &["DEBUG", "SLEEP", &seconds]) == "+OK" {
        return "DEBUG SLEEP";
    }
    let script = "local s = redis.call('TIME') \
        local limit = tonumber(ARGV[1]) * 1000 \
        while true do \
          local n = redis.call('TIME') \
          if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) >= limit then break end \
        end \
        return 1";
    let reply = raw_command(port, &["EVAL", script, "0", &millis.to_string()]);
    assert_eq!(reply, ":1", "the stalling script");
    "a spinning Lua script"
}

/// Sends one command to the Redis on `port` and returns the first line
/// of the reply: enough for a thread that does not own the cluster.
fn raw_command(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("Redis is up");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream
        .write_all(request.as_bytes())
        .expect("a write to Redis");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("a reply from Redis");
    line.trim_end().to_owned()
}

#[tokio::test]
async fn slow_redis_stops_no_beat_and_moves_no_worker() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster_with(3, STEADY, 12).await;
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;

    // Five stalls of half a second (most of a 600 ms heartbeat timeout),
    // from another thread, while this one samples.
    let port = cluster.redis().port();
    let stalls = std::thread::spawn(move || {
        let mut how = "";
        for _ in 0..5 {
            how = stall_redis(port, 500);
            std::thread::sleep(Duration::from_millis(300));
        }
        how
    });
    let start = Instant::now();
    while !stalls.is_finished() {
        let view = View::take(&mut probe, &m.heads, &m.workers).await;
        let moves = moved(&before, &view);
        assert!(
            moves.is_empty() && view.problems().is_empty(),
            "{:?} into the stalls:\n{}\n{:?}\n{view}",
            start.elapsed(),
            moves.join("\n"),
            view.problems()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let how = stalls.join().expect("the stalling thread");
    // Beats never went through Redis: the largest gap any worker saw
    // stays below the heartbeat timeout.
    let after = settle(&mut probe, &m.heads, &m.workers, Duration::from_secs(2)).await;
    let moves = moved(&before, &after);
    assert!(moves.is_empty(), "after the stalls:\n{}", moves.join("\n"));
    let gaps: BTreeMap<&String, u64> = after
        .statuses
        .iter()
        .filter_map(|(w, s)| s.as_ref().ok().map(|s| (w, s.max_head_beat_gap_ms)))
        .collect();
    assert!(
        gaps.values().all(|g| *g < 600),
        "HeadBeat gaps reached the 600 ms timeout during the stalls: {gaps:?}"
    );
    eprintln!(
        "Redis stalled 5 x 500 ms with {how} over {:?}; largest HeadBeat gaps: {gaps:?}",
        start.elapsed()
    );
}

/// The protocol promises every `Reassign` an epoch strictly greater than
/// any the worker held. After Redis loses its data, the epoch counter is
/// rebuilt only from the epochs that reachable heads reclaim, so a worker
/// leaving a hung head can get a smaller one.
#[tokio::test]
async fn epochs_keep_growing_across_an_empty_redis_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster(2, 2).await;
    // Push the epoch counter well past what the workers hold: the same
    // id adopted again and again by one head takes a new epoch each time.
    // Naming the other head unavailable waives the load bound, whichever
    // head the two workers chose.
    let mut client = head_client(cluster.process("head-0").expect("a head").addr);
    for _ in 0..30 {
        let call = client.reassign(ReassignRequest {
            worker_id: "epoch-bump".into(),
            unavailable_heads: vec!["head-1".into()],
            ..ReassignRequest::default()
        });
        let r = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(matches!(r, Ok(Ok(_))), "Reassign of epoch-bump: {r:?}");
    }
    // The newest worker now holds the highest epoch of all.
    ok(cluster.spawn_worker("late", WORKER_ARGS));
    let m = members(&cluster);
    let mut probe = Probe::new();
    let before = settle(&mut probe, &m.heads, &m.workers, START_TIMEOUT).await;
    let late = before.status("late").expect("settled").clone();
    let other = if late.head_id == "head-0" {
        "head-1"
    } else {
        "head-0"
    };

    // Its head hangs, and Redis loses everything meanwhile: only the
    // other head re-records its (older) workers, and then adopts `late`.
    cluster
        .process_mut(&late.head_id)
        .expect("a head")
        .stop()
        .unwrap_or_else(|e| panic!("{e}"));
    ok(cluster.redis_mut().restart());
    let late_addr = cluster.process("late").expect("a worker").addr;
    let mut now = None;
    let moved = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        async || {
            now = probe.worker_status(late_addr).await.ok();
            now.as_ref()
                .is_some_and(|s| s.attached && s.head_id == other)
        },
    )
    .await;
    cluster
        .process_mut(&late.head_id)
        .expect("a head")
        .cont()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(moved, "late did not move to {other}: {now:?}");
    let now = now.expect("answered");
    assert!(
        now.epoch > late.epoch,
        "late's epoch went from {} (on {}) to {} (on {other}) across an empty Redis restart: the protocol promises a strictly greater epoch on every Reassign",
        late.epoch,
        late.head_id,
        now.epoch
    );
    // And the woken head lets it go.
    settle(&mut probe, &m.heads, &m.workers, Duration::from_secs(3)).await;
}
