//! The scenarios, one per subcommand, and what they share: the common
//! flags and bringing up Redis, the heads and the simulated workers.

pub mod capacity;
pub mod floor;
pub mod moves;
pub mod scale_up;
pub mod steady;
pub mod sweep;

use crate::fleet::{Fleet, FleetConfig};
use crate::floor::FloorRun;
use crate::report::{Json, Report};
use crate::rig::Rig;
use std::path::PathBuf;
use std::time::Duration;
use tether::config::parse_duration;

/// Flags every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Heads to start [default: per scenario].
    #[arg(long)]
    pub heads: Option<usize>,

    /// Simulated workers [default: per scenario].
    #[arg(long)]
    pub workers: Option<usize>,

    /// Passed to every head: how often it beats.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Passed to every head: silence after which a peer counts as gone.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Passed to every head: the lifetime of its registry lease.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Another flag for every head, e.g. `--head-arg=--balance-slack=0.5`.
    /// Repeatable.
    #[arg(long = "head-arg", allow_hyphen_values = true)]
    pub head_args: Vec<String>,

    /// Writes the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Workers started per second while the fleet grows [default: 2000;
    /// 500 for `capacity`].
    #[arg(long)]
    pub ramp_rate: Option<f64>,

    /// The workers' bound on dialing a head and on each call.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// The workers' largest retry delay.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// Bound on the whole fleet attaching at start.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub attach_timeout: Duration,

    /// Runtime threads of the bench [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Common {
    /// Checks the flags before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        tether::config::Timing {
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
        }
        .validate()?;
        tether::config::check_lease_ttl(self.lease_ttl, self.heartbeat_interval)?;
        if self.workers == Some(0) || self.heads == Some(0) {
            return Err("--heads and --workers must be at least 1".into());
        }
        if !self.ramp().is_finite() || self.ramp() <= 0.0 {
            return Err("--ramp-rate must be above 0".into());
        }
        Ok(())
    }

    /// The flags every head gets: the timing, then `--head-arg`s.
    pub fn head_args(&self, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            "--heartbeat-interval".to_owned(),
            ms_flag(self.heartbeat_interval),
            "--heartbeat-timeout".to_owned(),
            ms_flag(self.heartbeat_timeout),
            "--lease-ttl".to_owned(),
            ms_flag(self.lease_ttl),
        ];
        args.extend(extra.iter().cloned());
        args.extend(self.head_args.iter().cloned());
        args
    }

    /// Workers started per second while the fleet grows.
    pub fn ramp(&self) -> f64 {
        self.ramp_rate.unwrap_or(2000.0)
    }

    /// The timeout a worker applies to a silent head: the head's, but at
    /// least two intervals (see `attach::open`).
    pub fn worker_timeout(&self) -> Duration {
        self.heartbeat_timeout.max(self.heartbeat_interval * 2)
    }

    /// Records the settings in `report`.
    pub fn describe(&self, report: &mut Report, heads: usize, workers: usize) {
        report.config("heads", heads);
        report.config("workers", workers);
        report.config("heartbeat_interval_ms", ms(self.heartbeat_interval));
        report.config("heartbeat_timeout_ms", ms(self.heartbeat_timeout));
        report.config("lease_ttl_ms", ms(self.lease_ttl));
        report.config("ramp_rate", self.ramp());
        report.config("threads", self.threads.unwrap_or(0));
        if !self.head_args.is_empty() {
            report.config(
                "head_args",
                Json::Array(
                    self.head_args
                        .iter()
                        .map(|a| Json::from(a.as_str()))
                        .collect(),
                ),
            );
        }
    }
}

/// The measured window of `steady`, `floor` and `sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct Window {
    /// How long the measured window lasts.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Settling time after the fleet attached, before the window.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
}

impl Window {
    /// Records the window in `report`.
    pub fn describe(&self, report: &mut Report) {
        report.config("duration_ms", ms(self.duration));
        report.config("warmup_ms", ms(self.warmup));
    }

    /// The floor at `workers` workers, this window and `c`'s interval.
    pub fn floor_run(&self, workers: usize, c: &Common) -> FloorRun {
        FloorRun {
            workers,
            interval: c.heartbeat_interval,
            warmup: self.warmup,
            duration: self.duration,
        }
    }
}

/// A duration as a head flag, in whole milliseconds.
pub fn ms_flag(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A duration in whole milliseconds, for the config section.
pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Redis, `heads` heads and `workers` attached workers.
pub struct Bench {
    pub rig: Rig,
    pub fleet: Fleet,
}

impl Bench {
    /// Starts Redis and the heads (with `extra` flags), and nothing else.
    pub async fn heads_only(
        common: &Common,
        heads: usize,
        extra: &[String],
        head_nofile: Option<u64>,
    ) -> Result<Self, String> {
        let mut rig = Rig::start(common.head_args(extra), head_nofile)?;
        rig.add_heads(heads).await?;
        let fleet = Fleet::new(FleetConfig {
            redis_url: rig.redis_url(),
            connect_timeout: common.connect_timeout,
            max_backoff: common.max_backoff,
            ramp_rate: common.ramp(),
        })?;
        Ok(Self { rig, fleet })
    }

    /// Adds `n` workers and waits until every worker is attached and has
    /// had two intervals to settle. Returns how long attaching took.
    pub async fn add_workers(&mut self, common: &Common, n: usize) -> Result<Duration, String> {
        let start = std::time::Instant::now();
        self.fleet.grow(n).await;
        self.fleet.wait_all_attached(common.attach_timeout).await?;
        let took = start.elapsed();
        tokio::time::sleep(common.heartbeat_interval * 2).await;
        Ok(took)
    }

    /// The full set-up of most scenarios.
    pub async fn start(
        common: &Common,
        heads: usize,
        workers: usize,
        extra: &[String],
    ) -> Result<(Self, Duration), String> {
        let mut bench = Self::heads_only(common, heads, extra, None).await?;
        let took = bench.add_workers(common, workers).await?;
        Ok((bench, took))
    }

    /// Stops the workers, then everything else.
    pub async fn stop(self) {
        self.fleet.stop().await;
        drop(self.rig);
    }
}
