//! Scaling events, end to end, with real processes: a head told to go
//! (SIGTERM or the `Drain` RPC) hands its workers over without a gap, a
//! crashed head's workers spread within the bounded-load limit, a new
//! head takes its share and no more, a head that hung and wakes up shares
//! no worker, a short hiccup moves nobody, and `--capacity` is a hard cap.
//!
//! These tests measure time and run up to 300 workers, so they run one
//! at a time: two of them side by side on a two-core machine would
//! measure each other.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tether::pb::{DrainRequest, ReassignReason, ReassignRequest, WorkerStatus};
use tether_testkit::localcluster::{head_client, wait_serving, wait_until, Cluster, Probe, Reply};
use tether_testkit::moves::{self, Moves, Orphan};
use tether_testkit::ONE_AT_A_TIME;
use tonic_health::pb::health_check_response::ServingStatus;

/// The heads' heartbeat interval, as given in [`TIMING`].
const INTERVAL: Duration = Duration::from_millis(200);

/// Head timings for these tests: beats every 200 ms, a silent peer is gone
/// after 800 ms, a crashed head leaves the registry after 1 s.
const TIMING: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "800ms",
    "--lease-ttl",
    "1s",
    "--shutdown-timeout",
    "2s",
];

/// The longest gap between two HeadBeats that a drain may open for a
/// worker it moves: three intervals, well below the heartbeat timeout
/// (800 ms), so that no worker ever takes a drain for a lost head. The tight number (a handoff p99 well
/// under one interval, no missed beat) is measured by `tether-bench drain`
/// on a quiet machine (docs/BENCHMARKS.md); on two cores shared with a
/// build, steady-state beats alone drift past 1.5 intervals.
const MAX_HANDOFF_GAP_MS: u64 = INTERVAL.as_millis() as u64 * 3;

/// A running cluster and the members the tests look at.
struct Scene {
    cluster: Cluster,
    heads: Vec<Member>,
    workers: Vec<Member>,
    probe: Probe,
}

impl Scene {
    /// A fresh Redis and nothing else yet.
    fn empty() -> Scene {
        Scene {
            cluster: cluster(),
            heads: Vec::new(),
            workers: Vec::new(),
            probe: Probe::new(),
        }
    }

    /// `heads` heads `head-0`... with [`TIMING`] and `head_args`, each
    /// ready before any worker starts, then `workers` workers; returns
    /// once every worker is attached to exactly one head.
    async fn start(heads: usize, workers: usize, head_args: &[&str]) -> Scene {
        let mut scene = Scene::empty();
        for i in 0..heads {
            scene.add_head(&head_id(i), head_args).await;
        }
        let spawning = Instant::now();
        scene.add_workers(0..workers).await;
        let spawned = spawning.elapsed();
        let settle_within = START_TIMEOUT + Duration::from_millis(100) * workers as u32;
        scene.settle(settle_within).await;
        eprintln!(
            "{heads} heads, {workers} workers: spawned in {spawned:?}, all attached {:?} later",
            spawning.elapsed() - spawned
        );
        scene
    }

    /// Starts one head and waits until it is registered (ready).
    async fn add_head(&mut self, id: &str, head_args: &[&str]) {
        let args: Vec<&str> = TIMING.iter().chain(head_args).copied().collect();
        let head = ok(self.cluster.spawn_head(id, &args));
        if let Err(e) = wait_serving(head.addr, HEAD_SERVICE, START_TIMEOUT).await {
            panic!("{e}\nlog of {id}:\n{}", head.log_tail(20));
        }
        self.heads.push(Member::from(head));
    }

