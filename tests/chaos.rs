//! Chaos: a seeded random schedule of head crashes (SIGKILL), hangs
//! (SIGSTOP, later SIGCONT), drains (SIGTERM), head restarts under the
//! same or a new id, scale-ups and Redis restarts, played against four
//! heads and forty workers (a hundred, for a minute, with
//! `TETHER_CHAOS_LONG=1`), while the cluster is sampled a few times a
//! second.
//!
//! What it proves, as invariants:
//! - I1, after the schedule: once a lease TTL and a heartbeat timeout
//!   (plus slack) have passed, every worker is attached to exactly one
//!   live head, and Redis (the one `{tether}:assigned:<head>` hash that
//!   names the worker, at its epoch), every
//!   head's `ListWorkers` and every worker's `Status` agree.
//! - I2, while it runs: no worker is listed by two heads in two
//!   consecutive samples (a make-before-break handoff may overlap once).
//! - I3, while it runs: no worker stays unattached longer than the
//!   heartbeat timeout plus 2 s while a head could take it (windows where
//!   Redis is down or just came back, or no head runs, do not count).
//! - I4: no process panics, no process exits on its own, and every head
//!   that got SIGTERM exits with code 0.
//!
//! The schedule depends only on the seed: it is printed at the start and
//! in every failure, and `TETHER_CHAOS_SEED=N` replays it.

mod common;

use common::chaos::{
    fresh_seed, members, panics_in, sample, seed_from_env, wait_agreement, DoubleListings, Record,
    Rng,
};
use common::{binaries, ok, HEAD_SERVICE, WORKER_ARGS};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{self, wait_serving, Cluster, Probe};
use tonic::transport::Channel;

/// Beats every 200 ms, a silent peer is gone after 800 ms, a crashed
/// head's lease lapses after 1 s; a drain lasts at most 5 s.
const HEAD_ARGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "800ms",
    "--lease-ttl",
    "1s",
    "--drain-timeout",
    "5s",
    "--shutdown-timeout",
    "2s",
];
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(800);
const LEASE_TTL: Duration = Duration::from_secs(1);
/// SIGTERM to exit, at most: the drain, the shutdown, and slack for a
/// loaded machine.
const TERM_TO_EXIT: Duration = Duration::from_secs(5 + 2 + 6);
/// I3's bound: the heartbeat timeout plus 2 s.
const UNATTACHED_LIMIT: Duration = Duration::from_millis(800 + 2000);
/// After Redis comes back, heads need a refresh to register again and
/// workers a backoff step to retry: I3 starts counting after this.
const REDIS_RECOVERY: Duration = Duration::from_millis(1500);
/// Samples are at least this far apart, so "two consecutive samples"
/// spans more than a handoff.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Bound on one probe call while sampling (a hung head must not stall
/// the sampler).
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Never more heads alive at once.
const MAX_HEADS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Running and expected to stay up.
    Running,
    /// SIGSTOPped; resumes at the pending `Resume`.
    Stopped,
    /// Got SIGTERM; must exit 0 within `TERM_TO_EXIT`.
    Draining,
    /// Killed, or drained and exited.
    Dead,
}

/// One head incarnation the schedule knows.
#[derive(Debug)]
struct Head {
    id: String,
    addr: SocketAddr,
    state: State,
    /// When it entered `state`.
    since: Instant,
}

#[derive(Debug, Clone)]
enum Pending {
    Resume(String),
    RedisUp,
}

/// The chaos run and its state.
struct Chaos {
    cluster: Cluster,
    rng: Rng,
    seed: u64,
    heads: Vec<Head>,
    next_head: usize,
    workers: Vec<(String, SocketAddr)>,
    pending: Vec<(Instant, Pending)>,
    redis_up: bool,
    redis_up_at: Instant,
    last_redis_restart: Option<Instant>,
    record: Record,
    /// Panics found in the logs of processes taken out of the cluster.
    removed_panics: Vec<String>,
    /// I3: since when each worker was seen unattached (in a counted
    /// window), and whether that episode was reported.
    unattached: BTreeMap<String, (Instant, bool)>,
    /// I2: double listings, and those of the previous sample.
    doubled: DoubleListings,
    /// Highest epoch each worker reported, to note regressions.
    epochs: BTreeMap<String, u64>,
    samples: usize,
    /// The longest counted unattached stretch seen, for the summary.
    longest_unattached: Duration,
    /// Worker samples that said unattached, for the summary.
    unattached_seen: usize,
}

