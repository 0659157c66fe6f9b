//! The promises "every worker attached to exactly one live head" and "two
//! heads never both count a worker", tried the way an attacker or a
//! misconfigured neighbour would break them (issue 10): fencing with
//! clock-sized epochs, one head that cannot take workers, ghost
//! assignments, duplicate worker ids, forged streams.
//!
//! Each test drives the real `tether-head` and `tether-worker` binaries
//! and a real `redis-server`, and raw gRPC calls where a hostile client
//! would make them.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tether::pb::{ListWorkersRequest, ReassignRequest, WorkerBeat};
use tether_testkit::localcluster::{head_client, wait_serving, wait_until, Cluster, Probe, Reply};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// The heartbeat interval and timeout of [`HEAD_ARGS`], and its lease.
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(600);
const LEASE_TTL: Duration = Duration::from_secs(1);

/// Slack for a loaded two-core machine on top of a protocol bound.
const SLACK: Duration = Duration::from_secs(1);

/// The tests that start dozens of processes run one at a time, so that
/// their bounds hold on two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every key in Redis.
fn all_keys(cluster: &Cluster) -> BTreeSet<String> {
    string_set("KEYS *", ok(cluster.redis().command(&["KEYS", "*"])))
}

/// The worker ids in a head's assignment hash.
fn assigned_fields(cluster: &Cluster, head: &str) -> BTreeSet<String> {
    let key = assigned_key(head);
    string_set("HKEYS", ok(cluster.redis().command(&["HKEYS", &key])))
}

/// The epoch counter.
fn epoch_counter(cluster: &Cluster) -> u64 {
    match ok(cluster.redis().command(&["GET", "{tether}:epoch"])) {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
        _ => 0,
    }
}

/// Calls `Reassign` for `worker` on the head at `addr`, as a client that
/// never opens the stream afterwards.
async fn bare_reassign(
    addr: std::net::SocketAddr,
    worker: &str,
) -> Result<tether::pb::ReassignResponse, tonic::Status> {
    let mut client = head_client(addr);
    let request = ReassignRequest {
        worker_id: worker.to_owned(),
        ..ReassignRequest::default()
    };
    match tokio::time::timeout(Duration::from_secs(5), client.reassign(request)).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => panic!("Reassign of {worker} on {addr} did not answer"),
    }
}

/// `(head, epoch)` of every head that lists `worker` right now.
async fn listings_of(probe: &mut Probe, cluster: &Cluster, worker: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for h in cluster.heads() {
        if let Ok(l) = probe.list_workers(h.addr).await {
            out.extend(
                l.workers
                    .iter()
                    .filter(|w| w.worker_id == worker)
                    .map(|w| (h.id.clone(), w.epoch)),
            );
        }
    }
    out
}

/// Waits until the registry holds only live state: a lease per live
/// head, and exactly the live workers in the assignment hashes of the
/// heads they stream to. Returns how long that took.
async fn wait_registry_live(cluster: &Cluster, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let mut problems = Vec::new();
    let clean = wait_until(within, Duration::from_millis(100), async || {
        let view = View::take(&mut probe, &heads, &workers).await;
        problems = view.problems();
        let mut expected: BTreeSet<String> = ["{tether}:heads", "{tether}:epoch"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        for h in &heads {
            expected.insert(format!("{{tether}}:head:{}", h.id));
            let want: BTreeSet<String> = view.workers_of(&h.id).into_iter().collect();
            if !want.is_empty() {
                expected.insert(assigned_key(&h.id));
            }
            let have = assigned_fields(cluster, &h.id);
            if have != want {
                problems.push(format!(
                    "{} holds {have:?} in Redis, streams {want:?}",
                    h.id
                ));
            }
        }
        let mut keys = all_keys(cluster);
        // One key each per namespace, not per id: the heads version and
        // the load digest.
        for k in ["{tether}:heads-version", "{tether}:loads"] {
            keys.remove(k);
        }
        if keys != expected {
            problems.push(format!(
                "keys beyond live state: {:?}; missing: {:?}",
                keys.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&keys).collect::<Vec<_>>()
            ));
        }
        problems.is_empty()
    })
    .await;
    assert!(
        clean,
        "{what}: the registry still holds more than live state after {within:?}: {problems:#?}"
    );
    started.elapsed()
}

