//! `floor`: the raw-TCP floor alone (`crate::floor`): what N workers cost
//! a server that does nothing but exchange 24-byte beats with each of
//! them. `steady` runs the same first and divides by it.

use super::{Common, Window};
use crate::report::Report;

/// Flags of `floor`: those of `steady`. Of the common flags only
/// `--workers`, `--heartbeat-interval`, `--json` and `--threads` apply;
/// the rest concern heads and Redis, which the floor has none of.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    #[command(flatten)]
    pub common: Common,

    #[command(flatten)]
    pub window: Window,
}

/// Runs `floor`.
pub async fn run(args: &FloorArgs) -> Result<Report, String> {
    let c = &args.common;
    if c.heads.is_some() {
        return Err("the floor has no heads; leave out --heads".into());
    }
    let workers = c.workers.unwrap_or(10_000);
    let mut report = Report::new("floor");
    report.config("workers", workers);
    report.config("heartbeat_interval_ms", super::ms(c.heartbeat_interval));
    args.window.describe(&mut report);
    report.config("threads", c.threads.unwrap_or(0));
    let measured = crate::floor::measure(args.window.floor_run(workers, c)).await?;
    measured.add_to(&mut report);
    report.note("the server is this executable's hidden floor-server subcommand, a process of its own: raw TCP, 8 phases, 24-byte beats each way (the shape of raw-tcp-beats); per worker-second = CPU / (workers × window)");
    report.note("the workers (this process) and the server share the machine's cores");
    Ok(report)
}
