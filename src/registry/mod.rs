//! Everything Tether keeps in Redis: head leases, worker assignments with
//! their epochs, and the reads workers make to find a head. No other
//! module talks to Redis.
//!
//! Every call is bounded by a timeout, so a hung Redis shows up as an
//! error the caller can report and retry, never as a stuck task.

mod backend;
mod keys;
mod scripts;

pub use backend::Topology;
use backend::{AnyConn, Backend};
use std::sync::Arc;

pub use keys::Keys;

use deadpool_redis::{redis, PoolConfig, Timeouts};
use std::future::Future;
use std::time::Duration;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis could not be reached or did not answer in time.
    #[error("redis unavailable at {at}: {cause}")]
    Unavailable {
        /// Which Redis was tried, without its password (see
        /// [`Registry::target`]).
        at: Arc<str>,
        /// What went wrong.
        cause: String,
    },
    /// The head asked to assign a worker holds no lease (it expired, or
    /// the head never registered).
    #[error("this head holds no lease in the registry")]
    NoLease,
    /// The head is draining and adopts no one.
    #[error("this head is draining")]
    Draining,
    /// The head is at its bounded-load limit.
    #[error("this head holds {load} workers, at its load bound of {bound}")]
    Full {
        /// Workers the head holds.
        load: u64,
        /// The bound ceil((1 + slack) * W / H).
        bound: u64,
    },
    /// The head is at its configured capacity.
    #[error("this head holds {load} workers, at its capacity of {capacity}")]
    AtCapacity {
        /// Workers the head holds.
        load: u64,
        /// The configured hard cap.
        capacity: u64,
    },
    /// Another process under the same worker id streams to a live head.
    #[error("worker id is held by another process streaming to head {head} at {head_addr} (that worker reported address {worker_addr:?})")]
    Held {
        /// The head the other process streams to.
        head: String,
        /// That head's address.
        head_addr: String,
        /// The address the other process reported in its `Reassign`.
        worker_addr: String,
    },
    /// The head's lease names another process (see `REFRESH_LEASE`).
    #[error("the lease of this head id is held by another process at {addr} ({pttl_ms} ms left)")]
    LeaseHeldElsewhere {
        /// The address that process advertises.
        addr: String,
        /// What is left of its lease, in milliseconds.
        pttl_ms: i64,
    },
    /// Redis answered with something this version does not understand.
    #[error("unexpected registry reply: {0}")]
    Protocol(String),
}

impl RegistryError {
    /// Whether the same call may succeed if made again later, unchanged.
    ///
    /// - `Unavailable`: yes; Redis was unreachable or slow, which passes
    ///   (a restart, a failover, a partition that heals), and refused
    ///   credentials, which an operator fixes without a restart of ours.
    /// - `NoLease`: yes; the head's lease loop registers it again within
    ///   one heartbeat interval.
    /// - `Draining`, `Full`, `AtCapacity`: no; this head refuses the worker
    ///   and keeps refusing until its load changes or for good (a draining
    ///   head adopts no one again): ask another head.
    /// - `Held`, `LeaseHeldElsewhere`: no; another process holds the id,
    ///   which is a configuration fault (ids must be unique), not a
    ///   passing one.
    /// - `Protocol`: no; Redis answered something this version does not
    ///   understand, and will answer the same.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::NoLease => true,
            Self::Draining
            | Self::Full { .. }
            | Self::AtCapacity { .. }
            | Self::Held { .. }
            | Self::LeaseHeldElsewhere { .. }
            | Self::Protocol(_) => false,
        }
    }
}

/// A result of a registry call.
pub type Result<T> = std::result::Result<T, RegistryError>;

pub use crate::pb::HeadState;

/// The state of a head as the `LIVE_HEADS` script spells it; anything
/// else (a newer head's word) is `Unspecified`, which no caller treats as
/// ready.
pub fn head_state(text: &str) -> HeadState {
    match text {
        "ready" => HeadState::Ready,
        "draining" => HeadState::Draining,
        "stale" => HeadState::Stale,
        _ => HeadState::Unspecified,
    }
}

/// The word for `state` in Redis and in what tetherctl prints.
pub fn head_state_name(state: HeadState) -> &'static str {
    match state {
        HeadState::Ready => "ready",
        HeadState::Draining => "draining",
        HeadState::Stale => "stale",
        HeadState::Unspecified => "unknown",
    }
}

