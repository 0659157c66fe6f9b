//! What the integration test files share on top of
//! `tether_testkit::localcluster`: where the binaries are, the short timings that
//! keep the suite fast, and a whole-cluster view that checks the one
//! invariant every test cares about: each worker is attached to exactly
//! one head, and that head and the worker agree on the epoch.

// Each test file is its own crate and uses a different part of this.
#![allow(dead_code)]

pub mod chaos;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use tether::pb::{ListWorkersResponse, WorkerStatus};
use tether_testkit::localcluster::{wait_serving, wait_until, Binaries, Cluster, Probe};

#[allow(unused_imports)] // each test file uses some of them
pub use tether_testkit::timings::{
    head_args, HEAD_ARGS, HEAD_SERVICE, START_TIMEOUT, WORKER_ARGS, WORKER_SERVICE,
};

/// The binaries Cargo built for this test run.
pub fn binaries() -> Binaries {
    Binaries::new(
        env!("CARGO_BIN_EXE_tether-head"),
        env!("CARGO_BIN_EXE_tether-worker"),
    )
}

/// Panics with the error's message (not its `Debug` form), so that a
/// missing `redis-server` fails with the command that fixes it.
pub fn ok<T>(r: tether_testkit::localcluster::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A cluster with a fresh Redis and nothing else yet.
pub fn cluster() -> Cluster {
    ok(Cluster::start(binaries()))
}

/// Head ids `head-0`... and worker ids `worker-00`...
pub fn head_id(i: usize) -> String {
    format!("head-{i}")
}

/// See [`head_id`].
pub fn worker_id(i: usize) -> String {
    format!("worker-{i:02}")
}

/// Starts `heads` heads, waits until each is registered (readiness
/// SERVING), then starts `workers` workers and waits until the whole
/// cluster is settled (see [`View::problems`]).
pub async fn start_cluster(heads: usize, workers: usize) -> Cluster {
    start_cluster_with(heads, &[], workers).await
}

/// [`start_cluster`] with every head given [`head_args`]`(head_extra)`.
pub async fn start_cluster_with(heads: usize, head_extra: &[&str], workers: usize) -> Cluster {
    let mut cluster = cluster();
    let args = head_args(head_extra);
    for i in 0..heads {
        ok(cluster.spawn_head(&head_id(i), &args));
    }
    for head in cluster.heads() {
        if let Err(e) = wait_serving(head.addr, HEAD_SERVICE, START_TIMEOUT).await {
            panic!("{e}\nlog of {}:\n{}", head.id, head.log_tail(20));
        }
    }
    for i in 0..workers {
        ok(cluster.spawn_worker(&worker_id(i), WORKER_ARGS));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    settle(&mut Probe::new(), &heads, &workers, START_TIMEOUT).await;
    cluster
}

/// A head or worker as the views see it: its id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The process's `--id`.
    pub id: String,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
}

impl From<&tether_testkit::localcluster::Process> for Member {
    fn from(p: &tether_testkit::localcluster::Process) -> Self {
        Self {
            id: p.id.clone(),
            addr: p.addr,
        }
    }
}

/// What every given head and worker said at (nearly) one moment.
#[derive(Debug)]
pub struct View {
    /// `Status` of each worker, by worker id.
    pub statuses: BTreeMap<String, Result<WorkerStatus, String>>,
    /// `ListWorkers` of each head, by head id.
    pub listings: BTreeMap<String, Result<ListWorkersResponse, String>>,
}

impl View {
    /// Asks every head, then every worker.
    pub async fn take(probe: &mut Probe, heads: &[Member], workers: &[Member]) -> View {
        let mut listings = BTreeMap::new();
        for h in heads {
            let answer = probe.list_workers(h.addr).await.map_err(|e| e.to_string());
            listings.insert(h.id.clone(), answer);
        }
        let mut statuses = BTreeMap::new();
        for w in workers {
            let answer = probe.worker_status(w.addr).await.map_err(|e| e.to_string());
            statuses.insert(w.id.clone(), answer);
        }
        View { statuses, listings }
    }

    /// For each worker id, the heads whose `ListWorkers` names it, with
    /// the epoch each lists.
    pub fn listed_by(&self) -> BTreeMap<String, Vec<(String, u64)>> {
        let mut out: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for (head, listing) in &self.listings {
            if let Ok(listing) = listing {
                for w in &listing.workers {
                    out.entry(w.worker_id.clone())
                        .or_default()
                        .push((head.clone(), w.epoch));
                }
            }
        }
        out
    }

    /// The worker's status, if it answered.
    pub fn status(&self, worker: &str) -> Option<&WorkerStatus> {
        self.statuses.get(worker).and_then(|s| s.as_ref().ok())
    }

    /// Everything that breaks "each worker is attached to exactly one
    /// head, and both agree on head and epoch", plus any head listing a
    /// worker twice or answering an id other than its own. Empty when the
    /// cluster is settled.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let listed = self.listed_by();
        for (head, listing) in &self.listings {
            match listing {
                Err(e) => problems.push(format!("head {head} did not answer ListWorkers: {e}")),
                Ok(l) if l.head_id != *head => {
                    problems.push(format!("head {head} answered as {:?}", l.head_id))
                }
                Ok(_) => {}
            }
        }
        for (worker, status) in &self.statuses {
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("worker {worker} did not answer Status: {e}"));
                    continue;
                }
            };
            let heads = listed.get(worker).cloned().unwrap_or_default();
            if !status.attached {
                problems.push(format!("worker {worker} is not attached"));
            }
            match heads.as_slice() {
                [] => problems.push(format!("worker {worker} is listed by no head")),
                [(head, epoch)] => {
                    if *head != status.head_id || *epoch != status.epoch {
                        problems.push(format!(
                            "worker {worker} says head {:?} epoch {}, but head {head} lists it at epoch {epoch}",
                            status.head_id, status.epoch
                        ));
                    }
                }
                many => problems.push(format!(
                    "worker {worker} is listed by several heads: {many:?}"
                )),
            }
        }
        for (worker, heads) in &listed {
            if !self.statuses.contains_key(worker) {
                problems.push(format!(
                    "heads {heads:?} list {worker}, which is not a worker here"
                ));
            }
        }
        problems
    }

    /// Workers whose status names `head`.
    pub fn workers_of(&self, head: &str) -> Vec<String> {
        self.statuses
            .iter()
            .filter(|(_, s)| s.as_ref().is_ok_and(|s| s.head_id == head))
            .map(|(w, _)| w.clone())
            .collect()
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "heads:")?;
        for (head, listing) in &self.listings {
            match listing {
                Ok(l) => {
                    let ws: Vec<String> = l
                        .workers
                        .iter()
                        .map(|w| format!("{}@{}", w.worker_id, w.epoch))
                        .collect();
                    writeln!(f, "  {head}: {}", ws.join(" "))?
                }
                Err(e) => writeln!(f, "  {head}: {e}")?,
            }
        }
        writeln!(f, "workers:")?;
        for (worker, status) in &self.statuses {
            match status {
                Ok(s) => writeln!(
                    f,
                    "  {worker}: head={:?} epoch={} attached={} moves={} beat_age={}ms",
                    s.head_id, s.epoch, s.attached, s.reassignments, s.last_head_beat_age_ms
                )?,
                Err(e) => writeln!(f, "  {worker}: {e}")?,
            }
        }
        Ok(())
    }
}

