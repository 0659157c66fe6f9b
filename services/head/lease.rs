//! Keeps this head's lease alive in Redis, applies what each refresh
//! reports (fencing notices, a lapsed lease), and reports readiness.
//!
//! Readiness (`tether.v1.HeadService` in health) is SERVING only while the
//! lease is held and the head is not draining; liveness (`""`) is not
//! touched here, so a Redis outage never gets every head restarted at once.

use super::attached::Attached;
use crate::metrics::METRICS;
use crate::pb::head_service_server::SERVICE_NAME;
use crate::registry::{HeldStream, LeaseInfo, LeaseRefresh, LoadDigest, Registry, RegistryError};
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

/// What the rest of the head needs to know about its lease.
#[derive(Debug)]
pub struct LeaseState {
    /// The last refresh succeeded.
    held: AtomicBool,
    /// The head is draining: the lease says so and readiness is off.
    draining: AtomicBool,
    /// Set while the head knows its lease lapsed and has not yet checked
    /// which of its workers it still owns: it sends no beat meanwhile.
    ///
    /// A head merely cut off from Redis keeps beating: only a worker can
    /// move itself (and it never holds two streams beyond a handoff), so
    /// keeping its workers is safe, and a Redis outage must not move every
    /// worker of the cluster.
    suspended: AtomicBool,
    /// A reclaim failed: the next refresh must retry it even though the
    /// failed attempt already recreated the lease.
    reclaim_pending: AtomicBool,
    /// When the last successful refresh was sent.
    last_ok: Mutex<Option<Instant>>,
    /// Consecutive refreshes at which the registry counted more workers
    /// for this head than it knows of: two in a row start a reconciliation.
    excess: AtomicU32,
    /// The registry's heads version, as the last refresh read it.
    heads_version: watch::Sender<u64>,
    /// This head's load in the registry and the cluster's load digest, as
    /// the last refresh read them: what the rebalance loop checks the
    /// balance on without reading every lease.
    loads: watch::Sender<Option<(u64, LoadDigest)>>,
    /// The state the lease's fields were last written with; `None` until
    /// the first refresh succeeds. A quiet refresh only extends the TTL.
    written: Mutex<Option<&'static str>>,
    /// Set by the first successful refresh: from then on a lease that
    /// names another process means this one was displaced.
    registered: AtomicBool,
    /// Before the first success: when a refresh first found the id's lease
    /// held by another process, and when that lease would have run out
    /// had nobody refreshed it since.
    foreign_since: Mutex<Option<(Instant, Instant)>>,
    /// Why the lease loop must end, once it must.
    verdict: Mutex<Option<LeaseEnd>>,
    /// The readiness last published (true: SERVING), so that health
    /// `Watch` streams hear of changes only.
    published: Mutex<Option<bool>>,
}

/// Why the lease loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Shutdown was asked for.
    Stopped,
    /// Another live process holds this head id; this one never held it
    /// and must not start (exit 2).
    IdInUse {
        /// Where that process serves.
        addr: String,
    },
    /// This process's lease lapsed and another process took the id
    /// meanwhile: this one must go (exit 1), so that one head serves it.
    Displaced {
        /// Where that process serves.
        addr: String,
    },
}

impl Default for LeaseState {
    fn default() -> Self {
        Self {
            held: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            suspended: AtomicBool::new(false),
            reclaim_pending: AtomicBool::new(false),
            last_ok: Mutex::new(None),
            excess: AtomicU32::new(0),
            heads_version: watch::Sender::new(0),
            loads: watch::Sender::new(None),
            written: Mutex::new(None),
            registered: AtomicBool::new(false),
            foreign_since: Mutex::new(None),
            verdict: Mutex::new(None),
            published: Mutex::new(None),
        }
    }
}

impl LeaseState {
    /// True while the last refresh succeeded.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// False while beats must pause (see `suspended`).
    pub fn may_beat(&self) -> bool {
        !self.suspended.load(Ordering::Relaxed)
    }

