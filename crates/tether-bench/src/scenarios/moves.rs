//! `failover`, `hang` and `drain`: one head goes (SIGKILL, SIGSTOP,
//! SIGTERM) and each of its workers is timed from the signal until its
//! new stream delivered its first `HeadBeat` on another head
//! (`Snapshot::attached_at`, taken by the worker's own attach loop). The
//! chart is the CDF of those times.

use super::{Bench, Common};
use crate::fleet::Fleet;
use crate::plot::Chart;
use crate::procfs::{self, Pid};
use crate::report::{json_ms, Json, Report};
use crate::stats::{missed_beats, Summary};
use std::time::{Duration, Instant};
use tether::config::parse_duration;
use tether_testkit::localcluster::Signal;

/// Flags of `failover`, `hang` and `drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct MoveArgs {
    #[command(flatten)]
    pub common: Common,

    /// The head to hit [default: the one holding the most workers].
    #[arg(long)]
    pub victim: Option<String>,

    /// Bound on every orphaned worker being attached again.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub move_timeout: Duration,
}

/// Which way the head goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SIGKILL: a crash; the kernel closes its sockets at once.
    Failover,
    /// SIGSTOP: a hang; sockets stay open, nothing answers.
    Hang,
    /// SIGTERM: a clean scale-down with redirects.
    Drain,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Failover => "failover",
            Kind::Hang => "hang",
            Kind::Drain => "drain",
        }
    }

    fn signal(self) -> Signal {
        match self {
            Kind::Failover => Signal::Kill,
            Kind::Hang => Signal::Stop,
            Kind::Drain => Signal::Term,
        }
    }
}

/// Default sizes: the targets.
fn defaults(kind: Kind) -> (usize, usize) {
    match kind {
        Kind::Failover | Kind::Hang => (4, 2000),
        Kind::Drain => (4, 500),
    }
}

