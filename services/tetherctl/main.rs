//! `tetherctl`: look at a running Tether cluster and act on it.
//!
//! It reads the registry (`--redis-url`) to find the heads and calls them
//! over gRPC: `status` shows heads, their load and their workers' beat
//! ages; `watch` prints the cluster's membership events live; `drain`
//! drains one head.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use tether::config::RegistryArgs;
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::{ClusterEvent, DrainRequest, EventKind, ListWorkersRequest, WatchEventsRequest};
use tether::registry::{now_ms, HeadEntry, Registry};
use tether::security::{ClientSecurity, SecurityArgs};
use tonic::transport::Channel;

/// Inspect and operate a Tether cluster.
#[derive(Debug, Parser)]
#[command(name = "tetherctl", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    security: SecurityArgs,

    /// Bound on each call to a head.
    #[arg(long, default_value = "3s", value_parser = tether::config::parse_duration)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Heads with address, state and load; workers per head with beat ages.
    Status {
        /// Only the per-head summary, not every worker.
        #[arg(long)]
        brief: bool,
    },
    /// Print membership events as they happen, until Ctrl-C.
    Watch {
        /// Watch through this head (default: the first live head).
        #[arg(long)]
        head: Option<String>,
    },
    /// Drain a head: it hands its workers to other heads and exits.
    Drain {
        /// The id of the head to drain.
        head_id: String,
    },
}

fn main() -> ExitCode {
    let args: Args = tether::config::parse_args("tetherctl");
    let security = match args.registry.validate().and_then(|()| args.security.load()) {
        Ok((_, client)) => client,
        Err(e) => {
            eprintln!("tetherctl: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tetherctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherctl: {e}");
            ExitCode::from(1)
        }
    }
}

struct Ctl {
    registry: Registry,
    security: ClientSecurity,
    timeout: Duration,
}

async fn run(args: Args, security: ClientSecurity) -> Result<(), String> {
    let registry = Registry::new(&args.registry.redis_url, &args.registry.namespace, 2)
        .map_err(|e| e.to_string())?;
    let ctl = Ctl {
        registry,
        security,
        timeout: args.timeout,
    };
    match args.command {
        Command::Status { brief } => ctl.status(brief).await,
        Command::Watch { head } => ctl.watch(head).await,
        Command::Drain { head_id } => ctl.drain(&head_id).await,
    }
}

impl Ctl {
    async fn heads(&self) -> Result<Vec<HeadEntry>, String> {
        self.registry
            .live_heads()
            .await
            .map_err(|e| format!("cannot read the registry: {e}"))
    }

    async fn client(&self, head: &HeadEntry) -> Result<HeadServiceClient<Channel>, String> {
        let channel = self
            .security
            .endpoint(&head.addr)?
            .connect_timeout(self.timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot reach head {} at {}: {e}", head.id, head.addr))?;
        Ok(HeadServiceClient::new(channel))
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        self.security.authorize(&mut request);
        request
    }

    async fn status(&self, brief: bool) -> Result<(), String> {
        let heads = self.heads().await?;
        if heads.is_empty() {
            println!("no live head in the registry");
            return Ok(());
        }
        println!(
            "{:<24} {:<22} {:<9} {:>8} {:>8}",
            "HEAD", "ADDRESS", "STATE", "ASSIGNED", "STREAMS"
        );
        let mut listings = Vec::new();
        for head in &heads {
            let listing = match self.client(head).await {
                Ok(mut c) => c
                    .list_workers(self.request(ListWorkersRequest {}))
                    .await
                    .map(|r| r.into_inner().workers)
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
                Err(e) => Err(e),
            };
            let streams = match &listing {
                Ok(w) => w.len().to_string(),
                Err(_) => "?".into(),
            };
            println!(
                "{:<24} {:<22} {:<9} {:>8} {:>8}",
                head.id, head.addr, head.state, head.assigned, streams
            );
            listings.push((head.id.clone(), listing));
        }
        if brief {
            return Ok(());
        }
        let now = now_ms();
        for (head, listing) in listings {
            println!();
            match listing {
                Err(e) => println!("{head}: cannot list workers: {e}"),
                Ok(workers) => {
                    println!("{head}: {} workers", workers.len());
                    println!(
                        "  {:<32} {:>8} {:>12} {:>14}",
                        "WORKER", "EPOCH", "ATTACHED", "LAST BEAT AGO"
                    );
                    for w in workers {
                        println!(
                            "  {:<32} {:>8} {:>11}s {:>12}ms",
                            w.worker_id,
                            w.epoch,
                            (now - w.attached_since_ms).max(0) / 1000,
                            (now - w.last_beat_ms).max(0)
                        );
                    }
                }
            }
        }
        Ok(())
    }

    async fn watch(&self, through: Option<String>) -> Result<(), String> {
        let mut backoff =
            tether::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 3);
        loop {
            let heads = self.heads().await?;
            let head = match &through {
                Some(id) => heads
                    .iter()
                    .find(|h| &h.id == id)
                    .ok_or_else(|| format!("head {id} is not in the registry"))?,
                None => heads
                    .iter()
                    .find(|h| h.state == "ready")
                    .ok_or("no ready head to watch through")?,
            };
            eprintln!(
                "watching the cluster's events through head {} ({})",
                head.id, head.addr
            );
            let mut client = self.client(head).await?;
            let mut request = tonic::Request::new(WatchEventsRequest {});
            self.security.authorize(&mut request);
            let mut stream = client
                .watch_events(request)
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            backoff.reset();
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(event)) => println!("{}", describe(&event)),
                        Ok(None) => break,
                        Err(s) => {
                            eprintln!("event stream ended: {:?}: {}", s.code(), s.message());
                            break;
                        }
                    },
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            let delay = backoff.next_delay();
            eprintln!("reconnecting in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }

    async fn drain(&self, head_id: &str) -> Result<(), String> {
        let heads = self.heads().await?;
        let head = heads
            .iter()
            .find(|h| h.id == head_id)
            .ok_or_else(|| format!("head {head_id} is not in the registry"))?;
        let answer = self
            .client(head)
            .await?
            .drain(self.request(DrainRequest {}))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        println!(
            "head {} is draining {} workers; it exits once they left, at the latest in {} ms",
            answer.head_id,
            answer.workers,
            (answer.deadline_ms - now_ms()).max(0)
        );
        Ok(())
    }
}

/// One readable line per event.
fn describe(e: &ClusterEvent) -> String {
    let kind = EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified);
    let what = match kind {
        EventKind::WorkerAttached => format!(
            "worker {} attached to {} (epoch {})",
            e.worker_id, e.head_id, e.epoch
        ),
        EventKind::WorkerLeft => {
            format!("worker {} left {} ({})", e.worker_id, e.head_id, e.detail)
        }
        EventKind::WorkerMoved => format!(
            "worker {} moved {} -> {} (epoch {}, {})",
            e.worker_id, e.previous_head_id, e.head_id, e.epoch, e.detail
        ),
        EventKind::HeadJoined => format!("head {} joined at {}", e.head_id, e.detail),
        EventKind::HeadDraining => format!("head {} is draining", e.head_id),
        EventKind::HeadGone => format!("head {} gone ({})", e.head_id, e.detail),
        EventKind::Unspecified => format!("unknown event {e:?}"),
    };
    format!("{} {what}", e.at_ms)
}
