//! `tetherctl`: look at a running Tether cluster and act on it.
//!
//! It reads the registry (`--redis-url`) to find the heads and calls them
//! over gRPC: `status` shows heads, their load and their workers' beat
//! ages; `watch` prints the cluster's membership events live; `drain`
//! drains one head.
//!
//! Times are printed as UTC RFC 3339 dates (`2025-01-02T12:03:04.512Z`)
//! and ages (`3.2s ago`); the proto's fields are Unix milliseconds.

use clap::{Parser, Subcommand};
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tether::backoff::Backoff;
use tether::config::RegistryArgs;
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::{ClusterEvent, DrainRequest, EventKind, WatchEventsRequest, WorkerInfo};
use tether::registry::{now_ms, HeadEntry, HeadState, Registry};
use tether::security::{ClientSecurity, ClientSecurityArgs};
use tonic::transport::Channel;
use tonic::Streaming;

/// `status` lists workers one per line only up to this many in the
/// cluster; above it, the per-head summary is what stays readable.
const LIST_WORKERS_UP_TO: usize = 100;

/// How often `watch` pings a head over HTTP/2 to notice that it hangs.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(2);

/// How often `watch` looks for a standby head while there is none.
const STANDBY_RECHECK: Duration = Duration::from_secs(2);

/// How long `watch` tries a head whose stream broke only after the
/// others: a SIGKILLed head stays in the registry until its lease runs out.
const FAILED_AVOID: Duration = Duration::from_secs(30);

/// Events `watch` remembers to tell the standby's copies from new ones.
/// The head cuts a watcher that falls 1,024 events behind.
const DEDUP_WINDOW: usize = 4096;

/// Inspect and operate a Tether cluster.
#[derive(Debug, Parser)]
#[command(
    name = "tetherctl",
    version,
    about = "Inspect and operate a Tether cluster: status, watch, drain.",
    long_about = None
)]
struct Args {
    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    security: ClientSecurityArgs,

    /// Bound on each call to a head.
    #[arg(long, default_value = "3s", value_parser = tether::config::parse_duration)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Heads with address, state and load; workers per head with beat ages.
    ///
    /// Each head's line counts its open streams and gives percentiles of
    /// their beat ages. Workers are listed one per line only while the
    /// cluster has at most 100, or with `--workers HEAD`.
    Status {
        /// Only the per-head summary, never one line per worker.
        #[arg(long, conflicts_with = "workers")]
        brief: bool,
        /// List every worker of this head, one per line, however many.
        #[arg(long, value_name = "HEAD")]
        workers: Option<String>,
    },
    /// Print membership events as they happen, until Ctrl-C.
    ///
    /// A second stream through another head stands by, so that when the
    /// watched head dies the events go on without a gap; when no stream
    /// is left, it moves to another live head (with backoff) and prints
    /// the gap.
    Watch {
        /// Watch through this head first (default: the first ready head).
        #[arg(long)]
        head: Option<String>,
    },
    /// Drain a head: it hands its workers to other heads and exits.
    Drain {
        /// The id of the head to drain.
        head_id: String,
    },
}

fn main() -> ExitCode {
    let args: Args = tether::config::parse_args("tetherctl");
    let security = match args
        .registry
        .validate()
        .map_err(String::from)
        .and_then(|()| args.security.load())
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("tetherctl: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tetherctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherctl: {e}");
            ExitCode::from(1)
        }
    }
}

struct Ctl {
    registry: Registry,
    security: ClientSecurity,
    timeout: Duration,
}

async fn run(args: Args, security: ClientSecurity) -> Result<(), String> {
    let registry = Registry::new(&args.registry.redis_url, &args.registry.namespace)
        .map_err(|e| e.to_string())?;
    let ctl = Ctl {
        registry,
        security,
        timeout: args.timeout,
    };
    match args.command {
        Command::Status { brief, workers } => ctl.status(brief, workers).await,
        Command::Watch { head } => ctl.watch(head).await,
        Command::Drain { head_id } => ctl.drain(&head_id).await,
    }
}

impl Ctl {
    async fn heads(&self) -> Result<Vec<HeadEntry>, String> {
        self.registry
            .live_heads()
            .await
            .map_err(|e| format!("cannot read the registry: {e}"))
    }