/// Runs one of the three scenarios.
pub async fn run(kind: Kind, args: &MoveArgs) -> Result<Report, String> {
    let c = &args.common;
    let (d_heads, d_workers) = defaults(kind);
    let heads = c.heads.unwrap_or(d_heads);
    let workers = c.workers.unwrap_or(d_workers);
    if heads < 2 {
        return Err("this scenario needs at least 2 heads".into());
    }
    let mut report = Report::new(kind.name());
    c.describe(&mut report, heads, workers);

    let (mut bench, attach_took) = Bench::start(c, heads, workers, &[]).await?;
    report.metric_ms("attach_all_ms", "fleet attached after", Some(attach_took));
    let loads = bench.fleet.loads();
    let victim = match &args.victim {
        Some(v) if bench.rig.head_ids().contains(v) => v.clone(),
        Some(v) => {
            return Err(format!(
                "--victim {v:?} is not one of {:?}",
                bench.rig.head_ids()
            ))
        }
        None => loads
            .iter()
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse((*id).clone())))
            .map(|(id, _)| id.clone())
            .ok_or("no worker is attached")?,
    };
    report.config("victim", victim.as_str());
    report.detail("loads_before", loads_json(&loads));

    let before = bench.fleet.views();
    let orphans: Vec<usize> = (0..before.len())
        .filter(|i| before[*i].attached && before[*i].head_id == victim)
        .collect();
    let gap_before = orphans
        .iter()
        .map(|i| before[*i].max_beat_gap)
        .max()
        .unwrap_or_default();

    let cpu_before = CpuUse::read(&bench);
    let (t0, send_took) = bench.rig.signal(&victim, kind.signal())?;
    let times = wait_moves(&bench.fleet, &orphans, &victim, t0, args.move_timeout).await;
    let cpu_spent = CpuUse::read(&bench).since(&cpu_before);
    let moved: Vec<Moved> = times.iter().flatten().copied().collect();
    let not_moved = times.len() - moved.len();
    let summary = Summary::new(moved.iter().map(|m| m.total).collect());
    let detected = Summary::new(moved.iter().filter_map(|m| m.detected).collect());
    let reattached = Summary::new(
        moved
            .iter()
            .filter_map(|m| m.detected.map(|d| m.total.saturating_sub(d)))
            .collect(),
    );

    // A drained head exits once its workers left: time that too.
    let exit_after = if kind == Kind::Drain {
        wait_exit(&mut bench, &victim, t0, Duration::from_secs(40)).await
    } else {
        None
    };
    // Gaps show only when the next beat arrives: give it two intervals.
    tokio::time::sleep(c.heartbeat_interval * 2).await;
    let after = bench.fleet.views();
    let others_moved = (0..after.len())
        .filter(|i| !orphans.contains(i) && after[*i].reassignments != before[*i].reassignments)
        .count();
    let unattached = after.iter().filter(|v| !v.attached).count();

    report.metric_count("orphaned", "workers on the victim", orphans.len() as u64);
    report.metric_ms("signal_send_ms", "sending the signal took", Some(send_took));
    summary.add_to(&mut report, "move", move_label(kind));
    if kind != Kind::Drain {
        // Where the time goes: noticing the loss, then finding a new head.
        for (key, label, part) in [
            ("detect", "signal -> loss noticed", &detected),
            ("reattach", "loss noticed -> first new beat", &reattached),
        ] {
            report.metric_ms(
                &format!("{key}_p50_ms"),
                &format!("{label}: p50"),
                part.percentile(50.0),
            );
            report.metric_ms(
                &format!("{key}_p99_ms"),
                &format!("{label}: p99"),
                part.percentile(99.0),
            );
            report.metric_ms(
                &format!("{key}_max_ms"),
                &format!("{label}: max"),
                part.max(),
            );
        }
    }
    report.metric_count("not_moved", "orphans not attached again", not_moved as u64);
    cpu_spent.add_to(&mut report, orphans.len());
    report.metric_count(
        "others_moved",
        "other workers that moved",
        others_moved as u64,
    );
    report.metric_count(
        "unattached_end",
        "workers unattached at the end",
        unattached as u64,
    );
    report.detail("move_histogram", summary.histogram());
    report.chart(move_cdf(
        kind,
        &summary,
        moved.iter().map(|m| m.total).collect(),
    ));
    report.detail("loads_after", loads_json(&bench.fleet.loads()));

    let p99 = summary.percentile(99.0);
    let max = summary.max();
    let complete = not_moved == 0 && !orphans.is_empty();
    match kind {
        Kind::Failover => {
            target_le(
                &mut report,
                "failover p99",
                p99,
                Duration::from_millis(250),
                complete,
            );
            target_le(
                &mut report,
                "failover max",
                max,
                Duration::from_millis(500),
                complete,
            );
        }
        Kind::Hang => {
            let timeout = c.worker_timeout();
            let minus = |d: Option<Duration>| {
                d.map(|d| d.as_secs_f64() * 1000.0 - timeout.as_secs_f64() * 1000.0)
            };
            for (key, label, value) in [
                (
                    "move_p50_minus_timeout_ms",
                    "move minus timeout: p50",
                    minus(summary.percentile(50.0)),
                ),
                (
                    "move_p99_minus_timeout_ms",
                    "move minus timeout: p99",
                    minus(p99),
                ),
                (
                    "move_max_minus_timeout_ms",
                    "move minus timeout: max",
                    minus(max),
                ),
            ] {
                let shown = value.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
                report.metric(key, label, value.map_or(Json::Null, Json::from), shown);
            }
            target_le(
                &mut report,
                "hang p99",
                p99,
                timeout + Duration::from_millis(300),
                complete,
            );
        }
        Kind::Drain => {
            report.metric_ms("all_moved_ms", "last orphan attached after", max);
            report.metric_ms("head_exit_ms", "drained head exited after", exit_after);
            let missed: Vec<u64> = orphans
                .iter()
                .map(|i| missed_beats(after[*i].max_beat_gap, c.heartbeat_interval))
                .collect();
            let gaps = Summary::new(orphans.iter().map(|i| after[*i].max_beat_gap).collect());
            let workers_missing = missed.iter().filter(|m| **m > 0).count();
            let missed_total: u64 = missed.iter().sum();
            report.metric_ms(
                "max_gap_before_ms",
                "longest beat gap before SIGTERM",
                Some(gap_before),
            );
            report.metric_ms(
                "max_gap_p99_ms",
                "longest beat gap after: p99",
                gaps.percentile(99.0),
            );
            report.metric_ms("max_gap_ms", "longest beat gap after: max", gaps.max());
            report.metric_count("missed_beats", "missed beats (sum)", missed_total);
            report.metric_count(
                "workers_missing_beats",
                "orphans that missed a beat",
                workers_missing as u64,
            );
            report.target(
                "drain missed beats",
                "0".into(),
                missed_total.to_string(),
                missed_total == 0 && complete,
            );
            target_le(
                &mut report,
                "drain handoff p99",
                p99,
                Duration::from_millis(100),
                complete,
            );
            target_le(
                &mut report,
                "drain all moved",
                max,
                Duration::from_secs(1),
                complete,
            );
            report.note(format!(
                "missed beats: a worker's longest gap g between two HeadBeats (since it attached, across the handoff) hides round(g / {}ms) - 1 beats",
                c.heartbeat_interval.as_millis()
            ));
        }
    }
    if !complete {
        report.note(format!(
            "{not_moved} of {} orphaned workers were not attached again within {:?}",
            orphans.len(),
            args.move_timeout
        ));
    }
    bench.stop().await;
    Ok(report)
}

/// The CDF of the orphans' times from the signal to their first beat on
/// another head, with p50 and p99 marked.
fn move_cdf(kind: Kind, summary: &Summary, samples: Vec<Duration>) -> Chart {
    let at = |p: f64| summary.percentile(p);
    let shown = |d: Option<Duration>| {
        d.map_or("-".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1000.0)
        })
    };
    Chart::Cdf {
        title: format!(
            "{}: {} orphans re-attached, p50 {}, p99 {}",
            kind.name(),
            samples.len(),
            shown(at(50.0)),
            shown(at(99.0))
        ),
        x_label: format!("ms, {}", move_label(kind)),
        y_label: "fraction of orphans".into(),
        samples,
        marks: [("p50", at(50.0)), ("p99", at(99.0))]
            .into_iter()
            .filter_map(|(name, d)| Some((name.to_owned(), d?)))
            .collect(),
    }
}