/// A live head as the registry sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadEntry {
    /// The head's id.
    pub id: String,
    /// The address workers dial.
    pub addr: String,
    /// `Ready`; `Draining`; or `Stale`: its lease has run down past half,
    /// so it is probably gone (tried last, not counted as live). Redis
    /// holds it as `ready` / `draining` / `stale` ([`head_state`]).
    pub state: HeadState,
    /// How many workers Redis counts as assigned to it.
    pub assigned: u64,
    /// When the head process started (Unix ms): a restart changes it, a
    /// pause does not.
    pub started_ms: i64,
    /// The head's `--capacity`: 0 for none (or a head too old to say).
    pub capacity: u64,
    /// Where the head serves `/metrics` and the dashboard (host:port);
    /// empty when it serves neither, or runs a version too old to say.
    /// The dashboard lists it so that a user can switch heads.
    pub metrics_addr: String,
}

/// What opening a stream found in the head's assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The assignment is this head's at this epoch, now marked streaming;
    /// holds the address the worker reported.
    Current {
        /// Where the worker serves `WorkerService`.
        worker_addr: String,
    },
    /// This head holds the worker under another epoch.
    OtherEpoch(u64),
    /// This head holds no assignment for the worker (never adopted here,
    /// or adopted elsewhere since).
    NotHere,
}

/// One stream a head re-records after its lease lapsed.
#[derive(Debug, Clone)]
pub struct HeldStream {
    /// The worker.
    pub worker_id: String,
    /// The epoch the stream was opened with.
    pub epoch: u64,
    /// The worker process's instance, as it gave it to `Reassign`.
    pub instance: String,
    /// The address the worker reported.
    pub worker_addr: String,
}

/// What a lease refresh tells the head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRefresh {
    /// False if the lease had lapsed (or never existed) before this call.
    pub existed: bool,
    /// The heads version counter: it changes whenever a head registers or
    /// deregisters.
    pub heads_version: u64,
    /// How many workers the registry counts for this head (adopted or
    /// streaming), to compare with what the head itself holds.
    pub assigned: u64,
    /// Workers that other heads adopted since the last refresh, with their
    /// new epochs: the head must close its streams of older epochs.
    pub fenced: Vec<(String, u64)>,
    /// The cluster's loads as the last sweep counted them (at most a lease
    /// TTL old); `None` before the first sweep, or if it expired.
    pub loads: Option<LoadDigest>,
    /// Heads whose lease expired and that this refresh's sweep removed
    /// from the registry: this head, and no other, announces them.
    pub gone: Vec<String>,
}

/// The cluster's loads in four numbers, written by the head whose turn it
/// was to sweep and read back by every refresh at no extra command: enough
/// for a head to tell whether it is over the load bound while another
/// head is under its share, without reading every lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadDigest {
    /// W: workers assigned to live heads.
    pub assigned: u64,
    /// Heads that are `ready` (neither draining nor stale).
    pub ready: u64,
    /// The smallest load of a ready head.
    pub least: u64,
    /// Live heads, whatever their state.
    pub live: u64,
}

impl LoadDigest {
    /// Parses `W R least live`, as the sweep writes it.
    pub fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_ascii_whitespace().map(|n| n.parse::<u64>());
        let mut next = || it.next()?.ok();
        Some(Self {
            assigned: next()?,
            ready: next()?,
            least: next()?,
            live: next()?,
        })
    }
}

/// A worker's request to be adopted, with the head's placement policy.
#[derive(Debug, Clone)]
pub struct AssignRequest<'a> {
    /// The adopting head.
    pub head_id: &'a str,
    /// The worker.
    pub worker_id: &'a str,
    /// Where the worker serves `WorkerService`.
    pub worker_addr: &'a str,
    /// TTL of the head's worker set and fence lists.
    pub lease_ttl: Duration,
    /// ε of the load bound, in thousandths (250 for 0.25).
    pub slack_permille: u32,
    /// Hard cap on the head's workers; 0 for none.
    pub capacity: u64,
    /// The worker process's instance token, so that a second process
    /// under the same id is refused; empty for clients that send none.
    pub instance: &'a str,
    /// Heads that do not count as live in the load bound: the one the
    /// worker lost, and those it found unreachable or full.
    pub excluded: &'a [String],
    /// The worker's stream is already open (adopt on open): record the
    /// assignment streaming at once, which `claim` does otherwise when
    /// the stream opens after `Reassign`.
    pub streaming: bool,
}

