//! Scale-up without a storm: when a head joins, every other head learns of
//! it at its next lease refresh (which reads the registry's heads version)
//! or at the latest within one lease TTL, and redirects
//! exactly the workers that rendezvous placement now puts on the new head,
//! at a bounded rate, and never a worker that moved within the cool-down.
//!
//! The registry is read every lease TTL while nothing changes, and every
//! interval while workers are still to be redirected to a new head:
//! reading it every interval made up a third of a quiet head's Redis
//! commands.

use crate::attached::Attached;
use crate::lease::LeaseState;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::pb::{Redirect, RedirectReason};
use tether::placement;
use tether::registry::Registry;
use tether::shutdown::Shutdown;
use tracing::{debug, info};

/// How long after a head joins it counts as new, i.e. a rebalance target.
const NEW_HEAD_WINDOW: Duration = Duration::from_secs(60);

/// What the loop remembers of a head: joined at, last seen, started ms.
type Known = (Option<Instant>, Instant, i64);

/// The rebalance loop's inputs.
pub struct Rebalance {
    pub head_id: String,
    pub registry: Registry,
    pub attached: Arc<Attached>,
    pub lease: Arc<LeaseState>,
    pub interval: Duration,
    /// How often the registry is read while no head is new: the lease TTL,
    /// within which an expired lease is noticed anyway.
    pub quiet_every: Duration,
    /// Workers per second this head may redirect.
    pub rate: f64,
    /// A worker attached or redirected more recently is left alone.
    pub cooldown: Duration,
    /// To announce heads whose lease expired.
    pub events: tether::events::Events,
}

impl Rebalance {
    /// Runs until `shutdown`.
    pub async fn run(self, mut shutdown: Shutdown) {
        // Per head: when it joined (`None` for heads present at this
        // head's first read, which already hold their share), when it was last
        // seen, and its process start time. A head that merely vanished
        // for a while (paused, cut off) is remembered for the window, so it
        // does not count as new again; a restarted one (new start time,
        // empty) does.
        let mut known: Option<HashMap<String, Known>> = None;
        let mut budget = 0.0f64;
        let burst = (self.rate * self.interval.as_secs_f64()).max(1.0) * 2.0;
        let mut joined = self.lease.heads_changes();
        let mut wait = self.interval;
        // When the registry was last read.
        let mut previous: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Ok(()) = joined.changed() => {}
                _ = shutdown.wait() => return,
            }
            wait = self.quiet_every;
            if self.lease.draining() || !self.lease.held() {
                continue;
            }
            let heads = match self.registry.live_heads().await {
                Ok(h) => h,
                Err(e) => {
                    debug!(error = %e, "rebalance: cannot read the registry");
                    continue;
                }
            };
            tether::metrics::METRICS.heads_live.set(heads.len() as i64);
            let now = Instant::now();
            let known = known.get_or_insert_with(|| {
                heads
                    .iter()
                    .map(|h| (h.id.clone(), (None, now, h.started_ms)))
                    .collect()
            });
            for h in &heads {
                match known.get_mut(&h.id) {
                    Some(k) if k.2 == h.started_ms => k.1 = now,
                    Some(k) => {
                        info!(head = %self.head_id, restarted = %h.id, "a head restarted; rebalancing its share to it");
                        *k = (Some(now), now, h.started_ms);
                    }
                    None => {
                        info!(head = %self.head_id, joined = %h.id, "a head joined; rebalancing its share to it");
                        known.insert(h.id.clone(), (Some(now), now, h.started_ms));
                    }
                }
            }
            // A head that vanished without saying goodbye: its lease
            // expired. The live head with the smallest id announces it, so
            // one event goes out, not one per head.
            let announcer =
                heads.iter().map(|h| h.id.as_str()).min() == Some(self.head_id.as_str());
            let since_last_read = previous.map_or(Duration::ZERO, |p| now.duration_since(p));
            for (id, (_, seen, _)) in known.iter() {
                // Seen by the previous read, gone from this one.
                if Some(*seen) == previous && announcer {
                    self.events.emit(
                        tether::pb::EventKind::HeadGone,
                        id,
                        "",
                        0,
                        "",
                        "lease expired",
                    );
                }
            }
            previous = Some(now);
            known.retain(|_, (_, seen, _)| now.duration_since(*seen) < NEW_HEAD_WINDOW);
            let ready: Vec<_> = heads.iter().filter(|h| h.state == "ready").collect();
            let is_new = |id: &str| matches!(known.get(id), Some((Some(t), _, _)) if now.duration_since(*t) < NEW_HEAD_WINDOW);
            if !ready.iter().any(|h| is_new(&h.id)) {
                budget = 0.0;
                continue;
            }
            budget = (budget
                + self.rate
                    * since_last_read
                        .as_secs_f64()
                        .max(self.interval.as_secs_f64()))
            .min(burst);
            let at = tokio::time::Instant::now();
            let mut streams = self.attached.streams();
            streams.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
            // Workers placement puts on a new head that were not asked to
            // move yet (cool-down, rate): while there are any, read again
            // after one interval rather than one lease TTL.
            let mut pending = false;
            for stream in streams {
                let order =
                    placement::rendezvous_order(&stream.worker_id, &ready, |h| h.id.as_str());
                let Some(top) = order.first() else { continue };
                if top.id == self.head_id || !is_new(&top.id) {
                    continue;
                }
                if budget < 1.0 {
                    pending = true;
                    break;
                }
                if at.saturating_duration_since(stream.since) < self.cooldown
                    || stream
                        .redirected()
                        .is_some_and(|r| at.saturating_duration_since(r) < self.cooldown)
                {
                    pending = true;
                    continue;
                }
                stream.redirect(
                    Redirect {
                        reason: RedirectReason::Rebalance as i32,
                        suggested_head_id: top.id.clone(),
                        suggested_head_addr: top.addr.clone(),
                    },
                    at,
                );
                budget -= 1.0;
                // Asked now; the next read checks that it went.
                pending = true;
            }
            if pending {
                wait = self.interval;
            }
        }
    }
}