    /// Marks the head draining; returns false if it already was.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::Relaxed)
    }

    /// True once the head started draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Changes when a head registered or deregistered, as seen by the
    /// lease refreshes.
    pub fn heads_changes(&self) -> watch::Receiver<u64> {
        self.heads_version.subscribe()
    }

    /// Changes when this head's load or the cluster's load digest does,
    /// as seen by the lease refreshes.
    pub fn load_changes(&self) -> watch::Receiver<Option<(u64, LoadDigest)>> {
        self.loads.subscribe()
    }

    /// The registry's heads version as the last refresh read it; 0 before
    /// the first. Sent in every `HeadBeat`.
    pub fn heads_version(&self) -> u64 {
        *self.heads_version.borrow()
    }

    /// The state the lease advertises to workers.
    pub fn advertised_state(&self) -> &'static str {
        if self.draining() {
            "draining"
        } else {
            "ready"
        }
    }
}

/// Sets readiness from the lease state: SERVING only while held and not
/// draining.
///
/// Only a change is published: tonic-health sends every status set to
/// every `Watch` stream, equal or not, and this runs at every refresh.
pub async fn publish_readiness(state: &LeaseState, health: &HealthReporter) {
    let serving = state.held() && !state.draining();
    {
        let mut published = state.published.lock().unwrap_or_else(|e| e.into_inner());
        if *published == Some(serving) {
            return;
        }
        *published = Some(serving);
    }
    if serving {
        health
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
    } else {
        health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
    }
}

/// The lease loop's fixed inputs.
pub struct LeaseLoop {
    pub registry: Registry,
    pub lease: LeaseInfo,
    pub every: Duration,
    pub state: Arc<LeaseState>,
    pub attached: Arc<Attached>,
    pub health: HealthReporter,
    pub events: crate::events::Events,
}

