//! Chaos at scale with real processes: four heads and two hundred
//! `tether-worker` processes, and a seeded schedule of head crashes
//! (SIGKILL), hangs long enough for a lease to lapse (SIGSTOP, later
//! SIGCONT), drains (SIGTERM) and new heads (the next free id) that
//! workers are rebalanced onto.
//!
//! What it proves:
//! - While it runs: no worker is listed by two heads in two consecutive
//!   samples, about 250 ms apart (a make-before-break handoff may overlap
//!   once).
//! - At quiescence (every hung head resumed, every drained head gone):
//!   every worker's `Status` agrees with exactly one live head's
//!   `ListWorkers` (same head, same epoch) and with Redis, and no head
//!   lists a worker that is not streaming to it. The test waits for this
//!   with a generous deadline, never a fixed sleep.
//!
//!   Quiescence includes the rebalance: a head redirects a worker to a new
//!   head only once it has been attached for the cool-down (10 s), so the
//!   check waits until no worker moved for the cool-down plus a lease TTL.
//!   A look taken while that rebalance runs, every head's `ListWorkers`
//!   first and the workers' `Status` after, shows workers whose `Status`
//!   names the new head while the new head does not list them and the old
//!   head lists them at their older epoch: each call saw a different
//!   moment, not a broken cluster (what issue 16 reported, 8 s after its
//!   last step).
//! - No process panics; a head that got SIGTERM exits 0; no worker exits.
//!
//! Replaying: each run prints its seed and its schedule.
//! `TETHER_CHAOS_SEED=N` replays seed N, `TETHER_CHAOS_SCHEDULE="kill h0,
//! stop h3, new h4, ..."` plays a schedule as written (the seed then only
//! picks the pauses between steps), and `TETHER_CHAOS_SEEDS=N` runs N
//! fresh seeds (`make chaos SEEDS=N`; `make test` runs a few).
//! `issue_16_schedule_leaves_every_worker_on_one_head` plays the schedule
//! of issue 16 as filed.

mod common;

use common::chaos::{
    fresh_seed, members, panics_in, sample, seed_from_env, wait_agreement, DoubleListings, Record,
    Rng,
};
use common::{binaries, ok, HEAD_SERVICE};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether::registry::now_ms;
use tether_testkit::localcluster::{wait_serving, Cluster, Role, Signal};

/// The timings of issue 16: beats every 200 ms, a silent peer is gone
/// after 1 s, a hung head's lease lapses after 2 s.
const HEAD_ARGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "1s",
    "--lease-ttl",
    "2s",
    "--drain-timeout",
    "5s",
    "--shutdown-timeout",
    "2s",
];
const LEASE_TTL: Duration = Duration::from_secs(2);
/// The heads' default `--rebalance-cooldown`: a worker that attached more
/// recently is not yet redirected to a new head.
const REBALANCE_COOLDOWN: Duration = Duration::from_secs(10);
/// Quiescence: no worker attached (moved) for this long, so no rebalance
/// is still due: the cool-down, a lease TTL for the rebalance loop's next
/// read, and a second of slack.
const QUIET_FOR: Duration = REBALANCE_COOLDOWN
    .saturating_add(LEASE_TTL)
    .saturating_add(Duration::from_secs(1));

/// Two hundred workers on a loaded two-core machine: dial and call with
/// some patience, and retry at most every second so that a cluster with
/// no head to take them does not spin.
const WORKER_ARGS: &[&str] = &["--connect-timeout", "1s", "--max-backoff", "1s"];
const WORKERS: usize = 200;
const FIRST_HEADS: usize = 4;
/// Never more heads alive at once.
const MAX_HEADS: usize = 7;

/// Steps of a seeded schedule; the last one adds a head.
const STEPS: usize = 14;
/// The pause before each step, as in issue 16.
const GAP_MS: (u64, u64) = (500, 3000);
/// A hung head is resumed by the schedule only after its lease lapsed;
/// quiescence resumes the rest.
const STOP_AT_LEAST: Duration = Duration::from_millis(2500);

