//! `steady`: N workers beat for T seconds and nothing else happens. What
//! does it cost? Head CPU and memory, Redis commands, and whether any
//! worker moved or missed a beat although nothing failed.
//!
//! First, in the same run, the raw-TCP floor (`crate::floor`) at the same
//! N, interval and window, so that the head's CPU and memory per worker
//! come with their ratio to it: on a busy machine the absolute numbers
//! drift with the load, and the ratio from one run does much less.

use super::moves::loads_json;
use super::{Bench, Common, Window};
use crate::floor::{self, PerWorker};
use crate::procfs::{self, Pid};
use crate::report::{obj, Json, Report};
use crate::rig::calls_between;
use crate::stats::{missed_beats, Summary};
use std::time::Instant;

/// Flags of `steady`.
#[derive(Debug, Clone, clap::Args)]
pub struct SteadyArgs {
    #[command(flatten)]
    pub common: Common,

    #[command(flatten)]
    pub window: Window,

    /// Leaves out the raw-TCP floor run (and the ratios to it), which
    /// otherwise comes first at the same N, interval and window.
    #[arg(long)]
    pub no_floor: bool,
}

/// Runs `steady`.
pub async fn run(args: &SteadyArgs) -> Result<Report, String> {
    let c = &args.common;
    let heads = c.heads.unwrap_or(1);
    let workers = c.workers.unwrap_or(10_000);
    let mut report = Report::new("steady");
    c.describe(&mut report, heads, workers);
    args.window.describe(&mut report);
    report.config("floor", !args.no_floor);

    let floor = if args.no_floor {
        None
    } else {
        Some(floor::measure(args.window.floor_run(workers, c)).await?)
    };
    let head = measure(c, heads, workers, &args.window, &mut report).await?;
    add_cost_rows(
        &mut report,
        "",
        "",
        head,
        floor.as_ref().map(|f| f.per_worker),
    );
    if let Some(f) = &floor {
        let mut floor_report = Report::new("floor");
        f.add_to(&mut floor_report);
        report.detail("floor", floor_report.results());
        if f.cpu < std::time::Duration::from_secs(1) {
            report.note(format!("the floor used {} ms of CPU in the window, counted in clock ticks (10 ms): a ratio from so few is rough; use more workers or a longer --duration", f.cpu.as_millis()));
        }
        report.note("the floor: a raw-TCP server process in the shape of raw-tcp-beats (tether-bench floor), run first at the same N, interval and window; per worker-second = CPU / (workers × window)");
    }
    Ok(report)
}

/// The rows of the head's cost per worker, and with the floor's, the
/// ratios to it: `head CPU per worker-second 50.6 µs = 1.63 × floor (31.0
/// µs)`. Keys and labels get `key_suffix` and `label_prefix` (the steps of
/// `sweep`).
pub fn add_cost_rows(
    report: &mut Report,
    key_suffix: &str,
    label_prefix: &str,
    head: PerWorker,
    floor: Option<PerWorker>,
) {
    let rows = [
        (
            "cpu_us_per_worker_second",
            "cpu",
            "head CPU per worker-second",
            head.cpu_us_per_worker_second,
            floor.map(|f| f.cpu_us_per_worker_second),
            "µs",
            1,
        ),
        (
            "rss_growth_kib_per_worker",
            "rss",
            "head RSS growth per worker",
            head.rss_growth_kib_per_worker,
            floor.map(|f| f.rss_growth_kib_per_worker),
            "KiB",
            2,
        ),
    ];
    for (key, short, label, value, floor, unit, digits) in rows {
        let ratio = floor.filter(|f| *f > 0.0).map(|f| value / f);
        let shown = match (floor, ratio) {
            (Some(f), Some(r)) => {
                format!("{value:.digits$} {unit} = {r:.2} × floor ({f:.digits$} {unit})")
            }
            (Some(f), None) => format!("{value:.digits$} {unit} (floor {f:.digits$} {unit})"),
            (None, _) => format!("{value:.digits$} {unit}"),
        };
        report.metric(
            &format!("head_{key}{key_suffix}"),
            &format!("{label_prefix}{label}"),
            value,
            shown,
        );
        if let Some(f) = floor {
            report.result(&format!("floor_{key}{key_suffix}"), f);
            report.result(
                &format!("head_{short}_over_floor{key_suffix}"),
                ratio.map_or(Json::Null, Json::from),
            );
        }
    }
}

