//! Prometheus metrics: a few counters, gauges and histograms kept in
//! atomics (no lock, no allocation on the beat path), exposed in the
//! OpenMetrics text format by `prometheus-client` at `GET /metrics` on the
//! metrics port (`--metrics-listen`). The port's HTTP server lives here
//! too (axum's router on hyper, bounded in connections and time), because
//! a head also serves its dashboard there.
//!
//! One process-wide set: a process is either a head or a worker (or a
//! benchmark simulating many workers, which then sees their sum). The
//! counters and gauges are `prometheus-client`'s own (atomics); the
//! histograms are ours, a fixed array of atomic buckets, because the
//! crate's histogram takes a lock per observation.

use crate::backoff::Backoff;
use crate::shutdown::Shutdown;
use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{counter, gauge, MetricType};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// A monotonically increasing count (`prometheus-client`'s, an atomic).
#[derive(Debug, Default)]
pub struct Counter(counter::Counter);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down (`prometheus-client`'s, an atomic).
#[derive(Debug, Default)]
pub struct Gauge(gauge::Gauge);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.set(v);
    }
    /// Adds `d` (may be negative).
    pub fn add(&self, d: i64) {
        self.0.inc_by(d);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// Upper bounds of the histogram buckets, in seconds: from 1 ms (a local
/// Redis call) to 10 s (a failover that waited for a timeout).
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram over [`BUCKETS`]: atomics only, so observing takes
/// no lock (`prometheus-client`'s histogram locks). Clones share the
/// counts, as the crate's metrics do, so that the exposition registry
/// holds one.
#[derive(Debug, Clone, Default)]
pub struct Histogram(Arc<HistogramCounts>);

/// What a [`Histogram`] counts.
#[derive(Debug, Default)]
struct HistogramCounts {
    /// Per bucket (not cumulative); the last one is over 10 s (`+Inf`).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    /// Microseconds: an integer, so that it adds up in one atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        let h = &self.0;
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        // The encoder sums the buckets up and writes `f64::MAX` as `+Inf`.
        let mut buckets = [(0.0, 0); BUCKETS.len() + 1];
        for (i, b) in buckets.iter_mut().enumerate() {
            let bound = BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            *b = (bound, h.buckets[i].load(Ordering::Relaxed));
        }
        // Count as the buckets' sum, so that `+Inf` and `_count` agree
        // even while observations land during the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Reasons a worker moves, as label values, indexed like `ReassignReason`.
pub const REASONS: [&str; 5] = [
    "unspecified",
    "startup",
    "head_lost",
    "head_draining",
    "rebalance",
];

/// One counter per reason, as the family `{reason="..."}`: an array, so
/// that counting one is an index and an atomic add (a `Family` would look
/// the label set up in a locked map), written in [`REASONS`]' order.
#[derive(Debug)]
struct ByReason([counter::Counter; 5]);

impl EncodeMetric for ByReason {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (reason, counter) in REASONS.iter().zip(&self.0) {
            let labels = [("reason", *reason)];
            counter.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Every metric Tether keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Heads: live heads in the registry, as last read.
    pub heads_live: Gauge,
    /// Heads: open worker streams. Workers: 1 while attached.
    pub workers_attached: Gauge,
    /// Heartbeats this process sent.
    pub beats_sent: Counter,
    /// Heartbeats this process received.
    pub beats_received: Counter,
    /// Workers: expected HeadBeats that did not arrive (gaps over 1.5
    /// intervals). Heads never drop a beat, so theirs stays 0.
    pub missed_beats: Counter,
    /// Adoptions (heads) or moves (workers), by reason.
    pub reassignments: [Counter; 5],
    /// Workers: from losing a head to the first beat of the next one.
    pub failover: Histogram,
    /// Workers: from a redirect to the first beat of the new head.
    pub handoff: Histogram,
    /// Registry calls that failed.
    pub redis_errors: Counter,
    /// Registry call latency.
    pub redis_latency: Histogram,
    /// Heads: fencing notices that could not be parsed (never expected;
    /// each one may leave a stream of a moved worker open).
    pub fence_unparsable: Counter,
    /// Heads: streams refused because their first beat lacked the
    /// assignment's secret.
    pub streams_denied: Counter,
    /// Heads: adoptions whose worker never opened its stream, released.
    pub adoptions_expired: Counter,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// Which process renders: a head and a worker expose different sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tether-head`.
    Head,
    /// `tether-worker`.
    Worker,
}

/// The exposition of `role`: the process-wide metrics (shared, not
/// copied: `prometheus-client`'s metrics are handles to their atomics)
/// under their Prometheus names. A counter's `_total` suffix is added by
/// the encoder, as is the period that ends each help text.
fn registry(role: Role) -> Registry {
    let m = &*METRICS;
    let mut r = Registry::default();
    match role {
        Role::Head => {
            r.register(
                "tether_heads_live",
                "Live heads in the registry, as this head last read it",
                m.heads_live.0.clone(),
            );
            r.register(
                "tether_workers_attached",
                "Workers whose heartbeat stream is open on this head",
                m.workers_attached.0.clone(),
            );
        }
        Role::Worker => {
            r.register(
                "tether_worker_attached",
                "1 while this worker is attached to a head",
                m.workers_attached.0.clone(),
            );
        }
    }
    r.register(
        "tether_beats_sent",
        "Heartbeats sent",
        m.beats_sent.0.clone(),
    );
    r.register(
        "tether_beats_received",
        "Heartbeats received",
        m.beats_received.0.clone(),
    );
    r.register(
        "tether_missed_beats",
        "Head beats a worker expected and did not get (workers only: a head never drops a beat; a worker that stops reading stalls its own stream)",
        m.missed_beats.0.clone(),
    );
    r.register(
        "tether_reassignments",
        "Workers adopted (heads) or moves made (workers), by reason",
        ByReason(m.reassignments.each_ref().map(|c| c.0.clone())),
    );
    if role == Role::Head {
        r.register(
            "tether_fence_unparsable",
            "Fencing notices that could not be parsed",
            m.fence_unparsable.0.clone(),
        );
        r.register(
            "tether_streams_denied",
            "Heartbeat streams refused for a missing or wrong assignment secret",
            m.streams_denied.0.clone(),
        );
        r.register(
            "tether_adoptions_expired",
            "Adoptions released because the worker never opened its stream",
            m.adoptions_expired.0.clone(),
        );
    }
    if role == Role::Worker {
        r.register_with_unit(
            "tether_failover",
            "From losing a head to the first beat of the next one",
            Unit::Seconds,
            m.failover.clone(),
        );
        r.register_with_unit(
            "tether_handoff",
            "From a head's redirect to the first beat of the new head",
            Unit::Seconds,
            m.handoff.clone(),
        );
    }
    r.register(
        "tether_redis_errors",
        "Registry calls that failed",
        m.redis_errors.0.clone(),
    );
    r.register_with_unit(
        "tether_redis_latency",
        "Latency of registry calls",
        Unit::Seconds,
        m.redis_latency.clone(),
    );
    r
}

/// The exposition registries, one per role, built on first use.
static HEAD: LazyLock<Registry> = LazyLock::new(|| registry(Role::Head));
static WORKER: LazyLock<Registry> = LazyLock::new(|| registry(Role::Worker));

/// The content type of [`render`]'s text, which Prometheus asks for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render(role: Role) -> String {
    let registry = match role {
        Role::Head => &*HEAD,
        Role::Worker => &*WORKER,
    };
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Connections the metrics port serves at once; more wait in the
/// kernel's accept queue. The dashboard holds one per open page.
const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time open requests get to finish once the process stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The routes every process serves on its metrics port: `GET /metrics`.
/// A head adds its dashboard to them.
pub fn routes(role: Role) -> Router {
    Router::new().route(
        "/metrics",
        get(move || async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(role)) }),
    )
}

/// Serves `routes` over HTTP/1.1 on `listener` until `shutdown`: at most
/// 64 connections, each given 5 s to send a request's headers; requests
/// still open at `shutdown` (the dashboard's event streams) get 1 s to
/// end. Unknown paths answer 404.
pub async fn serve(listener: TcpListener, routes: Router, mut shutdown: Shutdown) {
    let routes = routes.fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found; this port serves GET /metrics (and, on a head, the dashboard at /)\n",
        )
    });
    let service = TowerToHyperService::new(routes);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 31);
    loop {
        // Wait for a free slot first: over the bound, connections queue in
        // the kernel rather than as tasks here.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.wait() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait() => return,
        };
        let socket = match accepted {
            Ok((socket, _)) => {
                backoff.reset();
                socket
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait, do not spin.
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "metrics: accept failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let service = service.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(socket), service);
            tokio::pin!(connection);
            let done = tokio::select! {
                r = connection.as_mut() => Some(r),
                _ = shutdown.wait() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(CLOSE_GRACE, connection).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(11));
        let mut r = Registry::default();
        r.register_with_unit("x", "help", Unit::Seconds, h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(out.contains("# TYPE x_seconds histogram"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 2"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10.0\"} 2"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_seconds_count 3"), "{out}");
        assert!(out.contains("x_seconds_sum 11.033"), "{out}");
    }

    /// Every name, type and label that dashboards and docs/operations.md
    /// name, in each role's exposition.
    #[test]
    fn both_roles_expose_their_names() {
        let head = render(Role::Head);
        for line in [
            "# TYPE tether_heads_live gauge",
            "# TYPE tether_workers_attached gauge",
            "\ntether_workers_attached ",
            "# TYPE tether_beats_sent counter",
            "\ntether_beats_sent_total ",
            "\ntether_beats_received_total ",
            "\ntether_missed_beats_total ",
            "\ntether_reassignments_total{reason=\"unspecified\"} ",
            "\ntether_reassignments_total{reason=\"rebalance\"} ",
            "\ntether_fence_unparsable_total ",
            "\ntether_streams_denied_total ",
            "\ntether_adoptions_expired_total ",
            "\ntether_redis_errors_total ",
            "# TYPE tether_redis_latency_seconds histogram",
            "\ntether_redis_latency_seconds_count ",
            "# HELP tether_beats_sent Heartbeats sent.\n",
            "# EOF",
        ] {
            assert!(head.contains(line), "head lacks {line:?}:\n{head}");
        }
        assert!(!head.contains("tether_failover_seconds"), "{head}");
        let worker = render(Role::Worker);
        for line in [
            "\ntether_worker_attached ",
            "# TYPE tether_failover_seconds histogram",
            "\ntether_failover_seconds_bucket{le=\"+Inf\"} ",
            "\ntether_handoff_seconds_count ",
            "\ntether_missed_beats_total ",
        ] {
            assert!(worker.contains(line), "worker lacks {line:?}:\n{worker}");
        }
        assert!(!worker.contains("tether_workers_attached"), "{worker}");
        assert!(!worker.contains("tether_streams_denied"), "{worker}");
    }

    #[test]
    fn counts_reach_the_exposition() {
        METRICS.reassignments[4].inc();
        METRICS.streams_denied.add(2);
        let head = render(Role::Head);
        let rebalanced = head
            .lines()
            .find(|l| l.starts_with("tether_reassignments_total{reason=\"rebalance\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
        assert!(rebalanced >= Some(1), "{head}");
        assert!(
            !head.contains("\ntether_streams_denied_total 0\n"),
            "{head}"
        );
    }
}
