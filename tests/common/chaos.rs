//! What the chaos tests (`tests/chaos.rs`, `tests/chaos_processes.rs`)
//! share: the seeded generator, the timeline that explains a failure,
//! one concurrent sample of the cluster, the double-listing check (I2)
//! and the agreement with Redis.

use super::{Member, View};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::worker_service_client::WorkerServiceClient;
use tether::pb::{StatusRequest, WorkerStatus};
use tether_testkit::localcluster::{self, wait_until, Cluster, Probe, Reply};
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// splitmix64: tiny, good enough for a schedule, and the same on every
/// machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low + 1))
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The seed in `TETHER_CHAOS_SEED`, if set (a replay).
pub fn seed_from_env() -> Option<u64> {
    std::env::var("TETHER_CHAOS_SEED").ok().map(|s| {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("TETHER_CHAOS_SEED={s:?} is not a u64"))
    })
}

/// A seed from the clock and the pid.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// Everything the run saw that breaks an invariant, plus the timeline
/// that explains it.
#[derive(Default)]
pub struct Record {
    pub start: Option<Instant>,
    pub timeline: Vec<String>,
    pub violations: Vec<String>,
    pub notes: Vec<String>,
}

impl Record {
    fn t(&self) -> f64 {
        self.start.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    pub fn event(&mut self, what: String) {
        let line = format!("{:7.2}s {what}", self.t());
        eprintln!("chaos: {line}");
        self.timeline.push(line);
    }

    pub fn violation(&mut self, what: String) {
        let line = format!("{:7.2}s {what}", self.t());
        eprintln!("chaos VIOLATION: {line}");
        if self.violations.len() < 40 {
            self.violations.push(line);
        }
    }
}

/// What one round of probes saw.
pub struct Sample {
    /// Worker id to the (head, epoch) pairs of every head listing it.
    pub listed: BTreeMap<String, Vec<(String, u64)>>,
    pub statuses: BTreeMap<String, WorkerStatus>,
}

/// Asks the given heads and workers at once, each call bounded by
/// `timeout` (a hung head must not stall the sampler); calls that fail
/// are left out.
pub async fn sample(
    channels: &mut BTreeMap<SocketAddr, Channel>,
    heads: &[(String, SocketAddr)],
    workers: &[(String, SocketAddr)],
    timeout: Duration,
) -> Sample {
    let mut channel = |addr: SocketAddr| {
        channels
            .entry(addr)
            .or_insert_with(|| localcluster::channel(addr))
            .clone()
    };
    let mut lists = JoinSet::new();
    for (id, addr) in heads {
        let mut client = HeadServiceClient::new(channel(*addr));
        let id = id.clone();
        lists.spawn(async move {
            let call = tether::listing::list_all(&mut client, tonic::Request::new);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(r)) => Some((id, r)),
                _ => None,
            }
        });
    }
    let mut statuses = JoinSet::new();
    for (id, addr) in workers {
        let mut client = WorkerServiceClient::new(channel(*addr));
        let id = id.clone();
        statuses.spawn(async move {
            let call = client.status(StatusRequest {});
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(r)) => Some((id, r.into_inner())),
                _ => None,
            }
        });
    }
    let mut listed: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    while let Some(r) = lists.join_next().await {
        if let Ok(Some((head, listing))) = r {
            for w in listing.workers {
                listed
                    .entry(w.worker_id)
                    .or_default()
                    .push((head.clone(), w.epoch));
            }
        }
    }
    let mut out = BTreeMap::new();
    while let Some(r) = statuses.join_next().await {
        if let Ok(Some((id, s))) = r {
            out.insert(id, s);
        }
    }
    Sample {
        listed,
        statuses: out,
    }
}

/// I2: no worker is listed by two heads in two consecutive samples (a
/// make-before-break handoff may overlap once).
#[derive(Default)]
pub struct DoubleListings {
    /// The workers listed twice in the previous sample.
    previous: BTreeMap<String, Vec<(String, u64)>>,
    /// Double listings seen, one sample each (most are handoffs).
    pub seen: usize,
}