/// Starts Redis, `heads` heads and `workers` workers, waits the warm-up,
/// watches the window, and adds the rows of what it cost to `report`.
/// Returns the heads' cost per worker, all heads together.
pub async fn measure(
    c: &Common,
    heads: usize,
    workers: usize,
    window_args: &Window,
    report: &mut Report,
) -> Result<PerWorker, String> {
    let mut bench = Bench::heads_only(c, heads, &[], None).await?;
    let ids: Vec<String> = bench.rig.head_ids().to_vec();
    let pids: Vec<u32> = ids.iter().map(|id| bench.rig.pid(id)).collect();
    let rss_empty: Vec<u64> = pids
        .iter()
        .map(|p| procfs::status_kib(Pid::Of(*p), "VmRSS").unwrap_or(0))
        .collect();
    let attach_took = bench.add_workers(c, workers).await?;
    tokio::time::sleep(window_args.warmup).await;

    let views0 = bench.fleet.views();
    let stats0 = bench.rig.commandstats()?;
    let redis_cpu0 = bench.rig.redis_cpu();
    let cpu0: Vec<_> = pids.iter().map(|p| procfs::cpu(Pid::Of(*p))).collect();
    let me0 = procfs::cpu(Pid::Me);
    let t0 = Instant::now();
    // A worker that drops out and comes back shows in its reassignment
    // count; one that stays out, in its beat gap.
    let window_gaps = bench.fleet.watch_gaps(window_args.duration).await;
    let window = t0.elapsed();
    let cpu1: Vec<_> = pids.iter().map(|p| procfs::cpu(Pid::Of(*p))).collect();
    let me1 = procfs::cpu(Pid::Me);
    let redis_cpu1 = bench.rig.redis_cpu();
    let stats1 = bench.rig.commandstats()?;
    let views1 = bench.fleet.views();
    let loads = bench.fleet.loads();

    report.metric_ms("attach_all_ms", "fleet attached after", Some(attach_took));
    report.metric_ms("window_ms", "measured window", Some(window));
    let secs = window.as_secs_f64();

    let mut head_rows = Vec::new();
    let mut worst_cpu: f64 = 0.0;
    let mut worst_rss_per_worker: f64 = 0.0;
    let mut heads_cpu = std::time::Duration::ZERO;
    let mut heads_rss_growth: u64 = 0;
    let mut heads_attached: usize = 0;
    for (k, id) in ids.iter().enumerate() {
        let pid = Pid::Of(pids[k]);
        let (cpu, sys) = match (cpu0[k], cpu1[k]) {
            (Some(a), Some(b)) => {
                heads_cpu += procfs::cpu_between(a, b);
                (procfs::cpu_percent(a, b), procfs::sys_percent(a, b))
            }
            _ => (f64::NAN, f64::NAN),
        };
        let rss = procfs::status_kib(pid, "VmRSS").unwrap_or(0);
        let hwm = procfs::status_kib(pid, "VmHWM").unwrap_or(0);
        let fds = procfs::open_fds(pid).unwrap_or(0);
        let attached = loads.get(id).copied().unwrap_or(0);
        let per_worker = rss as f64 / attached.max(1) as f64;
        let per_worker_delta = rss.saturating_sub(rss_empty[k]) as f64 / attached.max(1) as f64;
        heads_rss_growth += rss.saturating_sub(rss_empty[k]);
        heads_attached += attached;
        worst_cpu = worst_cpu.max(cpu);
        worst_rss_per_worker = worst_rss_per_worker.max(per_worker);
        head_rows.push(obj([
            ("head", Json::from(id.as_str())),
            ("attached", Json::from(attached)),
            ("cpu_percent_of_one_core", Json::from(cpu)),
            ("sys_cpu_percent_of_one_core", Json::from(sys)),
            ("rss_kib", Json::from(rss)),
            ("rss_kib_without_workers", Json::from(rss_empty[k])),
            ("hwm_kib", Json::from(hwm)),
            ("rss_kib_per_worker", Json::from(per_worker)),
            ("rss_growth_kib_per_worker", Json::from(per_worker_delta)),
            ("open_fds", Json::from(fds)),
        ]));
        let p = if ids.len() > 1 {
            format!("{id}: ")
        } else {
            String::new()
        };
        report.metric(
            &format!("{id}_cpu_percent"),
            &format!("{p}head CPU (user+sys, % of one core)"),
            cpu,
            format!("{cpu:.2} %"),
        );
        report.metric(
            &format!("{id}_sys_cpu_percent"),
            &format!("{p}  of which in the kernel (sys)"),
            sys,
            format!("{sys:.2} %"),
        );
        report.metric(
            &format!("{id}_rss_kib"),
            &format!("{p}head RSS"),
            rss,
            format!(
                "{:.1} MiB ({} KiB before workers)",
                rss as f64 / 1024.0,
                rss_empty[k]
            ),
        );
        report.metric(
            &format!("{id}_rss_kib_per_worker"),
            &format!("{p}head RSS per attached worker"),
            per_worker,
            format!("{per_worker:.1} KiB (growth {per_worker_delta:.1} KiB)"),
        );
    }
    report.detail("heads", Json::Array(head_rows));

    let calls = calls_between(&stats0, &stats1);
    let total: u64 = calls.values().sum();
    let scripts: u64 =
        calls.get("evalsha").copied().unwrap_or(0) + calls.get("eval").copied().unwrap_or(0);
    let per_head = total as f64 / secs / heads as f64;
    let scripts_per_head = scripts as f64 / secs / heads as f64;
    report.metric(
        "redis_commands_per_s_per_head",
        "Redis commands/s per head (incl. inside scripts)",
        per_head,
        format!("{per_head:.2}"),
    );
    report.metric(
        "redis_scripts_per_s_per_head",
        "Redis script calls/s per head (round trips)",
        scripts_per_head,
        format!("{scripts_per_head:.2}"),
    );
    report.detail(
        "redis_calls",
        Json::Object(
            calls
                .iter()
                .map(|(k, v)| (k.clone(), Json::from(*v)))
                .collect(),
        ),
    );
    if let (Some(a), Some(b)) = (redis_cpu0, redis_cpu1) {
        let pct = b.saturating_sub(a).as_secs_f64() / secs * 100.0;
        report.metric(
            "redis_cpu_percent",
            "Redis CPU (% of one core)",
            pct,
            format!("{pct:.2} %"),
        );
    }
    if let (Some(a), Some(b)) = (me0, me1) {
        let pct = procfs::cpu_percent(a, b);
        report.metric(
            "bench_cpu_percent",
            "bench CPU, all simulated workers (% of one core)",
            pct,
            format!("{pct:.1} %"),
        );
    }

    let moves: u64 = (0..views1.len())
        .map(|i| views1[i].reassignments - views0[i].reassignments)
        .sum();
    let unattached_end = views1.iter().filter(|v| !v.attached).count();
    let missing = window_gaps
        .iter()
        .filter(|g| missed_beats(**g, c.heartbeat_interval) > 0)
        .count();
    let gaps = Summary::new(window_gaps);
    report.metric_count("spurious_moves", "spurious reassignments", moves);
    report.metric_count(
        "unattached_end",
        "workers unattached at the end",
        unattached_end as u64,
    );
    report.metric_ms(
        "max_gap_p99_ms",
        "longest beat gap in the window: p99",
        gaps.percentile(99.0),
    );
    report.metric_ms(
        "max_gap_ms",
        "longest beat gap in the window: max",
        gaps.max(),
    );
    report.metric_count(
        "workers_missing_beats",
        "workers that missed a beat",
        missing as u64,
    );
    report.detail("loads", loads_json(&loads));

    let complete = unattached_end == 0;
    report.target(
        "head CPU",
        "<= 15 % of one core".into(),
        format!("{worst_cpu:.2} %"),
        worst_cpu <= 15.0,
    );
    report.target(
        "head RSS per worker",
        "<= 32 KiB".into(),
        format!("{worst_rss_per_worker:.1} KiB"),
        worst_rss_per_worker <= 32.0,
    );
    report.target(
        "Redis commands per head",
        "<= 10 /s".into(),
        format!("{per_head:.2} /s"),
        per_head <= 10.0,
    );
    report.target(
        "spurious moves",
        "0".into(),
        moves.to_string(),
        moves == 0 && complete,
    );
    report.note("the simulated workers, the heads and Redis share the machine's cores");
    bench.stop().await;
    Ok(PerWorker::new(
        heads_cpu,
        window,
        heads_attached,
        heads_rss_growth,
    ))
}