/// SIGTERM (or SIGCONT of a head that got it while hung) to exit, at
/// most: the drain, the shutdown, and slack for a loaded machine.
const TERM_TO_EXIT: Duration = Duration::from_secs(5 + 2 + 8);
/// Bound on reaching agreement once the cluster is quiet: failover,
/// reclaims, and the rebalance onto the newest heads (cool-down, rate)
/// on a machine running two hundred and some processes.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);
/// Samples are at least this far apart.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Bound on one probe call while sampling (a hung head must not stall
/// the sampler).
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// How many fresh seeds run when `TETHER_CHAOS_SEEDS` is unset.
const DEFAULT_SEEDS: usize = 1;

/// The schedule of issue 16, as filed.
const ISSUE_16: &str = "kill h0, stop h3, new h4, new h5, stop h4, term h3, stop h4, kill h4, cont h3, stop h5, stop h1, term h5, term h5, new h6, term h6, cont h5, new h7, kill h2, cont h1, kill h7, new h8";

// Two runs at once would put four hundred workers on the machine.
use tether_testkit::ONE_AT_A_TIME;

/// One step of a schedule; `Display` writes what `parse` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Kill(String),
    Stop(String),
    Cont(String),
    Term(String),
    /// A new head, with the next free id.
    New(String),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Kill(h) => write!(f, "kill {h}"),
            Step::Stop(h) => write!(f, "stop {h}"),
            Step::Cont(h) => write!(f, "cont {h}"),
            Step::Term(h) => write!(f, "term {h}"),
            Step::New(h) => write!(f, "new {h}"),
        }
    }
}

fn parse(schedule: &str) -> Vec<Step> {
    schedule
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once(' ') {
            Some(("kill", h)) => Step::Kill(h.trim().into()),
            Some(("stop", h)) => Step::Stop(h.trim().into()),
            Some(("cont", h)) => Step::Cont(h.trim().into()),
            Some(("term", h)) => Step::Term(h.trim().into()),
            Some(("new", h)) => Step::New(h.trim().into()),
            _ => panic!("{s:?} is not a step: kill|stop|cont|term|new HEAD"),
        })
        .collect()
}