impl Chaos {
    fn head(&mut self, id: &str) -> &mut Head {
        self.heads
            .iter_mut()
            .find(|h| h.id == id)
            .expect("a known head")
    }

    fn ids_in(&self, state: State) -> Vec<String> {
        self.heads
            .iter()
            .filter(|h| h.state == state)
            .map(|h| h.id.clone())
            .collect()
    }

    fn alive(&self) -> usize {
        self.heads.iter().filter(|h| h.state != State::Dead).count()
    }

    fn spawn_head(&mut self, id: &str) {
        let addr = tokio::task::block_in_place(|| ok(self.cluster.spawn_head(id, HEAD_ARGS)).addr);
        let now = Instant::now();
        match self.heads.iter_mut().find(|h| h.id == id) {
            Some(h) => {
                h.addr = addr;
                h.state = State::Running;
                h.since = now;
            }
            None => self.heads.push(Head {
                id: id.to_owned(),
                addr,
                state: State::Running,
                since: now,
            }),
        }
    }

    fn signal(&mut self, id: &str, signal: localcluster::Signal) {
        let process = self.cluster.process_mut(id).expect("a spawned head");
        if let Err(e) = process.signal(signal) {
            let tail = process.log_tail(20);
            self.record.violation(format!(
                "SIG{} to {id} failed: {e}; log:\n{tail}",
                signal.name()
            ));
        }
    }

