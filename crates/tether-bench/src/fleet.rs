//! The simulated workers: N copies of the library's attach loop
//! ([`tether::attach::run`], the same code `tether-worker` runs) in this
//! one process, each with its own TCP connection and `Heartbeat` stream.
//!
//! They share one registry connection pool: a real worker has its own
//! Redis connection, but N of them here would spend N descriptors of the
//! bench's budget on connections that are idle between moves.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether::attach::{self, AttachConfig, Snapshot};
use tether::registry::Registry;
use tether::security::ClientSecurity;
use tether::shutdown::{self, Shutdown, ShutdownTrigger};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the simulated workers attach.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub redis_url: String,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    /// Workers started per second while the fleet grows.
    pub ramp_rate: f64,
}

/// One simulated worker, seen from outside.
#[derive(Debug)]
struct SimWorker {
    status: watch::Receiver<Snapshot>,
}

/// What the bench needs of one worker's [`Snapshot`], copied out.
#[derive(Debug, Clone)]
pub struct View {
    pub head_id: String,
    pub epoch: u64,
    pub attached: bool,
    pub reassignments: u64,
    pub max_beat_gap: Duration,
}

/// The simulated workers.
pub struct Fleet {
    cfg: FleetConfig,
    registry: Registry,
    trigger: ShutdownTrigger,
    stop: Shutdown,
    workers: Vec<SimWorker>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// An empty fleet against the Redis at `cfg.redis_url`.
    pub fn new(cfg: FleetConfig) -> Result<Self, String> {
        let registry = Registry::new(&cfg.redis_url, "tether")
            .map_err(|e| format!("cannot set up the registry: {e}"))?;
        let (trigger, stop) = shutdown::channel();
        Ok(Self {
            cfg,
            registry,
            trigger,
            stop,
            workers: Vec::new(),
            tasks: Vec::new(),
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Starts `n` more workers, at most `ramp_rate` per second, so that the
    /// heads see a steady stream of `Reassign`s rather than one burst.
    pub async fn grow(&mut self, n: usize) {
        let per_tick = ((self.cfg.ramp_rate / 100.0).ceil() as usize).max(1);
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        let target = self.workers.len() + n;
        while self.workers.len() < target {
            ticks.tick().await;
            let batch = per_tick.min(target - self.workers.len());
            for _ in 0..batch {
                self.spawn_one();
            }
        }
    }

    fn spawn_one(&mut self) {
        let id = format!("w-{:05}", self.workers.len() + 1);
        let (tx, rx) = watch::channel(Snapshot::default());
        let cfg = AttachConfig {
            worker_id: id,
            worker_addr: String::new(),
            connect_timeout: self.cfg.connect_timeout,
            backoff_base: Duration::from_millis(100),
            backoff_max: self.cfg.max_backoff,
            // Plain TCP, no token: the heads run with their defaults.
            security: ClientSecurity::default(),
        };
        self.tasks.push(tokio::spawn(attach::run(
            cfg,
            self.registry.clone(),
            tx,
            self.stop.clone(),
        )));
        self.workers.push(SimWorker { status: rx });
    }

    /// A copy of worker `i`'s state.
    pub fn view(&self, i: usize) -> View {
        let s = self.workers[i].status.borrow();
        View {
            head_id: s.head_id.clone(),
            epoch: s.epoch,
            attached: s.attached,
            reassignments: s.reassignments,
            max_beat_gap: s.max_beat_gap,
        }
    }

    /// Every worker's state.
    pub fn views(&self) -> Vec<View> {
        (0..self.workers.len()).map(|i| self.view(i)).collect()
    }

    /// Applies `f` to worker `i`'s snapshot without copying it.
    pub fn with<T>(&self, i: usize, f: impl FnOnce(&Snapshot) -> T) -> T {
        f(&self.workers[i].status.borrow())
    }

    /// How many workers are attached now.
    pub fn attached(&self) -> usize {
        (0..self.workers.len())
            .filter(|i| self.with(*i, |s| s.attached))
            .count()
    }

    /// Attached workers per head id.
    pub fn loads(&self) -> BTreeMap<String, usize> {
        let mut loads = BTreeMap::new();
        for i in 0..self.workers.len() {
            self.with(i, |s| {
                if s.attached {
                    *loads.entry(s.head_id.clone()).or_insert(0) += 1;
                }
            });
        }
        loads
    }

    /// Waits until every worker is attached; on timeout, says how many are.
    pub async fn wait_all_attached(&self, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let attached = self.attached();
            if attached == self.workers.len() {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "only {attached} of {} workers attached within {timeout:?}",
                    self.workers.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits `duration` and measures the beat gaps that fall into it:
    /// each worker's longest silence seen by polling `last_head_beat`
    /// every 50 ms, and its `max_beat_gap` if that grew meanwhile (which
    /// then is exact). `max_beat_gap` alone counts since the worker
    /// attached, so it would blame a window for a gap during the ramp.
    pub async fn watch_gaps(&self, duration: Duration) -> Vec<Duration> {
        let n = self.workers.len();
        let before: Vec<Duration> = (0..n).map(|i| self.with(i, |s| s.max_beat_gap)).collect();
        let mut longest = vec![Duration::ZERO; n];
        let start = Instant::now();
        while start.elapsed() < duration {
            let left = duration.saturating_sub(start.elapsed());
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
            let now = Instant::now();
            for (i, l) in longest.iter_mut().enumerate() {
                let silent = self.with(i, |s| {
                    s.last_head_beat.map_or(now.duration_since(start), |b| {
                        now.saturating_duration_since(b)
                    })
                });
                *l = (*l).max(silent);
            }
        }
        for (i, l) in longest.iter_mut().enumerate() {
            let after = self.with(i, |s| s.max_beat_gap);
            if after > before[i] {
                *l = (*l).max(after);
            }
        }
        longest
    }

    /// Stops every worker (their streams close) and waits a bounded time
    /// for the tasks to end.
    pub async fn stop(self) {
        self.trigger.trigger();
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
