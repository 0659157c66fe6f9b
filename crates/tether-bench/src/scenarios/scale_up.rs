//! `scale-up`: one head joins a settled cluster; counts the workers that
//! move (against the optimum W/(H+1): rendezvous placement moves exactly
//! the new head's share) and the load spread once moves stop.

use super::moves::loads_json;
use super::{ms_flag, Bench, Common};
use crate::report::{Json, Report};
use std::time::{Duration, Instant};
use tether::config::parse_duration;

/// Flags of `scale-up`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleUpArgs {
    #[command(flatten)]
    pub common: Common,

    /// Passed to every head: workers per second each may redirect.
    #[arg(long, default_value = "100")]
    pub rebalance_rate: f64,

    /// Passed to every head: workers that attached more recently are not
    /// redirected. The bench waits this long before adding the head.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub rebalance_cooldown: Duration,

    /// Moves are over once no worker moved for this long [default: the
    /// larger of 3 s and 3 intervals].
    #[arg(long, value_parser = parse_duration)]
    pub quiet: Option<Duration>,

    /// Bound on waiting for the moves to end.
    #[arg(long, default_value = "70s", value_parser = parse_duration)]
    pub settle_timeout: Duration,
}

/// Runs `scale-up`.
pub async fn run(args: &ScaleUpArgs) -> Result<Report, String> {
    let c = &args.common;
    let heads = c.heads.unwrap_or(4);
    let workers = c.workers.unwrap_or(2000);
    let quiet = args
        .quiet
        .unwrap_or_else(|| (c.heartbeat_interval * 3).max(Duration::from_secs(3)));
    let mut report = Report::new("scale-up");
    c.describe(&mut report, heads, workers);
    report.config("rebalance_rate", args.rebalance_rate);
    report.config("rebalance_cooldown_ms", super::ms(args.rebalance_cooldown));
    report.config("quiet_ms", super::ms(quiet));
    let extra = vec![
        "--rebalance-rate".to_owned(),
        args.rebalance_rate.to_string(),
        "--rebalance-cooldown".to_owned(),
        ms_flag(args.rebalance_cooldown),
    ];
    let (mut bench, attach_took) = Bench::start(c, heads, workers, &extra).await?;
    report.metric_ms("attach_all_ms", "fleet attached after", Some(attach_took));
    // Workers younger than the cool-down are left alone by design.
    tokio::time::sleep(
        args.rebalance_cooldown
            .saturating_sub(c.heartbeat_interval * 2),
    )
    .await;
    let before = bench.fleet.views();
    report.detail("loads_before", loads_json(&bench.fleet.loads()));

    let t0 = Instant::now();
    let new_head = bench.rig.add_heads(1).await?.pop().expect("one head added");
    let ready_after = t0.elapsed();
    let ready_at = Instant::now();

    let mut epochs: Vec<u64> = before.iter().map(|v| v.epoch).collect();
    let mut last_change: Option<Instant> = None;
    let mut first_change: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        for (i, epoch) in epochs.iter_mut().enumerate() {
            let e = bench.fleet.with(i, |s| s.epoch);
            if e != *epoch {
                *epoch = e;
                last_change = Some(now);
                first_change.get_or_insert(now);
            }
        }
        let since = last_change.unwrap_or(ready_at);
        let waited_enough = now.duration_since(ready_at) >= quiet + c.heartbeat_interval * 2;
        if waited_enough && now.duration_since(since) >= quiet {
            break;
        }
        if now.duration_since(t0) >= args.settle_timeout {
            report.note(format!(
                "moves had not stopped after {:?}",
                args.settle_timeout
            ));
            break;
        }
    }

    let after = bench.fleet.views();
    let moved = (0..after.len())
        .filter(|i| after[*i].head_id != before[*i].head_id)
        .count();
    let moved_to_new = after.iter().filter(|v| v.head_id == new_head).count();
    let reassignments: u64 = (0..after.len())
        .map(|i| after[i].reassignments - before[i].reassignments)
        .sum();
    let unattached = after.iter().filter(|v| !v.attached).count();
    let loads = bench.fleet.loads();
    let optimum = workers as f64 / (heads + 1) as f64;
    let max_load = loads.values().copied().max().unwrap_or(0);
    let avg_load = workers as f64 / (heads + 1) as f64;

    report.metric_ms(
        "new_head_ready_ms",
        "new head registered after",
        Some(ready_after),
    );
    report.metric_count("workers_moved", "workers moved", moved as u64);
    report.metric(
        "optimum_moves",
        "optimum W/(H+1)",
        (optimum * 10.0).round() / 10.0,
        format!("{optimum:.1}"),
    );
    let ratio = moved as f64 / optimum;
    report.metric(
        "moved_over_optimum",
        "moved / optimum",
        ratio,
        format!("{ratio:.3}"),
    );
    report.metric_count(
        "moved_to_new_head",
        "workers on the new head",
        moved_to_new as u64,
    );
    report.metric_count("reassignments", "reassignments (all moves)", reassignments);
    report.metric_ms(
        "first_move_ms",
        "first move after the head started",
        first_change.map(|t| t.duration_since(t0)),
    );
    report.metric_ms(
        "last_move_ms",
        "last move after the head started",
        last_change.map(|t| t.duration_since(t0)),
    );
    report.metric_count("max_load", "final max load", max_load as u64);
    report.metric(
        "avg_load",
        "final avg load",
        (avg_load * 10.0).round() / 10.0,
        format!("{avg_load:.1}"),
    );
    let spread = max_load as f64 / avg_load;
    report.metric(
        "max_over_avg",
        "final max / avg",
        spread,
        format!("{spread:.3}"),
    );
    report.metric_count(
        "unattached_end",
        "workers unattached at the end",
        unattached as u64,
    );
    report.detail("loads_after", loads_json(&loads));
    report.detail("new_head", Json::from(new_head.as_str()));
    bench.stop().await;
    Ok(report)
}
