//! `tether-worker`: stays attached to one live head, moves when it is
//! lost, and serves `WorkerService` so operators can see where it is. This
//! file only parses configuration and wires the process.

mod run;
mod status;

use std::time::Duration;
use tether::config::{parse_duration, parse_id, CommonArgs};

/// A Tether worker: holds a heartbeat stream to one live head.
///
/// The heartbeat interval and timeout are not set here: every head tells
/// its workers the values to use, so one cluster has one policy.
#[derive(Debug, clap::Parser)]
#[command(name = "tether-worker", version, about, long_about = None)]
pub struct Args {
    /// This worker's id, unique in the cluster: 1 to 128 printable bytes
    /// [default: worker-HOSTNAME-PID].
    #[arg(long, env = "TETHER_ID", value_parser = parse_id)]
    pub id: Option<String>,

    /// Address to serve gRPC on (WorkerService, health, reflection).
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:7071")]
    pub listen: std::net::SocketAddr,

    /// Address operators should dial to reach this worker, as host:port
    /// [default: the listen address, or 127.0.0.1:PORT on a wildcard].
    #[arg(long, env = "TETHER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Bound on dialing a head and on each call to it.
    #[arg(long, env = "TETHER_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Heads to learn the cluster from, as HOST:PORT[,HOST:PORT...]: any
    /// subset of the heads (a DNS name resolving to several addresses, such
    /// as a Kubernetes headless Service, counts as all of them). The worker
    /// calls ListHeads on them and needs no Redis; with --redis-url given
    /// too, the registry is read when no head answers.
    #[arg(long, env = "TETHER_HEADS", value_delimiter = ',', value_parser = tether::config::parse_head_addr)]
    pub heads: Vec<String>,

    /// Largest delay between attempts while no head accepts the worker.
    #[arg(long, env = "TETHER_MAX_BACKOFF", default_value = "5s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    fn validate(&self) -> Result<(), String> {
        if self.connect_timeout.is_zero() {
            return Err("--connect-timeout must be larger than 0".into());
        }
        if self.max_backoff < Duration::from_millis(100) {
            return Err("--max-backoff must be at least 100ms".into());
        }
        if let Some(a) = &self.advertise {
            if a.len() > 256 || !a.contains(':') {
                return Err(format!("--advertise {a:?} must be host:port"));
            }
        }
        Ok(())
    }
}

fn main() {
    let (args, matches): (Args, _) = tether::config::parse_args_and_matches("tether-worker");
    // --redis-url has a default for heads; a worker given --heads uses
    // Redis only when told to.
    let redis_given = matches!(
        matches.value_source("redis_url"),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    );
    let security = args
        .validate()
        .and_then(|()| args.common.registry.validate().map_err(String::from))
        .and_then(|()| args.common.security.load());
    let (server_security, client_security) = match security {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tether-worker: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    tether::telemetry::init(args.common.log_format);
    // One thread is plenty for one stream and a status service, and keeps
    // a host with hundreds of workers light.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("tether-worker: cannot start the runtime: {e}");
            std::process::exit(1);
        });
    let code = runtime.block_on(run::run(
        args,
        redis_given,
        server_security,
        client_security,
    ));
    std::process::exit(code);
}