/// What a head writes into its lease.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The head's id.
    pub head_id: String,
    /// The address workers should dial.
    pub addr: String,
    /// How long the lease lives without a refresh.
    pub ttl: Duration,
    /// When the head started, Unix milliseconds.
    pub started_ms: i64,
    /// A random token naming this head process, so that a second process
    /// under the same id is told apart from this one's own refreshes.
    pub instance: String,
    /// The head's hard cap on workers (0: none), shown to workers by
    /// `ListHeads`.
    pub capacity: u64,
    /// Where the head serves metrics and the dashboard (host:port), or
    /// empty; shown by `ListHeads` and the dashboard.
    pub metrics_addr: String,
}

/// A handle to the registry: a connection pool and the key layout.
/// Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    /// The pools, and the following of a moving master or node.
    backend: Arc<Backend>,
    keys: Keys,
    op_timeout: Duration,
    /// Where the registry connects, password hidden: named in errors.
    target: Arc<str>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool holds the URL and thus maybe a password: never print it.
        f.debug_struct("Registry")
            .field("keys", &self.keys)
            .finish()
    }
}

/// The current time in Unix milliseconds: for display fields and as the
/// seed of a lost epoch counter, never for a timeout.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Registry {
    /// A registry on `url` under `namespace`. Does not connect yet: the
    /// first call does, so a process may start before Redis. Every call
    /// shares one multiplexed connection (see `backend::Backend` for why).
    pub fn new(url: &str, namespace: &str) -> Result<Self> {
        let op_timeout = Duration::from_secs(2);
        let topology = Topology::parse(url).map_err(RegistryError::Protocol)?;
        let pool = PoolConfig {
            // One connection, shared (see `Backend`).
            max_size: 1,
            timeouts: Timeouts {
                wait: Some(op_timeout),
                create: Some(op_timeout),
                recycle: Some(op_timeout),
            },
            ..PoolConfig::default()
        };
        let target = topology.describe().into();
        let backend = Backend::new(topology, pool).map_err(RegistryError::Protocol)?;
        Ok(Self {
            backend: Arc::new(backend),
            keys: Keys::new(namespace),
            op_timeout,
            target,
        })
    }

    /// Where the registry connects, as errors and logs show it: host,
    /// port and user, never the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// An [`RegistryError::Unavailable`] naming this registry's Redis.
    pub fn unavailable(&self, cause: impl Into<String>) -> RegistryError {
        RegistryError::Unavailable {
            at: self.target.clone(),
            cause: cause.into(),
        }
    }

    /// `e` with this registry's Redis named, if it is an unavailability
    /// found before the target was known (see [`classify`]).
    fn located(&self, e: RegistryError) -> RegistryError {
        match e {
            RegistryError::Unavailable { at, cause } if at.is_empty() => self.unavailable(cause),
            e => e,
        }
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs one Redis operation on a pooled connection, bounded by the
    /// operation timeout.
    async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(AnyConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.backend.get().await.map_err(|e| self.unavailable(e))?;
            op(conn).await.map_err(|e| self.located(classify(e)))
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.op_timeout, work)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {:?}", self.op_timeout)))
            .and_then(|r| r);
        let m = &crate::metrics::METRICS;
        m.redis_latency.observe(started.elapsed());
        if matches!(
            result,
            Err(RegistryError::Unavailable { .. } | RegistryError::Protocol(_))
        ) {
            m.redis_errors.inc();
            // The shared connection may be broken (or talking to a demoted
            // master): the next call makes a new one.
            self.backend.invalidate();
        }
        result
    }

    /// Publishes encoded membership events to every head, in one round
    /// trip.
    pub async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        let channel = self.keys.events();
        self.with_conn(|mut c| async move {
            let mut pipe = redis::pipe();
            for payload in payloads {
                pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
            }
            pipe.query_async::<()>(&mut c).await
        })
        .await
    }

    /// A dedicated connection subscribed to the membership events.
    pub async fn subscribe_events(&self) -> Result<redis::aio::PubSubStream> {
        let work = async {
            let client = self.backend.pubsub_client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(self.keys.events()).await?;
            Ok(pubsub.into_on_message())
        };
        tokio::time::timeout(self.op_timeout, work)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {:?}", self.op_timeout)))?
            .map_err(|e| self.located(classify(e)))
    }

    /// Changes whenever the Redis master moved (Sentinel): long-lived
    /// connections such as the event subscription should reconnect.
    pub fn topology_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.backend.changes()
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<()> {
        self.with_conn(
            |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
        )
        .await
        .map(|_| ())
    }

    /// Creates or refreshes a head's lease, marked `state` (`ready` or
    /// `draining`), and collects the fencing notices left for the head.
    ///
    /// `write` rewrites the lease's fields even if it exists: on the
    /// process's first refresh, and when `state` changed.
    pub async fn refresh_lease(
        &self,
        lease: &LeaseInfo,
        state: &str,
        write: bool,
    ) -> Result<LeaseRefresh> {
        let k = &self.keys;
        let mut inv = scripts::REFRESH_LEASE.prepare_invoke();
        inv.key(k.head(&lease.head_id))
            .key(k.heads())
            .key(k.assigned(&lease.head_id))
            .key(k.fence(&lease.head_id))
            .key(k.heads_version())
            .key(k.loads())
            .arg(&lease.head_id)
            .arg(&lease.addr)
            .arg(lease.ttl.as_millis() as u64)
            .arg(lease.started_ms)
            .arg(state)
            .arg(if write { "1" } else { "0" })
            .arg(&lease.instance)
            .arg(k.head_prefix())
            .arg(k.assigned_prefix())
            .arg(lease.capacity)
            .arg(&lease.metrics_addr);
        let reply: Vec<redis::Value> = self
            .with_conn(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let mut items = reply.iter();
        let existed = items.next().map(number).transpose()?.unwrap_or(0) == 1;
        let heads_version = items.next().map(number).transpose()?.unwrap_or(0);
        let assigned = items.next().map(number).transpose()?.unwrap_or(0);
        let loads = items
            .next()
            .map(text)
            .transpose()?
            .and_then(|d| LoadDigest::parse(&d));
        let gone: Vec<String> = match items.next() {
            Some(v) => redis::from_redis_value_ref(v)
                .map_err(|e| RegistryError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let mut fenced = Vec::new();
        for item in items {
            let entry = text(item)?;
            match parse_fence(&entry) {
                Some(notice) => fenced.push(notice),
                None => {
                    // Dropping it would leave a stream of a worker that
                    // another head adopted open here: say so loudly.
                    crate::metrics::METRICS.fence_unparsable.inc();
                    tracing::warn!(head = %lease.head_id, entry = %entry, "cannot parse a fencing notice (expected epoch:worker); ignoring it");
                }
            }
        }
        Ok(LeaseRefresh {
            existed,
            heads_version,
            assigned,
            fenced,
            loads,
            gone,
        })
    }

    /// Re-records the workers whose streams a head holds after it got its
    /// lease back; returns those another head took under a newer epoch.
    pub async fn reclaim(
        &self,
        head_id: &str,
        streams: &[HeldStream],
        lease_ttl: Duration,
    ) -> Result<Vec<String>> {
        let mut stale = Vec::new();
        // Chunks keep each script call short: Redis runs nothing else
        // while a script runs.
        for chunk in streams.chunks(500) {
            let k = &self.keys;
            let mut inv = scripts::RECLAIM.prepare_invoke();
            inv.key(k.assigned(head_id))
                .key(k.epoch())
                .key(k.heads())
                .arg(head_id)
                .arg(k.assigned_prefix())
                .arg(lease_ttl.as_millis() as u64)
                .arg(epoch_seed());
            for s in chunk {
                inv.arg(&s.worker_id)
                    .arg(s.epoch.to_string())
                    .arg(&s.instance)
                    .arg(&s.worker_addr);
            }
            let part: Vec<String> = self
                .with_conn(|mut c| async move { inv.invoke_async(&mut c).await })
                .await?;
            stale.extend(part);
        }
        Ok(stale)
    }

    /// Removes a head's lease and assignments at once.
    pub async fn deregister(&self, head_id: &str) -> Result<()> {
        let k = &self.keys;
        let mut inv = scripts::DEREGISTER.prepare_invoke();
        inv.key(k.head(head_id))
            .key(k.heads())
            .key(k.assigned(head_id))
            .key(k.fence(head_id))
            .key(k.heads_version())
            .arg(head_id);
        self.with_conn(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// The heads whose lease is live, sorted by id.
    pub async fn live_heads(&self) -> Result<Vec<HeadEntry>> {
        self.live_heads_versioned().await.map(|(heads, _)| heads)
    }

    /// The heads whose lease is live, sorted by id, and the heads version
    /// they were read at (in the same script, so the two agree): a worker
    /// may reuse the list for as long as its head's beats carry that
    /// version.
    pub async fn live_heads_versioned(&self) -> Result<(Vec<HeadEntry>, u64)> {
        let k = &self.keys;
        let mut inv = scripts::LIVE_HEADS.prepare_invoke();
        inv.key(k.heads())
            .key(k.heads_version())
            .arg(k.head_prefix())
            .arg(k.assigned_prefix());
        let flat: Vec<redis::Value> = self
            .with_conn(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let (version, flat) = flat
            .split_first()
            .ok_or_else(|| RegistryError::Protocol("LIVE_HEADS answered nothing".into()))?;
        let version = text(version)?.parse().unwrap_or(0);
        let mut heads = Vec::with_capacity(flat.len() / 7);
        for chunk in flat.chunks_exact(7) {
            heads.push(HeadEntry {
                id: text(&chunk[0])?,
                addr: text(&chunk[1])?,
                state: head_state(&text(&chunk[2])?),
                assigned: number(&chunk[3])?,
                started_ms: text(&chunk[4])?.parse().unwrap_or(0),
                capacity: text(&chunk[5])?.parse().unwrap_or(0),
                metrics_addr: text(&chunk[6])?,
            });
        }
        heads.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((heads, version))
    }

    /// Assigns the worker to the head under a new epoch, atomically and
    /// within the head's load bound, and returns the epoch.
    pub async fn assign(&self, req: &AssignRequest<'_>) -> Result<u64> {
        let k = &self.keys;
        let mut inv = scripts::ASSIGN.prepare_invoke();
        inv.key(k.head(req.head_id))
            .key(k.assigned(req.head_id))
            .key(k.epoch())
            .key(k.heads())
            .arg(req.head_id)
            .arg(req.worker_id)
            .arg(epoch_seed())
            .arg(req.lease_ttl.as_millis() as u64)
            .arg(k.head_prefix())
            .arg(k.assigned_prefix())
            .arg(k.fence_prefix())
            .arg(req.slack_permille)
            .arg(req.capacity)
            .arg(req.instance)
            .arg(req.worker_addr)
            .arg(if req.streaming { "s" } else { "p" });
        for head in req.excluded {
            inv.arg(head);
        }
        let epoch: String = self
            .with_conn(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        parse_epoch(&epoch)
    }

    /// Marks the worker's assignment streaming if it is still `head_id`'s
    /// at `epoch`.
    pub async fn claim(&self, head_id: &str, worker_id: &str, epoch: u64) -> Result<Claim> {
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(self.keys.assigned(head_id))
            .arg(worker_id)
            .arg(epoch.to_string());
        let (ok, detail): (i64, String) = self
            .with_conn(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(match (ok, detail.as_str()) {
            (1, _) => Claim::Current {
                worker_addr: detail,
            },
            (_, "") => Claim::NotHere,
            (_, other) => Claim::OtherEpoch(parse_epoch(other)?),
        })
    }

    /// Drops the worker's assignment if it is still `head_id`'s at
    /// `epoch`. Returns whether it did.
    pub async fn release(&self, head_id: &str, worker_id: &str, epoch: u64) -> Result<bool> {
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(self.keys.assigned(head_id))
            .arg(worker_id)
            .arg(epoch.to_string());
        self.with_conn(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map(|n| n == 1)
    }

    /// Every assignment the registry holds for `head_id`, as (worker,
    /// epoch), read in pages so that a large head does not stall Redis.
    /// Used only when the registry's count disagrees with the head's own.
    pub async fn assignments_of(&self, head_id: &str) -> Result<Vec<(String, u64)>> {
        let key = self.keys.assigned(head_id);
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let key = key.clone();
            let (next, page): (u64, Vec<(String, String)>) = self
                .with_conn(|mut c| async move {
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            for (worker, value) in page {
                let epoch = value.split('|').next().unwrap_or_default();
                if let Ok(epoch) = epoch.parse() {
                    out.push((worker, epoch));
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

/// The seed of a lost epoch counter: the clock in microseconds, far above
/// any epoch handed out before (a million epochs a second would be needed
/// to catch up with it).
fn epoch_seed() -> String {
    (u64::try_from(now_ms()).unwrap_or(0) * 1000).to_string()
}

fn parse_epoch(text: &str) -> Result<u64> {
    text.parse()
        .map_err(|_| RegistryError::Protocol(format!("epoch {text:?} is not an integer")))
}

/// Parses a fencing notice, `epoch:worker`.
fn parse_fence(entry: &str) -> Option<(String, u64)> {
    let (epoch, worker) = entry.split_once(':')?;
    if worker.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((worker.to_owned(), epoch.parse().ok()?))
}

fn classify(e: redis::RedisError) -> RegistryError {
    let two_numbers = || {
        let mut it = e.detail().unwrap_or("").split_whitespace();
        let a = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        let b = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        (a, b)
    };
    match e.code() {
        Some("NOLEASE") => return RegistryError::NoLease,
        Some("DRAINING") => return RegistryError::Draining,
        Some("FULL") => {
            let (load, bound) = two_numbers();
            return RegistryError::Full { load, bound };
        }
        Some("CAPACITY") => {
            let (load, capacity) = two_numbers();
            return RegistryError::AtCapacity { load, capacity };
        }
        Some("FOREIGN") => {
            let detail = e.detail().unwrap_or("");
            let (pttl, addr) = detail.split_once(' ').unwrap_or((detail, ""));
            return RegistryError::LeaseHeldElsewhere {
                addr: addr.to_owned(),
                pttl_ms: pttl.parse().unwrap_or(-1),
            };
        }
        Some("HELD") => {
            let detail = e.detail().unwrap_or("");
            let mut it = detail.splitn(3, ' ');
            let mut next = || it.next().unwrap_or("").to_owned();
            return RegistryError::Held {
                head: next(),
                head_addr: next(),
                worker_addr: next(),
            };
        }
        _ => {}
    }
    let text = e.to_string();
    if [
        "NOAUTH",
        "WRONGPASS",
        "unauthenticated",
        "invalid username-password",
    ]
    .iter()
    .any(|m| text.contains(m))
    {
        return RegistryError::Unavailable {
            at: "".into(),
            cause: "Redis refused the credentials: check the user and password in --redis-url"
                .into(),
        };
    }
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        RegistryError::Unavailable {
            at: "".into(),
            cause: e.to_string(),
        }
    } else {
        RegistryError::Protocol(e.to_string())
    }
}

fn text(v: &redis::Value) -> Result<String> {
    redis::from_redis_value_ref::<String>(v).map_err(|e| RegistryError::Protocol(e.to_string()))
}

fn number(v: &redis::Value) -> Result<u64> {
    redis::from_redis_value_ref::<u64>(v).map_err(|e| RegistryError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passing_faults_are_retryable() {
        let unavailable = RegistryError::Unavailable {
            at: "redis://h:6379".into(),
            cause: "connection refused".into(),
        };
        assert!(unavailable.is_retryable());
        assert!(RegistryError::NoLease.is_retryable());
        for e in [
            RegistryError::Draining,
            RegistryError::Full { load: 3, bound: 3 },
            RegistryError::AtCapacity {
                load: 5,
                capacity: 5,
            },
            RegistryError::Held {
                head: "h".into(),
                head_addr: "a".into(),
                worker_addr: "w".into(),
            },
            RegistryError::LeaseHeldElsewhere {
                addr: "a".into(),
                pttl_ms: 100,
            },
            RegistryError::Protocol("?".into()),
        ] {
            assert!(!e.is_retryable(), "{e:?}");
        }
    }
}