fn show(steps: &[Step]) -> String {
    steps
        .iter()
        .map(Step::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a head is, as the schedule drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stopped,
    /// Got SIGTERM; `hung` if it was stopped then (it drains once resumed).
    Terminated {
        hung: bool,
    },
    Dead,
}

/// A seeded schedule: the steps and the pause before each. Every step
/// keeps at least one head running; a hung head is resumed only once its
/// lease lapsed; the last step adds a head, so the run ends with a
/// rebalance.
fn generate(rng: &mut Rng) -> Vec<(Duration, Step)> {
    let mut heads: Vec<(State, Duration)> = vec![(State::Running, Duration::ZERO); FIRST_HEADS];
    let mut now = Duration::ZERO;
    let mut out = Vec::new();
    while out.len() < STEPS {
        let gap = rng.millis(GAP_MS.0, GAP_MS.1);
        now += gap;
        let ids = |want: &dyn Fn(State, Duration) -> bool| -> Vec<usize> {
            (0..heads.len())
                .filter(|&i| want(heads[i].0, now - heads[i].1))
                .collect()
        };
        let running = ids(&|s, _| s == State::Running);
        let stopped = ids(&|s, _| s == State::Stopped);
        let resumable = ids(&|s, age| s == State::Stopped && age >= STOP_AT_LEAST);
        let alive = ids(&|s, _| !matches!(s, State::Dead | State::Terminated { hung: false }));
        let last = out.len() + 1 == STEPS;
        let mut choices: Vec<(&str, usize)> = Vec::new();
        if last {
            choices.push(("new", 1));
        } else {
            if running.len() >= 2 {
                choices.extend([("kill", 2), ("stop", 3), ("term", 2)]);
            }
            if !stopped.is_empty() {
                choices.extend([("kill-hung", 1), ("term-hung", 1)]);
            }
            if !resumable.is_empty() {
                choices.push(("cont", 4));
            }
            if alive.len() < MAX_HEADS {
                choices.push(("new", 3));
            }
        }
        let total: usize = choices.iter().map(|(_, w)| w).sum();
        let mut pick = rng.below(total);
        let action = choices
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map(|(a, _)| *a)
            .expect("pick < total");
        let one = |rng: &mut Rng, of: &[usize]| of[rng.below(of.len())];
        let (index, step) = match action {
            "kill" => {
                let i = one(rng, &running);
                (i, Step::Kill(format!("h{i}")))
            }
            "kill-hung" => {
                let i = one(rng, &stopped);
                (i, Step::Kill(format!("h{i}")))
            }
            "stop" => {
                let i = one(rng, &running);
                (i, Step::Stop(format!("h{i}")))
            }
            "term" => {
                let i = one(rng, &running);
                (i, Step::Term(format!("h{i}")))
            }
            "term-hung" => {
                let i = one(rng, &stopped);
                (i, Step::Term(format!("h{i}")))
            }
            "cont" => {
                let i = one(rng, &resumable);
                (i, Step::Cont(format!("h{i}")))
            }
            "new" => {
                heads.push((State::Running, now));
                (heads.len() - 1, Step::New(format!("h{}", heads.len() - 1)))
            }
            other => unreachable!("{other}"),
        };
        let state = match &step {
            Step::Kill(_) => State::Dead,
            Step::Stop(_) => State::Stopped,
            Step::Cont(_) => State::Running,
            Step::Term(_) => State::Terminated {
                hung: heads[index].0 == State::Stopped,
            },
            Step::New(_) => State::Running,
        };
        heads[index] = (state, now);
        out.push((gap, step));
    }
    out
}

/// One head process as the run drives it.
struct Head {
    id: String,
    addr: SocketAddr,
    state: State,
    /// When it got SIGTERM, or was resumed after it.
    since: Instant,
}

/// One run: a fresh cluster, a schedule, the checks.
struct Run {
    cluster: Cluster,
    seed: u64,
    schedule: String,
    heads: Vec<Head>,
    workers: Vec<(String, SocketAddr)>,
    record: Record,
    doubled: DoubleListings,
    samples: usize,
}

impl Run {
    fn spawn_head(&mut self, id: &str) {
        let addr = tokio::task::block_in_place(|| ok(self.cluster.spawn_head(id, HEAD_ARGS)).addr);
        self.heads.push(Head {
            id: id.to_owned(),
            addr,
            state: State::Running,
            since: Instant::now(),
        });
    }

    fn signal(&mut self, id: &str, signal: Signal) {
        let Some(process) = self.cluster.process_mut(id) else {
            self.record
                .violation(format!("the schedule names {id}, which never ran"));
            return;
        };
        if let Err(e) = process.signal(signal) {
            // Signalling a head that already exited (a second SIGTERM to a
            // drained head) is no fault of the cluster.
            self.record
                .event(format!("SIG{} to {id} not sent: {e}", signal.name()));
        }
    }

    fn head(&mut self, id: &str) -> Option<&mut Head> {
        self.heads.iter_mut().find(|h| h.id == id)
    }

    fn apply(&mut self, step: &Step) {
        self.record.event(step.to_string());
        match step {
            Step::New(id) => self.spawn_head(id),
            Step::Kill(id) => {
                self.signal(id, Signal::Kill);
                if let Some(p) = self.cluster.process_mut(id) {
                    p.wait_exit(Duration::from_secs(2));
                }
                if let Some(h) = self.head(id) {
                    h.state = State::Dead;
                }
            }
            Step::Stop(id) => {
                self.signal(id, Signal::Stop);
                if let Some(h) = self.head(id) {
                    if h.state == State::Running {
                        h.state = State::Stopped;
                    }
                }
            }
            Step::Cont(id) => {
                self.signal(id, Signal::Cont);
                if let Some(h) = self.head(id) {
                    h.state = match h.state {
                        State::Stopped => State::Running,
                        State::Terminated { .. } => State::Terminated { hung: false },
                        other => other,
                    };
                    h.since = Instant::now();
                }
            }
            Step::Term(id) => {
                self.signal(id, Signal::Term);
                if let Some(h) = self.head(id) {
                    h.state = match h.state {
                        State::Running => State::Terminated { hung: false },
                        State::Stopped => State::Terminated { hung: true },
                        other => other,
                    };
                    h.since = Instant::now();
                }
            }
        }
    }

    /// Drained heads must exit 0 in time; nothing else may exit on its
    /// own.
    fn check_exits(&mut self) {
        let mut violations = Vec::new();
        let mut events = Vec::new();
        for h in &mut self.heads {
            if h.state == State::Dead {
                continue;
            }
            let Some(p) = self.cluster.process_mut(&h.id) else {
                continue;
            };
            match (h.state, p.exit_status()) {
                (State::Terminated { .. }, Some(status)) if status.code() == Some(0) => {
                    events.push(format!("{} exited 0", h.id));
                    h.state = State::Dead;
                }
                (State::Terminated { hung: false }, None) if h.since.elapsed() > TERM_TO_EXIT => {
                    violations.push(format!(
                        "{} still running {TERM_TO_EXIT:?} after SIGTERM; log:\n{}",
                        h.id,
                        p.log_tail(30)
                    ));
                    let _ = p.kill();
                    p.wait_exit(Duration::from_secs(2));
                    h.state = State::Dead;
                }
                (state, Some(status)) => {
                    violations.push(format!(
                        "{} ({state:?}) exited with {status}; log:\n{}",
                        h.id,
                        p.log_tail(30)
                    ));
                    h.state = State::Dead;
                }
                _ => {}
            }
        }
        for (id, _) in &self.workers {
            if let Some(status) = self.cluster.process_mut(id).and_then(|p| p.exit_status()) {
                violations.push(format!("worker {id} exited with {status}"));
            }
        }
        for e in events {
            self.record.event(e);
        }
        for v in violations {
            self.record.violation(v);
        }
    }

    /// Heads that answer: running, or draining after SIGTERM.
    fn answering(&self) -> Vec<(String, SocketAddr)> {
        self.heads
            .iter()
            .filter(|h| matches!(h.state, State::Running | State::Terminated { hung: false }))
            .map(|h| (h.id.clone(), h.addr))
            .collect()
    }

    /// Samples every `SAMPLE_EVERY` for `span`, checking double listings.
    async fn observe_for(
        &mut self,
        channels: &mut BTreeMap<SocketAddr, tonic::transport::Channel>,
        span: Duration,
    ) {
        let until = Instant::now() + span;
        loop {
            let round = Instant::now();
            self.check_exits();
            let s = sample(channels, &self.answering(), &self.workers, PROBE_TIMEOUT).await;
            self.samples += 1;
            for v in self.doubled.check(&s) {
                self.record.violation(v);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(SAMPLE_EVERY.saturating_sub(round.elapsed()).min(left)).await;
        }
    }

    /// Waits for agreement between every worker, the running heads and
    /// Redis, and, with `quiet_for`, for no worker to have moved for that
    /// long (so no rebalance is pending); returns the problems of the last
    /// look if that never comes.
    async fn settle(&mut self, within: Duration, quiet_for: Option<Duration>) -> Vec<String> {
        let heads = members(
            self.heads
                .iter()
                .filter(|h| h.state == State::Running)
                .map(|h| (&h.id, h.addr)),
        );
        let workers = members(self.workers.iter().map(|(id, addr)| (id, *addr)));
        let every = Duration::from_millis(500);
        wait_agreement(&self.cluster, &heads, &workers, (within, every), |view| {
            let Some(quiet) = quiet_for else {
                return Vec::new();
            };
            let last_move_ms = view
                .statuses
                .values()
                .filter_map(|s| s.as_ref().ok())
                .map(|s| s.attached_since_ms)
                .max()
                .unwrap_or(0);
            let since = now_ms() - last_move_ms;
            if since < quiet.as_millis() as i64 {
                // Moves (a rebalance) may still be under way.
                vec![format!(
                    "last move {since} ms ago; waiting for {quiet:?} without one"
                )]
            } else {
                Vec::new()
            }
        })
        .await
    }

    fn report(&self) -> String {
        format!(
            "seed {seed} (rerun with TETHER_CHAOS_SEED={seed})\nschedule (TETHER_CHAOS_SCHEDULE=\"{}\")\nlogs in {}\nviolations:\n  {}\ntimeline:\n  {}",
            self.schedule,
            self.cluster.log_dir().display(),
            self.record.violations.join("\n  "),
            self.record.timeline.join("\n  "),
            seed = self.seed,
        )
    }

    /// Resident memory (MiB) and CPU time (s) of the workers, summed and
    /// at most, from `/proc`.
    fn worker_cost(&self) -> String {
        let mut rss_kib = Vec::new();
        let mut cpu_ticks = Vec::new();
        for p in self.cluster.workers() {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid()));
            if let Some(kib) = status.ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            }) {
                rss_kib.push(kib);
            }
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid()));
            if let Some(ticks) = stat.ok().and_then(|s| {
                // Fields after the command's closing parenthesis; utime
                // and stime are the 14th and 15th of the whole line.
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            }) {
                cpu_ticks.push(ticks);
            }
        }
        let mib = |k: u64| k as f64 / 1024.0;
        let secs = |t: u64| t as f64 / 100.0;
        format!(
            "workers: RSS {:.0} MiB in all, {:.1} MiB at most; CPU {:.1} s in all, {:.2} s at most",
            mib(rss_kib.iter().sum()),
            mib(rss_kib.iter().copied().max().unwrap_or(0)),
            secs(cpu_ticks.iter().sum()),
            secs(cpu_ticks.iter().copied().max().unwrap_or(0)),
        )
    }
}

