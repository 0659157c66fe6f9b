//! `capacity`: one head, more and more workers, until the head misses a
//! beat or runs out of descriptors. Reports the largest fleet it held
//! for a whole step with no missed beat and no move, and what stopped it.
//!
//! The machine's open-file limit binds the bench as hard as the head (one
//! descriptor per simulated worker), so the bench raises its own limit
//! when it may and sets each head back to the machine's limit: then the
//! head, not the bench, is what runs out.

use super::{Bench, Common};
use crate::plot::{Chart, Panel, Series};
use crate::procfs::{self, Pid};
use crate::report::{json_ms, obj, Json, Report};
use crate::stats::{missed_beats, Summary};
use std::time::{Duration, Instant};
use tether::config::parse_duration;

/// Flags of `capacity`.
#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    pub common: Common,

    /// Fleet sizes to try, in order [default: 2000 to 18000 by 2000, then
    /// 19000, 19500, 19800, 19850, 19900, 19950, 20000].
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,

    /// How long each size must hold with no missed beat.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,

    /// Bound on one step's new workers attaching.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub step_timeout: Duration,
}

fn default_steps() -> Vec<usize> {
    let mut steps: Vec<usize> = (1..=9).map(|k| k * 2000).collect();
    steps.extend([19_000, 19_500, 19_800, 19_850, 19_900, 19_950, 20_000]);
    steps
}

/// Runs `capacity`.
pub async fn run(args: &CapacityArgs) -> Result<Report, String> {
    if args.common.heads.is_some_and(|h| h != 1) {
        return Err("capacity measures one head; leave out --heads".into());
    }
    let mut common = args.common.clone();
    // Each step's ramp must not be what breaks the fleet already held.
    common.ramp_rate.get_or_insert(500.0);
    let c = &common;
    let mut steps = if args.steps.is_empty() {
        default_steps()
    } else {
        args.steps.clone()
    };
    if let Some(max) = c.workers {
        steps.retain(|n| *n <= max);
        if steps.last() != Some(&max) {
            steps.push(max);
        }
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) || steps.first() == Some(&0) {
        return Err("--steps must be increasing and above 0".into());
    }
    let mut report = Report::new("capacity");
    c.describe(&mut report, 1, *steps.last().unwrap_or(&0));
    report.config("hold_ms", super::ms(args.hold));
    report.config(
        "steps",
        Json::Array(steps.iter().map(|n| Json::from(*n)).collect()),
    );

    let machine_limit = procfs::nofile_limit(Pid::Me).unwrap_or(0);
    let bench_limit = procfs::raise_own_nofile(machine_limit * 2 + 1000);
    let head_nofile = (bench_limit > machine_limit).then_some(machine_limit);
    report.config("machine_nofile_limit", machine_limit);
    report.config("bench_nofile_limit", bench_limit);
    if head_nofile.is_none() {
        report.note("the bench could not raise its own open-file limit: it may run out of descriptors before the head does");
    }

    let mut bench = Bench::heads_only(c, 1, &[], head_nofile).await?;
    let head = bench.rig.head_ids()[0].clone();
    let pid = Pid::Of(bench.rig.pid(&head));
    let head_limit = procfs::nofile_limit(pid).unwrap_or(0);
    report.config("head_nofile_limit", head_limit);
    let rss_empty = procfs::status_kib(pid, "VmRSS").unwrap_or(0);

    let mut held: Option<usize> = None;
    let mut stopped_by = format!("reached the last step ({})", steps.last().unwrap_or(&0));
    let mut rows = Vec::new();
    let mut cpu_line = Vec::new();
    let mut rss_line = Vec::new();
    for &n in &steps {
        let start = Instant::now();
        bench.fleet.grow(n - bench.fleet.len()).await;
        if let Err(why) = wait_step(&bench, &head, pid, head_limit, args.step_timeout).await {
            stopped_by = format!(
                "at {n}: {why}; {}",
                diagnose(&mut bench, &head, pid, head_limit, bench_limit)
            );
            rows.push(step_row(n, Some(start.elapsed()), None, &stopped_by));
            break;
        }
        let attach_took = start.elapsed();
        let before = bench.fleet.views();
        let cpu0 = procfs::cpu(pid);
        let me0 = procfs::cpu(Pid::Me);
        let window_gaps = bench.fleet.watch_gaps(args.hold).await;
        let cpu1 = procfs::cpu(pid);
        let me1 = procfs::cpu(Pid::Me);
        let after = bench.fleet.views();
        let moves: u64 = (0..after.len())
            .map(|i| after[i].reassignments - before[i].reassignments)
            .sum();
        let unattached = after.iter().filter(|v| !v.attached).count();
        let missing = window_gaps
            .iter()
            .filter(|g| missed_beats(**g, c.heartbeat_interval) > 0)
            .count();
        let gaps = Summary::new(window_gaps);
        let rss = procfs::status_kib(pid, "VmRSS").unwrap_or(0);
        let fds = procfs::open_fds(pid).unwrap_or(0);
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => procfs::cpu_percent(a, b),
            _ => f64::NAN,
        };
        let bench_cpu = match (me0, me1) {
            (Some(a), Some(b)) => procfs::cpu_percent(a, b),
            _ => f64::NAN,
        };
        let ok = moves == 0 && unattached == 0 && missing == 0;
        let verdict = if ok {
            "held".to_owned()
        } else {
            format!("{missing} workers missed a beat, {moves} moves, {unattached} unattached")
        };
        println!(
            "  step {n:>6}: attached in {:>6.1} s, head CPU {cpu:5.1} %, RSS {:>7.1} MiB, {fds} fds, longest gap {:>6.0} ms: {verdict}",
            attach_took.as_secs_f64(),
            rss as f64 / 1024.0,
            gaps.max().unwrap_or_default().as_secs_f64() * 1000.0,
        );
        cpu_line.push((n as f64, cpu));
        rss_line.push((n as f64, rss as f64 / n as f64));
        rows.push(obj([
            ("workers", Json::from(n)),
            ("attach_ms", json_ms(attach_took)),
            ("head_cpu_percent", Json::from(cpu)),
            ("bench_cpu_percent", Json::from(bench_cpu)),
            ("head_rss_kib", Json::from(rss)),
            ("head_rss_kib_per_worker", Json::from(rss as f64 / n as f64)),
            ("head_open_fds", Json::from(fds)),
            (
                "max_gap_p99_ms",
                gaps.percentile(99.0).map_or(Json::Null, json_ms),
            ),
            ("max_gap_ms", gaps.max().map_or(Json::Null, json_ms)),
            ("workers_missing_beats", Json::from(missing)),
            ("moves", Json::from(moves)),
            ("unattached", Json::from(unattached)),
            ("verdict", Json::from(verdict.as_str())),
        ]));
        if !ok {
            stopped_by = format!("at {n}: {verdict}");
            break;
        }
        held = Some(n);
    }

    let shown = held.map_or("none".to_owned(), |n| n.to_string());
    report.metric(
        "largest_held",
        "largest fleet held at this interval",
        held.map_or(Json::Null, Json::from),
        shown,
    );
    report.metric(
        "stopped_by",
        "what stopped it",
        stopped_by.as_str(),
        stopped_by.clone(),
    );
    report.metric_count(
        "head_rss_kib_without_workers",
        "head RSS before workers (KiB)",
        rss_empty,
    );
    report.detail("steps", Json::Array(rows));
    let one = |label: &str, points| {
        vec![Series {
            label: label.to_owned(),
            points,
        }]
    };
    report.chart(Chart::VersusWorkers {
        title: format!(
            "One head, growing fleet, beats every {} ms",
            c.heartbeat_interval.as_millis()
        ),
        panels: vec![
            Panel {
                y_label: "head CPU, % of one core".into(),
                series: one("head CPU", cpu_line),
            },
            Panel {
                y_label: "head RSS, KiB per worker".into(),
                series: one("head RSS / workers", rss_line),
            },
        ],
    });
    let goal = 19_900;
    report.target(
        "capacity at 1 Hz",
        format!("~{goal} workers, no missed beat"),
        shown_or_none(held),
        held.is_some_and(|n| n >= goal) && c.heartbeat_interval >= Duration::from_secs(1),
    );
    report.note("the simulated workers, the head and Redis share the machine's cores");
    bench.stop().await;
    Ok(report)
}