    /// Plays one random action allowed in the current state.
    fn act(&mut self) {
        let running = self.ids_in(State::Running);
        let stopped = self.ids_in(State::Stopped);
        let dead = self.ids_in(State::Dead);
        let alive = self.alive();
        let redis_quiet = self
            .last_redis_restart
            .is_none_or(|t| t.elapsed() > Duration::from_secs(6));
        let mut choices: Vec<(&str, usize)> = Vec::new();
        if running.len() >= 2 {
            choices.push(("kill", 3));
            choices.push(("drain", 2));
            if stopped.is_empty() {
                choices.push(("stop", 2));
            }
        }
        if !dead.is_empty() && alive < MAX_HEADS {
            choices.push(("restart", 3));
        }
        if alive < MAX_HEADS {
            choices.push(("scale-up", 1));
        }
        if self.redis_up && redis_quiet {
            choices.push(("redis-restart", 1));
        }
        let total: usize = choices.iter().map(|(_, w)| w).sum();
        if total == 0 {
            self.record.event("no action possible; waiting".into());
            return;
        }
        let mut pick = self.rng.below(total);
        let action = choices
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(a, _)| *a)
            .expect("pick < total");
        let now = Instant::now();
        match action {
            "kill" => {
                let id = running[self.rng.below(running.len())].clone();
                self.signal(&id, localcluster::Signal::Kill);
                if let Some(p) = self.cluster.process_mut(&id) {
                    p.wait_exit(Duration::from_secs(2));
                }
                let h = self.head(&id);
                h.state = State::Dead;
                h.since = now;
                self.record.event(format!("SIGKILL {id}"));
            }
            "stop" => {
                let id = running[self.rng.below(running.len())].clone();
                let hang = self.rng.millis(1000, 3000);
                self.signal(&id, localcluster::Signal::Stop);
                let h = self.head(&id);
                h.state = State::Stopped;
                h.since = now;
                self.pending.push((now + hang, Pending::Resume(id.clone())));
                self.record.event(format!("SIGSTOP {id} for {hang:?}"));
            }
            "drain" => {
                let id = running[self.rng.below(running.len())].clone();
                self.signal(&id, localcluster::Signal::Term);
                let h = self.head(&id);
                h.state = State::Draining;
                h.since = now;
                self.record.event(format!("SIGTERM {id} (drain)"));
            }
            "restart" => {
                let old = dead[self.rng.below(dead.len())].clone();
                if self.rng.chance(50) {
                    // Same id: the old process makes room, its log is
                    // checked for panics first (the new one reuses the id).
                    self.removed_panics.extend(
                        self.cluster
                            .process(&old)
                            .map(|p| panics_in(p.log_path()))
                            .unwrap_or_default()
                            .into_iter()
                            .map(|l| format!("{old} (earlier incarnation): {l}")),
                    );
                    drop(self.cluster.remove(&old));
                    self.spawn_head(&old);
                    self.record
                        .event(format!("restart {old} under the same id"));
                } else {
                    let id = format!("head-{}", self.next_head);
                    self.next_head += 1;
                    // The old incarnation is gone for good.
                    self.heads.retain(|h| h.id != old);
                    self.spawn_head(&id);
                    self.record.event(format!("restart {old} as {id}"));
                }
            }
            "scale-up" => {
                let id = format!("head-{}", self.next_head);
                self.next_head += 1;
                self.spawn_head(&id);
                self.record.event(format!("scale up: {id}"));
            }
            "redis-restart" => {
                let down = self.rng.millis(300, 1500);
                self.cluster.redis_mut().kill();
                self.redis_up = false;
                self.last_redis_restart = Some(now);
                self.pending.push((now + down, Pending::RedisUp));
                self.record
                    .event(format!("Redis killed (data lost) for {down:?}"));
            }
            other => unreachable!("{other}"),
        }
    }

    /// Runs the pending resumes and Redis restarts that are due.
    fn run_pending(&mut self, all: bool) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.pending = later;
        for (_, what) in due {
            match what {
                Pending::Resume(id) => {
                    self.signal(&id, localcluster::Signal::Cont);
                    let h = self.head(&id);
                    h.state = State::Running;
                    h.since = Instant::now();
                    self.record.event(format!("SIGCONT {id}"));
                }
                Pending::RedisUp => {
                    tokio::task::block_in_place(|| ok(self.cluster.redis_mut().restart()));
                    self.redis_up = true;
                    self.redis_up_at = Instant::now();
                    self.record.event("Redis back (empty)".into());
                }
            }
        }
    }

    /// Collects exits: drained heads must exit 0 in time, nothing else
    /// may exit on its own.
    fn check_exits(&mut self) {
        let now = Instant::now();
        let mut events = Vec::new();
        let mut violations = Vec::new();
        for h in &mut self.heads {
            if h.state == State::Dead {
                continue;
            }
            let Some(p) = self.cluster.process_mut(&h.id) else {
                continue;
            };
            match (h.state, p.exit_status()) {
                (State::Draining, Some(status)) => {
                    if status.code() == Some(0) {
                        events.push(format!(
                            "{} exited 0, {:?} after SIGTERM",
                            h.id,
                            now.duration_since(h.since)
                        ));
                    } else {
                        violations.push(format!(
                            "{} exited with {status} after SIGTERM; log:\n{}",
                            h.id,
                            p.log_tail(30)
                        ));
                    }
                    h.state = State::Dead;
                    h.since = now;
                }
                (State::Draining, None) if now.duration_since(h.since) > TERM_TO_EXIT => {
                    violations.push(format!(
                        "{} still running {TERM_TO_EXIT:?} after SIGTERM; log:\n{}",
                        h.id,
                        p.log_tail(30)
                    ));
                    let _ = p.kill();
                    p.wait_exit(Duration::from_secs(2));
                    h.state = State::Dead;
                    h.since = now;
                }
                (_, Some(status)) => {
                    violations.push(format!(
                        "{} ({:?}) exited on its own with {status}; log:\n{}",
                        h.id,
                        h.state,
                        p.log_tail(30)
                    ));
                    h.state = State::Dead;
                    h.since = now;
                }
                _ => {}
            }
        }
        for (id, _) in &self.workers {
            if let Some(p) = self.cluster.process_mut(id) {
                if let Some(status) = p.exit_status() {
                    violations.push(format!(
                        "worker {id} exited with {status}; log:\n{}",
                        p.log_tail(30)
                    ));
                }
            }
        }
        for e in events {
            self.record.event(e);
        }
        for v in violations {
            self.record.violation(v);
        }
    }

    /// Whether I3 counts the present moment: Redis up (and for a while),
    /// and some head running that could take a worker.
    fn i3_counts(&self) -> bool {
        self.redis_up
            && self.redis_up_at.elapsed() > REDIS_RECOVERY
            && self
                .heads
                .iter()
                .any(|h| h.state == State::Running && h.since.elapsed() > LEASE_TTL)
    }

    /// Takes one sample and checks I2 and I3 on it.
    async fn observe(&mut self, channels: &mut BTreeMap<SocketAddr, Channel>) {
        let heads: Vec<(String, SocketAddr)> = self
            .heads
            .iter()
            .filter(|h| matches!(h.state, State::Running | State::Draining))
            .map(|h| (h.id.clone(), h.addr))
            .collect();
        let s = sample(channels, &heads, &self.workers, PROBE_TIMEOUT).await;
        self.samples += 1;

        // I2: listed by two heads in this sample and the previous one.
        for v in self.doubled.check(&s) {
            self.record.violation(v);
        }

        // I3: unattached too long while a head could take the worker.
        let counts = self.i3_counts();
        let now = Instant::now();
        for (w, _) in &self.workers {
            let Some(status) = s.statuses.get(w) else {
                continue;
            };
            if let Some(top) = self.epochs.get(w) {
                if status.epoch < *top && status.epoch != 0 {
                    let note = format!(
                        "{w}: epoch went from {top} down to {} (head {})",
                        status.epoch, status.head_id
                    );
                    if self.record.notes.len() < 20 {
                        self.record.notes.push(note);
                    }
                }
            }
            let top = self.epochs.entry(w.clone()).or_default();
            *top = (*top).max(status.epoch);
            if status.attached {
                self.unattached.remove(w);
                continue;
            }
            self.unattached_seen += 1;
            let entry = self.unattached.entry(w.clone()).or_insert((now, false));
            if !counts {
                // Not counted: the clock starts again when it counts.
                entry.0 = now;
                continue;
            }
            let waited = now.duration_since(entry.0);
            self.longest_unattached = self.longest_unattached.max(waited);
            if waited > UNATTACHED_LIMIT && !entry.1 {
                entry.1 = true;
                let running: Vec<String> = self
                    .heads
                    .iter()
                    .filter(|h| h.state == State::Running)
                    .map(|h| h.id.clone())
                    .collect();
                let line = format!(
                    "I3: {w} unattached for {waited:?} (limit {UNATTACHED_LIMIT:?}) with Redis up and heads {running:?} running; last head {} epoch {}",
                    status.head_id, status.epoch
                );
                self.record.violation(line);
            }
        }
    }

    /// I1: waits for agreement between Redis, the live heads and every
    /// worker; returns the problems of the last look if it never comes.
    async fn converge(&mut self, within: Duration) -> Vec<String> {
        let heads = members(
            self.heads
                .iter()
                .filter(|h| h.state == State::Running)
                .map(|h| (&h.id, h.addr)),
        );
        let workers = members(self.workers.iter().map(|(id, addr)| (id, *addr)));
        let every = Duration::from_millis(200);
        wait_agreement(&self.cluster, &heads, &workers, (within, every), |_| {
            Vec::new()
        })
        .await
    }

    fn report(&self) -> String {
        format!(
            "seed {seed} (rerun with TETHER_CHAOS_SEED={seed})\nviolations:\n  {}\nepoch notes:\n  {}\ntimeline:\n  {}",
            self.record.violations.join("\n  "),
            self.record.notes.join("\n  "),
            self.record.timeline.join("\n  "),
            seed = self.seed,
        )
    }
}