/// Starts the cluster, plays `steps` (with the seed's pauses, or the
/// given ones), waits for quiescence and checks it. Returns the report
/// of a failed run.
async fn play(seed: u64, steps: Vec<(Duration, Step)>) -> Result<String, String> {
    let began = Instant::now();
    let schedule = show(&steps.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>());
    eprintln!("chaos_processes: seed {seed} (rerun with TETHER_CHAOS_SEED={seed}); {FIRST_HEADS} heads, {WORKERS} workers; schedule: {schedule}");
    let mut run = Run {
        cluster: ok(Cluster::start(binaries())),
        seed,
        schedule,
        heads: Vec::new(),
        workers: Vec::new(),
        record: Record::default(),
        doubled: DoubleListings::default(),
        samples: 0,
    };
    for i in 0..FIRST_HEADS {
        run.spawn_head(&format!("h{i}"));
    }
    for h in &run.heads {
        if let Err(e) = wait_serving(h.addr, HEAD_SERVICE, Duration::from_secs(15)).await {
            return Err(format!("{e}\n{}", run.report()));
        }
    }
    let ids: Vec<String> = (0..WORKERS).map(|i| format!("w{i:03}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    tokio::task::block_in_place(|| ok(run.cluster.spawn_all(Role::Worker, &ids, WORKER_ARGS)));
    run.workers = run
        .cluster
        .workers()
        .map(|p| (p.id.clone(), p.addr))
        .collect();
    let problems = run.settle(SETTLE_WITHIN, None).await;
    if !problems.is_empty() {
        return Err(format!(
            "the cluster did not settle before the schedule:\n{}\n{}",
            problems.join("\n"),
            run.report()
        ));
    }
    let started = began.elapsed();

    let mut channels = BTreeMap::new();
    run.record.start = Some(Instant::now());
    for (gap, step) in &steps {
        run.observe_for(&mut channels, *gap).await;
        run.apply(step);
    }
    // Quiescence: resume every hung head, let the drains finish.
    let hung: Vec<String> = run
        .heads
        .iter()
        .filter(|h| matches!(h.state, State::Stopped | State::Terminated { hung: true }))
        .map(|h| h.id.clone())
        .collect();
    for id in hung {
        run.apply(&Step::Cont(id));
    }
    let calm = Instant::now();
    while run
        .heads
        .iter()
        .any(|h| matches!(h.state, State::Terminated { .. }))
        && calm.elapsed() < TERM_TO_EXIT + Duration::from_secs(1)
    {
        run.observe_for(&mut channels, SAMPLE_EVERY).await;
    }
    if !run.heads.iter().any(|h| h.state == State::Running) {
        let id = format!("h{}", run.heads.len());
        run.apply(&Step::New(id));
    }
    // A lease TTL for the dead heads to leave the registry, sampled.
    run.observe_for(&mut channels, LEASE_TTL).await;
    let quiet = Instant::now();
    let problems = run.settle(SETTLE_WITHIN, Some(QUIET_FOR)).await;
    let settled_in = quiet.elapsed();
    if !problems.is_empty() {
        run.record.violation(format!(
            "no agreement between Redis, heads and workers within {SETTLE_WITHIN:?} of quiescence:\n{}",
            problems.join("\n")
        ));
    } else {
        run.record
            .event(format!("agreement {settled_in:?} after quiescence"));
    }
    run.check_exits();
    let mut panics = Vec::new();
    for p in run.cluster.heads().chain(run.cluster.workers()) {
        panics.extend(
            panics_in(p.log_path())
                .into_iter()
                .map(|l| format!("{}: {l}", p.id)),
        );
    }
    for p in panics {
        run.record.violation(format!("panic: {p}"));
    }
    eprintln!(
        "chaos_processes: seed {seed}: {} ({} violations): cluster up in {started:?}, {} samples, {} one-sample double listings (handoffs), agreement {settled_in:?} after quiescence, {:?} in all; {}",
        if run.record.violations.is_empty() { "passed" } else { "FAILED" },
        run.record.violations.len(),
        run.samples,
        run.doubled.seen,
        began.elapsed(),
        run.worker_cost(),
    );
    if run.record.violations.is_empty() {
        Ok(format!("seed {seed}: passed in {:?}", began.elapsed()))
    } else {
        // The cluster removes its logs when dropped (this run does not
        // panic, the next may still run): keep a copy.
        let kept = keep_logs(run.cluster.log_dir(), seed);
        Err(format!("{}\nlogs copied to {kept}", run.report()))
    }
}

/// Copies a failed run's logs under Cargo's temporary directory for
/// tests; returns where, or why not.
fn keep_logs(dir: &std::path::Path, seed: u64) -> String {
    let to =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-processes-{seed}"));
    let copied = std::fs::create_dir_all(&to).and_then(|()| {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
        Ok(())
    });
    match copied {
        Ok(()) => to.display().to_string(),
        Err(e) => format!("nowhere ({e}); they were in {}", dir.display()),
    }
}

/// Pauses for `steps` from `seed`, each within `GAP_MS`.
fn gaps(seed: u64, steps: Vec<Step>) -> Vec<(Duration, Step)> {
    let mut rng = Rng(seed);
    steps
        .into_iter()
        .map(|s| (rng.millis(GAP_MS.0, GAP_MS.1), s))
        .collect()
}

/// Plays each run in turn; panics with every failed run's report.
async fn play_all(runs: Vec<(u64, Vec<(Duration, Step)>)>) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for (seed, steps) in runs {
        match play(seed, steps).await {
            Ok(line) => passed.push(line),
            Err(report) => failed.push(report),
        }
    }
    eprintln!(
        "chaos_processes: {} passed, {} failed\n  {}",
        passed.len(),
        failed.len(),
        passed.join("\n  ")
    );
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_schedules_keep_each_of_200_worker_processes_on_one_head() {
    let count = std::env::var("TETHER_CHAOS_SEEDS")
        .ok()
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("TETHER_CHAOS_SEEDS={n:?} is not a count"))
        })
        .unwrap_or(DEFAULT_SEEDS);
    let seeds: Vec<u64> = match seed_from_env() {
        Some(seed) => vec![seed],
        None => (0..count).map(|_| fresh_seed()).collect(),
    };
    let written = std::env::var("TETHER_CHAOS_SCHEDULE").ok();
    let runs = seeds
        .into_iter()
        .map(|seed| {
            let steps = match &written {
                Some(s) => gaps(seed, parse(s)),
                None => generate(&mut Rng(seed)),
            };
            (seed, steps)
        })
        .collect();
    play_all(runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_16_schedule_leaves_every_worker_on_one_head() {
    let seed = seed_from_env().unwrap_or_else(fresh_seed);
    play_all(vec![(seed, gaps(seed, parse(ISSUE_16)))]).await;
}

#[test]
fn schedules_read_back_as_written_and_keep_a_head_running() {
    assert_eq!(show(&parse(ISSUE_16)), ISSUE_16);
    for seed in 0..200 {
        let steps = generate(&mut Rng(seed));
        assert_eq!(steps.len(), STEPS);
        assert!(matches!(steps.last(), Some((_, Step::New(_)))));
        let written: Vec<Step> = steps.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(parse(&show(&written)), written, "seed {seed}");
    }
}
