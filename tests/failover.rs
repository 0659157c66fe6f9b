//! A head that crashes (SIGKILL) or hangs (SIGSTOP) loses its workers to
//! the other heads quickly, under new epochs, and a hung head that wakes
//! up does not end up sharing a worker with another head.
//!
//! These tests measure time, so they run one at a time: two of them side
//! by side on a two-core machine would measure each other.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{wait_until, Cluster, Probe};
use tether_testkit::moves::{self, Moves, Orphan};
use tether_testkit::ONE_AT_A_TIME;

/// The head with the most workers, and the epoch of each of them.
fn busiest(view: &View) -> (String, BTreeMap<String, u64>) {
    let head = view
        .listings
        .iter()
        .max_by_key(|(_, l)| l.as_ref().map_or(0, |l| l.workers.len()))
        .map(|(h, _)| h.clone())
        .expect("there are heads");
    let orphans = view
        .workers_of(&head)
        .into_iter()
        .map(|w| {
            let epoch = view.status(&w).expect("answered").epoch;
            (w, epoch)
        })
        .collect();
    (head, orphans)
}

/// Polls the orphans until each is attached to another head under a
/// higher epoch, for at most `within` after `since`; returns when each was
/// first seen moved. Panics, with what it saw, if one is late.
async fn wait_moved(
    cluster: &Cluster,
    victim: &str,
    orphans: &BTreeMap<String, u64>,
    since: Instant,
    within: Duration,
) -> BTreeMap<String, Duration> {
    let orphans: BTreeMap<String, Orphan> = orphans
        .iter()
        .map(|(w, epoch)| {
            let addr = cluster.process(w).expect("a worker").addr;
            let orphan = Orphan {
                addr,
                epoch_before: *epoch,
            };
            (w.clone(), orphan)
        })
        .collect();
    let Moves { moved, late } =
        moves::wait_moved(&mut Probe::new(), &[victim], &orphans, since, within).await;
    let moved: BTreeMap<String, Duration> = moved.into_iter().map(|(w, (t, _))| (w, t)).collect();
    assert!(
        late.is_empty(),
        "orphans of {victim} not attached elsewhere under a higher epoch within {within:?}:\n{}\nmoved: {moved:?}",
        late.join("\n")
    );
    moved
}

#[tokio::test]
async fn sigkill_of_a_head_moves_its_workers_within_two_seconds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster(3, 30).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    let (victim, orphans) = busiest(&before);
    assert!(!orphans.is_empty(), "no head has workers:\n{before}");

    let killed_at = Instant::now();
    cluster
        .process_mut(&victim)
        .expect("a head")
        .kill()
        .unwrap_or_else(|e| panic!("{e}"));
    let moved = wait_moved(
        &cluster,
        &victim,
        &orphans,
        killed_at,
        Duration::from_secs(2),
    )
    .await;
    let slowest = moved.values().max().copied().unwrap_or_default();
    eprintln!(
        "{} orphans of {victim} moved; slowest after {slowest:?}",
        moved.len()
    );

    // The survivors agree with every worker, none lists a worker twice,
    // and only the orphans moved.
    let survivors: Vec<Member> = heads.iter().filter(|h| h.id != victim).cloned().collect();
    let after = settle(&mut probe, &survivors, &workers, Duration::from_secs(3)).await;
    for w in &workers {
        let (b, a) = (before.status(&w.id).unwrap(), after.status(&w.id).unwrap());
        if !orphans.contains_key(&w.id) {
            assert_eq!(
                (&a.head_id, a.epoch),
                (&b.head_id, b.epoch),
                "{} was not on {victim} but moved\nbefore:\n{before}\nafter:\n{after}",
                w.id
            );
        }
    }
}

