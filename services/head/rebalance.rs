//! Keeps the load even, without a storm and without reading every lease
//! all the time.
//!
//! Two passes, each time the loop reads the registry:
//! - **Scale-up.** When a head joins (or restarts), every other head
//!   redirects exactly the workers that rendezvous placement now puts on
//!   the new head, among the workers that attached before it joined: one
//!   that attached later (a cluster starting, workers attaching while
//!   heads join) chose among all heads already.
//! - **Continuous balance.** When this head holds more than the load bound
//!   ceil((1 + ε) W / H) while another ready head holds less than its
//!   share W / H (a head that was paused, cut off, or whose workers left),
//!   it hands the excess over, down to its share, to the heads under it.
//!   Every head over the bound computes the same plan from the same read,
//!   so two of them do not fill the same empty head twice; the registry's
//!   own bound refuses what a stale read would overshoot.
//!
//! Both redirect make-before-break (reason `REBALANCE`), at most
//! `--rebalance-rate` a second, and never a worker that attached or was
//! redirected within `--rebalance-cooldown`, so a worker moves at most
//! once per cool-down. A cluster within the bound moves nobody: the pass
//! starts only above the bound and stops at the share.
//!
//! **What it reads, and when.** Reading every lease costs three Redis
//! commands per head, so a head that read them on a timer paid in
//! proportion to the number of heads. The loop reads them only when:
//! - the heads version that every lease refresh returns changed (a head
//!   registered, deregistered, or a sweep found one expired);
//! - the load digest that every refresh also returns (written by the
//!   head whose turn it was to sweep, see `REFRESH_LEASE`) says this head
//!   is over the bound while a ready head is under its share; at most
//!   once per cool-down;
//! - workers remain to be moved: again after one interval, or when the
//!   first of them leaves its cool-down.
//!
//! A quiet, balanced cluster therefore reads no lease at all here.
//! Expired heads are announced (`HEAD_GONE`) by the lease loop of the
//! head whose sweep removed them, not by this loop.

use super::attached::{Attached, Stream};
use super::lease::LeaseState;
use crate::pb::{Redirect, RedirectReason};
use crate::placement;
use crate::registry::{HeadEntry, HeadState, LoadDigest, Registry};
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};

/// How long after a head joins it counts as new, i.e. a rebalance target.
const NEW_HEAD_WINDOW: Duration = Duration::from_secs(60);

/// What the loop remembers of a head between two reads.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// When this head saw it join (or restart); `None` for heads present
    /// at this head's first read, which already hold their share.
    joined: Option<Instant>,
    /// When a read last listed it.
    seen: Instant,
    /// Its process start (Unix ms): a change means it restarted.
    started_ms: i64,
}

