//! `sweep`: `steady` at several fleet sizes, each with its floor. For
//! each N it runs the raw-TCP floor, then Redis, the heads and N workers
//! afresh, and reports the head's CPU per worker-second and RSS growth per
//! worker beside the floor's; the chart shows both against N.

use super::steady::{self, add_cost_rows};
use super::{Common, Window};
use crate::plot::{Chart, Panel, Series};
use crate::report::{obj, Json, Report};

/// Flags of `sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub common: Common,

    #[command(flatten)]
    pub window: Window,

    /// Fleet sizes, in order, e.g. `2000,4000,10000`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub steps: Vec<usize>,
}

/// Runs `sweep`.
pub async fn run(args: &SweepArgs) -> Result<Report, String> {
    let c = &args.common;
    if c.workers.is_some() {
        return Err("sweep takes its fleet sizes from --steps; leave out --workers".into());
    }
    if args.steps.is_empty() || args.steps.contains(&0) {
        return Err("--steps must be above 0".into());
    }
    let heads = c.heads.unwrap_or(1);
    let mut report = Report::new("sweep");
    c.describe(
        &mut report,
        heads,
        args.steps.iter().copied().max().unwrap_or(0),
    );
    args.window.describe(&mut report);
    report.config(
        "steps",
        Json::Array(args.steps.iter().map(|n| Json::from(*n)).collect()),
    );

    let mut points = Vec::new();
    let mut lines: [Vec<(f64, f64)>; 4] = Default::default();
    for &n in &args.steps {
        let floor = crate::floor::measure(args.window.floor_run(n, c)).await?;
        let mut tether = Report::new("steady");
        let head = steady::measure(c, heads, n, &args.window, &mut tether).await?;
        let (f, h) = (floor.per_worker, head);
        add_cost_rows(
            &mut report,
            &format!("_{n}"),
            &format!("{n} workers: "),
            h,
            Some(f),
        );
        println!(
            "  step {n:>6}: head CPU per worker-second {:.1} µs (floor {:.1}), RSS growth per worker {:.1} KiB (floor {:.2})",
            h.cpu_us_per_worker_second,
            f.cpu_us_per_worker_second,
            h.rss_growth_kib_per_worker,
            f.rss_growth_kib_per_worker,
        );
        let x = n as f64;
        lines[0].push((x, f.cpu_us_per_worker_second));
        lines[1].push((x, h.cpu_us_per_worker_second));
        lines[2].push((x, f.rss_growth_kib_per_worker));
        lines[3].push((x, h.rss_growth_kib_per_worker));
        let mut floor_report = Report::new("floor");
        floor.add_to(&mut floor_report);
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                Json::from(a / b)
            } else {
                Json::Null
            }
        };
        points.push(obj([
            ("workers", Json::from(n)),
            (
                "head_cpu_over_floor",
                ratio(h.cpu_us_per_worker_second, f.cpu_us_per_worker_second),
            ),
            (
                "head_rss_over_floor",
                ratio(h.rss_growth_kib_per_worker, f.rss_growth_kib_per_worker),
            ),
            ("floor", floor_report.results()),
            ("tether", tether.results()),
        ]));
    }
    report.detail("points", Json::Array(points));
    let [floor_cpu, head_cpu, floor_rss, head_rss] = lines;
    let series = |floor: Vec<(f64, f64)>, head: Vec<(f64, f64)>| {
        vec![
            Series {
                label: "raw-TCP floor".into(),
                points: floor,
            },
            Series {
                label: format!("Tether ({heads} head{})", if heads == 1 { "" } else { "s" }),
                points: head,
            },
        ]
    };
    report.chart(Chart::VersusWorkers {
        title: format!(
            "Heartbeat cost per worker vs N, beats every {} ms",
            c.heartbeat_interval.as_millis()
        ),
        panels: vec![
            Panel {
                y_label: "server CPU, µs per worker-second".into(),
                series: series(floor_cpu, head_cpu),
            },
            Panel {
                y_label: "RSS growth, KiB per worker".into(),
                series: series(floor_rss, head_rss),
            },
        ],
    });
    report.note("each step: the floor first, then Redis, the heads and the workers started afresh; per worker-second = CPU / (workers × window)");
    report.note("the simulated workers, the servers and Redis share the machine's cores");
    Ok(report)
}
