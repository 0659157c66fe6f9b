//! The head's view of the other heads, for `ListHeads`: a snapshot of the
//! registry's live heads, read at most once per lease TTL, and again as
//! soon as the heads version (which the lease refresh already reads)
//! changes. Calls that find it stale wait for one read rather than each
//! making their own, so ten thousand workers asking at once after a head
//! died cost Redis one command, not ten thousand.

use crate::pb::{HeadInfo, HeadState};
use crate::placement;
use crate::registry::{HeadEntry, Registry, RegistryError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One read of the registry's heads.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The live heads, sorted by id.
    pub heads: Arc<Vec<HeadEntry>>,
    /// The heads version the lease refresh had seen when the read began.
    pub version: u64,
    /// When the read was made.
    pub read_at: Instant,
}

/// The last good snapshot, and the last attempt to read one.
#[derive(Debug, Default)]
struct Cached {
    /// The last read that succeeded: served while a later read fails (an
    /// old list is better than none).
    snapshot: Option<Snapshot>,
    /// The last read tried, good or not; `None` before the first.
    tried: Option<Attempt>,
}

/// When a read of the registry was tried, and at which heads version: it
/// holds (even when it failed) until `max_age` passes or the version moves.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// When the read began.
    at: Instant,
    /// The heads version the lease refresh had seen then.
    version: u64,
}

/// The cached snapshot and the rules for refreshing it.
pub struct HeadsView {
    registry: Registry,
    /// The heads version, as the lease refreshes see it.
    version: watch::Receiver<u64>,
    /// A snapshot older than this is read again.
    max_age: Duration,
    /// The last good snapshot, and when a read was last tried (a failed
    /// read is not retried before `max_age`, so a Redis outage does not
    /// turn every call into a command).
    state: Mutex<Cached>,
    /// Held by the one call that reads the registry.
    reading: tokio::sync::Mutex<()>,
}

impl HeadsView {
    /// A view reading `registry`, refreshed when `version` changes or the
    /// snapshot is older than `max_age`.
    pub fn new(registry: Registry, version: watch::Receiver<u64>, max_age: Duration) -> Self {
        Self {
            registry,
            version,
            max_age,
            state: Mutex::new(Cached::default()),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The current snapshot, if the last attempt is recent enough and
    /// was made at the current version.
    fn fresh(&self) -> Option<Result<Snapshot, ()>> {
        let version = *self.version.borrow();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let tried = state.tried?;
        if tried.at.elapsed() >= self.max_age || tried.version != version {
            return None;
        }
        Some(state.snapshot.clone().ok_or(()))
    }

    /// The heads, from the snapshot or from one read of the registry.
    pub async fn snapshot(&self) -> Result<Snapshot, RegistryError> {
        let unread = || {
            self.registry
                .unavailable("this head has not read the registry since the last failure")
        };
        if let Some(s) = self.fresh() {
            return s.map_err(|()| unread());
        }
        let _reading = self.reading.lock().await;
        if let Some(s) = self.fresh() {
            return s.map_err(|()| unread());
        }
        let version = *self.version.borrow();
        let now = Instant::now();
        let read = self.registry.live_heads().await;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tried = Some(Attempt { at: now, version });
        match read {
            Ok(heads) => {
                let snapshot = Snapshot {
                    heads: Arc::new(heads),
                    version,
                    read_at: now,
                };
                state.snapshot = Some(snapshot.clone());
                Ok(snapshot)
            }
            // An old list is better than none: the worker tries them all.
            Err(e) => state.snapshot.clone().ok_or(e),
        }
    }
}

/// The heads in the order `worker` should try them: ready heads below the
/// load bound in rendezvous order, then ready heads at it, then stale
/// heads, then draining ones. A head at its `--capacity` counts as at the
/// bound. `own` is the answering head, whose capacity it knows first-hand;
/// the others' come from their leases.
pub fn preference(
    worker: &str,
    heads: &[HeadEntry],
    slack_permille: u32,
    own: (&str, u64),
) -> Vec<HeadInfo> {
    let ready: Vec<&HeadEntry> = heads
        .iter()
        .filter(|h| h.state == HeadState::Ready)
        .collect();
    let total: u64 = heads.iter().map(|h| h.assigned).sum();
    let bound = placement::load_bound(total + 1, ready.len() as u64, slack_permille);
    fn ordered<'a>(worker: &str, group: Vec<&'a HeadEntry>) -> Vec<&'a HeadEntry> {
        if worker.is_empty() {
            return group;
        }
        placement::rendezvous_order(worker, &group, |h| h.id.as_str())
            .into_iter()
            .copied()
            .collect()
    }
    let (under, full): (Vec<&HeadEntry>, Vec<&HeadEntry>) = ready
        .into_iter()
        .partition(|h| h.assigned < bound && (h.capacity == 0 || h.assigned < h.capacity));
    let stale = heads
        .iter()
        .filter(|h| h.state == HeadState::Stale)
        .collect();
    let draining = heads
        .iter()
        .filter(|h| h.state == HeadState::Draining)
        .collect();
    [under, full, stale, draining]
        .into_iter()
        .flat_map(|group| ordered(worker, group))
        .map(|h| HeadInfo {
            head_id: h.id.clone(),
            addr: h.addr.clone(),
            state: h.state as i32,
            load: h.assigned,
            capacity: if h.id == own.0 { own.1 } else { h.capacity },
            metrics_addr: h.metrics_addr.clone(),
        })
        .collect()
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
            started_ms: 0,
            capacity: 0,
            metrics_addr: String::new(),
        }
    }

    #[test]
    fn order_is_rendezvous_then_full_then_stale_then_draining() {
        let heads = vec![
            head("a", "ready", 0),
            head("b", "ready", 0),
            head("c", "ready", 0),
            head("d", "stale", 0),
            head("e", "draining", 0),
        ];
        let order: Vec<String> = preference("w1", &heads, 250, ("a", 7))
            .into_iter()
            .map(|h| h.head_id)
            .collect();
        let ready = ["a", "b", "c"];
        let expected: Vec<&str> = placement::rendezvous_order("w1", &ready, |h| h)
            .into_iter()
            .copied()
            .chain(["d", "e"])
            .collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn a_head_at_its_bound_comes_after_the_others() {
        let ready = ["a", "b", "c"];
        let first = *placement::rendezvous_order("w1", &ready, |h| h)[0];
        let heads: Vec<HeadEntry> = ready
            .iter()
            .map(|id| head(id, "ready", if *id == first { 10 } else { 0 }))
            .collect();
        let order = preference("w1", &heads, 250, ("a", 0));
        assert_eq!(
            order.last().map(|h| h.head_id.as_str()),
            Some(first),
            "{order:?}"
        );
        assert_eq!(
            order.iter().find(|h| h.head_id == "a").map(|h| h.capacity),
            Some(0)
        );
    }
}