/// The rebalance loop's inputs.
pub struct Rebalance {
    pub head_id: String,
    pub registry: Registry,
    pub attached: Arc<Attached>,
    pub lease: Arc<LeaseState>,
    pub interval: Duration,
    /// The least time between two reads that the load digest asks for
    /// (the cool-down at least: a worker cannot be moved sooner anyway).
    pub quiet_every: Duration,
    /// Workers per second this head may redirect.
    pub rate: f64,
    /// A worker attached or redirected more recently is left alone.
    pub cooldown: Duration,
    /// ε of the load bound, in thousandths.
    pub slack_permille: u32,
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
        let mut loads = self.lease.load_changes();
        let digest_every = self.quiet_every.max(self.cooldown);
        // When to read the registry next without being woken: at first
        // once an interval until the first read; then only while workers
        // remain to be moved.
        let mut next_read: Option<Instant> = Some(Instant::now() + self.interval);
        // When the registry was last read.
        let mut previous: Option<Instant> = None;
        // This head was over the bound at a previous read and has not yet
        // come down to its share: it keeps giving below the bound.
        let mut giving = false;
        loop {
            tokio::select! {
                _ = sleep_until(next_read) => {}
                Ok(()) = joined.changed() => {}
                Ok(()) = loads.changed() => {
                    let digest = *loads.borrow_and_update();
                    if let Some((_, d)) = digest {
                        crate::metrics::METRICS.heads_live.set(d.live as i64);
                    }
                    let due = previous.is_none_or(|p| p.elapsed() >= digest_every);
                    if !(due && digest.is_some_and(|(mine, d)| self.digest_unbalanced(mine, d))) {
                        continue;
                    }
                    debug!(head = %self.head_id, ?digest, "rebalance: the load digest says this head is over the bound");
                }
                _ = shutdown.wait() => return,
            }
            next_read = None;
            if self.lease.draining() || !self.lease.held() {
                next_read = Some(Instant::now() + self.interval);
                continue;
            }
            let heads = match self.registry.live_heads().await {
                Ok(h) => h,
                Err(e) => {
                    debug!(error = %e, "rebalance: cannot read the registry");
                    next_read = Some(Instant::now() + self.interval);
                    continue;
                }
            };
            crate::metrics::METRICS.heads_live.set(heads.len() as i64);
            let now = Instant::now();
            let known = known.get_or_insert_with(|| {
                heads
                    .iter()
                    .map(|h| {
                        let k = Known {
                            joined: None,
                            seen: now,
                            started_ms: h.started_ms,
                        };
                        (h.id.clone(), k)
                    })
                    .collect()
            });
            for h in &heads {
                match known.get_mut(&h.id) {
                    Some(k) if k.started_ms == h.started_ms => k.seen = now,
                    Some(k) => {
                        info!(head = %self.head_id, restarted = %h.id, "a head restarted; rebalancing its share to it");
                        *k = Known {
                            joined: Some(now),
                            seen: now,
                            started_ms: h.started_ms,
                        };
                    }
                    None => {
                        info!(head = %self.head_id, joined = %h.id, "a head joined; rebalancing its share to it");
                        let k = Known {
                            joined: Some(now),
                            seen: now,
                            started_ms: h.started_ms,
                        };
                        known.insert(h.id.clone(), k);
                    }
                }
            }
            let since_last_read = previous.map_or(Duration::ZERO, |p| now.duration_since(p));
            previous = Some(now);
            known.retain(|_, k| now.duration_since(k.seen) < NEW_HEAD_WINDOW);
            let ready: Vec<&HeadEntry> = heads
                .iter()
                .filter(|h| h.state == HeadState::Ready)
                .collect();
            let is_new = |id: &str| matches!(known.get(id), Some(Known { joined: Some(t), .. }) if now.duration_since(*t) < NEW_HEAD_WINDOW);
            let scale_up = ready.iter().any(|h| is_new(&h.id));
            let plan = balance_plan(&heads, &self.head_id, self.slack_permille, giving);
            giving = !plan.is_empty();
            if !scale_up && plan.is_empty() {
                budget = 0.0;
                continue;
            }
            budget = (budget
                + self.rate
                    * since_last_read
                        .as_secs_f64()
                        .max(self.interval.as_secs_f64()))
            .min(burst);
            let mut streams = self.attached.streams();
            streams.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
            let mut wait = Wait::default();

            // Scale-up: the workers placement puts on a new head.
            if scale_up {
                for stream in &streams {
                    let order =
                        placement::rendezvous_order(&stream.worker_id, &ready, |h| h.id.as_str());
                    let Some(top) = order.first() else { continue };
                    if top.id == self.head_id || !is_new(&top.id) {
                        continue;
                    }
                    // A worker that attached after the new head registered
                    // chose among all heads already (a cluster starting,
                    // workers attaching while heads join): moving it to its
                    // first choice would be a move for nothing. This head
                    // notices a join within an interval (the heads version
                    // of its next refresh); two leave a margin.
                    let joined = known.get(&top.id).and_then(|k| k.joined).unwrap_or(now);
                    if stream.since + self.interval * 2 > joined {
                        continue;
                    }
                    // Asked now or later; the next read checks that it went.
                    wait.pending = true;
                    if budget < 1.0 {
                        break;
                    }
                    if let Some(until) = self.cooling(stream, now) {
                        wait.cooling(until);
                        continue;
                    }
                    self.redirect(stream, top, now);
                    budget -= 1.0;
                }
            }

            // Continuous balance: the excess over the share, to the heads
            // under theirs. Redirects still in flight count as handed over.
            if !plan.is_empty() {
                let in_flight = streams
                    .iter()
                    .filter(|s| {
                        s.redirected()
                            .is_some_and(|r| now.saturating_duration_since(r) < self.cooldown)
                    })
                    .count() as u64;
                let mut left = plan
                    .iter()
                    .map(|(_, n)| n)
                    .sum::<u64>()
                    .saturating_sub(in_flight);
                let planned = left;
                if in_flight > 0 {
                    wait.pending = true;
                }
                let mut eligible: Vec<&Arc<Stream>> = Vec::new();
                for s in &streams {
                    match self.cooling(s, now) {
                        Some(until) => wait.cooling(until),
                        None => eligible.push(s),
                    }
                }
                'targets: for (target, quota) in &plan {
                    let target = &heads[*target];
                    // The workers that weigh the target highest go first,
                    // so a later scale-up finds them where placement wants.
                    eligible.sort_by_key(|s| {
                        std::cmp::Reverse(placement::weight(&s.worker_id, &target.id))
                    });
                    let mut give = (*quota).min(left);
                    while give > 0 && !eligible.is_empty() {
                        if budget < 1.0 {
                            wait.pending = true;
                            break 'targets;
                        }
                        let stream = eligible.remove(0);
                        self.redirect(stream, target, now);
                        budget -= 1.0;
                        give -= 1;
                        left -= 1;
                    }
                }
                let asked = planned - left;
                if asked > 0 {
                    info!(head = %self.head_id, asked, in_flight, plan = ?plan.iter().map(|(t, n)| (heads[*t].id.as_str(), n)).collect::<Vec<_>>(), "over the load bound; redirecting workers to heads under their share");
                }
                if left > 0 {
                    wait.pending = true;
                }
            }
            next_read = wait.next(now, self.interval);
        }
    }

    /// Whether the digest says this head (`mine` workers in the registry)
    /// is over the load bound while a ready head is under its share.
    fn digest_unbalanced(&self, mine: u64, d: LoadDigest) -> bool {
        d.ready >= 2
            && mine > placement::load_bound(d.assigned, d.ready, self.slack_permille)
            && d.least < d.assigned / d.ready
    }

    /// Until when `stream` is in its cool-down, if it is.
    fn cooling(&self, stream: &Stream, now: Instant) -> Option<Instant> {
        let last = match stream.redirected() {
            Some(r) if r > stream.since => r,
            _ => stream.since,
        };
        let until = last + self.cooldown;
        (until > now).then_some(until)
    }

    /// Asks the worker of `stream` to move to `to`, make-before-break.
    fn redirect(&self, stream: &Stream, to: &HeadEntry, now: Instant) {
        stream.redirect(
            Redirect {
                reason: RedirectReason::Rebalance as i32,
                suggested_head_id: to.id.clone(),
                suggested_head_addr: to.addr.clone(),
            },
            now,
        );
    }
}