fn shown_or_none(held: Option<usize>) -> String {
    held.map_or("none".to_owned(), |n| n.to_string())
}

fn step_row(n: usize, took: Option<Duration>, cpu: Option<f64>, verdict: &str) -> Json {
    obj([
        ("workers", Json::from(n)),
        ("attach_ms", took.map_or(Json::Null, json_ms)),
        ("head_cpu_percent", cpu.map_or(Json::Null, Json::from)),
        ("verdict", Json::from(verdict)),
    ])
}

/// Waits until every worker is attached. Gives up early when no worker
/// attached for five seconds while the head has used up its descriptors
/// or refuses connections past its bound.
async fn wait_step(
    bench: &Bench,
    head: &str,
    pid: Pid,
    head_limit: u64,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let mut best = 0;
    let mut best_at = Instant::now();
    loop {
        let attached = bench.fleet.attached();
        let total = bench.fleet.len();
        if attached == total {
            return Ok(());
        }
        if attached > best {
            best = attached;
            best_at = Instant::now();
        }
        let stuck = best_at.elapsed() >= Duration::from_secs(5);
        let fds = procfs::open_fds(pid).unwrap_or(0) as u64;
        if stuck
            && (fds + 4 >= head_limit || bench.rig.log_contains(head, "connection limit reached"))
        {
            return Err(format!("{attached} of {total} attached, none more for 5 s"));
        }
        if start.elapsed() >= timeout {
            return Err(format!("{attached} of {total} attached within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Why a step failed, from what the head and the bench look like now.
fn diagnose(bench: &mut Bench, head: &str, pid: Pid, head_limit: u64, bench_limit: u64) -> String {
    if bench.rig.exited(head) {
        return format!(
            "the head exited; its log ends with:\n{}",
            bench.rig.log_tail(head, 10)
        );
    }
    let head_fds = procfs::open_fds(pid).unwrap_or(0) as u64;
    let bench_fds = procfs::open_fds(Pid::Me).unwrap_or(0) as u64;
    let head_cpu = {
        let a = procfs::cpu(pid);
        std::thread::sleep(Duration::from_millis(500));
        match (a, procfs::cpu(pid)) {
            (Some(a), Some(b)) => procfs::cpu_percent(a, b),
            _ => f64::NAN,
        }
    };
    let bound = bench.rig.log_contains(head, "connection limit reached");
    let accept_failed = bench.rig.log_contains(head, "accept failed");
    if bound {
        format!("the head refused connections past its connection bound (--max-connections; by default its open-file limit {head_limit} less {}); {head_fds} descriptors open", tether::server::RESERVED_DESCRIPTORS)
    } else if accept_failed || head_fds + 4 >= head_limit {
        format!("the head ran out of descriptors ({head_fds} open, limit {head_limit}; head CPU {head_cpu:.0} % while refusing)")
    } else if bench_fds + 4 >= bench_limit {
        format!("the bench ran out of descriptors ({bench_fds} open, limit {bench_limit})")
    } else {
        format!("head has {head_fds} of {head_limit} descriptors, bench {bench_fds} of {bench_limit}; head CPU {head_cpu:.0} %")
    }
}