fn move_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Failover => "SIGKILL -> first beat on new head",
        Kind::Hang => "SIGSTOP -> first beat on new head",
        Kind::Drain => "SIGTERM -> first beat on new head",
    }
}

/// Adds a "≤ goal" target; an incomplete run never meets it.
pub fn target_le(
    report: &mut Report,
    name: &str,
    value: Option<Duration>,
    goal: Duration,
    complete: bool,
) {
    let measured = value.map_or("-".to_owned(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    });
    let met = complete && value.is_some_and(|d| d <= goal);
    report.target(name, format!("<= {} ms", goal.as_millis()), measured, met);
}

/// Per-head worker counts as JSON.
pub fn loads_json(loads: &std::collections::BTreeMap<String, usize>) -> Json {
    Json::Object(
        loads
            .iter()
            .map(|(k, v)| (k.clone(), Json::from(*v)))
            .collect(),
    )
}

/// Polls the orphans until each is attached to another head after `t0`;
/// returns each one's time from `t0` (None if it did not make it).
async fn wait_moves(
    fleet: &Fleet,
    orphans: &[usize],
    victim: &str,
    t0: Instant,
    timeout: Duration,
) -> Vec<Option<Moved>> {
    let mut done: Vec<Option<Moved>> = vec![None; orphans.len()];
    let mut left = orphans.len();
    while left > 0 && t0.elapsed() < timeout {
        for (k, &i) in orphans.iter().enumerate() {
            if done[k].is_some() {
                continue;
            }
            let moved = fleet.with(i, |s| {
                if !s.attached || s.head_id == victim {
                    return None;
                }
                let at = s.attached_at.filter(|a| *a >= t0)?;
                Some(Moved {
                    total: at - t0,
                    // Unset on a handoff: the worker never lost its head.
                    detected: s.lost_at.filter(|l| *l >= t0).map(|l| l - t0),
                })
            });
            if let Some(moved) = moved {
                done[k] = Some(moved);
                left -= 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done
}

/// CPU time used so far by the bench (all simulated workers), the heads
/// still running, and Redis.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    bench: Duration,
    heads: Duration,
    redis: Duration,
}

impl CpuUse {
    fn read(bench: &Bench) -> Self {
        let heads = bench
            .rig
            .head_ids()
            .iter()
            .filter_map(|id| procfs::cpu(Pid::Of(bench.rig.pid(id))))
            .map(|s| s.cpu)
            .sum();
        Self {
            bench: procfs::cpu(Pid::Me).map(|s| s.cpu).unwrap_or_default(),
            heads,
            redis: bench.rig.redis_cpu().unwrap_or_default(),
        }
    }

    /// What was used since `before`. A head that died meanwhile drops out
    /// of the sum, so the heads' share is a lower bound.
    fn since(&self, before: &CpuUse) -> CpuUse {
        CpuUse {
            bench: self.bench.saturating_sub(before.bench),
            heads: self.heads.saturating_sub(before.heads),
            redis: self.redis.saturating_sub(before.redis),
        }
    }

    /// Rows: CPU used while the orphans moved, and per moved worker. The
    /// machine's cores bound how many moves a second it can make.
    fn add_to(&self, report: &mut Report, moved: usize) {
        let total = self.bench + self.heads + self.redis;
        let per = |d: Duration| d.as_secs_f64() * 1000.0 / moved.max(1) as f64;
        report.metric(
            "cpu_during_moves_ms",
            "CPU used until the last orphan moved",
            json_ms(total),
            format!(
                "{:.0} ms (bench {:.0}, heads {:.0}, redis {:.0}; ticks of 10 ms)",
                total.as_secs_f64() * 1000.0,
                self.bench.as_secs_f64() * 1000.0,
                self.heads.as_secs_f64() * 1000.0,
                self.redis.as_secs_f64() * 1000.0
            ),
        );
        report.metric(
            "cpu_per_move_ms",
            "CPU per moved worker",
            per(total),
            format!(
                "{:.2} ms (bench {:.2}, heads {:.2}, redis {:.2})",
                per(total),
                per(self.bench),
                per(self.heads),
                per(self.redis)
            ),
        );
    }
}

/// One orphan's move, measured from the signal.
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// Until its first beat on the new head.
    total: Duration,
    /// Until it found its head lost (`Snapshot::lost_at`).
    detected: Option<Duration>,
}

/// Waits until head `id` exited; the time from `t0` if it did.
async fn wait_exit(
    bench: &mut Bench,
    id: &str,
    t0: Instant,
    timeout: Duration,
) -> Option<Duration> {
    while t0.elapsed() < timeout {
        if bench.rig.exited(id) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}