    async fn client(&self, head: &HeadEntry) -> Result<HeadServiceClient<Channel>, String> {
        let channel = self
            .security
            .endpoint(&head.addr)?
            .connect_timeout(self.timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot reach head {} at {}: {e}", head.id, head.addr))?;
        Ok(HeadServiceClient::new(channel))
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        self.security.authorize(&mut request);
        request
    }

    /// Every page of one head's `ListWorkers`.
    async fn list_all(&self, head: &HeadEntry) -> Result<Vec<WorkerInfo>, String> {
        let mut client = self.client(head).await?;
        tether::listing::list_all(&mut client, |m| self.request(m))
            .await
            .map(|answer| answer.workers)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    async fn status(&self, brief: bool, workers_of: Option<String>) -> Result<(), String> {
        let mut heads = self.heads().await?;
        if let Some(id) = &workers_of {
            heads.retain(|h| &h.id == id);
            if heads.is_empty() {
                return Err(format!("head {id} is not in the registry"));
            }
        }
        if heads.is_empty() {
            println!("no live head in the registry");
            return Ok(());
        }
        println!(
            "{:<24} {:<22} {:<9} {:>8} {:>8}  {:>7} {:>7} {:>7}",
            "HEAD", "ADDRESS", "STATE", "ASSIGNED", "STREAMS", "AGE P50", "P99", "MAX"
        );
        let mut listings = Vec::new();
        for head in &heads {
            let listing = self.list_all(head).await;
            let (streams, ages) = match &listing {
                Ok(w) => (w.len().to_string(), BeatAges::of(w, now_ms()).to_string()),
                Err(_) => ("?".into(), format!("{:>7} {:>7} {:>7}", "-", "-", "-")),
            };
            println!(
                "{:<24} {:<22} {:<9} {:>8} {:>8}  {ages}",
                head.id,
                head.addr,
                tether::registry::head_state_name(head.state),
                head.assigned,
                streams
            );
            listings.push((head.id.clone(), listing));
        }
        let listed: usize = listings
            .iter()
            .map(|(_, l)| l.as_ref().map_or(0, Vec::len))
            .sum();
        let every_worker = workers_of.is_some() || (!brief && listed <= LIST_WORKERS_UP_TO);
        let now = now_ms();
        for (head, listing) in listings {
            match listing {
                Err(e) => println!("\n{head}: cannot list workers: {e}"),
                Ok(workers) if every_worker => {
                    println!("\n{head}: {} workers", workers.len());
                    println!(
                        "  {:<32} {:>8} {:<24} {:>13} {:>14}",
                        "WORKER", "EPOCH", "ATTACHED AT", "ATTACHED FOR", "LAST BEAT"
                    );
                    for w in workers {
                        println!(
                            "  {:<32} {:>8} {:<24} {:>13} {:>14}",
                            w.worker_id,
                            w.epoch,
                            date(w.attached_since_ms),
                            age(now - w.attached_since_ms),
                            ago(now - w.last_beat_ms)
                        );
                    }
                }
                Ok(_) => {}
            }
        }
        if !brief && !every_worker {
            println!(
                "\n{listed} workers in all (AGE: time since each worker's last beat); \
                 more than {LIST_WORKERS_UP_TO}, so not one per line: \
                 `tetherctl status --workers HEAD` lists one head's"
            );
        }
        Ok(())
    }

    /// Opens a `WatchEvents` stream through `head`. The channel sends
    /// HTTP/2 pings, so a head that hangs (rather than dies) breaks the
    /// stream instead of leaving it silent for ever.
    async fn feed(&self, head: &HeadEntry) -> Result<Feed, String> {
        let channel = self
            .security
            .endpoint(&head.addr)?
            .connect_timeout(self.timeout)
            .http2_keep_alive_interval(WATCH_KEEPALIVE)
            .keep_alive_timeout(self.timeout)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| format!("cannot reach head {} at {}: {e}", head.id, head.addr))?;
        let mut request = tonic::Request::new(WatchEventsRequest {});
        self.security.authorize(&mut request);
        // A deadline on the call itself, not on the stream that follows.
        let stream = tokio::time::timeout(
            self.timeout,
            HeadServiceClient::new(channel).watch_events(request),
        )
        .await
        .map_err(|_| {
            format!(
                "head {} did not answer WatchEvents within {:?}",
                head.id, self.timeout
            )
        })?
        .map_err(|s| format!("head {}: {:?}: {}", head.id, s.code(), s.message()))?
        .into_inner();
        Ok(Feed {
            head: head.clone(),
            stream,
        })
    }

    /// The first head of `order` that opens a stream; `failed` learns
    /// the others.
    async fn first_feed(&self, order: Vec<HeadEntry>, failed: &mut Failed) -> Result<Feed, String> {
        let mut errors = Vec::new();
        for head in order {
            match self.feed(&head).await {
                Ok(feed) => return Ok(feed),
                Err(e) => {
                    failed.record(&head);
                    errors.push(e);
                }
            }
        }
        Err(if errors.is_empty() {
            "no live head in the registry".into()
        } else {
            errors.join("; ")
        })
    }

    async fn watch(&self, through: Option<String>) -> Result<(), String> {
        tokio::select! {
            r = self.follow(through) => r,
            _ = tether::shutdown::signal() => Ok(()),
        }
    }

    /// Prints the cluster's events through one head (the primary) while
    /// a second stream through another head (the standby) stays open.
    /// When the primary breaks, the standby takes over with the events it
    /// already holds, so a head's death costs no event; a new standby is
    /// opened afterwards. Only when no stream is open are events missed,
    /// and that gap is printed. Never returns but on a bad `--head`.
    async fn follow(&self, through: Option<String>) -> Result<(), String> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 3);
        let mut standby_backoff = backoff.clone();
        let mut failed = Failed::default();
        let mut dedup = Dedup::default();
        let mut first = true;
        // When the last stream broke, and why: the start of a gap.
        let mut gap: Option<(i64, String)> = None;
        loop {
            let heads = match self.heads().await {
                Ok(h) => h,
                Err(e) => {
                    let delay = backoff.next_delay();
                    eprintln!("{e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if first {
                if let Some(id) = &through {
                    if !heads.iter().any(|h| &h.id == id) {
                        return Err(format!("head {id} is not in the registry"));
                    }
                }
            }
            let order = failed.order(heads, through.as_deref(), None, true);
            let mut primary = match self.first_feed(order, &mut failed).await {
                Ok(feed) => feed,
                Err(e) => {
                    let delay = backoff.next_delay();
                    eprintln!("cannot watch: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            backoff.reset();
            first = false;
            match gap.take() {
                None => println!(
                    "{} -- watching the cluster's events through head {} ({})",
                    date(now_ms()),
                    primary.head.id,
                    primary.head.addr
                ),
                Some((since, why)) => {
                    let now = now_ms();
                    println!(
                        "{} -- GAP: events from {} to {} ({}) were missed ({why}); watching through head {} ({}) again",
                        date(now),
                        date(since),
                        date(now),
                        age(now - since),
                        primary.head.id,
                        primary.head.addr
                    );
                }
            }
            let mut standby: Option<Feed> = None;
            let mut next_standby = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    m = primary.stream.message() => match m {
                        Ok(Some(event)) => {
                            if dedup.primary(&event) {
                                println!("{}", describe(&event));
                            }
                        }
                        end => {
                            failed.record(&primary.head);
                            let why = ended(&primary.head, end);
                            match standby.take() {
                                Some(next) => {
                                    println!(
                                        "{} -- {why}; continuing through head {} ({}), whose stream was already open: no event missed",
                                        date(now_ms()), next.head.id, next.head.addr
                                    );
                                    for event in dedup.promote() {
                                        println!("{}", describe(&event));
                                    }
                                    primary = next;
                                    next_standby = tokio::time::Instant::now();
                                }
                                None => {
                                    let since = now_ms();
                                    println!("{} -- {why}; events are missed until a stream is open again", date(since));
                                    gap = Some((since, why));
                                    break;
                                }
                            }
                        }
                    },
                    m = next_event(standby.as_mut()) => match m {
                        Ok(Some(event)) => dedup.standby(event),
                        end => {
                            let lost = standby.take().expect("only polled while open");
                            failed.record(&lost.head);
                            eprintln!("standby: {}", ended(&lost.head, end));
                            dedup.forget_standby();
                            next_standby = tokio::time::Instant::now() + standby_backoff.next_delay();
                        }
                    },
                    _ = tokio::time::sleep_until(next_standby), if standby.is_none() => {
                        match self.open_standby(&primary.head, &mut failed).await {
                            Ok(Some(feed)) => {
                                eprintln!("standby stream open through head {} ({})", feed.head.id, feed.head.addr);
                                standby_backoff.reset();
                                standby = Some(feed);
                            }
                            Ok(None) => next_standby = tokio::time::Instant::now() + STANDBY_RECHECK,
                            Err(e) => {
                                let delay = standby_backoff.next_delay();
                                eprintln!("standby: {e}; retrying in {delay:?}");
                                next_standby = tokio::time::Instant::now() + delay;
                            }
                        }
                    }
                }
            }
            // Straight to the next head: backoff is for failing attempts.
        }
    }

    /// A stream through a live head other than `primary`; none if there
    /// is no other head.
    async fn open_standby(
        &self,
        primary: &HeadEntry,
        failed: &mut Failed,
    ) -> Result<Option<Feed>, String> {
        let heads = self.heads().await?;
        let order = failed.order(heads, None, Some(&primary.id), false);
        if order.is_empty() {
            return Ok(None);
        }
        self.first_feed(order, failed).await.map(Some)
    }

    async fn drain(&self, head_id: &str) -> Result<(), String> {
        let heads = self.heads().await?;
        let head = heads
            .iter()
            .find(|h| h.id == head_id)
            .ok_or_else(|| format!("head {head_id} is not in the registry"))?;
        let answer = self
            .client(head)
            .await?
            .drain(self.request(DrainRequest {}))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        println!(
            "head {} is draining {} workers; it exits once they left, at the latest at {} (in {})",
            answer.head_id,
            answer.workers,
            date(answer.deadline_ms),
            age(answer.deadline_ms - now_ms())
        );
        Ok(())
    }
}

/// One `WatchEvents` stream and the head it comes through.
struct Feed {
    head: HeadEntry,
    stream: Streaming<ClusterEvent>,
}

/// The next message of `feed`; never resolves without one.
async fn next_event(feed: Option<&mut Feed>) -> Result<Option<ClusterEvent>, tonic::Status> {
    match feed {
        Some(f) => f.stream.message().await,
        None => std::future::pending().await,
    }
}

/// Why the stream through `head` ended, for one line of output.
fn ended(head: &HeadEntry, end: Result<Option<ClusterEvent>, tonic::Status>) -> String {
    match end {
        Ok(_) => format!(
            "the stream through head {} ended (the head is shutting down)",
            head.id
        ),
        Err(s) => format!(
            "the stream through head {} broke: {:?}: {}",
            head.id,
            s.code(),
            s.message()
        ),
    }
}

/// Heads whose stream broke or that could not be reached lately, so that
/// `watch` tries them last: the registry lists a killed head until its
/// lease runs out. A restarted head (new start time) is trusted again.
#[derive(Default)]
struct Failed(HashMap<String, (i64, Instant)>);

impl Failed {
    fn record(&mut self, head: &HeadEntry) {
        self.0
            .insert(head.id.clone(), (head.started_ms, Instant::now()));
    }

    fn recent(&self, head: &HeadEntry) -> bool {
        self.0
            .get(&head.id)
            .is_some_and(|(started, at)| *started == head.started_ms && at.elapsed() < FAILED_AVOID)
    }

    /// The heads to try, best first: `prefer`, then ready, draining and
    /// stale heads; the recently failed ones last, or not at all without
    /// `with_failed`. `exclude` never.
    fn order(
        &self,
        heads: Vec<HeadEntry>,
        prefer: Option<&str>,
        exclude: Option<&str>,
        with_failed: bool,
    ) -> Vec<HeadEntry> {
        let mut order: Vec<HeadEntry> = heads
            .into_iter()
            .filter(|h| Some(h.id.as_str()) != exclude && (with_failed || !self.recent(h)))
            .collect();
        order.sort_by_key(|h| {
            let state = match h.state {
                HeadState::Ready => 0,
                HeadState::Draining => 1,
                _ => 2,
            };
            (self.recent(h), Some(h.id.as_str()) != prefer, state)
        });
        order
    }
}

/// Tells the standby stream's copies of events from events the primary
/// has not delivered. Both streams carry the same events in the same
/// order (every head relays one Redis channel); the standby's are held
/// until the primary delivers them too, and printed only if the primary
/// breaks first.
#[derive(Default)]
struct Dedup {
    /// Encoded events printed lately, oldest first, and the same as a set.
    seen: VecDeque<Vec<u8>>,
    seen_set: HashSet<Vec<u8>>,
    /// The standby's events not yet delivered by the primary.
    held: VecDeque<(Vec<u8>, ClusterEvent)>,
}

impl Dedup {
    /// An event from the primary; true if it was not printed yet.
    fn primary(&mut self, event: &ClusterEvent) -> bool {
        let key = event.encode_to_vec();
        if let Some(at) = self.held.iter().position(|(k, _)| *k == key) {
            self.held.remove(at);
        }
        self.remember(key)
    }

    /// An event from the standby: held unless already printed.
    fn standby(&mut self, event: ClusterEvent) {
        let key = event.encode_to_vec();
        if self.seen_set.contains(&key) {
            return;
        }
        self.held.push_back((key, event));
        if self.held.len() > DEDUP_WINDOW {
            self.held.pop_front();
        }
    }

    /// The standby becomes the primary: its held events, in order, are
    /// the ones the old primary never delivered.
    fn promote(&mut self) -> Vec<ClusterEvent> {
        std::mem::take(&mut self.held)
            .into_iter()
            .filter_map(|(key, event)| self.remember(key).then_some(event))
            .collect()
    }

    /// The standby broke: what it held is the primary's to deliver.
    fn forget_standby(&mut self) {
        self.held.clear();
    }

    fn remember(&mut self, key: Vec<u8>) -> bool {
        if !self.seen_set.insert(key.clone()) {
            return false;
        }
        self.seen.push_back(key);
        if self.seen.len() > DEDUP_WINDOW {
            if let Some(old) = self.seen.pop_front() {
                self.seen_set.remove(&old);
            }
        }
        true
    }
}

/// Percentiles of how long ago a head's workers last beat, in ms.
struct BeatAges(Option<[i64; 3]>);

impl BeatAges {
    fn of(workers: &[WorkerInfo], now_ms: i64) -> Self {
        let mut ages: Vec<i64> = workers
            .iter()
            .map(|w| (now_ms - w.last_beat_ms).max(0))
            .collect();
        if ages.is_empty() {
            return Self(None);
        }
        ages.sort_unstable();
        let at = |q: f64| ages[((ages.len() - 1) as f64 * q).round() as usize];
        Self(Some([at(0.5), at(0.99), ages[ages.len() - 1]]))
    }
}

impl fmt::Display for BeatAges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "{:>7} {:>7} {:>7}", "-", "-", "-"),
            Some([p50, p99, max]) => write!(f, "{:>7} {:>7} {:>7}", age(p50), age(p99), age(max)),
        }
    }
}

