//! Prometheus metrics: a few counters, gauges and histograms kept in
//! atomics (no lock, no allocation on the beat path), rendered in the text
//! exposition format at `GET /metrics` on the metrics port
//! (`--metrics-listen`). The port's HTTP server lives here too (axum's
//! router on hyper, bounded in connections and time), because a head also
//! serves its dashboard there.
//!
//! One process-wide set: a process is either a head or a worker (or a
//! benchmark simulating many workers, which then sees their sum).

use crate::backoff::Backoff;
use crate::shutdown::Shutdown;
use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// A monotonically increasing count.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    const fn new() -> Self {
        Self(AtomicI64::new(0))
    }
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds `d` (may be negative).
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the histogram buckets, in seconds: from 1 ms (a local
/// Redis call) to 10 s (a failover that waited for a timeout).
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram over [`BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
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

/// Every metric Tether keeps.
#[derive(Debug)]
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
pub static METRICS: Metrics = Metrics {
    heads_live: Gauge::new(),
    workers_attached: Gauge::new(),
    beats_sent: Counter::new(),
    beats_received: Counter::new(),
    missed_beats: Counter::new(),
    reassignments: [const { Counter::new() }; 5],
    failover: Histogram::new(),
    handoff: Histogram::new(),
    redis_errors: Counter::new(),
    redis_latency: Histogram::new(),
    fence_unparsable: Counter::new(),
    streams_denied: Counter::new(),
    adoptions_expired: Counter::new(),
};

/// Which process renders: a head and a worker expose different sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tether-head`.
    Head,
    /// `tether-worker`.
    Worker,
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// The metrics in Prometheus text format.
pub fn render(role: Role) -> String {
    let m = &METRICS;
    let mut out = String::with_capacity(4096);
    match role {
        Role::Head => {
            gauge(
                &mut out,
                "tether_heads_live",
                "Live heads in the registry, as this head last read it.",
                m.heads_live.get(),
            );
            gauge(
                &mut out,
                "tether_workers_attached",
                "Workers whose heartbeat stream is open on this head.",
                m.workers_attached.get(),
            );
        }
        Role::Worker => {
            gauge(
                &mut out,
                "tether_worker_attached",
                "1 while this worker is attached to a head.",
                m.workers_attached.get(),
            );
        }
    }
    counter(
        &mut out,
        "tether_beats_sent_total",
        "Heartbeats sent.",
        m.beats_sent.get(),
    );
    counter(
        &mut out,
        "tether_beats_received_total",
        "Heartbeats received.",
        m.beats_received.get(),
    );
    counter(&mut out, "tether_missed_beats_total", "Head beats a worker expected and did not get (workers only: a head never drops a beat; a worker that stops reading stalls its own stream).", m.missed_beats.get());
    let name = "tether_reassignments_total";
    let _ = writeln!(out, "# HELP {name} Workers adopted (heads) or moves made (workers), by reason.\n# TYPE {name} counter");
    for (i, reason) in REASONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{reason}\"}} {}",
            m.reassignments[i].get()
        );
    }
    if role == Role::Head {
        counter(
            &mut out,
            "tether_fence_unparsable_total",
            "Fencing notices that could not be parsed.",
            m.fence_unparsable.get(),
        );
        counter(
            &mut out,
            "tether_streams_denied_total",
            "Heartbeat streams refused for a missing or wrong assignment secret.",
            m.streams_denied.get(),
        );
        counter(
            &mut out,
            "tether_adoptions_expired_total",
            "Adoptions released because the worker never opened its stream.",
            m.adoptions_expired.get(),
        );
    }
    if role == Role::Worker {
        m.failover.render(
            &mut out,
            "tether_failover_seconds",
            "From losing a head to the first beat of the next one.",
        );
        m.handoff.render(
            &mut out,
            "tether_handoff_seconds",
            "From a head's redirect to the first beat of the new head.",
        );
    }
    counter(
        &mut out,
        "tether_redis_errors_total",
        "Registry calls that failed.",
        m.redis_errors.get(),
    );
    m.redis_latency.render(
        &mut out,
        "tether_redis_latency_seconds",
        "Latency of registry calls.",
    );
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
        get(move || async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                render(role),
            )
        }),
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
        let h = Histogram::new();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.05\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_count 2"), "{out}");
    }

    #[test]
    fn both_roles_render() {
        assert!(render(Role::Head).contains("tether_workers_attached"));
        assert!(render(Role::Worker).contains("tether_failover_seconds_bucket"));
    }
}