/// Waits until [`View::problems`] is empty; panics with the last view and
/// its problems if it does not happen within `timeout`.
pub async fn settle(
    probe: &mut Probe,
    heads: &[Member],
    workers: &[Member],
    timeout: Duration,
) -> View {
    let mut last = None;
    let settled = wait_until(timeout, Duration::from_millis(50), async || {
        let view = View::take(probe, heads, workers).await;
        let done = view.problems().is_empty();
        last = Some(view);
        done
    })
    .await;
    let view = last.expect("wait_until checks at least once");
    if !settled {
        panic!(
            "the cluster did not settle within {timeout:?}:\n{}\n{view}",
            view.problems().join("\n")
        );
    }
    view
}

/// The epoch of an assignment as Redis stores it: the value of the
/// worker's field in `{ns}:assigned:<head>`, `epoch|instance|state|addr`.
#[allow(dead_code)]
pub fn assignment_epoch(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    text.split('|').next()?.parse().ok()
}

/// The key of a head's assignment hash under the default namespace.
#[allow(dead_code)]
pub fn assigned_key(head: &str) -> String {
    format!("{{tether}}:assigned:{head}")
}

/// `n` workers in this process through the library's worker API
/// (`tether::worker`, which `tether-worker` runs too), each over its own
/// connection. Cheaper than `n` worker processes on a small machine.
/// Stops them when dropped.
pub struct Fleet {
    workers: Vec<tether::worker::WorkerHandle>,
}