/// How many moves the workers made in all, by their own count.
async fn chaos_moves(chaos: &Chaos) -> u64 {
    let mut probe = Probe::new();
    let mut total = 0;
    for (_, addr) in &chaos.workers {
        if let Ok(s) = probe.worker_status(*addr).await {
            total += s.reassignments;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_worker_on_exactly_one_live_head() {
    let long = std::env::var("TETHER_CHAOS_LONG").is_ok_and(|v| v == "1");
    let (run_for, worker_count) = if long {
        (Duration::from_secs(60), 100)
    } else {
        (Duration::from_secs(25), 40)
    };
    let seed = seed_from_env().unwrap_or_else(fresh_seed);
    eprintln!(
        "chaos seed: {seed} (rerun with TETHER_CHAOS_SEED={seed}); {} mode: {run_for:?}, 4 heads, {worker_count} workers",
        if long { "long" } else { "short" }
    );

    let mut chaos = Chaos {
        cluster: ok(Cluster::start(binaries())),
        rng: Rng(seed),
        seed,
        heads: Vec::new(),
        next_head: 4,
        workers: Vec::new(),
        pending: Vec::new(),
        redis_up: true,
        redis_up_at: Instant::now(),
        last_redis_restart: None,
        record: Record::default(),
        removed_panics: Vec::new(),
        unattached: BTreeMap::new(),
        doubled: DoubleListings::default(),
        epochs: BTreeMap::new(),
        samples: 0,
        longest_unattached: Duration::ZERO,
        unattached_seen: 0,
    };
    for i in 0..4 {
        chaos.spawn_head(&format!("head-{i}"));
    }
    for h in &chaos.heads {
        if let Err(e) = wait_serving(h.addr, HEAD_SERVICE, Duration::from_secs(15)).await {
            panic!("{e}; seed {seed}");
        }
    }
    for i in 0..worker_count {
        let id = format!("worker-{i:03}");
        let addr =
            tokio::task::block_in_place(|| ok(chaos.cluster.spawn_worker(&id, WORKER_ARGS)).addr);
        chaos.workers.push((id, addr));
    }
    let problems = chaos.converge(Duration::from_secs(30)).await;
    assert!(
        problems.is_empty(),
        "the cluster did not settle before the chaos (seed {seed}):\n{}",
        problems.join("\n")
    );

    // The schedule, sampled all along.
    let mut channels = BTreeMap::new();
    let start = Instant::now();
    chaos.record.start = Some(start);
    let mut next_action = start + chaos.rng.millis(800, 1500);
    let mut actions = 0;
    while start.elapsed() < run_for {
        let round = Instant::now();
        chaos.run_pending(false);
        if Instant::now() >= next_action {
            chaos.act();
            actions += 1;
            next_action = Instant::now() + chaos.rng.millis(1200, 2800);
        }
        chaos.check_exits();
        chaos.observe(&mut channels).await;
        tokio::time::sleep(SAMPLE_EVERY.saturating_sub(round.elapsed())).await;
    }

    // Calm: resume hung heads, bring Redis back, let drains finish.
    chaos.run_pending(true);
    chaos.record.event(format!(
        "schedule over: {actions} actions, {} samples",
        chaos.samples
    ));
    let calm = Instant::now();
    while chaos.heads.iter().any(|h| h.state == State::Draining) && calm.elapsed() < TERM_TO_EXIT {
        chaos.check_exits();
        chaos.observe(&mut channels).await;
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    chaos.check_exits();
    if !chaos.heads.iter().any(|h| h.state == State::Running) {
        // Every head went: the invariant needs one.
        let id = format!("head-{}", chaos.next_head);
        chaos.next_head += 1;
        chaos.spawn_head(&id);
        chaos.record.event(format!("no head left; started {id}"));
    }
    // One lease TTL and one heartbeat timeout, plus slack.
    let quiet = LEASE_TTL + HEARTBEAT_TIMEOUT + Duration::from_millis(700);
    let until = Instant::now() + quiet;
    while Instant::now() < until {
        chaos.check_exits();
        chaos.observe(&mut channels).await;
        tokio::time::sleep(SAMPLE_EVERY).await;
    }

    // I1.
    let problems = chaos.converge(Duration::from_secs(15)).await;
    if !problems.is_empty() {
        chaos.record.violation(format!(
            "I1: no agreement between Redis, heads and workers within {:?} after the schedule:\n{}",
            quiet + Duration::from_secs(15),
            problems.join("\n")
        ));
    }
    chaos.check_exits();

    // I4: panics anywhere.
    let mut panics = chaos.removed_panics.clone();
    for p in chaos.cluster.heads().chain(chaos.cluster.workers()) {
        panics.extend(
            panics_in(p.log_path())
                .into_iter()
                .map(|l| format!("{}: {l}", p.id)),
        );
    }
    for p in panics {
        chaos.record.violation(format!("I4: panic: {p}"));
    }
    let live: BTreeSet<&str> = chaos
        .heads
        .iter()
        .filter(|h| h.state == State::Running)
        .map(|h| h.id.as_str())
        .collect();
    let moves: u64 = chaos_moves(&chaos).await;
    eprintln!(
        "chaos: seed {seed}: {actions} actions, {} samples, {} workers, {moves} moves, {} one-sample double listings (handoffs), {} unattached worker samples, longest counted unattached stretch {:?}, live heads at the end {live:?}, took {:?}",
        chaos.samples,
        chaos.workers.len(),
        chaos.doubled.seen,
        chaos.unattached_seen,
        chaos.longest_unattached,
        start.elapsed()
    );
    if !chaos.record.notes.is_empty() {
        eprintln!("chaos notes:\n  {}", chaos.record.notes.join("\n  "));
    }
    assert!(chaos.record.violations.is_empty(), "{}", chaos.report());
    assert!(actions >= 5, "too few actions ran: {}", chaos.report());
}