#[tokio::test]
async fn sigstop_of_a_head_moves_its_workers_and_sigcont_shares_none() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster(3, 12).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    let (victim, orphans) = busiest(&before);
    assert!(!orphans.is_empty(), "no head has workers:\n{before}");

    // A hung machine: the sockets stay open, nothing answers. Workers can
    // only notice the silence, so they get the heartbeat timeout (600 ms)
    // plus one second.
    let stopped_at = Instant::now();
    let head = cluster.process_mut(&victim).expect("a head");
    head.stop().unwrap_or_else(|e| panic!("{e}"));
    let within = Duration::from_millis(600) + Duration::from_secs(1);
    let moved = wait_moved(&cluster, &victim, &orphans, stopped_at, within).await;
    let slowest = moved.values().max().copied().unwrap_or_default();
    eprintln!(
        "{} orphans of {victim} moved; slowest after {slowest:?}",
        moved.len()
    );

    // The head wakes up still holding streams it thinks are open. Within
    // about a second it must notice they are dead, so that no worker is
    // listed by two heads and every worker's Status matches the one head
    // listing it.
    cluster
        .process_mut(&victim)
        .expect("a head")
        .cont()
        .unwrap_or_else(|e| panic!("{e}"));
    let after = settle(&mut probe, &heads, &workers, Duration::from_millis(1500)).await;
    let kept = after.listings[&victim].as_ref().map(|l| l.workers.len());
    assert_eq!(kept, Ok(0), "the woken head still lists workers\n{after}");

    // And it stays that way: the woken head takes nobody back by itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = View::take(&mut probe, &heads, &workers).await;
    assert!(
        later.problems().is_empty(),
        "{:?}\n{later}",
        later.problems()
    );
    for w in &workers {
        let (a, l) = (after.status(&w.id).unwrap(), later.status(&w.id).unwrap());
        assert_eq!(
            (&a.head_id, a.epoch),
            (&l.head_id, l.epoch),
            "{} moved after the cluster settled\n{after}\n{later}",
            w.id
        );
    }
}

/// What `docs/failure-model.md` says of a pause, precisely: a worker times
/// the silence from the last HeadBeat it received, not from the start of
/// the pause, so a pause of P moves a worker once P plus the time since
/// that beat exceeds the heartbeat timeout. A pause shorter than the
/// timeout but longer than the timeout less one interval can therefore
/// move workers; a pause shorter than the timeout less one interval never
/// does (`scaling.rs::a_pause_shorter_than_the_heartbeat_timeout_moves_no_worker`).
///
/// Beats every 1 s, timeout 1.5 s: the head is stopped for 1.1 s, just
/// before its next beat is due (its workers' last beat at least 600 ms
/// old), so they hear nothing for at least 1.7 s and move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_shorter_than_the_timeout_moves_workers_whose_last_beat_was_older_than_the_rest() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const ARGS: &[&str] = &[
        "--heartbeat-interval",
        "1s",
        "--heartbeat-timeout",
        "1500ms",
        "--lease-ttl",
        "3s",
        "--shutdown-timeout",
        "2s",
    ];
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), ARGS));
    }
    for h in cluster.heads() {
        ok(tether_testkit::localcluster::wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    for i in 0..4 {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let before = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    let mut before = before;
    // On a loaded machine the stop can land just after the head's beat
    // went out; then nobody heard silence for the timeout, nobody may
    // move, and the attempt proves nothing: try again (at most 3 times).
    for attempt in 1..=3 {
        let (victim, orphans) = busiest(&before);
        let witness = orphans
            .keys()
            .next()
            .expect("the busiest head has a worker")
            .clone();
        let witness_addr = workers
            .iter()
            .find(|w| w.id == witness)
            .expect("a worker")
            .addr;

        // Stop the head once its next beat is due within 400 ms.
        let mut age = 0;
        let due = wait_until(
            Duration::from_secs(5),
            Duration::from_millis(5),
            async || {
                age = probe
                    .worker_status(witness_addr)
                    .await
                    .map_or(0, |s| s.last_head_beat_age_ms);
                age >= 600
            },
        )
        .await;
        assert!(
            due,
            "{witness}'s last beat never got 600 ms old (last seen {age} ms)"
        );
        ok(cluster.process_mut(&victim).expect("a head").stop());
        let stopped = Instant::now();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        ok(cluster.process_mut(&victim).expect("a head").cont());
        let paused = stopped.elapsed();
        assert!(
            paused < Duration::from_millis(1500),
            "the pause lasted {paused:?}, not shorter than the 1.5 s timeout: it proves nothing"
        );

        let after = settle(&mut probe, &heads, &workers, Duration::from_secs(10)).await;
        let moved: Vec<&String> = orphans
            .iter()
            .filter(|(w, epoch)| after.status(w).is_some_and(|s| s.epoch > **epoch))
            .map(|(w, _)| w)
            .collect();
        eprintln!(
            "attempt {attempt}: {victim} stopped {paused:?} (timeout 1.5 s, interval 1 s) with {witness}'s last beat {age} ms old: {} of {} moved",
            moved.len(),
            orphans.len()
        );
        if !moved.is_empty() {
            return;
        }
        before = after;
    }
    panic!("in 3 attempts, a pause under the timeout never moved a worker whose last beat was old");
}
