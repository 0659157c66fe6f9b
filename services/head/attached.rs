//! The workers whose `Heartbeat` stream is open on this head. The streams
//! are the truth of who is attached; `ListWorkers` reads this table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use tether::metrics::METRICS;

/// Marks "no load reported" in [`Stream::load_bits`].
const NO_LOAD: u64 = u64::MAX;

/// One open stream. Beats update the atomics, so the hot path never takes
/// the table's lock.
#[derive(Debug)]
pub struct Stream {
    pub worker_id: String,
    pub epoch: u64,
    pub worker_addr: String,
    pub since_ms: i64,
    last_beat_ms: AtomicI64,
    last_sequence: AtomicU64,
    load_bits: AtomicU64,
    /// Set when a newer stream of the same worker replaced this one, or
    /// the worker got a newer epoch on another head.
    replaced: AtomicBool,
    /// A move the head asks of the worker, sent on the stream at once.
    redirect: Mutex<Option<tether::pb::Redirect>>,
    /// Whether `redirect` holds one, so that the beat path need not lock.
    redirect_pending: AtomicBool,
    /// Wakes the stream's response body, which has no task of its own, to
    /// act on `replaced` or `redirect`.
    waker: Mutex<Option<Waker>>,
    /// When the head last redirected this worker (Unix ms; 0: never), so
    /// one worker is not asked again and again.
    redirected_ms: AtomicI64,
}

impl Stream {
    /// Records a `WorkerBeat`.
    pub fn record(&self, sequence: u64, load: Option<f64>, now_ms: i64) {
        self.last_beat_ms.store(now_ms, Ordering::Relaxed);
        self.last_sequence.store(sequence, Ordering::Relaxed);
        self.load_bits
            .store(load.map_or(NO_LOAD, f64::to_bits), Ordering::Relaxed);
    }

    /// Asks the worker to move; the stream sends it at once.
    pub fn redirect(&self, redirect: tether::pb::Redirect, now_ms: i64) {
        *self.redirect.lock().unwrap_or_else(|e| e.into_inner()) = Some(redirect);
        self.redirected_ms.store(now_ms, Ordering::Relaxed);
        self.redirect_pending.store(true, Ordering::Release);
        self.wake();
    }

    /// The pending redirect, if any, taken once.
    pub fn take_redirect(&self) -> Option<tether::pb::Redirect> {
        if !self.redirect_pending.swap(false, Ordering::Acquire) {
            return None;
        }
        self.redirect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Tells the stream to close: a newer stream or epoch took over.
    pub fn close(&self) {
        self.replaced.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether [`Stream::close`] was called.
    pub fn is_replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }

    /// Remembers the waker of the stream's body, woken by `close` and
    /// `redirect`.
    pub fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// When the worker was last redirected, Unix ms; 0 if never.
    pub fn redirected_ms(&self) -> i64 {
        self.redirected_ms.load(Ordering::Relaxed)
    }

    /// When the last beat arrived, Unix ms.
    pub fn last_beat_ms(&self) -> i64 {
        self.last_beat_ms.load(Ordering::Relaxed)
    }

    /// The `WorkerInfo` that `ListWorkers` reports.
    pub fn info(&self) -> tether::pb::WorkerInfo {
        let bits = self.load_bits.load(Ordering::Relaxed);
        tether::pb::WorkerInfo {
            worker_id: self.worker_id.clone(),
            epoch: self.epoch,
            attached_since_ms: self.since_ms,
            last_beat_ms: self.last_beat_ms(),
            worker_addr: self.worker_addr.clone(),
            last_sequence: self.last_sequence.load(Ordering::Relaxed),
            load: (bits != NO_LOAD).then(|| f64::from_bits(bits)),
        }
    }
}

/// The table of open streams, keyed by worker id.
#[derive(Debug, Default)]
pub struct Attached {
    streams: Mutex<HashMap<String, Arc<Stream>>>,
}

impl Attached {
    /// Adds a stream. A stream of the same worker already here is told to
    /// close: one worker, one stream.
    pub fn insert(
        &self,
        worker_id: String,
        epoch: u64,
        worker_addr: String,
        now_ms: i64,
    ) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            worker_id: worker_id.clone(),
            epoch,
            worker_addr,
            since_ms: now_ms,
            last_beat_ms: AtomicI64::new(now_ms),
            last_sequence: AtomicU64::new(0),
            load_bits: AtomicU64::new(NO_LOAD),
            replaced: AtomicBool::new(false),
            redirect: Mutex::new(None),
            redirect_pending: AtomicBool::new(false),
            waker: Mutex::new(None),
            redirected_ms: AtomicI64::new(0),
        });
        let old = self.lock().insert(worker_id, stream.clone());
        match old {
            Some(old) => old.close(),
            None => METRICS.workers_attached.add(1),
        }
        stream
    }

    /// Removes `stream`, unless a newer stream of its worker replaced it.
    pub fn remove(&self, stream: &Arc<Stream>) {
        let mut map = self.lock();
        if map
            .get(&stream.worker_id)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            map.remove(&stream.worker_id);
            METRICS.workers_attached.add(-1);
        }
    }

    /// Closes the worker's stream if it carries an epoch older than
    /// `epoch`: another head adopted the worker since (fencing).
    pub fn fence(&self, worker_id: &str, epoch: u64) -> bool {
        let map = self.lock();
        match map.get(worker_id) {
            Some(s) if s.epoch < epoch => {
                s.close();
                true
            }
            _ => false,
        }
    }

    /// A snapshot of the open streams, for the drain and rebalance loops.
    pub fn streams(&self) -> Vec<Arc<Stream>> {
        self.lock().values().cloned().collect()
    }

    /// Every open stream, ordered by worker id.
    pub fn list(&self) -> Vec<tether::pb::WorkerInfo> {
        let mut out: Vec<_> = self.lock().values().map(|s| s.info()).collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Stream>>> {
        // A panic while holding the lock cannot leave the map half-written
        // (single inserts and removes), so a poisoned lock is still usable.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}
