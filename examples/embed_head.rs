//! A tonic server that serves its own gRPC service and a Tether head on
//! one port: the use of [`tether::head::Head::serve_with`]. Workers attach
//! to it like to any `tether-head`; the program's own service shares the
//! port, its limits and its security layer.
//!
//! The "own service" here is `tether.v1.WorkerService`, implemented by
//! this program to answer `Status` with a fixed reply (only because it is a
//! generated service at hand; in your program, your own).
//!
//! ```sh
//! cargo run --example embed_head -- --redis-url redis://127.0.0.1:6379 --listen 127.0.0.1:7070 --id app-head
//! ```
//!
//! SIGTERM or Ctrl-C drains the head (its workers move to other heads),
//! then the program exits. `tests/embed_examples.rs` runs it.

use tether::head::{Head, HeadSettings};
use tether::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tether::pb::{StatusRequest, WorkerStatus};
use tether::registry::Registry;
use tonic::{Request, Response, Status};

/// The program's own service.
struct AppStatus;

#[tonic::async_trait]
impl WorkerService for AppStatus {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<WorkerStatus>, Status> {
        Ok(Response::new(WorkerStatus {
            worker_id: "embed-head-app".to_owned(),
            ..WorkerStatus::default()
        }))
    }
}

/// `--redis-url URL`, `--listen ADDR`, `--id ID`, in any order.
struct Args {
    redis_url: String,
    listen: String,
    id: String,
}

fn parse_args() -> Result<Args, String> {
    let mut out = Args {
        redis_url: "redis://127.0.0.1:6379".to_owned(),
        listen: "127.0.0.1:7070".to_owned(),
        id: "embed-head".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--redis-url" => out.redis_url = value,
            "--listen" => out.listen = value,
            "--id" => out.id = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let settings = HeadSettings::new(args.id.as_str()).validate()?;
    let registry = Registry::new(&args.redis_url, "tether")?;
    let head = Head::builder(settings).registry(registry).build()?;
    println!("{} serving on {}", args.id, listener.local_addr()?);
    head.serve_with(
        listener,
        async {
            let s = tether::shutdown::signal().await;
            println!("{s:?}: draining");
        },
        |router| router.add_service(WorkerServiceServer::new(AppStatus)),
    )
    .await?;
    println!("{} stopped", args.id);
    Ok(())
}
