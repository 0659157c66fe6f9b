//! Workers attach to heads and the heartbeat flows both ways: the
//! steady state every other behaviour starts from.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::Probe;

#[tokio::test]
async fn workers_attach_and_beats_flow_both_ways() {
    let cluster = start_cluster(2, 6).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();

    // Settled: every worker is listed by exactly one head, which is the
    // head its Status names, at the same epoch.
    let first = settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    for w in &workers {
        let mut listing = first.listings.values().flatten().flat_map(|l| &l.workers);
        let info = listing
            .find(|i| i.worker_id == w.id)
            .unwrap_or_else(|| panic!("{} not listed:\n{first}", w.id));
        assert_eq!(
            info.worker_addr,
            w.addr.to_string(),
            "head lists the address the worker reported\n{first}"
        );
        let status = first.status(&w.id).expect("settled views have statuses");
        assert!(
            status.epoch > 0,
            "{}: epoch 0 while attached\n{first}",
            w.id
        );
        assert!(
            status.attached_since_ms > 0,
            "{}: no attach time\n{first}",
            w.id
        );
    }

    // Head -> worker: for a second, the worker's last HeadBeat is never
    // older than an interval (200 ms) plus scheduling slack, well under
    // the 600 ms timeout.
    let mut worst: BTreeMap<String, u64> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        for w in &workers {
            let s = probe
                .worker_status(w.addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(s.attached, "{} detached in steady state: {s:?}", w.id);
            let age = worst.entry(w.id.clone()).or_default();
            *age = (*age).max(s.last_head_beat_age_ms);
        }
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    assert!(
        worst.values().all(|age| *age < 450),
        "oldest HeadBeat age seen per worker (interval 200ms): {worst:?}"
    );

    // Worker -> head: a second later every worker's last beat is newer
    // and its sequence grew by about five beats.
    let second = View::take(&mut probe, &heads, &workers).await;
    assert!(
        second.problems().is_empty(),
        "{:?}\n{second}",
        second.problems()
    );
    let infos = |v: &View| -> BTreeMap<String, (i64, u64, u64)> {
        v.listings
            .values()
            .flatten()
            .flat_map(|l| &l.workers)
            .map(|i| {
                (
                    i.worker_id.clone(),
                    (i.last_beat_ms, i.last_sequence, i.epoch),
                )
            })
            .collect()
    };
    let (before, after) = (infos(&first), infos(&second));
    for w in &workers {
        let (b, a) = (before[&w.id], after[&w.id]);
        assert!(
            a.0 > b.0,
            "{}: last_beat_ms did not advance: {b:?} -> {a:?}",
            w.id
        );
        assert!(
            a.1 >= b.1 + 3,
            "{}: last_sequence grew by less than 3 in over a second: {b:?} -> {a:?}",
            w.id
        );
        assert_eq!(a.2, b.2, "{}: epoch changed in steady state", w.id);
    }

    // Nobody moved while nothing failed.
    for (id, s) in &second.statuses {
        let s = s.as_ref().expect("answered");
        assert_eq!(s.reassignments, 0, "{id} moved in steady state\n{second}");
    }
}
