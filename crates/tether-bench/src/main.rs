//! `tether-bench`: measures failover, hang detection, drain, scale-up,
//! steady-state cost and capacity of real `tether-head` processes.
//!
//! It starts its own `redis-server` and heads (the binaries next to it;
//! `cargo build --release` at the workspace root builds them all) and
//! simulates the workers in this one process with the library's attach
//! loop, the code `tether-worker` runs, each over its own TCP connection.
//! Each scenario prints a small table and, with `--json PATH`, writes the
//! same numbers as JSON, and for some a chart beside it (`PATH` with
//! `.svg`). `floor` and `steady` also measure the raw-TCP floor, a server
//! process that is this executable again (the hidden `floor-server`).
//! `docs/BENCHMARKS.md` has the commands and the results.
//!
//! # Layout
//! - `scenarios`: one module per subcommand, and the shared set-up.
//! - `fleet`: the simulated workers.
//! - `floor`: the raw-TCP floor, its server process and its workers.
//! - `rig`: Redis and the heads, signals, Redis command counts.
//! - `procfs`: CPU, memory and descriptors from `/proc`.
//! - `stats`: percentiles and missed beats.
//! - `report`: the table and the JSON.
//! - `plot`: the SVG charts.

mod fleet;
mod floor;
mod plot;
mod procfs;
mod report;
mod rig;
mod scenarios;
mod stats;

/// mimalloc instead of glibc's malloc: during a failover, glibc's malloc
/// and free took a sixth of all CPU, and with it a quiet head at 10,000
/// workers uses about a sixth less (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use scenarios::capacity::CapacityArgs;
use scenarios::floor::FloorArgs;
use scenarios::moves::{Kind, MoveArgs};
use scenarios::scale_up::ScaleUpArgs;
use scenarios::steady::SteadyArgs;
use scenarios::sweep::SweepArgs;
use scenarios::Common;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Benchmarks of Tether with real heads and simulated workers.
#[derive(Debug, Parser)]
#[command(name = "tether-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// SIGKILL one head; time each of its workers until it gets its first
    /// beat from another head [default: 4 heads, 2000 workers].
    Failover(MoveArgs),
    /// SIGSTOP one head; the same measure, also less the heartbeat
    /// timeout [default: 4 heads, 2000 workers].
    Hang(MoveArgs),
    /// SIGTERM one head; handoff times and missed beats [default: 4
    /// heads, 500 workers].
    Drain(MoveArgs),
    /// Add one head; workers moved against the optimum, final load spread
    /// [default: 4 heads, 2000 workers].
    ScaleUp(ScaleUpArgs),
    /// Beat for a while; head CPU and RSS, Redis commands, spurious moves,
    /// and the head's cost per worker as a ratio to the raw-TCP floor, run
    /// first [default: 1 head, 10000 workers].
    Steady(SteadyArgs),
    /// The raw-TCP floor alone: a server process exchanging 24-byte beats
    /// with each worker; its CPU and RSS per worker [default: 10000
    /// workers].
    Floor(FloorArgs),
    /// `steady` and its floor at each of --steps fleet sizes; cost per
    /// worker against N, with a chart.
    Sweep(SweepArgs),
    /// Grow the workers of one head in steps until it misses a beat or
    /// runs out of descriptors.
    Capacity(CapacityArgs),
    /// The floor's server process, which `floor`, `steady` and `sweep`
    /// start: serves ADDR until its stdin closes.
    #[command(hide = true)]
    FloorServer(FloorServerArgs),
}

/// Arguments of the hidden `floor-server`.
#[derive(Debug, clap::Args)]
struct FloorServerArgs {
    /// Where to listen; port 0 for any. The bound address is printed.
    addr: SocketAddr,
    /// How often to beat each connection.
    #[arg(value_parser = tether::config::parse_duration)]
    interval: Duration,
}

impl Scenario {
    fn common(&self) -> Option<&Common> {
        match self {
            Scenario::Failover(a) | Scenario::Hang(a) | Scenario::Drain(a) => Some(&a.common),
            Scenario::ScaleUp(a) => Some(&a.common),
            Scenario::Steady(a) => Some(&a.common),
            Scenario::Floor(a) => Some(&a.common),
            Scenario::Sweep(a) => Some(&a.common),
            Scenario::Capacity(a) => Some(&a.common),
            Scenario::FloorServer(_) => None,
        }
    }

    async fn run(&self) -> Result<report::Report, String> {
        match self {
            Scenario::Failover(a) => scenarios::moves::run(Kind::Failover, a).await,
            Scenario::Hang(a) => scenarios::moves::run(Kind::Hang, a).await,
            Scenario::Drain(a) => scenarios::moves::run(Kind::Drain, a).await,
            Scenario::ScaleUp(a) => scenarios::scale_up::run(a).await,
            Scenario::Steady(a) => scenarios::steady::run(a).await,
            Scenario::Floor(a) => scenarios::floor::run(a).await,
            Scenario::Sweep(a) => scenarios::sweep::run(a).await,
            Scenario::Capacity(a) => scenarios::capacity::run(a).await,
            Scenario::FloorServer(_) => Err("floor-server is not a scenario".into()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(common) = cli.scenario.common().cloned() else {
        if let Scenario::FloorServer(a) = &cli.scenario {
            return floor_server(a);
        }
        return ExitCode::FAILURE;
    };
    if let Err(e) = common.validate() {
        eprintln!("tether-bench: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    // Logs of the attach loops are off unless RUST_LOG asks for them:
    // thousands of workers logging every move would measure the logger.
    if std::env::var_os("RUST_LOG").is_some() {
        tether::telemetry::init(tether::telemetry::LogFormat::Text);
    }
    let machine = procfs::Machine::read();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = common.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = cli.scenario.run() => r,
            s = tether::shutdown::signal() => Err(format!("interrupted by {s:?}")),
        }
    });
    // The workers' tasks may still hold sockets: do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    if let Some(path) = &common.json {
        if let Err(e) = report.write_json(path, machine.json()) {
            eprintln!("tether-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        match report.write_chart(path) {
            Ok(Some(svg)) => println!("  chart: {}", svg.display()),
            Ok(None) => {}
            Err(e) => {
                eprintln!("tether-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Runs the floor's server: a runtime of its own, one thread per core, as
/// raw-tcp-beats has (`#[tokio::main]`).
fn floor_server(args: &FloorServerArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-bench floor-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(floor::serve(args.addr, args.interval)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-bench floor-server: {e}");
            ExitCode::FAILURE
        }
    }
}
