//! `make demo`: a throwaway Redis, three heads and twelve workers as real
//! local processes; shows who is attached to whom, kills one head with
//! SIGKILL and times how long each of its workers took to be attached to
//! another head, then drains another head with SIGTERM and shows each of
//! its workers' handoff time and longest gap between head beats.
//!
//! Every process it starts is stopped when it ends, also on Ctrl-C or
//! SIGTERM: they belong to a [`Cluster`], which kills them when dropped.
//!
//! Run it with `make demo`, or `cargo build --release --bins --examples`
//! then `target/release/examples/demo`. Arguments are passed to every
//! head, e.g. `demo --heartbeat-interval 200ms --heartbeat-timeout 600ms`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tether::pb::WorkerStatus;
use tether::registry::now_ms;
use tether::shutdown::{self, Signal};
use tether_testkit::localcluster::{self, Binaries, Cluster, Probe};

const HEADS: usize = 3;
const WORKERS: usize = 12;
/// How often each moving worker's `Status` is polled after the kill.
const POLL: Duration = Duration::from_millis(10);
/// Bound on start-up: every head ready, every worker attached.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the failover of the killed head's workers.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> ExitCode {
    let head_args: Vec<String> = std::env::args().skip(1).collect();
    if head_args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: demo [HEAD FLAGS...]   (flags are passed to every tether-head)");
        return ExitCode::SUCCESS;
    }
    let binaries = match Binaries::beside_current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Tether demo: {HEADS} heads, {WORKERS} workers; one head is killed with SIGKILL, then another drained with SIGTERM.\n");
    let mut cluster = match Cluster::start(binaries) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (outcome, interrupted) = tokio::select! {
        r = run(&mut cluster, &head_args) => (r, None),
        s = shutdown::signal() => (Ok(false), Some(s)),
    };
    print!("\nStopping everything the demo started (redis-server, heads, workers) ...");
    let _ = std::io::stdout().flush();
    drop(cluster);
    println!(" done.");
    match (outcome, interrupted) {
        (_, Some(signal)) => {
            // The shell's convention for "ended by a signal": 128 + its number.
            let (what, code) = match signal {
                Signal::Interrupt => ("Ctrl-C", 130),
                Signal::Terminate => ("SIGTERM", 143),
            };
            eprintln!("demo: interrupted by {what}");
            ExitCode::from(code)
        }
        (Ok(true), None) => ExitCode::SUCCESS,
        (Ok(false), None) => ExitCode::FAILURE,
        (Err(e), None) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A process the demo talks to.
#[derive(Debug, Clone)]
struct Member {
    id: String,
    addr: SocketAddr,
}

/// What happened to one of the killed head's workers.
#[derive(Debug)]
struct Move {
    worker: String,
    before: WorkerStatus,
    /// The first `Status` that showed it attached to another head, and
    /// when the poll saw it; `None` if that did not happen in time.
    after: Option<(WorkerStatus, Duration)>,
}

/// Runs the demo; returns whether every worker of the killed head was
/// attached again in time.
async fn run(cluster: &mut Cluster, head_args: &[String]) -> Result<bool, Error> {
    println!(
        "redis-server  {}  (throwaway: no persistence, gone at the end)",
        cluster.redis().url()
    );
    if !head_args.is_empty() {
        println!("head flags    {}", head_args.join(" "));
    }

    let extra: Vec<&str> = head_args.iter().map(String::as_str).collect();
    for i in 1..=HEADS {
        cluster.spawn_head(&format!("head-{i}"), &extra)?;
    }
    let heads = members(cluster.heads().map(|p| (&p.id, p.addr)));
    for head in &heads {
        if let Err(e) =
            localcluster::wait_serving(head.addr, "tether.v1.HeadService", START_TIMEOUT).await
        {
            return Err(with_log(cluster, &head.id, e.to_string()).into());
        }
    }
    println!(
        "heads ready   {}",
        join(heads.iter().map(|h| format!("{} {}", h.id, h.addr)))
    );

    // Workers get no Redis address: each knows one head to start from
    // (round robin) and learns the others from it with ListHeads.
    let started = Instant::now();
    for i in 1..=WORKERS {
        let bootstrap = heads[(i - 1) % heads.len()].addr.to_string();
        cluster.spawn_worker(&format!("worker-{i:02}"), &["--heads", &bootstrap])?;
    }
    let workers = members(cluster.workers().map(|p| (&p.id, p.addr)));
    println!("workers       no Redis address; each knows one head (--heads) and learns the rest with ListHeads");
    print!("workers       {WORKERS} started; waiting until all are attached ...");
    let _ = std::io::stdout().flush();
    let mut probe = Probe::new();
    let mut unattached = Vec::new();
    let all_attached =
        localcluster::wait_until(START_TIMEOUT, Duration::from_millis(20), async || {
            unattached.clear();
            for w in &workers {
                if !matches!(probe.worker_status(w.addr).await, Ok(s) if s.attached) {
                    unattached.push(w.id.clone());
                }
            }
            unattached.is_empty()
        })
        .await;
    if !all_attached {
        println!();
        let first = unattached.first().cloned().unwrap_or_default();
        let message = format!(
            "not attached after {START_TIMEOUT:?}: {}",
            unattached.join(", ")
        );
        return Err(with_log(cluster, &first, message).into());
    }
    println!(" done in {} ms", started.elapsed().as_millis());

    println!("\nWho is attached to whom (each head's ListWorkers):");
    let table = attachments(&mut probe, &heads).await?;
    print_attachments(&heads, &table);

    let before = statuses(&mut probe, &workers).await?;
    // The head with the most workers, so that the kill moves as many
    // workers as possible.
    let (victim, moving) = busiest(&heads, &workers, &table);

    let pid = cluster
        .process(&victim.id)
        .map(|p| p.pid())
        .unwrap_or_default();
    println!(
        "\nKilling {} (pid {pid}) with SIGKILL; {} workers were attached to it.",
        victim.id,
        moving.len()
    );
    let killed_ms = now_ms();
    let killed_at = Instant::now();
    cluster
        .process_mut(&victim.id)
        .ok_or("the head to kill is gone")?
        .kill()?;

    // One task per moving worker, each polling only its own worker.
    let mut watchers = tokio::task::JoinSet::new();
    for w in &moving {
        let (w, victim_id) = (w.clone(), victim.id.clone());
        watchers.spawn(async move {
            let mut probe = Probe::new();
            while killed_at.elapsed() < FAILOVER_TIMEOUT {
                if let Ok(s) = probe.worker_status(w.addr).await {
                    if s.attached && s.head_id != victim_id {
                        return (w.id, Some((s, killed_at.elapsed())));
                    }
                }
                tokio::time::sleep(POLL).await;
            }
            (w.id, None)
        });
    }
    let mut moves = Vec::new();
    while let Some(joined) = watchers.join_next().await {
        let (worker, after) = joined?;
        let before = before[&worker].clone();
        moves.push(Move {
            worker,
            before,
            after,
        });
    }
    moves.sort_by(|a, b| a.worker.cmp(&b.worker));

    println!(
        "\nFailover of {}'s workers (each worker's Status polled every {} ms):",
        victim.id,
        POLL.as_millis()
    );
    print_moves(&moves, killed_ms);
    let done: Vec<(&WorkerStatus, Duration)> = moves
        .iter()
        .filter_map(|m| m.after.as_ref().map(|(s, seen)| (s, *seen)))
        .collect();
    let all_moved = done.len() == moves.len();
    if !done.is_empty() {
        println!(
            "  {} of {} attached to another head {} after the kill; the poll saw it after {}.",
            done.len(),
            moves.len(),
            range_ms(
                done.iter()
                    .map(|(s, _)| attached_after(s, killed_ms) as u128)
            ),
            range_ms(done.iter().map(|(_, seen)| seen.as_millis()))
        );
    }
    if !all_moved {
        println!(
            "  {} did not attach to another head within {FAILOVER_TIMEOUT:?}.",
            moves.len() - done.len()
        );
    }

    let survivors: Vec<Member> = heads
        .iter()
        .filter(|h| h.id != victim.id)
        .cloned()
        .collect();
    let stayers: Vec<Member> = workers
        .iter()
        .filter(|w| !moving.iter().any(|m| m.id == w.id))
        .cloned()
        .collect();
    let now = statuses(&mut probe, &stayers).await?;
    let wandered: Vec<&String> = stayers
        .iter()
        .map(|w| &w.id)
        .filter(|id| {
            let (a, b) = (&before[*id], &now[*id]);
            a.head_id != b.head_id || a.epoch != b.epoch || !b.attached
        })
        .collect();
    if wandered.is_empty() {
        println!(
            "  The other {} workers stayed attached where they were (same head, same epoch).",
            stayers.len()
        );
    } else {
        println!(
            "  Of the other workers, these changed head or epoch too: {}",
            join(wandered.iter())
        );
    }

    println!("\nWho is attached to whom now:");
    let table = attachments(&mut probe, &survivors).await?;
    print_attachments(&survivors, &table);

    let drained = drain(cluster, &mut probe, &survivors, &workers, &table, head_args).await?;
    Ok(all_moved && drained)
}

/// Scale-down: SIGTERM the busiest surviving head and show its workers
/// moving make-before-break: each one's handoff time and the longest gap
/// between two head beats it saw, across the handoff.
async fn drain(
    cluster: &mut Cluster,
    probe: &mut Probe,
    heads: &[Member],
    workers: &[Member],
    table: &BTreeMap<String, Vec<String>>,
    head_args: &[String],
) -> Result<bool, Error> {
    let interval = head_args
        .iter()
        .position(|a| a == "--heartbeat-interval")
        .and_then(|i| head_args.get(i + 1))
        .and_then(|v| tether::config::parse_duration(v).ok())
        .unwrap_or(Duration::from_secs(1));
    let (victim, moving) = busiest(heads, workers, table);
    // Let every worker see a few beats first, so the gap measure covers
    // ordinary beats as well as the handoff.
    tokio::time::sleep(interval * 2).await;
    println!(
        "\nDraining {} with SIGTERM; {} workers are attached to it.",
        victim.id,
        moving.len()
    );
    let sent_ms = now_ms();
    let sent_at = Instant::now();
    let head = cluster
        .process_mut(&victim.id)
        .ok_or("the head to drain is gone")?;
    head.terminate()?;
    let status = head.wait_exit(FAILOVER_TIMEOUT);
    let exited_after = sent_at.elapsed();
    let after = statuses(probe, &moving).await?;
    println!(
        "  {:<10} {:<8} {:<8} {:>15}  {:>22}  {:>12}",
        "worker", "from", "to", "handed over in", "longest gap in beats", "missed beats"
    );
    let mut ok = true;
    let mut missed_total = 0;
    for w in &moving {
        let s = &after[&w.id];
        let moved = s.attached && s.head_id != victim.id;
        ok &= moved;
        // A beat is missed when the gap between two beats exceeds 1.5
        // intervals; each further interval of silence is another.
        let gap = Duration::from_millis(s.max_head_beat_gap_ms);
        let missed = if gap > interval * 3 / 2 {
            (gap.as_secs_f64() / interval.as_secs_f64()).round() as u64 - 1
        } else {
            0
        };
        missed_total += missed;
        println!(
            "  {:<10} {:<8} {:<8} {:>12} ms  {:>19} ms  {:>12}",
            w.id,
            victim.id,
            if moved { s.head_id.as_str() } else { "-" },
            (s.attached_since_ms - sent_ms).max(0),
            s.max_head_beat_gap_ms,
            missed
        );
    }
    println!(
        "  (heartbeat interval {} ms; longest gap: between two HeadBeats, across the handoff)",
        interval.as_millis()
    );
    match status {
        Some(code) => println!(
            "  {} exited after {} ms ({code}); {missed_total} beats missed in all.",
            victim.id,
            exited_after.as_millis()
        ),
        None => {
            ok = false;
            println!("  {} did not exit within {FAILOVER_TIMEOUT:?}.", victim.id);
        }
    }
    Ok(ok && missed_total == 0)
}

fn members<'a>(it: impl Iterator<Item = (&'a String, SocketAddr)>) -> Vec<Member> {
    it.map(|(id, addr)| Member {
        id: id.clone(),
        addr,
    })
    .collect()
}