// 1. Fencing with epochs seeded from the clock.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_head_closes_the_stream_of_a_worker_adopted_elsewhere() {
    // Epochs are seeded from the clock in microseconds (about 1.8e15).
    fences_with_epochs_from(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_near_2_pow_63_survive_every_script_exactly() {
    fences_with_epochs_from(Some(i64::MAX as u64 - 1_000)).await;
}

/// A worker streams to one head; another head adopts it by `Reassign`
/// (no stream follows). The first head must close the old stream within
/// two intervals, and no head may list the worker under an older epoch
/// than the registry's. `counter` presets the epoch counter.
async fn fences_with_epochs_from(counter: Option<u64>) {
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), HEAD_ARGS));
    }
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    if let Some(start) = counter {
        ok(cluster
            .redis()
            .command(&["SET", "{tether}:epoch", &start.to_string()]));
    }
    ok(cluster.spawn_worker(&worker_id(0), WORKER_ARGS));
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
    let worker = worker_id(0);
    let before = listings_of(&mut probe, &cluster, &worker).await;
    let [(old_head, old_epoch)] = before.as_slice() else {
        panic!("{worker} should be listed once: {before:?}");
    };
    assert!(
        *old_epoch > 1 << 50,
        "epochs this large are what broke the fence entries: {old_epoch}"
    );
    if let Some(start) = counter {
        assert_eq!(
            *old_epoch,
            start + 1,
            "the first epoch after the preset counter"
        );
    }
    let other = cluster
        .heads()
        .find(|h| h.id != *old_head)
        .expect("two heads");
    // Another head adopts the worker; nobody opens its stream there.
    let adopted = bare_reassign(other.addr, &worker)
        .await
        .unwrap_or_else(|s| panic!("Reassign on {}: {s:?}", other.id));
    assert_eq!(adopted.epoch, old_epoch + 1, "epochs are exact at any size");
    let started = Instant::now();
    let mut now = Vec::new();
    let fenced = wait_until(
        INTERVAL * 2 + SLACK,
        Duration::from_millis(20),
        async || {
            now = listings_of(&mut probe, &cluster, &worker).await;
            !now.iter().any(|(h, e)| h == old_head && *e == *old_epoch)
        },
    )
    .await;
    let took = started.elapsed();
    eprintln!(
        "{old_head} let go of {worker} (epoch {old_epoch}) {took:?} after {} adopted it under {}",
        other.id, adopted.epoch
    );
    assert!(
        fenced,
        "{old_head} still lists {worker} at epoch {old_epoch} {took:?} after {} adopted it under epoch {}: {now:?}\nlog of {old_head}:\n{}",
        other.id,
        adopted.epoch,
        cluster.process(old_head).expect("a head").log_tail(20)
    );
    // The worker comes back under an epoch newer than the adoption, on
    // exactly one head; no head lists it under an older one.
    let mut now = Vec::new();
    let back = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        now = listings_of(&mut probe, &cluster, &worker).await;
        matches!(now.as_slice(), [(_, e)] if *e > adopted.epoch)
    })
    .await;
    assert!(back, "{worker} after the fence: {now:?}");
}

// 2. One head that cannot take workers must not lock the others' out.

