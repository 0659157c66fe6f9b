//! `tether-head`: registers in Redis under a lease, adopts workers and
//! streams heartbeats to them. This file only parses flags into
//! [`tether::head::HeadSettings`], binds, installs the signal handlers and
//! calls the library (`tether::head`, the rest of this directory).

/// mimalloc instead of glibc's malloc: during a failover, glibc's malloc
/// and free took a sixth of all CPU, and with it a quiet head at 10,000
/// workers uses about a sixth less (see docs/BENCHMARKS.md). Behind the
/// default-on `mimalloc` feature, so that `--no-default-features` leaves
/// the library (and this binary) on the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;
use tether::config::{default_id, parse_duration, parse_id, CommonArgs};
use tether::head::{Head, HeadError, HeadHandle, HeadSettings};
use tether::registry::Registry;
use tether::security::{ClientSecurity, ServerSecurity};
use tether::shutdown::Signals;
use tracing::{error, info, warn};

/// A Tether head: workers attach to it and it beats to them.
#[derive(Debug, clap::Parser)]
#[command(name = "tether-head", version, about, long_about = None)]
pub struct Args {
    /// This head's id, unique in the cluster [default: head-HOSTNAME-PID].
    #[arg(long, env = "TETHER_ID", value_parser = parse_id)]
    pub id: Option<String>,

    /// Address to serve gRPC on (HeadService, health, reflection).
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: std::net::SocketAddr,

    /// Address workers should dial, as host:port; in containers, the pod or
    /// container address [default: the listen address, or 127.0.0.1:PORT
    /// when listening on a wildcard].
    #[arg(long, env = "TETHER_ADVERTISE")]
    pub advertise: Option<String>,

    /// How often the head beats to each worker and refreshes its lease.
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Silence after which a worker counts as gone (and, told to workers,
    /// after which they count this head as gone). Must exceed the interval.
    #[arg(long, env = "TETHER_HEARTBEAT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Lifetime of this head's registry entry without a refresh: a crashed
    /// head disappears from the registry after at most this long. At least
    /// 2.5 heartbeat intervals: a head whose lease ran down past half
    /// counts as stale.
    #[arg(long, env = "TETHER_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// On SIGTERM or a Drain call, how long the head waits for its workers
    /// to move before it exits anyway. Keep Kubernetes'
    /// terminationGracePeriodSeconds above it.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Bound on the last step of shutdown (leaving the registry, closing
    /// streams, stopping the server), after the drain.
    #[arg(long, env = "TETHER_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// ε of bounded-load placement: no head adopts a worker while it holds
    /// ceil((1 + ε) * W / H) or more, W the assigned workers and H the live
    /// heads that are not draining. From 0.0 to 10.0.
    #[arg(long, env = "TETHER_BALANCE_SLACK", default_value = "0.25", value_parser = parse_slack)]
    pub balance_slack: f64,

    /// Hard cap on the workers this head adopts; 0 for no cap.
    #[arg(long, env = "TETHER_CAPACITY", default_value = "0")]
    pub capacity: u64,

    /// Workers per second this head may redirect for rebalancing: to a
    /// newly joined head, or away from this head while it is over the load
    /// bound.
    #[arg(long, env = "TETHER_REBALANCE_RATE", default_value = "100", value_parser = parse_rate)]
    pub rebalance_rate: f64,

    /// A worker that attached (or was redirected) more recently than this
    /// is not redirected for rebalancing.
    #[arg(long, env = "TETHER_REBALANCE_COOLDOWN", default_value = "10s", value_parser = parse_duration)]
    pub rebalance_cooldown: Duration,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// The library's settings, checked (every cross-field rule lives in
    /// [`HeadSettings::validate`]).
    fn settings(&self) -> Result<HeadSettings, String> {
        HeadSettings {
            id: self.id.clone().unwrap_or_else(|| default_id("head")),
            advertise: self.advertise.clone(),
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            lease_ttl: self.lease_ttl,
            drain_timeout: self.drain_timeout,
            shutdown_timeout: self.shutdown_timeout,
            balance_slack: self.balance_slack,
            capacity: self.capacity,
            rebalance_rate: self.rebalance_rate,
            rebalance_cooldown: self.rebalance_cooldown,
            max_connections: self.common.connection_bound(),
            idle_connection_timeout: self.common.idle_connection_timeout,
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

fn parse_slack(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=10.0).contains(&v) => Ok(v),
        _ => Err(format!("'{text}' is not a number from 0.0 to 10.0")),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1e6 => Ok(v),
        _ => Err(format!(
            "'{text}' is not a rate above 0 (workers per second)"
        )),
    }
}

fn main() {
    let args: Args = tether::config::parse_args("tether-head");
    let checked = args.settings().and_then(|settings| {
        args.common.registry.validate()?;
        let security = args.common.security.load()?;
        Ok((settings, security))
    });
    let (settings, (server_security, client_security)) = match checked {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tether-head: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    tether::telemetry::init(args.common.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("tether-head: cannot start the runtime: {e}");
            std::process::exit(1);
        });
    let code = runtime.block_on(run(args, settings, server_security, client_security));
    std::process::exit(code);
}

/// Binds, starts the head and handles signals; returns the exit code.
async fn run(
    args: Args,
    settings: HeadSettings,
    server_security: ServerSecurity,
    client_security: ClientSecurity,
) -> i32 {
    // Listening from the start: a SIGTERM right after a `Drain` call must
    // be counted, not lost between two waits.
    let mut signals = match Signals::listen() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install the signal handlers");
            return 1;
        }
    };
    let listeners = match tether::server::bind(args.listen, args.common.metrics_listen).await {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let registry = match Registry::new(
        &args.common.registry.redis_url,
        &args.common.registry.namespace,
    ) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot set up the registry");
            return 2;
        }
    };
    let id = settings.id.clone();
    let mut builder = Head::builder(settings)
        .registry(registry)
        .security(server_security)
        .client_security(client_security);
    if let Some(metrics) = listeners.metrics {
        builder = builder.metrics(metrics);
    }
    let head = match builder.build() {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot set up the head");
            return 2;
        }
    };
    // The first signal begins the drain; one that arrives while a drain
    // that a `Drain` call began runs (Kubernetes: a preStop hook calls
    // Drain, then the kubelet sends SIGTERM) is tolerated too, and must not
    // cut the handoff short. Only the signal after that exits at once.
    let handle: HeadHandle = head.handle();
    let signal_id = id.clone();
    let second_signal = async move {
        let s = signals.next().await;
        if handle.draining() {
            info!(head = %signal_id, signal = ?s, "signal during a drain begun by a Drain call; the drain goes on (another signal exits at once)");
        } else {
            info!(head = %signal_id, signal = ?s, "draining on signal");
            handle.drain();
        }
        signals.next().await
    };
    tokio::select! {
        r = head.serve(listeners.grpc, std::future::pending()) => exit_code(r),
        s = second_signal => {
            warn!(head = %id, signal = ?s, "second signal; exiting at once");
            1
        }
    }
}

/// The exit code of a head that stopped: 0 after a clean exit, 2 for what
/// a restart cannot fix (bad set-up, the id in use), 1 otherwise.
fn exit_code(r: Result<(), HeadError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e @ (HeadError::Setup(_) | HeadError::Settings(_))) => {
            error!(error = %e, "cannot start");
            2
        }
        // Logged where it was found.
        Err(HeadError::IdInUse(_)) => 2,
        Err(_) => 1,
    }
}