/// One readable line per event.
fn describe(e: &ClusterEvent) -> String {
    let kind = EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified);
    let what = match kind {
        EventKind::WorkerAttached => format!(
            "worker {} attached to {} (epoch {})",
            e.worker_id, e.head_id, e.epoch
        ),
        EventKind::WorkerLeft => {
            format!("worker {} left {} ({})", e.worker_id, e.head_id, e.detail)
        }
        EventKind::WorkerMoved => format!(
            "worker {} moved {} -> {} (epoch {}, {})",
            e.worker_id, e.previous_head_id, e.head_id, e.epoch, e.detail
        ),
        EventKind::HeadJoined => format!("head {} joined at {}", e.head_id, e.detail),
        EventKind::HeadDraining => format!("head {} is draining", e.head_id),
        EventKind::HeadGone => format!("head {} gone ({})", e.head_id, e.detail),
        EventKind::Unspecified => format!("unknown event {e:?}"),
    };
    format!("{} {what}", date(e.at_ms))
}

/// Unix milliseconds as a UTC RFC 3339 date to the millisecond:
/// `2025-01-02T12:03:04.512Z`.
fn date(unix_ms: i64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{unix_ms} (Unix ms, out of range)"),
    }
}

/// A duration in milliseconds as people read it: `512ms`, `3.2s`,
/// `4m05s`, `2h07m`; negative ones (clock skew) count as zero.
fn age(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// How long ago, from an age in milliseconds: `3.2s ago`.
fn ago(ms: i64) -> String {
    format!("{} ago", age(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ages_read_as_people_read_them() {
        assert_eq!(date(1_735_819_384_512), "2025-01-02T12:03:04.512Z");
        assert_eq!(date(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(age(-5), "0ms");
        assert_eq!(age(512), "512ms");
        assert_eq!(ago(3_249), "3.2s ago");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(7_620_000), "2h07m");
    }
}