impl DoubleListings {
    /// Checks one sample; returns a line per violation.
    pub fn check(&mut self, s: &Sample) -> Vec<String> {
        let doubled: BTreeMap<String, Vec<(String, u64)>> = s
            .listed
            .iter()
            .filter(|(_, hs)| hs.len() > 1)
            .map(|(w, hs)| (w.clone(), hs.clone()))
            .collect();
        let mut violations = Vec::new();
        for (w, hs) in &doubled {
            self.seen += 1;
            if let Some(prev) = self.previous.get(w) {
                let status = s.statuses.get(w).map(|s| {
                    format!(
                        "head={} epoch={} attached={}",
                        s.head_id, s.epoch, s.attached
                    )
                });
                violations.push(format!(
                    "I2: {w} listed by several heads in two consecutive samples: before {prev:?}, now {hs:?}; its Status: {status:?}"
                ));
            }
        }
        self.previous = doubled;
        violations
    }
}

/// Lines of a log that report a panic.
pub fn panics_in(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_owned)
        .collect()
}

/// Every `(head, epoch)` the registry holds for the worker: one entry per
/// registered head whose assignment hash names it.
pub fn redis_assignment(cluster: &Cluster, worker: &str) -> Result<Vec<(String, u64)>, String> {
    let heads = match cluster.redis().command(&["SMEMBERS", "{tether}:heads"]) {
        Ok(Reply::Array(Some(ids))) => ids,
        other => return Err(format!("SMEMBERS {{tether}}:heads: {other:?}")),
    };
    let mut out = Vec::new();
    for id in heads {
        let Reply::Bulk(Some(id)) = id else { continue };
        let head = String::from_utf8_lossy(&id).into_owned();
        let key = super::assigned_key(&head);
        match cluster.redis().command(&["HGET", &key, worker]) {
            Ok(Reply::Bulk(Some(v))) => match super::assignment_epoch(&v) {
                Some(epoch) => out.push((head, epoch)),
                None => return Err(format!("{worker} in {key}: unparsable {v:?}")),
            },
            Ok(Reply::Bulk(None)) => {}
            other => return Err(format!("HGET {key} {worker}: {other:?}")),
        }
    }
    Ok(out)
}

/// Where Redis disagrees with the workers' `Status` in `view`: exactly one
/// head's assignment hash must hold each worker, at its epoch.
pub fn redis_problems(cluster: &Cluster, view: &View) -> Vec<String> {
    let mut problems = Vec::new();
    for worker in view.statuses.keys() {
        let Some(status) = view.status(worker) else {
            continue;
        };
        match redis_assignment(cluster, worker) {
            Ok(found) if found == [(status.head_id.clone(), status.epoch)] => {}
            other => problems.push(format!(
                "{worker}: Redis says {other:?}, Status says head {:?} epoch {}",
                status.head_id, status.epoch
            )),
        }
    }
    problems
}

/// Members from `(id, address)` pairs.
pub fn members<'a>(pairs: impl IntoIterator<Item = (&'a String, SocketAddr)>) -> Vec<Member> {
    pairs
        .into_iter()
        .map(|(id, addr)| Member {
            id: id.clone(),
            addr,
        })
        .collect()
}

/// Waits until every worker's `Status`, the `ListWorkers` of `heads` and
/// Redis agree (see [`View::problems`] and [`redis_problems`]) and `also`
/// finds nothing more in the view; polls every `poll`. Returns the
/// problems of the last look, with the view, if that does not happen
/// within `within`.
pub async fn wait_agreement(
    cluster: &Cluster,
    heads: &[Member],
    workers: &[Member],
    (within, poll): (Duration, Duration),
    mut also: impl FnMut(&View) -> Vec<String>,
) -> Vec<String> {
    let mut probe = Probe::new();
    let mut last = Vec::new();
    let agreed = wait_until(within, poll, async || {
        let view = View::take(&mut probe, heads, workers).await;
        let mut problems = also(&view);
        problems.extend(view.problems());
        problems.extend(redis_problems(cluster, &view));
        let done = problems.is_empty();
        if !done {
            problems.push(view.to_string());
        }
        last = problems;
        done
    })
    .await;
    if agreed {
        Vec::new()
    } else {
        last
    }
}
