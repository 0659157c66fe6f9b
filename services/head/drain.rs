//! Scale-down without a gap: on SIGTERM or the `Drain` RPC the head marks
//! itself draining, asks each worker to move to a suggested head, and
//! lets the caller exit once the last worker left or the deadline passed.
//!
//! Workers move make-before-break (new stream first, then they close this
//! one), so a drained worker misses no beat.

use super::attached::Attached;
use crate::pb::{Redirect, RedirectReason};
use crate::placement;
use crate::registry::{now_ms, HeadEntry, HeadState, Registry};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// The drain switch shared by the signal handler and the `Drain` RPC.
#[derive(Debug)]
pub struct Drain {
    timeout: Duration,
    /// When the drain began: Unix ms of its deadline, and the monotonic one.
    deadline: OnceLock<(i64, Instant)>,
    started: watch::Sender<bool>,
}

impl Drain {
    /// A drain that, once begun, lasts at most `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: OnceLock::new(),
            started: watch::Sender::new(false),
        }
    }

    /// Begins the drain (once); returns its deadline in Unix ms.
    pub fn begin(&self) -> i64 {
        let (ms, _) = *self.deadline.get_or_init(|| {
            (
                now_ms() + self.timeout.as_millis() as i64,
                Instant::now() + self.timeout,
            )
        });
        self.started.send_replace(true);
        ms
    }

    /// True once the drain began.
    pub fn begun(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves when the drain begins.
    pub async fn wait_begun(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|b| *b).await;
    }

    fn deadline(&self) -> Instant {
        self.deadline
            .get()
            .map(|(_, at)| *at)
            .unwrap_or_else(Instant::now)
    }
}

/// What the hand-off needs.
pub struct Handoff {
    pub head_id: String,
    pub registry: Registry,
    pub attached: Arc<Attached>,
    pub interval: Duration,
    pub slack_permille: u32,
}

impl Handoff {
    /// Redirects every worker until none is left or the deadline passes.
    /// Workers that have not moved within two intervals are asked again,
    /// with a fresh suggestion (a head may have joined meanwhile).
    /// Returns how many workers were still attached when it ended (0
    /// unless the drain timeout passed).
    pub async fn run(&self, drain: &Drain) -> usize {
        let deadline = drain.deadline();
        let start = Instant::now();
        let initial = self.attached.len();
        info!(head = %self.head_id, workers = initial, "draining: redirecting workers");
        let mut next_round = Instant::now();
        loop {
            if self.attached.len() == 0 {
                info!(head = %self.head_id, workers = initial, took = ?start.elapsed(), "drained: every worker moved");
                return 0;
            }
            let now = Instant::now();
            if now >= deadline {
                let left = self.attached.len();
                warn!(head = %self.head_id, left, "drain timeout passed with workers still attached");
                return left;
            }
            if now >= next_round {
                self.redirect_round().await;
                next_round = now + self.interval * 2;
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
        }
    }

    async fn redirect_round(&self) {
        let heads = match self.registry.live_heads().await {
            Ok(h) => h,
            Err(e) => {
                warn!(head = %self.head_id, error = %e, "draining: cannot read the registry; workers will use their own order");
                Vec::new()
            }
        };
        let total: u64 = heads.iter().map(|h| h.assigned).sum();
        let targets: Vec<&HeadEntry> = heads
            .iter()
            .filter(|h| h.state == HeadState::Ready && h.id != self.head_id)
            .collect();
        let bound = placement::load_bound(total, targets.len() as u64, self.slack_permille);
        let ids: Vec<&str> = targets.iter().map(|h| h.id.as_str()).collect();
        let mut loads: Vec<u64> = targets.iter().map(|h| h.assigned).collect();
        let mut streams = self.attached.streams();
        streams.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        let workers: Vec<&str> = streams.iter().map(|s| s.worker_id.as_str()).collect();
        let picks = placement::assign_bounded(&workers, &ids, &mut loads, bound);
        let now = tokio::time::Instant::now();
        for (stream, pick) in streams.iter().zip(picks) {
            let (id, addr) = pick
                .map(|i| (targets[i].id.clone(), targets[i].addr.clone()))
                .unwrap_or_default();
            stream.redirect(
                Redirect {
                    reason: RedirectReason::Drain as i32,
                    suggested_head_id: id,
                    suggested_head_addr: addr,
                },
                now,
            );
        }
    }
}