    /// Starts workers `worker-<i>` for each i, one after the other (each
    /// listens before the next starts, so that the machine is not asked
    /// to start 300 debug-build processes at once); does not wait until
    /// they are attached.
    async fn add_workers(&mut self, ids: std::ops::Range<usize>) {
        for i in ids {
            ok(self.cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
        }
        self.workers = self.cluster.workers().map(Member::from).collect();
    }

    /// The heads other than `gone`.
    fn heads_except(&self, gone: &[&str]) -> Vec<Member> {
        self.heads
            .iter()
            .filter(|h| !gone.contains(&h.id.as_str()))
            .cloned()
            .collect()
    }

    /// What every head and worker says now.
    async fn view(&mut self) -> View {
        View::take(&mut self.probe, &self.heads, &self.workers).await
    }

    /// Waits until every worker is attached to exactly one of all heads.
    async fn settle(&mut self, within: Duration) -> View {
        settle(&mut self.probe, &self.heads, &self.workers, within).await
    }

    /// Waits until every worker is attached to exactly one of `heads`.
    async fn settle_on(&mut self, heads: &[Member], within: Duration) -> View {
        settle(&mut self.probe, heads, &self.workers, within).await
    }

    fn addr(&self, id: &str) -> SocketAddr {
        self.cluster.process(id).expect("a process").addr
    }

    fn log_tail(&self, id: &str) -> String {
        self.cluster.process(id).expect("a process").log_tail(30)
    }

    /// Polls, without blocking the runtime, until `id` exits.
    async fn wait_exit(&mut self, id: &str, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self
                .cluster
                .process_mut(id)
                .expect("a process")
                .exit_status();
            if status.is_some() || Instant::now() >= deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that `head` left the registry: its lease key is gone and
    /// the heads set does not name it.
    fn assert_left_registry(&self, head: &str) {
        let redis = self.cluster.redis();
        let key = format!("{{tether}}:head:{head}");
        let exists = ok(redis.command(&["EXISTS", &key]));
        let members = ok(redis.command(&["SMEMBERS", "{tether}:heads"]));
        let listed = strings(&members);
        assert!(
            exists == Reply::Integer(0) && !listed.iter().any(|h| h == head),
            "{head} is still in the registry: EXISTS {key} = {exists:?}, SMEMBERS {{tether}}:heads = {listed:?}"
        );
    }
}

/// The strings of an array reply; empty for anything else.
fn strings(reply: &Reply) -> Vec<String> {
    match reply {
        Reply::Array(Some(items)) => items
            .iter()
            .filter_map(|i| match i {
                Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// How many workers each head lists, by head id.
fn loads(view: &View) -> BTreeMap<String, usize> {
    view.listings
        .iter()
        .map(|(h, l)| (h.clone(), l.as_ref().map_or(0, |l| l.workers.len())))
        .collect()
}

/// The `n` heads with the most workers, busiest first.
fn busiest(view: &View, n: usize) -> Vec<String> {
    let mut by_load: Vec<(String, usize)> = loads(view).into_iter().collect();
    by_load.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    by_load.into_iter().take(n).map(|(h, _)| h).collect()
}

/// The status of each worker attached to one of `heads`.
fn workers_on(view: &View, heads: &[&str]) -> BTreeMap<String, WorkerStatus> {
    view.statuses
        .iter()
        .filter_map(|(w, s)| s.as_ref().ok().map(|s| (w, s)))
        .filter(|(_, s)| heads.contains(&s.head_id.as_str()))
        .map(|(w, s)| (w.clone(), s.clone()))
        .collect()
}

/// Every worker's (head, epoch, reassignments).
fn placements(view: &View) -> BTreeMap<String, (String, u64, u64)> {
    view.statuses
        .iter()
        .filter_map(|(w, s)| s.as_ref().ok().map(|s| (w, s)))
        .map(|(w, s)| (w.clone(), (s.head_id.clone(), s.epoch, s.reassignments)))
        .collect()
}

/// Polls the `orphans` until each is attached to a head not in `left`
/// under a higher epoch, for at most `within` after `since`. Returns when
/// each was first seen moved and its status then. Panics, with what it
/// saw, if one is late.
async fn wait_moved(
    scene: &mut Scene,
    left: &[&str],
    orphans: &BTreeMap<String, WorkerStatus>,
    since: Instant,
    within: Duration,
) -> BTreeMap<String, (Duration, WorkerStatus)> {
    let orphans: BTreeMap<String, Orphan> = orphans
        .iter()
        .map(|(w, s)| {
            let orphan = Orphan {
                addr: scene.addr(w),
                epoch_before: s.epoch,
            };
            (w.clone(), orphan)
        })
        .collect();
    let Moves { moved, late } =
        moves::wait_moved(&mut scene.probe, left, &orphans, since, within).await;
    if !late.is_empty() {
        let logs: Vec<String> = left
            .iter()
            .map(|h| format!("log of {h}:\n{}", scene.log_tail(h)))
            .collect();
        panic!(
            "workers of {left:?} not attached elsewhere under a higher epoch within {within:?}:\n{}\nmoved after: {:?}\n{}",
            late.join("\n"),
            moved.iter().map(|(w, (t, _))| (w, t)).collect::<BTreeMap<_, _>>(),
            logs.join("\n")
        );
    }
    moved
}

/// The slowest of the move times.
fn slowest(moved: &BTreeMap<String, (Duration, WorkerStatus)>) -> Duration {
    moved.values().map(|(t, _)| *t).max().unwrap_or_default()
}

/// Lets the freshly settled cluster beat for five intervals, so that each
/// worker's longest HeadBeat gap so far is an ordinary one, and returns
/// the view then.
async fn steady(scene: &mut Scene) -> View {
    tokio::time::sleep(INTERVAL * 5).await;
    scene.settle(Duration::from_secs(2)).await
}

/// What a drain must achieve, checked after `victim` was told to drain at
/// `since` while `orphans` were attached to it: every orphan moves
/// within 2 s, exactly once, with no gap between HeadBeats over 1.5
/// intervals; the head exits 0 within 3 s (its drain timeout is far
/// longer) and has left the registry; the rest of the cluster settles on
/// the other heads and no other worker moved.
async fn check_drain(
    scene: &mut Scene,
    victim: &str,
    before: &View,
    orphans: &BTreeMap<String, WorkerStatus>,
    since: Instant,
) {
    let moved = wait_moved(scene, &[victim], orphans, since, Duration::from_secs(2)).await;
    let status = scene.wait_exit(victim, Duration::from_secs(3)).await;
    let exited_after = since.elapsed();
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{victim} should exit 0 within 3 s of the drain (drain timeout 20 s), got {status:?} after {exited_after:?}; log:\n{}",
        scene.log_tail(victim)
    );
    scene.assert_left_registry(victim);

    let survivors = scene.heads_except(&[victim]);
    let after = scene.settle_on(&survivors, Duration::from_secs(3)).await;
    let mut gaps: Vec<(u64, u64, String)> = Vec::new();
    for (w, b) in orphans {
        let a = after.status(w).expect("settled views have statuses");
        assert_eq!(
            a.reassignments,
            b.reassignments + 1,
            "{w} should have moved exactly once\nbefore: {b:?}\nafter: {a:?}"
        );
        gaps.push((a.max_head_beat_gap_ms, b.max_head_beat_gap_ms, w.clone()));
    }
    for w in &scene.workers {
        if orphans.contains_key(&w.id) {
            continue;
        }
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch),
            (&b.head_id, b.epoch),
            "{} was not on {victim} but moved",
            w.id
        );
    }
    gaps.sort();
    let worst = gaps.last().map_or(0, |g| g.0);
    eprintln!(
        "drain of {victim}: {} workers moved, slowest seen moved after {:?}, head exited 0 after {exited_after:?}; max HeadBeat gap per moved worker (after, before) ms: {:?}",
        moved.len(),
        slowest(&moved),
        gaps.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>()
    );
    // Only gaps the drain opened count: `before` is the worst gap the
    // worker saw before it began.
    let over: Vec<&(u64, u64, String)> = gaps
        .iter()
        .filter(|g| g.0 > g.1 && g.0 >= MAX_HANDOFF_GAP_MS)
        .collect();
    assert!(
        over.is_empty(),
        "the drain opened HeadBeat gaps of 3 intervals ({MAX_HANDOFF_GAP_MS} ms) or more (after ms, before ms, worker): {over:?}; worst {worst} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_every_worker_over_without_a_gap_and_exits_early() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(3, 60, &["--drain-timeout", "20s"]).await;
    let before = steady(&mut scene).await;
    let victim = busiest(&before, 1).remove(0);
    let orphans = workers_on(&before, &[&victim]);
    assert!(!orphans.is_empty(), "no head has workers:\n{before}");

    let sent_at = Instant::now();
    ok(scene
        .cluster
        .process_mut(&victim)
        .expect("a head")
        .terminate());
    check_drain(&mut scene, &victim, &before, &orphans, sent_at).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_rpc_hands_every_worker_over_and_reports_their_count() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(3, 30, &["--drain-timeout", "20s"]).await;
    let before = steady(&mut scene).await;
    let victim = busiest(&before, 1).remove(0);
    let orphans = workers_on(&before, &[&victim]);
    let listed = loads(&before)[&victim];
    assert!(!orphans.is_empty(), "no head has workers:\n{before}");

    let sent_at = Instant::now();
    let mut client = head_client(scene.addr(&victim));
    let answer = tokio::time::timeout(Duration::from_secs(2), client.drain(DrainRequest {}))
        .await
        .unwrap_or_else(|_| panic!("Drain on {victim} did not answer"))
        .unwrap_or_else(|s| panic!("Drain on {victim}: {s:?}"))
        .into_inner();
    let expected_deadline = tether::registry::now_ms() + 20_000;
    assert_eq!(
        (answer.head_id.as_str(), answer.workers as usize),
        (victim.as_str(), listed),
        "Drain answer {answer:?}; the head listed {listed} workers just before"
    );
    assert!(
        (answer.deadline_ms - expected_deadline).abs() < 2_000,
        "Drain deadline {} should be about now + 20 s ({expected_deadline})",
        answer.deadline_ms
    );
    check_drain(&mut scene, &victim, &before, &orphans, sent_at).await;
}

/// Asks `addr` to adopt a worker that is not running; returns the status
/// the head answered with.
async fn reassign_stranger(addr: SocketAddr) -> tonic::Status {
    let mut client = head_client(addr);
    let request = ReassignRequest {
        worker_id: "stranger".into(),
        worker_addr: String::new(),
        previous_head_id: String::new(),
        reason: ReassignReason::Startup as i32,
        ..ReassignRequest::default()
    };
    match tokio::time::timeout(Duration::from_secs(2), client.reassign(request)).await {
        Ok(Ok(answer)) => panic!("{addr} adopted a stranger: {:?}", answer.into_inner()),
        Ok(Err(status)) => status,
        Err(_) => panic!("Reassign on {addr} did not answer within 2 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_head_refuses_new_workers_and_is_unready_but_alive_until_it_exits() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // One head: its workers have nowhere to go, so the drain lasts until
    // its timeout and there is time to look at the draining head.
    let mut scene = Scene::start(1, 2, &["--drain-timeout", "3s"]).await;
    let head = "head-0";
    let addr = scene.addr(head);
    let before = scene.view().await;

    let mut client = head_client(addr);
    let drain = async |client: &mut tether::pb::head_service_client::HeadServiceClient<
        tonic::transport::Channel,
    >| {
        tokio::time::timeout(Duration::from_secs(2), client.drain(DrainRequest {}))
            .await
            .unwrap_or_else(|_| panic!("Drain on {head} did not answer"))
            .unwrap_or_else(|s| panic!("Drain on {head}: {s:?}"))
            .into_inner()
    };
    let started = Instant::now();
    let first = drain(&mut client).await;
    assert_eq!(first.workers, 2, "Drain answer {first:?}\n{before}");
    let again = drain(&mut client).await;
    assert_eq!(
        again.deadline_ms, first.deadline_ms,
        "a second Drain should give the same deadline: {first:?} then {again:?}"
    );

    // The lease says so too, soon after (the RPC only throws the switch).
    let key = format!("{{tether}}:head:{head}");
    let mut state = None;
    let redis = scene.cluster.redis();
    let marked = wait_until(
        Duration::from_secs(1),
        Duration::from_millis(10),
        async || {
            let answer = ok(redis.command(&["HGET", &key, "state"]));
            let done = answer == Reply::Bulk(Some(b"draining".to_vec()));
            state = Some(answer);
            done
        },
    )
    .await;
    assert!(marked, "HGET {key} state 1 s after Drain: {state:?}");
    let refusal = reassign_stranger(addr).await;
    assert!(
        refusal.code() == tonic::Code::FailedPrecondition && refusal.message().contains("draining"),
        "Reassign on a draining head: {:?}: {}",
        refusal.code(),
        refusal.message()
    );

    // Readiness goes NOT_SERVING at once and stays so; liveness answers
    // SERVING every time it answers, until the process is gone.
    let mut readiness: Vec<(Duration, String)> = Vec::new();
    let mut liveness: Vec<(Duration, String)> = Vec::new();
    let mut probe = Probe::new();
    let mut mid_drain: Option<View> = None;
    let exit = loop {
        if let Some(status) = scene
            .cluster
            .process_mut(head)
            .expect("a head")
            .exit_status()
        {
            break status;
        }
        let t = started.elapsed();
        assert!(
            t < Duration::from_secs(8),
            "{head} still runs {t:?} after Drain (drain timeout 3 s)"
        );
        let show = |r: tether_testkit::localcluster::Result<ServingStatus>| match r {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("error: {e}"),
        };
        readiness.push((t, show(probe.health(addr, HEAD_SERVICE).await)));
        liveness.push((t, show(probe.health(addr, "").await)));
        if mid_drain.is_none() && t > Duration::from_millis(1500) {
            mid_drain = Some(scene.view().await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    assert_eq!(
        exit.code(),
        Some(0),
        "{head} exit after its drain timeout; log:\n{}",
        scene.log_tail(head)
    );
    assert!(
        took >= Duration::from_millis(2900),
        "{head} exited {took:?} after Drain although its workers could not move (drain timeout 3 s)"
    );

    let answered = |samples: &[(Duration, String)]| -> Vec<(Duration, String)> {
        samples
            .iter()
            .filter(|(_, s)| !s.starts_with("error"))
            .cloned()
            .collect()
    };
    let ready = answered(&readiness);
    let live = answered(&liveness);
    let first_unready = ready.iter().position(|(_, s)| s == "NotServing");
    assert!(
        first_unready.is_some_and(|i| ready[i].0 < Duration::from_secs(1))
            && ready[first_unready.unwrap()..]
                .iter()
                .all(|(_, s)| s == "NotServing"),
        "readiness during the drain should turn NOT_SERVING within 1 s and stay so: {ready:?}"
    );
    assert!(
        live.len() >= 20 && live.iter().all(|(_, s)| s == "Serving"),
        "liveness during the drain should answer SERVING until exit: {liveness:?}"
    );
    // The workers stayed with the head while it drained (nowhere to go).
    let mid = mid_drain.expect("the drain lasted over 1.5 s");
    assert!(
        mid.problems().is_empty(),
        "workers should stay attached to the draining head while no other head exists: {:?}\n{mid}",
        mid.problems()
    );
    eprintln!(
        "drain of the only head: exit 0 after {took:?}; readiness NOT_SERVING first seen at {:?}; {} liveness answers, all SERVING; last answers {:?} / {:?}",
        first_unready.map(|i| ready[i].0),
        live.len(),
        readiness.last(),
        liveness.last()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_every_surviving_head_stays_within_the_load_bound() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let workers = 200;
    let mut scene = Scene::start(4, workers, &[]).await;
    let before = scene.view().await;
    let victim = busiest(&before, 1).remove(0);
    let orphans = workers_on(&before, &[&victim]);

    let killed_at = Instant::now();
    ok(scene.cluster.process_mut(&victim).expect("a head").kill());
    let moved = wait_moved(
        &mut scene,
        &[&victim],
        &orphans,
        killed_at,
        Duration::from_secs(5),
    )
    .await;
    let survivors = scene.heads_except(&[&victim]);
    let after = scene.settle_on(&survivors, Duration::from_secs(5)).await;
    let bound = (125 * workers).div_ceil(100 * 3);
    let over: Vec<(String, usize)> = loads(&after)
        .into_iter()
        .filter(|(_, n)| *n > bound)
        .collect();
    eprintln!(
        "SIGKILL of {victim}: loads before {:?}, after {:?}; {} orphans re-attached, slowest after {:?}; bound {bound}",
        loads(&before),
        loads(&after),
        moved.len(),
        slowest(&moved)
    );
    assert!(
        over.is_empty(),
        "heads above ceil(1.25 * {workers} / 3) = {bound} after the crash of {victim}: {over:?}; all loads {:?}",
        loads(&after)
    );
    // `settle_on` already checked that every worker is listed by exactly
    // one survivor, which agrees with it on the epoch.
    assert_eq!(
        loads(&after).values().sum::<usize>(),
        workers,
        "every worker listed exactly once"
    );
}

/// Takes views until no worker's head or epoch changed for `quiet`;
/// returns the last view. Panics if the cluster is still moving after
/// `within`.
async fn wait_quiet(scene: &mut Scene, quiet: Duration, within: Duration) -> View {
    let deadline = Instant::now() + within;
    let mut view = scene.view().await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = scene.view().await;
        let changed = placements(&next)
            .iter()
            .zip(placements(&view).iter())
            .filter(|(a, b)| a != b)
            .count();
        if changed > 0 || !next.problems().is_empty() {
            since = Instant::now();
        }
        view = next;
        if since.elapsed() >= quiet && view.problems().is_empty() {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster kept changing for {within:?}: {:?}\n{view}",
            view.problems()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_head_takes_its_share_and_no_worker_moves_twice() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let workers = 300;
    let args = ["--rebalance-cooldown", "1s"];
    let mut scene = Scene::start(3, workers, &args).await;
    // Past the cool-down, and with nothing moving any more.
    let before = wait_quiet(
        &mut scene,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await;
    let churn: u64 = placements(&before).values().map(|p| p.2).sum();

    let joined_at = Instant::now();
    scene.add_head("head-3", &args).await;
    let after = wait_quiet(
        &mut scene,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await;
    let settled_after = joined_at.elapsed();

    let (b, a) = (placements(&before), placements(&after));
    let mut moved: Vec<String> = Vec::new();
    let mut twice: Vec<String> = Vec::new();
    let mut destinations: BTreeMap<String, usize> = BTreeMap::new();
    for (w, (head, epoch, moves)) in &a {
        let (old_head, old_epoch, old_moves) = &b[w];
        if epoch != old_epoch {
            moved.push(w.clone());
            *destinations.entry(head.clone()).or_default() += 1;
            if old_head == head {
                twice.push(format!("{w}: stayed on {head} under a new epoch"));
            }
        }
        if moves > &(old_moves + 1) {
            twice.push(format!("{w}: reassignments {old_moves} -> {moves}"));
        }
    }
    let new_load = loads(&after)["head-3"];
    eprintln!(
        "head-3 joined: loads before {:?}, after {:?}; {} workers moved (to {destinations:?}); quiet {settled_after:?} after the join; reassignments before the join (startup churn): {churn}",
        loads(&before),
        loads(&after),
        moved.len()
    );
    assert!(
        (56..=94).contains(&new_load),
        "the new head holds {new_load} workers, expected 56..=94 of {workers}; loads {:?}",
        loads(&after)
    );
    assert!(
        moved.len() <= 94,
        "{} workers moved when head-3 joined, expected at most 94: {destinations:?}",
        moved.len()
    );
    assert!(twice.is_empty(), "workers moved more than once: {twice:?}");
}

/// Signals two heads at once; returns when the signals were sent.
fn signal_both(scene: &mut Scene, first: (&str, bool), second: (&str, bool)) -> Instant {
    let at = Instant::now();
    for (id, kill) in [first, second] {
        let head = scene.cluster.process_mut(id).expect("a head");
        if kill {
            ok(head.kill());
        } else {
            ok(head.terminate());
        }
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_and_a_crash_at_once_leave_every_worker_on_a_survivor() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(4, 40, &["--drain-timeout", "20s"]).await;
    let before = scene.view().await;
    let gone = busiest(&before, 2);
    let (drained, crashed) = (gone[0].as_str(), gone[1].as_str());
    let orphans = workers_on(&before, &[drained, crashed]);

    let at = signal_both(&mut scene, (drained, false), (crashed, true));
    let moved = wait_moved(
        &mut scene,
        &[drained, crashed],
        &orphans,
        at,
        Duration::from_secs(4),
    )
    .await;
    let survivors = scene.heads_except(&[drained, crashed]);
    let after = scene.settle_on(&survivors, Duration::from_secs(2)).await;
    let status = scene.wait_exit(drained, Duration::from_secs(3)).await;
    eprintln!(
        "drain of {drained} with crash of {crashed}: {} workers moved, slowest after {:?}; loads {:?}; {drained} exited {status:?} after {:?}",
        moved.len(),
        slowest(&moved),
        loads(&after),
        at.elapsed()
    );
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{drained} should exit 0, got {status:?}; log:\n{}",
        scene.log_tail(drained)
    );
    scene.assert_left_registry(drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drains_at_once_leave_every_worker_on_a_survivor() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(4, 40, &["--drain-timeout", "20s"]).await;
    let before = scene.view().await;
    let gone = busiest(&before, 2);
    let (a, b) = (gone[0].as_str(), gone[1].as_str());
    let orphans = workers_on(&before, &[a, b]);

    let at = signal_both(&mut scene, (a, false), (b, false));
    let moved = wait_moved(&mut scene, &[a, b], &orphans, at, Duration::from_secs(4)).await;
    let survivors = scene.heads_except(&[a, b]);
    let after = scene.settle_on(&survivors, Duration::from_secs(2)).await;
    let status_a = scene.wait_exit(a, Duration::from_secs(3)).await;
    let status_b = scene.wait_exit(b, Duration::from_secs(1)).await;
    eprintln!(
        "drains of {a} and {b}: {} workers moved, slowest after {:?}; loads {:?}; exits {status_a:?} {status_b:?} by {:?}",
        moved.len(),
        slowest(&moved),
        loads(&after),
        at.elapsed()
    );
    for (id, status) in [(a, status_a), (b, status_b)] {
        assert!(
            status.is_some_and(|s| s.code() == Some(0)),
            "{id} should exit 0, got {status:?}; log:\n{}",
            scene.log_tail(id)
        );
        scene.assert_left_registry(id);
    }
    // A worker sent to the other draining head just before that head
    // began its drain is adopted there and sent on: two moves at most.
    let mut twice = Vec::new();
    for (w, s) in &orphans {
        let now = after.status(w).expect("settled");
        let moves = now.reassignments - s.reassignments;
        assert!(
            (1..=2).contains(&moves),
            "{w} should have moved once, or twice through the other draining head\nbefore: {s:?}\nafter: {now:?}"
        );
        if moves == 2 {
            twice.push(w.clone());
        }
    }
    eprintln!("drains of {a} and {b}: moved twice (through the other draining head): {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_the_last_head_wait_after_its_drain_and_attach_to_a_new_head() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(1, 3, &["--drain-timeout", "1s"]).await;
    let at = Instant::now();
    ok(scene
        .cluster
        .process_mut("head-0")
        .expect("a head")
        .terminate());
    let status = scene.wait_exit("head-0", Duration::from_secs(4)).await;
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "the last head should exit 0 after its drain timeout (1 s), got {status:?} after {:?}; log:\n{}",
        at.elapsed(),
        scene.log_tail("head-0")
    );
    let exited_after = at.elapsed();

    // With no head left the workers are unattached, and stay alive.
    let addrs: Vec<SocketAddr> = scene.workers.iter().map(|w| w.addr).collect();
    let mut last: Vec<String> = Vec::new();
    let probe = &mut scene.probe;
    let detached = wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        async || {
            last.clear();
            for addr in &addrs {
                match probe.worker_status(*addr).await {
                    Ok(s) if !s.attached => {}
                    Ok(s) => last.push(format!("{s:?}")),
                    Err(e) => last.push(e.to_string()),
                }
            }
            last.is_empty()
        },
    )
    .await;
    assert!(
        detached,
        "workers still attached after the last head left: {last:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for w in scene.workers.clone() {
        let s = ok(scene.probe.worker_status(w.addr).await);
        assert!(!s.attached, "{} attached with no head running: {s:?}", w.id);
    }

    let started = Instant::now();
    scene.add_head("head-1", &[]).await;
    let heads = scene.heads_except(&["head-0"]);
    let after = scene.settle_on(&heads, Duration::from_secs(5)).await;
    eprintln!(
        "last head drained: exited 0 after {exited_after:?}; workers attached to head-1 {:?} after it started; loads {:?}",
        started.elapsed(),
        loads(&after)
    );
}

/// One round of [`Sampler`]: what each head listed, `None` if it did not
/// answer in time, and when each answer came.
#[derive(Debug)]
struct Round {
    /// When the round's calls went out.
    at: Duration,
    lists: BTreeMap<String, Option<BTreeSet<String>>>,
    /// When each head's answer (or its timeout) came. A call sent to a
    /// stopped head is answered when it wakes, up to 150 ms after `at`:
    /// what it lists is the head's state then, not at `at`.
    answered: BTreeMap<String, Duration>,
}

/// Samples every head's `ListWorkers` every 50 ms, all heads at once and
/// each call bounded, so that a stopped head delays nobody.
struct Sampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Round>>,
}

impl Sampler {
    fn start(heads: &[Member]) -> Sampler {
        let clients: Vec<(String, _)> = heads
            .iter()
            .map(|h| (h.id.clone(), head_client(h.addr)))
            .collect();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut rounds = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(50));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !*stopped.borrow_and_update() {
                ticks.tick().await;
                let at = started.elapsed();
                let mut calls = tokio::task::JoinSet::new();
                for (id, client) in &clients {
                    let (id, mut client) = (id.clone(), client.clone());
                    calls.spawn(async move {
                        let call = client.list_workers(tether::pb::ListWorkersRequest::default());
                        let answer = tokio::time::timeout(Duration::from_millis(150), call).await;
                        let answered = started.elapsed();
                        let list = match answer {
                            Ok(Ok(l)) => Some(
                                l.into_inner()
                                    .workers
                                    .into_iter()
                                    .map(|w| w.worker_id)
                                    .collect(),
                            ),
                            _ => None,
                        };
                        (id, list, answered)
                    });
                }
                let mut lists = BTreeMap::new();
                let mut answered = BTreeMap::new();
                for (id, list, when) in calls.join_all().await {
                    answered.insert(id.clone(), when);
                    lists.insert(id, list);
                }
                rounds.push(Round {
                    at,
                    lists,
                    answered,
                });
            }
            rounds
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Vec<Round> {
        let _ = self.stop.send(true);
        self.task.await.expect("the sampler does not panic")
    }
}

/// Workers listed by two heads in two consecutive rounds: longer than a
/// handoff. Two rounds whose answers came within `SAME_MOMENT` of each
/// other saw one moment, not two: a call sent to a stopped head waits for
/// it to wake, and the next round's call then reaches it in the same
/// few milliseconds, before it let go of the workers that left.
fn shared_too_long(rounds: &[Round]) -> Vec<String> {
    /// Half the sampling period: rounds answered closer than this saw
    /// the same moment.
    const SAME_MOMENT: Duration = Duration::from_millis(25);
    let shared = |r: &Round| -> BTreeMap<String, Vec<String>> {
        let mut by_worker: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (head, list) in &r.lists {
            for w in list.iter().flatten() {
                by_worker.entry(w.clone()).or_default().push(head.clone());
            }
        }
        by_worker.retain(|_, heads| heads.len() > 1);
        by_worker
    };
    let mut out = Vec::new();
    for pair in rounds.windows(2) {
        let (a, b) = (shared(&pair[0]), shared(&pair[1]));
        for (w, heads) in &b {
            if let Some(earlier) = a.get(w) {
                let seen_a = earlier.iter().map(|h| pair[0].answered[h]).max();
                let seen_b = heads.iter().map(|h| pair[1].answered[h]).min();
                let (Some(seen_a), Some(seen_b)) = (seen_a, seen_b) else {
                    continue;
                };
                if seen_b.saturating_sub(seen_a) < SAME_MOMENT {
                    continue;
                }
                out.push(format!(
                    "{w} listed by {earlier:?} in answers up to {seen_a:?} and by {heads:?} in answers from {seen_b:?} (rounds sent at {:?} and {:?})",
                    pair[0].at, pair[1].at
                ));
            }
        }
    }
    out
}

/// The check itself: two answers a sampling period apart that both list a
/// worker on two heads are reported; a late answer from a waking head and
/// the next round's, milliseconds apart, are one moment (seen in CI, where
/// the round sent at 1.868 s got head-2's answer after its SIGCONT at
/// 2.000 s, and the next round's at 2.003 s).
#[test]
fn shared_too_long_counts_moments_by_when_the_answers_came() {
    let ms = Duration::from_millis;
    let round = |at: u64, answered: [(&str, u64); 2]| Round {
        at: ms(at),
        lists: answered
            .iter()
            .map(|(h, _)| {
                (
                    h.to_string(),
                    Some(BTreeSet::from(["worker-02".to_string()])),
                )
            })
            .collect(),
        answered: answered
            .iter()
            .map(|(h, t)| (h.to_string(), ms(*t)))
            .collect(),
    };
    let late = [
        round(1868, [("head-1", 1870), ("head-2", 2001)]),
        round(2003, [("head-1", 2004), ("head-2", 2005)]),
    ];
    assert!(
        shared_too_long(&late).is_empty(),
        "{:?}",
        shared_too_long(&late)
    );
    let two_moments = [
        round(1950, [("head-1", 1952), ("head-2", 1953)]),
        round(2000, [("head-1", 2002), ("head-2", 2003)]),
    ];
    assert_eq!(shared_too_long(&two_moments).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_hung_past_its_lease_holds_no_worker_when_it_wakes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // What is checked here is that the woken head takes no worker back
    // by itself; continuous balance hands it workers on purpose once
    // they are out of their cool-down (tests/balance.rs), so keep them in it.
    let mut scene = Scene::start(3, 30, &["--rebalance-cooldown", "60s"]).await;
    let before = scene.view().await;
    let victim = busiest(&before, 1).remove(0);
    let orphans = workers_on(&before, &[&victim]);
    let sampler = Sampler::start(&scene.heads);

    // Hung for 2 s: past its 1 s lease and the 800 ms heartbeat timeout.
    let stopped_at = Instant::now();
    ok(scene.cluster.process_mut(&victim).expect("a head").stop());
    let moved = wait_moved(
        &mut scene,
        &[&victim],
        &orphans,
        stopped_at,
        Duration::from_secs(2),
    )
    .await;
    let pause = Duration::from_secs(2).saturating_sub(stopped_at.elapsed());
    tokio::time::sleep(pause).await;
    let woke_at = Instant::now();
    ok(scene.cluster.process_mut(&victim).expect("a head").cont());

    let addr = scene.addr(&victim);
    let mut held = None;
    let probe = &mut scene.probe;
    let empty = wait_until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        async || match probe.list_workers(addr).await {
            Ok(l) => {
                held = Some(
                    l.workers
                        .iter()
                        .map(|w| w.worker_id.clone())
                        .collect::<Vec<_>>(),
                );
                l.workers.is_empty()
            }
            Err(e) => {
                held = Some(vec![e.to_string()]);
                false
            }
        },
    )
    .await;
    let emptied_after = woke_at.elapsed();
    assert!(
        empty,
        "{victim} still lists {held:?} 2 s after SIGCONT; log:\n{}",
        scene.log_tail(&victim)
    );
    // Keep sampling a while after waking: it must take nobody back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rounds = sampler.finish().await;
    let after = scene.settle(Duration::from_secs(2)).await;
    let kept = loads(&after)[&victim];
    let woke = woke_at.duration_since(stopped_at);
    let victim_after_wake: Vec<&Round> = rounds
        .iter()
        .filter(|r| r.at > woke && r.lists[&victim].as_ref().is_some_and(|l| !l.is_empty()))
        .collect();
    let unanswered = rounds
        .iter()
        .filter(|r| r.lists.values().any(Option::is_none))
        .count();
    eprintln!(
        "SIGSTOP of {victim} for {woke:?}: {} workers moved, slowest after {:?}; after SIGCONT its list was empty within {emptied_after:?}; {} rounds sampled ({unanswered} with a head not answering), {} rounds after waking where {victim} listed workers: {:?}",
        moved.len(),
        slowest(&moved),
        rounds.len(),
        victim_after_wake.len(),
        victim_after_wake.iter().map(|r| (r.at, &r.lists[&victim])).collect::<Vec<_>>()
    );
    assert_eq!(
        kept, 0,
        "{victim} holds workers again after waking\n{after}"
    );
    let shared = shared_too_long(&rounds);
    assert!(
        shared.is_empty(),
        "workers attached to two heads for longer than a handoff:\n{}",
        shared.join("\n")
    );
    // The check means something only if the woken head was sampled.
    let awake_rounds = rounds
        .iter()
        .filter(|r| r.at > woke && r.lists[&victim].is_some())
        .count();
    assert!(
        awake_rounds >= 10,
        "only {awake_rounds} rounds saw {victim} answer after it woke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_shorter_than_the_heartbeat_timeout_moves_no_worker() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::start(3, 30, &[]).await;
    let before = wait_quiet(&mut scene, Duration::from_secs(1), Duration::from_secs(15)).await;
    let head = busiest(&before, 1).remove(0);
    // A worker of another head hiccups at the same time.
    let worker = before
        .statuses
        .iter()
        .find(|(_, s)| s.as_ref().is_ok_and(|s| s.head_id != head))
        .map(|(w, _)| w.clone())
        .expect("a worker on another head");

    for id in [&head, &worker] {
        ok(scene.cluster.process_mut(id).expect("a process").stop());
    }
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in [&head, &worker] {
        ok(scene.cluster.process_mut(id).expect("a process").cont());
    }
    let paused = stopped_at.elapsed();
    // Several heartbeat timeouts later, nothing moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = scene.settle(Duration::from_secs(2)).await;
    let (b, a) = (placements(&before), placements(&after));
    let moved: Vec<String> = a
        .iter()
        .filter(|(w, p)| b[*w] != **p)
        .map(|(w, p)| format!("{w}: {:?} -> {p:?}", b[w]))
        .collect();
    eprintln!(
        "SIGSTOP of {head} and {worker} for {paused:?}: {} workers moved",
        moved.len()
    );
    assert!(
        moved.is_empty(),
        "a {paused:?} pause of {head} and {worker} (timeout 800 ms) moved workers (head, epoch, reassignments):\n{}",
        moved.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_never_holds_more_than_its_capacity() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut scene = Scene::empty();
    scene.add_head("head-0", &["--capacity", "5"]).await;
    let sampler = Sampler::start(&scene.heads);
    scene.add_workers(0..8).await;

    // Five attach; three find the head full and keep retrying.
    let mut last = None;
    let mut probe = Probe::new();
    let (heads, workers) = (scene.heads.clone(), scene.workers.clone());
    let five = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            let view = View::take(&mut probe, &heads, &workers).await;
            let attached = view
                .statuses
                .values()
                .filter(|s| s.as_ref().is_ok_and(|s| s.attached))
                .count();
            let done = attached == 5 && loads(&view)["head-0"] == 5;
            last = Some(view);
            done
        },
    )
    .await;
    let view = last.expect("checked once");
    assert!(
        five,
        "expected exactly 5 of 8 workers attached to head-0 (capacity 5):\n{view}"
    );

    let refusal = reassign_stranger(scene.addr("head-0")).await;
    assert!(
        refusal.code() == tonic::Code::ResourceExhausted
            && refusal.message().contains("capacity of 5"),
        "Reassign on a head at its capacity: {:?}: {}",
        refusal.code(),
        refusal.message()
    );

    // A second head takes the rest; the capped head still holds 5.
    scene.add_head("head-1", &[]).await;
    let after = scene.settle(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rounds = sampler.finish().await;
    let peak = rounds
        .iter()
        .filter_map(|r| r.lists["head-0"].as_ref().map(BTreeSet::len))
        .max()
        .unwrap_or(0);
    eprintln!(
        "capacity 5: peak listed {peak} over {} samples; loads with a second head {:?}; refusal: {}",
        rounds.len(),
        loads(&after),
        refusal.message()
    );
    assert!(
        peak <= 5,
        "head-0 (capacity 5) listed {peak} workers at one point"
    );
    assert!(
        loads(&after)["head-0"] <= 5,
        "head-0 (capacity 5) holds more than 5:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_head_takes_its_share_again() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let args = ["--rebalance-cooldown", "1s"];
    let mut scene = Scene::start(2, 20, &args).await;
    wait_quiet(
        &mut scene,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await;

    // head-1 crashes: everyone ends on head-0.
    ok(scene.cluster.process_mut("head-1").expect("head-1").kill());
    let survivors = scene.heads_except(&["head-1"]);
    scene.settle_on(&survivors, Duration::from_secs(5)).await;
    drop(scene.cluster.remove("head-1"));
    scene.heads.retain(|h| h.id != "head-1");

    // It comes back under the same id, as a new process: a paused head
    // would be left alone, a restarted one gets its share again.
    scene.add_head("head-1", &args).await;
    let after = wait_quiet(
        &mut scene,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await;
    let load = loads(&after).get("head-1").copied().unwrap_or(0);
    eprintln!("after head-1 restarted: loads {:?}", loads(&after));
    assert!(
        (4..=16).contains(&load),
        "the restarted head holds {load} of 20 workers; expected its share (4..=16); loads {:?}",
        loads(&after)
    );
}