impl Fleet {
    /// Starts workers `w-00000`... against the registry at `redis_url`.
    pub fn start(redis_url: &str, n: usize) -> Fleet {
        let registry = tether::registry::Registry::new(redis_url, "tether").expect("registry");
        let workers = (0..n)
            .map(|i| {
                tether::worker::Worker::builder(format!("w-{i:05}"))
                    .registry(registry.clone())
                    .connect_timeout(Duration::from_secs(5))
                    .max_backoff(Duration::from_secs(1))
                    .spawn()
                    .expect("worker settings")
            })
            .collect();
        Fleet { workers }
    }

    /// How many workers are attached now.
    pub fn attached(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.attachment().borrow().attached)
            .count()
    }

    /// Each worker's (head, epoch, reassignments, attached), by worker id.
    pub fn placements(&self) -> BTreeMap<String, (String, u64, u64, bool)> {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let a = w.attachment().borrow().clone();
                (
                    format!("w-{i:05}"),
                    (a.head_id, a.epoch, a.reassignments, a.attached),
                )
            })
            .collect()
    }
}

/// Redis's count of calls per command so far (`INFO commandstats`,
/// commands inside scripts included), without `info` itself.
pub fn command_calls(redis: &tether_testkit::localcluster::RedisServer) -> BTreeMap<String, u64> {
    let text = match ok(redis.command(&["INFO", "commandstats"])) {
        tether_testkit::localcluster::Reply::Bulk(Some(b)) => {
            String::from_utf8_lossy(&b).into_owned()
        }
        other => panic!("INFO commandstats answered {other:?}"),
    };
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

/// The strings of a Redis array reply (`KEYS`, `HKEYS`, `SMEMBERS`), or a
/// panic naming `what` for any other reply.
#[allow(dead_code)]
pub fn string_set(
    what: &str,
    reply: tether_testkit::localcluster::Reply,
) -> std::collections::BTreeSet<String> {
    use tether_testkit::localcluster::Reply;
    match reply {
        Reply::Array(Some(items)) => items
            .into_iter()
            .map(|item| match item {
                Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                other => panic!("{what} answered an item {other:?}"),
            })
            .collect(),
        other => panic!("{what} answered {other:?}"),
    }
}

/// The cluster's events as the head at `addr` streams them, from now on.
pub async fn watch_events(addr: SocketAddr) -> tonic::Streaming<tether::pb::ClusterEvent> {
    let mut client = tether_testkit::localcluster::head_client(addr);
    let call = client.watch_events(tether::pb::WatchEventsRequest {});
    tokio::time::timeout(START_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("WatchEvents at {addr}: no answer within {START_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("WatchEvents at {addr}: {e}"))
        .into_inner()
}