impl LeaseLoop {
    /// Refreshes the lease every `every` until `shutdown`. Does not
    /// deregister: the caller does that at the right moment of shutdown.
    pub async fn run(&self, mut shutdown: Shutdown) -> LeaseEnd {
        let mut failures = 0u64;
        loop {
            if shutdown.is_triggered() {
                return LeaseEnd::Stopped;
            }
            self.refresh_once(&mut failures).await;
            if let Some(end) = self
                .state
                .verdict
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return end;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = shutdown.wait() => return LeaseEnd::Stopped,
            }
        }
    }

    /// A refresh found the id's lease held by another process (sent at
    /// `sent`). Before this process ever held the lease, that may be a
    /// crashed predecessor whose lease still runs (an orchestrator restarts
    /// a head at once): wait until that lease would have run out, plus one
    /// interval, and refuse to start only if it is still there, i.e. it was
    /// refreshed meanwhile. After this process held it, the id was taken
    /// while its own lease had lapsed: give way.
    fn foreign_lease(&self, sent: Instant, addr: String, pttl_ms: i64) {
        let LeaseLoop {
            lease,
            state,
            every,
            ..
        } = self;
        let mut verdict = state.verdict.lock().unwrap_or_else(|e| e.into_inner());
        if verdict.is_some() {
            return;
        }
        if state.registered.load(Ordering::Relaxed) {
            error!(head = %lease.head_id, other = %addr, "another tether-head process took head id {} (at {addr}) while this one's lease had lapsed; exiting so that one head serves the id", lease.head_id);
            *verdict = Some(LeaseEnd::Displaced { addr });
            return;
        }
        let left = u64::try_from(pttl_ms).map_or(lease.ttl, Duration::from_millis);
        let mut since = state
            .foreign_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *since {
            None => {
                // The margin covers this call's own latency: the lease ran
                // out `left` after Redis ran it, a little after `sent`.
                let lapse = sent + left + *every + Duration::from_millis(250);
                *since = Some((sent, lapse));
                warn!(head = %lease.head_id, other = %addr, left = ?left, "head id {} is held by another process at {addr}; waiting until its lease would have lapsed before refusing to start", lease.head_id);
            }
            Some((_, lapse)) if sent >= lapse => {
                error!(head = %lease.head_id, other = %addr, "head id {} is in use: another live tether-head at {addr} keeps refreshing its lease; refusing to start (give every head its own --id)", lease.head_id);
                *verdict = Some(LeaseEnd::IdInUse { addr });
            }
            Some(_) => {}
        }
    }

    /// One refresh, with everything it implies. Also called by the drain
    /// so that workers see the draining state at once.
    pub async fn refresh_once(&self, failures: &mut u64) {
        let LeaseLoop {
            registry,
            lease,
            state,
            attached,
            health,
            every,
            events,
        } = self;
        let sent = Instant::now();
        let advertised = state.advertised_state();
        let write = *state.written.lock().unwrap_or_else(|e| e.into_inner()) != Some(advertised);
        match registry.refresh_lease(lease, advertised, write).await {
            Ok(refresh) => {
                *state.written.lock().unwrap_or_else(|e| e.into_inner()) = Some(advertised);
                let was_held = state.held.load(Ordering::Relaxed);
                // More than a TTL since the last refresh that surely landed:
                // the lease may have lapsed in between even though this one
                // found it, because a refresh whose answer was lost (a hung
                // Redis running its queued commands late) can have
                // recreated it. Reclaim is idempotent, so check.
                let gap = {
                    let mut last = state.last_ok.lock().unwrap_or_else(|e| e.into_inner());
                    let gap = last.map(|t| t.elapsed());
                    *last = Some(sent);
                    gap
                };
                let may_have_lapsed = gap.is_some_and(|g| g > lease.ttl);
                if !refresh.existed
                    || may_have_lapsed
                    || state.reclaim_pending.load(Ordering::Relaxed)
                {
                    // The lease lapsed (paused, cut off, or Redis lost its
                    // data): other heads may have taken some workers.
                    // Re-record the rest before beating again.
                    let streams: Vec<HeldStream> = attached
                        .streams()
                        .iter()
                        .map(|s| HeldStream {
                            worker_id: s.worker_id.clone(),
                            epoch: s.epoch,
                            instance: s.instance.clone(),
                            worker_addr: s.worker_addr.clone(),
                        })
                        .collect();
                    if !streams.is_empty() {
                        state.suspended.store(true, Ordering::Relaxed);
                        match registry.reclaim(&lease.head_id, &streams, lease.ttl).await {
                            Ok(stale) => {
                                state.reclaim_pending.store(false, Ordering::Relaxed);
                                warn!(head = %lease.head_id, kept = streams.len() - stale.len(), let_go = stale.len(), "lease had lapsed; re-registered and re-recorded workers");
                                // Close only the stream that was checked: a
                                // worker adopted here again between the
                                // snapshot and the script has a newer stream
                                // with a newer epoch, which is current.
                                let checked: HashMap<&str, u64> = streams
                                    .iter()
                                    .map(|s| (s.worker_id.as_str(), s.epoch))
                                    .collect();
                                for worker in stale {
                                    if let Some(epoch) = checked.get(worker.as_str()) {
                                        attached.fence(&worker, epoch + 1);
                                    }
                                }
                            }
                            Err(e) => {
                                // Without reclaim the head must not beat:
                                // leave the lease unheld and retry.
                                warn!(head = %lease.head_id, error = %e, "cannot re-record workers after a lapsed lease; retrying");
                                state.held.store(false, Ordering::Relaxed);
                                state.reclaim_pending.store(true, Ordering::Relaxed);
                                publish_readiness(state, health).await;
                                return;
                            }
                        }
                    } else {
                        state.reclaim_pending.store(false, Ordering::Relaxed);
                        if was_held {
                            warn!(head = %lease.head_id, "lease had lapsed; registered again");
                        }
                    }
                }
                state.heads_version.send_if_modified(|v| {
                    std::mem::replace(v, refresh.heads_version) != refresh.heads_version
                });
                let loads = refresh.loads.map(|d| (refresh.assigned, d));
                state
                    .loads
                    .send_if_modified(|v| std::mem::replace(v, loads) != loads);
                // This refresh's sweep removed them: this head alone
                // announces them (see docs/registry.md, the sweep).
                for gone in &refresh.gone {
                    info!(head = %lease.head_id, %gone, "a head's lease expired; removed it from the registry");
                    events.emit(
                        crate::pb::EventKind::HeadGone,
                        gone,
                        "",
                        0,
                        "",
                        "lease expired",
                    );
                }
                for (worker, epoch) in &refresh.fenced {
                    if attached.fence(worker, *epoch) {
                        info!(head = %lease.head_id, %worker, epoch, "worker adopted elsewhere under a newer epoch; closing its stream");
                    }
                }
                state.suspended.store(false, Ordering::Relaxed);
                state.held.store(true, Ordering::Relaxed);
                state.registered.store(true, Ordering::Relaxed);
                if let Some((first, _)) = state
                    .foreign_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    info!(head = %lease.head_id, waited = ?first.elapsed(), "the other process's lease of this head id lapsed; taking the id");
                }
                self.tidy(&refresh).await;
                if !was_held {
                    info!(head = %lease.head_id, addr = %lease.addr, ttl = ?lease.ttl, "registered in the registry");
                    if !refresh.existed {
                        events.emit(
                            crate::pb::EventKind::HeadJoined,
                            &lease.head_id,
                            "",
                            0,
                            "",
                            &lease.addr,
                        );
                    }
                }
                *failures = 0;
            }
            Err(RegistryError::LeaseHeldElsewhere { addr, pttl_ms }) => {
                state.held.store(false, Ordering::Relaxed);
                self.foreign_lease(sent, addr, pttl_ms);
            }
            Err(e) => {
                *failures += 1;
                let was_held = state.held.swap(false, Ordering::Relaxed);
                if was_held || *failures == 1 {
                    error!(head = %lease.head_id, error = %e, "cannot refresh the lease; readiness NOT_SERVING, retrying every {every:?}");
                } else if failures.is_power_of_two() || *failures % 32 == 0 {
                    // Again after 2, 4, 8, 16, 32 failures, then every 32:
                    // an operator who looks late still sees the cause,
                    // and a long outage does not flood the log.
                    warn!(head = %lease.head_id, error = %e, failures = *failures, "registry still unreachable; retrying");
                }
            }
        }
        publish_readiness(state, health).await;
    }

    /// Keeps the registry down to live state: releases adoptions whose
    /// worker never opened its stream, and, when the registry counts more
    /// workers for this head than it holds twice in a row (a release that
    /// failed, a previous process under this id), releases the ones it
    /// does not know. Costs nothing while the counts agree.
    async fn tidy(&self, refresh: &LeaseRefresh) {
        let LeaseLoop {
            registry,
            lease,
            state,
            attached,
            ..
        } = self;
        for (worker, epoch) in attached.expire_adoptions(tokio::time::Instant::now()) {
            METRICS.adoptions_expired.inc();
            match registry.release(&lease.head_id, &worker, epoch).await {
                Ok(_) => {
                    info!(head = %lease.head_id, %worker, epoch, "adopted worker never opened its stream; released")
                }
                Err(e) => {
                    // The reconciliation below catches it later.
                    warn!(head = %lease.head_id, %worker, error = %e, "cannot release an expired adoption")
                }
            }
        }
        let known = (attached.len() + attached.adoptions_len()) as u64;
        if refresh.assigned <= known {
            state.excess.store(0, Ordering::Relaxed);
            return;
        }
        if state.excess.fetch_add(1, Ordering::Relaxed) < 1 {
            return;
        }
        state.excess.store(0, Ordering::Relaxed);
        let entries = match registry.assignments_of(&lease.head_id).await {
            Ok(e) => e,
            Err(e) => {
                warn!(head = %lease.head_id, error = %e, "cannot read this head's assignments to reconcile them");
                return;
            }
        };
        let mut released = 0u64;
        for (worker, epoch) in entries {
            if attached.knows(&worker) {
                continue;
            }
            if let Ok(true) = registry.release(&lease.head_id, &worker, epoch).await {
                released += 1;
            }
        }
        if released > 0 {
            warn!(head = %lease.head_id, released, "released assignments the registry held for this head without a stream");
        }
    }
}