fn join(items: impl Iterator<Item = impl std::fmt::Display>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// `message`, followed by the end of the log of process `id`.
fn with_log(cluster: &Cluster, id: &str, message: String) -> String {
    match cluster.process(id) {
        Some(p) => format!("{message}\nthe log of {id} ends with:\n{}", p.log_tail(15)),
        None => message,
    }
}

/// Each head's attached workers, by head id, as its `ListWorkers` says.
async fn attachments(
    probe: &mut Probe,
    heads: &[Member],
) -> Result<BTreeMap<String, Vec<String>>, Error> {
    let mut table = BTreeMap::new();
    for h in heads {
        let answer = probe.list_workers(h.addr).await?;
        let ids = answer.workers.into_iter().map(|w| w.worker_id).collect();
        table.insert(h.id.clone(), ids);
    }
    Ok(table)
}

/// Each worker's `Status`, by worker id.
async fn statuses(
    probe: &mut Probe,
    workers: &[Member],
) -> Result<BTreeMap<String, WorkerStatus>, Error> {
    let mut out = BTreeMap::new();
    for w in workers {
        out.insert(w.id.clone(), probe.worker_status(w.addr).await?);
    }
    Ok(out)
}

fn print_attachments(heads: &[Member], table: &BTreeMap<String, Vec<String>>) {
    println!(
        "  {:<8} {:<17} {:>7}  attached workers",
        "head", "address", "workers"
    );
    for h in heads {
        let ids = &table[&h.id];
        println!(
            "  {:<8} {:<17} {:>7}  {}",
            h.id,
            h.addr,
            ids.len(),
            ids.join(" ")
        );
    }
}

fn print_moves(moves: &[Move], killed_ms: i64) {
    let epochs: Vec<String> = moves
        .iter()
        .map(|m| match &m.after {
            Some((s, _)) => format!("{} -> {}", m.before.epoch, s.epoch),
            None => format!("{} -> -", m.before.epoch),
        })
        .collect();
    let width = epochs.iter().map(String::len).max().unwrap_or(0).max(5);
    println!(
        "  {:<10} {:<8} {:<8} {:<width$}  {:>14}  {:>12}",
        "worker", "from", "to", "epoch", "attached after", "seen by poll"
    );
    for (m, epoch) in moves.iter().zip(&epochs) {
        match &m.after {
            Some((s, seen)) => println!(
                "  {:<10} {:<8} {:<8} {:<width$}  {:>11} ms  {:>9} ms",
                m.worker,
                m.before.head_id,
                s.head_id,
                epoch,
                attached_after(s, killed_ms),
                seen.as_millis()
            ),
            None => println!(
                "  {:<10} {:<8} {:<8} {:<width$}  {:>14}  {:>12}",
                m.worker, m.before.head_id, "-", epoch, "not attached", "-"
            ),
        }
    }
    println!(
        "  (attached after: the worker's own attached_since_ms minus the time of the kill;\n   seen by poll: when the first Status poll showed it attached elsewhere)"
    );
}

/// Milliseconds from the kill until the worker's new attachment began, by
/// the worker's own clock (the same machine's).
fn attached_after(status: &WorkerStatus, killed_ms: i64) -> i64 {
    (status.attached_since_ms - killed_ms).max(0)
}

/// `a ms` or `a to b ms`.
fn range_ms(values: impl Iterator<Item = u128>) -> String {
    let values: Vec<u128> = values.collect();
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => format!("{lo} ms"),
        (Some(lo), Some(hi)) => format!("{lo} to {hi} ms"),
        _ => "-".into(),
    }
}

/// The head with the most workers (the first one on a tie), and its
/// workers.
fn busiest(
    heads: &[Member],
    workers: &[Member],
    table: &BTreeMap<String, Vec<String>>,
) -> (Member, Vec<Member>) {
    let victim = heads
        .iter()
        .max_by_key(|h| (table[&h.id].len(), std::cmp::Reverse(h.id.clone())))
        .expect("there are heads")
        .clone();
    let moving = workers
        .iter()
        .filter(|w| table[&victim.id].contains(&w.id))
        .cloned()
        .collect();
    (victim, moving)
}