/// Two normal heads, a third started with `bad_args`, then 30 workers:
/// all must attach within twice the heartbeat timeout of the last one
/// starting (plus slack), on the normal heads or the third.
async fn thirty_workers_attach_despite(bad_args: impl FnOnce(&Cluster) -> Vec<String>) {
    let _serial = HEAVY.lock().await;
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), HEAD_ARGS));
    }
    let extra = bad_args(&cluster);
    let mut args: Vec<&str> = HEAD_ARGS.to_vec();
    args.extend(extra.iter().map(String::as_str));
    ok(cluster.spawn_head("head-bad", &args));
    for h in cluster.heads() {
        if let Err(e) = wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await {
            panic!("{e}\nlog of {}:\n{}", h.id, h.log_tail(20));
        }
    }
    for i in 0..30 {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let started = Instant::now();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let mut probe = Probe::new();
    let mut unattached = Vec::new();
    let all = wait_until(
        TIMEOUT * 2 + SLACK * 2,
        Duration::from_millis(50),
        async || {
            unattached.clear();
            for w in &workers {
                match probe.worker_status(w.addr).await {
                    Ok(s) if s.attached => {}
                    other => unattached.push(format!("{}: {other:?}", w.id)),
                }
            }
            unattached.is_empty()
        },
    )
    .await;
    let took = started.elapsed();
    eprintln!("30 workers attached {took:?} after the last one started (head-bad: {extra:?})");
    assert!(
        all,
        "{} of 30 workers unattached {took:?} after the last started, with head-bad {extra:?}: {unattached:#?}\nlog of worker-00:\n{}",
        unattached.len(),
        cluster.process("worker-00").expect("a worker").log_tail(10)
    );
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    settle(&mut probe, &heads, &workers, START_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_advertising_an_unreachable_address_locks_nobody_out() {
    thirty_workers_attach_despite(|_| vec!["--advertise".into(), "127.0.0.1:1".into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_advertising_another_heads_address_locks_nobody_out() {
    thirty_workers_attach_despite(|c| {
        let addr = c.process("head-0").expect("a head").addr;
        vec!["--advertise".into(), addr.to_string()]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_with_a_small_capacity_locks_nobody_out() {
    thirty_workers_attach_despite(|_| vec!["--capacity".into(), "3".into()]).await;
}

// 3. Ghost assignments and registry growth.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_killed_with_its_workers_leaves_nothing_in_redis() {
    let mut cluster = start_cluster(2, 6).await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let view = View::take(&mut Probe::new(), &heads, &workers).await;
    // A node loss: the head and every worker on it at once.
    let victim = "head-0";
    let mut gone = view.workers_of(victim);
    gone.push(victim.to_owned());
    for id in &gone {
        let mut p = cluster.remove(id).expect("a process");
        ok(p.kill());
        p.wait_exit(Duration::from_secs(5));
    }
    let took = wait_registry_live(
        &cluster,
        LEASE_TTL + INTERVAL * 2 + SLACK * 2,
        "after a node loss",
    )
    .await;
    eprintln!("registry back to live state {took:?} after SIGKILL of {gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoptions_without_a_stream_expire_and_do_not_fill_the_capacity() {
    let mut cluster = start_cluster_with(1, &["--capacity", "10"], 0).await;
    let addr = cluster.process("head-0").expect("a head").addr;
    // Ten made-up workers are adopted and never open their stream.
    for i in 0..10 {
        let r = bare_reassign(addr, &format!("ghost-{i}")).await;
        assert!(r.is_ok(), "Reassign of ghost-{i}: {r:?}");
    }
    // Five real workers must still get in: the ghosts expire within a
    // heartbeat timeout and an interval.
    for i in 0..5 {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    settle(
        &mut Probe::new(),
        &heads,
        &workers,
        TIMEOUT + INTERVAL * 2 + SLACK * 3,
    )
    .await;
    wait_registry_live(
        &cluster,
        TIMEOUT + INTERVAL * 2 + SLACK,
        "after ghost adoptions",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_never_reused_ids_leaves_only_live_state() {
    let _serial = HEAVY.lock().await;
    let rounds: usize = std::env::var("TETHER_CHURN_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let mut cluster = start_cluster(3, 0).await;
    let mut next_worker = 0usize;
    let mut next_head = 3usize;
    let started = Instant::now();
    for round in 0..rounds {
        // New workers under ids never seen before.
        for _ in 0..6 {
            ok(cluster.spawn_worker(&format!("pod-{next_worker:05}"), WORKER_ARGS));
            next_worker += 1;
        }
        // Some workers die without a word.
        let victims: Vec<String> = cluster.workers().map(|w| w.id.clone()).step_by(3).collect();
        for id in &victims {
            let mut p = cluster.remove(id).expect("a worker");
            ok(p.kill());
            p.wait_exit(Duration::from_secs(5));
        }
        // Every other round a head dies too, and a new one replaces it.
        if round % 2 == 1 {
            let head = cluster.heads().next().expect("a head").id.clone();
            let mut p = cluster.remove(&head).expect("a head");
            ok(p.kill());
            p.wait_exit(Duration::from_secs(5));
            let id = head_id(next_head);
            next_head += 1;
            ok(cluster.spawn_head(&id, HEAD_ARGS));
            let addr = cluster.process(&id).expect("just spawned").addr;
            ok(wait_serving(addr, HEAD_SERVICE, START_TIMEOUT).await);
        }
        let took = wait_registry_live(
            &cluster,
            LEASE_TTL + TIMEOUT + INTERVAL * 2 + SLACK * 4,
            &format!("churn round {round}"),
        )
        .await;
        eprintln!(
            "round {round}: {} heads, {} workers live, {} worker ids seen; registry clean {took:?} after the round",
            cluster.heads().count(),
            cluster.workers().count(),
            next_worker
        );
    }
    eprintln!("{rounds} churn rounds in {:?}", started.elapsed());
}

// 4. Duplicate worker ids.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_under_the_same_id_is_refused_and_the_first_undisturbed() {
    let mut cluster = start_cluster(2, 1).await;
    let id = worker_id(0);
    let first = cluster.remove(&id).expect("the first worker");
    let first_addr = first.addr;
    let mut probe = Probe::new();
    let before = ok(probe.worker_status(first_addr).await);
    let counter_before = epoch_counter(&cluster);
    // The second process under the same id; its own max backoff is 1 s.
    ok(cluster.spawn_worker(&id, &["--connect-timeout", "500ms", "--max-backoff", "1s"]));
    let second = cluster.process(&id).expect("the second worker");
    let window = Duration::from_secs(10);
    let started = Instant::now();
    let mut refused = false;
    while started.elapsed() < window {
        let s = ok(probe.worker_status(first_addr).await);
        assert!(
            s.attached && s.epoch == before.epoch && s.head_id == before.head_id,
            "the first worker was disturbed: before {before:?}, now {s:?}"
        );
        if !refused {
            let log = std::fs::read_to_string(second.log_path()).unwrap_or_default();
            refused = log.contains("ERROR") && log.contains("worker ids must be unique");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second_status = ok(probe.worker_status(second.addr).await);
    assert!(
        !second_status.attached,
        "the second process attached: {second_status:?}"
    );
    let moved = epoch_counter(&cluster) - counter_before;
    let log = std::fs::read_to_string(second.log_path()).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    eprintln!("in {window:?}: epoch counter moved {moved}; second worker's errors: {errors:#?}");
    assert!(
        refused,
        "the second worker never logged why it was refused:\n{log}"
    );
    assert_eq!(errors.len(), 1, "one clear ERROR, not a flood:\n{log}");
    assert!(
        errors[0].contains(&before.head_id) && errors[0].contains(&first_addr.to_string()),
        "the ERROR names the head and the address that hold the id: {}",
        errors[0]
    );
    assert!(
        moved <= 2,
        "the epoch counter moved {moved} times in {window:?}"
    );

    // When the first process goes away, the second takes over.
    drop(first);
    let mut last = None;
    let took_over = wait_until(TIMEOUT + SLACK * 4, Duration::from_millis(50), async || {
        last = Some(probe.worker_status(second.addr).await);
        matches!(&last, Some(Ok(s)) if s.attached)
    })
    .await;
    assert!(
        took_over,
        "the second worker after the first exited: {last:?}"
    );
}

// 5. Forged streams.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_the_assignment_secret_is_denied_and_disturbs_nobody() {
    let cluster = start_cluster(1, 1).await;
    let head = cluster.process("head-0").expect("a head");
    let worker = cluster.process(&worker_id(0)).expect("a worker");
    let mut probe = Probe::new();
    let before = ok(probe.worker_status(worker.addr).await);
    // What anyone allowed to list workers sees: the id and the epoch.
    let listed = ok(probe.list_workers(head.addr).await);
    let info = listed.workers.first().expect("one worker").clone();
    for secret in [String::new(), "0".repeat(32), "not hex at all".into()] {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WorkerBeat {
            worker_id: info.worker_id.clone(),
            epoch: info.epoch,
            stream_secret: secret.clone(),
            reassign: None,
            ..WorkerBeat::default()
        })
        .await
        .expect("the receiver is alive");
        let mut client = head_client(head.addr);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client.heartbeat(ReceiverStream::new(rx)),
        )
        .await
        .expect("an answer");
        let code = match r {
            Ok(mut s) => {
                match tokio::time::timeout(Duration::from_secs(2), s.get_mut().message()).await {
                    Ok(Err(status)) => Some(status.code()),
                    other => panic!("a forged stream (secret {secret:?}) was served: {other:?}"),
                }
            }
            Err(status) => Some(status.code()),
        };
        assert_eq!(code, Some(Code::PermissionDenied), "secret {secret:?}");
        drop(tx);
    }
    // The real worker never noticed: same head, same epoch, no move, and
    // its beats keep coming.
    tokio::time::sleep(INTERVAL * 3).await;
    let after = ok(probe.worker_status(worker.addr).await);
    assert!(
        after.attached
            && after.epoch == before.epoch
            && after.head_id == before.head_id
            && after.reassignments == before.reassignments,
        "the real worker was disturbed: before {before:?}, after {after:?}"
    );

    // A secret is never shown: adopt a worker by hand and look for its
    // secret in the listing, the metrics and the head's log.
    let adopted = bare_reassign(head.addr, "by-hand").await.expect("Reassign");
    assert_eq!(adopted.stream_secret.len(), 32, "{adopted:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(WorkerBeat {
        worker_id: "by-hand".into(),
        epoch: adopted.epoch,
        stream_secret: adopted.stream_secret.clone(),
        reassign: None,
        ..WorkerBeat::default()
    })
    .await
    .expect("the receiver is alive");
    let mut client = head_client(head.addr);
    let mut stream = client
        .heartbeat(ReceiverStream::new(rx))
        .await
        .expect("the stream with the secret is served")
        .into_inner();
    let beat = tokio::time::timeout(Duration::from_secs(2), stream.message()).await;
    assert!(matches!(beat, Ok(Ok(Some(_)))), "{beat:?}");
    let listing = client
        .list_workers(ListWorkersRequest::default())
        .await
        .expect("ListWorkers");
    assert!(!format!("{:?}", listing.get_ref()).contains(&adopted.stream_secret));
    assert!(!head.log_tail(10_000).contains(&adopted.stream_secret));
    drop(tx);
}
