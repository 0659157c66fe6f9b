//! Failover tests all ask one question: did each worker of the heads that
//! went away attach to another head, under a higher epoch, in time? This
//! is the one poll that answers it, shared by `tests/failover.rs` and
//! `tests/scaling.rs`.

use crate::localcluster::{wait_until, Probe};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether::pb::WorkerStatus;

/// A worker that had to move: where it answers `Status`, and the epoch it
/// was attached under before.
#[derive(Debug, Clone)]
pub struct Orphan {
    /// The worker's `Status` address.
    pub addr: SocketAddr,
    /// Its epoch before its head went away.
    pub epoch_before: u64,
}

/// What [`wait_moved`] saw.
#[derive(Debug, Default)]
pub struct Moves {
    /// Each worker seen moved: how long after `since`, and its status then.
    pub moved: BTreeMap<String, (Duration, WorkerStatus)>,
    /// Each worker not seen moved, with its last status or error and its
    /// epoch before; empty when all moved in time.
    pub late: Vec<String>,
}

/// Polls the `orphans` every 20 ms until each is attached to a head not in
/// `left` under a higher epoch, for at most `within` after `since`.
pub async fn wait_moved(
    probe: &mut Probe,
    left: &[&str],
    orphans: &BTreeMap<String, Orphan>,
    since: Instant,
    within: Duration,
) -> Moves {
    let mut moved: BTreeMap<String, (Duration, WorkerStatus)> = BTreeMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let remaining = within.saturating_sub(since.elapsed());
    wait_until(remaining, Duration::from_millis(20), async || {
        for (w, orphan) in orphans {
            if moved.contains_key(w) {
                continue;
            }
            match probe.worker_status(orphan.addr).await {
                Ok(s)
                    if s.attached
                        && !left.contains(&s.head_id.as_str())
                        && s.epoch > orphan.epoch_before =>
                {
                    moved.insert(w.clone(), (since.elapsed(), s));
                }
                Ok(s) => {
                    last.insert(w.clone(), format!("{s:?}"));
                }
                Err(e) => {
                    last.insert(w.clone(), e.to_string());
                }
            }
        }
        moved.len() == orphans.len()
    })
    .await;
    let late = orphans
        .iter()
        .filter(|(w, _)| !moved.contains_key(*w))
        .map(|(w, o)| {
            format!(
                "{w} (epoch before {}): {}",
                o.epoch_before,
                last.get(w).map_or("", |s| s)
            )
        })
        .collect();
    Moves { moved, late }
}