/// When the loop should read again on its own, from what one pass left.
#[derive(Debug, Default)]
struct Wait {
    /// Workers remain to be moved (or to be seen gone).
    pending: bool,
    /// The first time a cooling worker may be moved.
    first_free: Option<Instant>,
}

impl Wait {
    fn cooling(&mut self, until: Instant) {
        self.pending = true;
        self.first_free = Some(self.first_free.map_or(until, |f| f.min(until)));
    }

    /// After one interval, or when the first cooling worker is free if
    /// that is later; `None` when nothing is left to move.
    fn next(&self, now: Instant, interval: Duration) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        let soonest = now + interval;
        Some(self.first_free.map_or(soonest, |f| f.max(soonest)))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What this head hands over to restore the balance: (index into `heads`,
/// workers) for each head under its share, empty unless this head is over
/// the load bound, or `giving` (it was over the bound at a previous read)
/// and still above its share.
///
/// W counts the workers of every live head (as `ASSIGN` does), H the
/// ready ones. A head over the bound gives down to ceil(W/H) (and keeps
/// giving, `giving`, once under the bound until it is there); heads under
/// floor(W/H) take up to ceil(W/H). The takers' room is split among the
/// heads above ceil(W/H) in id order, so every head computes the same
/// split from the same read and two givers do not fill one taker twice.
/// Takers end at most at ceil(W/H), within the bound, so they never give
/// back: no flapping.
pub fn balance_plan(
    heads: &[HeadEntry],
    me: &str,
    slack_permille: u32,
    giving: bool,
) -> Vec<(usize, u64)> {
    let total: u64 = heads.iter().map(|h| h.assigned).sum();
    let mut ready: Vec<usize> = (0..heads.len())
        .filter(|i| heads[*i].state == HeadState::Ready)
        .collect();
    let count = ready.len() as u64;
    if count < 2 {
        return Vec::new();
    }
    ready.sort_by(|a, b| heads[*a].id.cmp(&heads[*b].id));
    let bound = placement::load_bound(total, count, slack_permille);
    let (low, high) = (total / count, total.div_ceil(count));
    let mut takers: Vec<(usize, u64)> = ready
        .iter()
        .filter(|i| heads[**i].assigned < low)
        .map(|i| (*i, high - heads[*i].assigned))
        .collect();
    let mut plan = Vec::new();
    let Some(mine) = heads.iter().find(|h| h.id == me) else {
        return Vec::new();
    };
    if !(mine.assigned > bound || (giving && mine.assigned > high)) {
        return Vec::new();
    }
    // The room is split among every head above its share, whether it
    // gives now or not: each head's slice then depends on the read alone,
    // so heads that give do not fill the same room twice (a head that
    // does not give leaves its slice empty).
    for giver in ready.iter().filter(|i| heads[**i].assigned > high) {
        let mut excess = heads[*giver].assigned - high;
        for (taker, room) in takers.iter_mut() {
            let n = excess.min(*room);
            if n == 0 {
                continue;
            }
            *room -= n;
            excess -= n;
            if heads[*giver].id == me {
                plan.push((*taker, n));
            }
        }
        if heads[*giver].id == me {
            break;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(id: &str, state: &str, assigned: u64) -> HeadEntry {
        HeadEntry {
            id: id.into(),
            addr: format!("{id}:1"),
            state: crate::registry::head_state(state),
            assigned,
            started_ms: 1,
            capacity: 0,
            metrics_addr: String::new(),
        }
    }

    #[test]
    fn a_balanced_cluster_hands_nothing_over() {
        let heads = [
            head("a", "ready", 12),
            head("b", "ready", 8),
            head("c", "ready", 10),
        ];
        for me in ["a", "b", "c"] {
            assert!(balance_plan(&heads, me, 250, false).is_empty(), "{me}");
        }
    }

    #[test]
    fn heads_over_the_bound_fill_an_empty_head_once_between_them() {
        // The case: W 24, H 3, bound 10, share 8.
        let heads = [
            head("h1", "ready", 10),
            head("h2", "ready", 0),
            head("h3", "ready", 14),
        ];
        assert!(
            balance_plan(&heads, "h1", 250, false).is_empty(),
            "h1 is at the bound"
        );
        assert!(balance_plan(&heads, "h2", 250, false).is_empty());
        assert_eq!(balance_plan(&heads, "h3", 250, false), vec![(1, 6)]);
        // Two givers split the room instead of each filling it.
        let heads = [
            head("a", "ready", 15),
            head("b", "ready", 0),
            head("c", "ready", 15),
        ];
        let a = balance_plan(&heads, "a", 250, false);
        let c = balance_plan(&heads, "c", 250, false);
        assert_eq!((a.clone(), c.clone()), (vec![(1, 5)], vec![(1, 5)]));
    }

    #[test]
    fn draining_and_stale_heads_neither_give_nor_take() {
        let heads = [
            head("a", "ready", 20),
            head("b", "draining", 0),
            head("c", "stale", 0),
            head("d", "ready", 0),
        ];
        assert_eq!(balance_plan(&heads, "a", 250, false), vec![(3, 10)]);
        assert!(balance_plan(&heads, "b", 250, false).is_empty());
    }

    #[test]
    fn a_giver_keeps_giving_below_the_bound_down_to_its_share_and_no_further() {
        // W 30, H 3: bound 13, share 10. At 12 a head is within the bound:
        // it starts nothing, but finishes what it started.
        let heads = [
            head("a", "ready", 12),
            head("b", "ready", 6),
            head("c", "ready", 12),
        ];
        assert!(balance_plan(&heads, "a", 250, false).is_empty());
        assert_eq!(balance_plan(&heads, "a", 250, true), vec![(1, 2)]);
        let heads = [
            head("a", "ready", 10),
            head("b", "ready", 8),
            head("c", "ready", 12),
        ];
        assert!(balance_plan(&heads, "a", 250, true).is_empty());
    }
}
