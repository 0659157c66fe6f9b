//! A program that does its own work and stays attached to a Tether head
//! while it does: the smallest use of [`tether::worker`]. It prints a line
//! whenever its attachment changes (attached, lost, moved to another
//! head), counts "work" in the meantime, and on SIGTERM or Ctrl-C closes
//! its stream (the head releases the assignment at once) and exits.
//!
//! ```sh
//! cargo run --example embed_worker -- --heads 127.0.0.1:7070 --id my-worker
//! ```
//!
//! `tests/embed_examples.rs` runs it against real heads.

use std::time::Duration;
use tether::worker::{Attachment, Worker};

/// `--heads A,B` (required) and `--id ID` (default `embed-worker`).
fn parse_args() -> Result<(Vec<String>, String), String> {
    let mut heads = Vec::new();
    let mut id = "embed-worker".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--heads" => heads = value.split(',').map(str::to_owned).collect(),
            "--id" => id = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if heads.is_empty() {
        return Err("--heads HOST:PORT[,HOST:PORT...] is required".to_owned());
    }
    Ok((heads, id))
}

/// One line per change, for people and for the test that reads them.
fn describe(before: &Attachment, now: &Attachment) -> String {
    match (before.attached, now.attached) {
        (false, true) if before.head_id.is_empty() => {
            format!("attached to {} (epoch {})", now.head_id, now.epoch)
        }
        (_, true) if before.head_id != now.head_id => format!(
            "moved from {} to {} (epoch {})",
            before.head_id, now.head_id, now.epoch
        ),
        (_, true) => format!("attached to {} (epoch {})", now.head_id, now.epoch),
        (true, false) => format!("lost head {}", before.head_id),
        (false, false) => format!("not attached (last head {:?})", now.head_id),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (heads, id) = parse_args().unwrap_or_else(|e| {
        eprintln!("embed_worker: {e}");
        std::process::exit(2);
    });
    let worker = Worker::builder(id.as_str())
        .heads(heads)
        .connect_timeout(Duration::from_millis(500))
        .max_backoff(Duration::from_millis(500))
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("embed_worker: {e}");
            std::process::exit(2);
        });
    println!("{id} started");
    let mut attachment = worker.attachment();
    let mut seen = Attachment::default();
    let mut work = tokio::time::interval(Duration::from_millis(100));
    let mut done: u64 = 0;
    loop {
        tokio::select! {
            // The program's own work, unaffected by where it is attached.
            _ = work.tick() => done += 1,
            changed = attachment.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = attachment.borrow_and_update().clone();
                // A move shows up as lost-then-attached only when the
                // stream broke; a redirect goes straight to the new head.
                if now.attached != seen.attached || now.head_id != seen.head_id {
                    println!("{}", describe(&seen, &now));
                }
                seen = now;
            }
            s = tether::shutdown::signal() => {
                println!("{s:?}: stopping after {done} units of work");
                break;
            }
        }
    }
    worker.shutdown().await;
    println!("{id} stopped");
}
