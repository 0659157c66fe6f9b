//! The workers whose `Heartbeat` stream is open on this head, and those
//! adopted by `Reassign` whose stream is not open yet. The streams are the
//! truth of who is attached; `ListWorkers` reads this table.
//!
//! Every time here is monotonic (tokio's clock, which tests can pause and
//! advance): a step of the wall clock must neither close every stream nor
//! hide a dead worker. Wall-clock milliseconds are derived only for the
//! display fields of `ListWorkers`.

use crate::metrics::METRICS;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::Waker;
use std::time::Duration;
use tokio::time::Instant;

/// Marks "no load reported" in [`Stream::load_bits`].
const NO_LOAD: u64 = u64::MAX;

/// Marks "never redirected" in [`Stream::redirected`].
const NEVER: u64 = u64::MAX;

/// The origin of the monotonic instants kept in atomics.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `at` as nanoseconds since [`ORIGIN`], to fit an atomic.
fn to_nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*ORIGIN).as_nanos()).unwrap_or(u64::MAX - 1)
}

fn from_nanos(nanos: u64) -> Instant {
    *ORIGIN + Duration::from_nanos(nanos)
}

/// A secret that `Reassign` hands out and the stream's first beat must
/// present: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret([u8; 16]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never printed, whatever logs a stream.
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh secret from the operating system's generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The secret as the proto carries it: 32 lowercase hex digits.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `text` is this secret, compared in constant time so that
    /// answers do not leak how much of a guess was right.
    pub fn matches(&self, text: &str) -> bool {
        let text = text.as_bytes();
        if text.len() != 32 {
            return false;
        }
        let mut diff = 0u8;
        for (i, b) in self.0.iter().enumerate() {
            let hex = format!("{b:02x}");
            diff |= hex.as_bytes()[0] ^ text[2 * i];
            diff |= hex.as_bytes()[1] ^ text[2 * i + 1];
        }
        diff == 0
    }
}

/// A worker adopted by `Reassign` whose `Heartbeat` stream is not open yet.
#[derive(Debug, Clone)]
pub struct Adoption {
    /// The epoch `Reassign` handed out; 0 while the registry call runs.
    pub epoch: u64,
    pub secret: Secret,
    pub instance: String,
    /// After this the adoption is dropped and released in Redis: a worker
    /// that never opens its stream must not count against the head.
    pub expires: Instant,
}

/// One open stream. Beats update the atomics, so the hot path never takes
/// the table's lock.
#[derive(Debug)]
pub struct Stream {
    pub worker_id: String,
    pub epoch: u64,
    pub worker_addr: String,
    /// The worker process's instance, re-recorded after a lapsed lease.
    pub instance: String,
    /// The assignment's secret: a reconnect under the same epoch must
    /// present it again.
    pub secret: Secret,
    /// When the stream was accepted: Unix ms for display, and monotonic.
    pub since_ms: i64,
    pub since: Instant,
    /// When the last beat arrived (see [`to_nanos`]).
    last_beat: AtomicU64,
    last_sequence: AtomicU64,
    load_bits: AtomicU64,
    /// Set when a newer stream of the same worker replaced this one, or
    /// the worker got a newer epoch on another head.
    replaced: AtomicBool,
    /// A move the head asks of the worker, sent on the stream at once.
    redirect: Mutex<Option<crate::pb::Redirect>>,
    /// Whether `redirect` holds one, so that the beat path need not lock.
    redirect_pending: AtomicBool,
    /// Wakes the stream's response body, which has no task of its own, to
    /// act on `replaced` or `redirect`.
    /// Lock-free: the body registers on every poll, twice a second per
    /// worker.
    waker: atomic_waker::AtomicWaker,
    /// When the head last redirected this worker ([`NEVER`] if it did
    /// not), so one worker is not asked again and again.
    redirected: AtomicU64,
}

impl Stream {
    /// Records a `WorkerBeat`.
    pub fn record(&self, sequence: u64, load: Option<f64>, now: Instant) {
        self.last_beat.store(to_nanos(now), Ordering::Relaxed);
        self.last_sequence.store(sequence, Ordering::Relaxed);
        self.load_bits
            .store(load.map_or(NO_LOAD, f64::to_bits), Ordering::Relaxed);
    }

    /// Asks the worker to move; the stream sends it at once.
    pub fn redirect(&self, redirect: crate::pb::Redirect, now: Instant) {
        *self.redirect.lock().unwrap_or_else(|e| e.into_inner()) = Some(redirect);
        self.redirected.store(to_nanos(now), Ordering::Relaxed);
        self.redirect_pending.store(true, Ordering::Release);
        self.wake();
    }

    /// The pending redirect, if any, taken once.
    pub fn take_redirect(&self) -> Option<crate::pb::Redirect> {
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
        self.waker.register(waker);
    }

    fn wake(&self) {
        self.waker.wake();
    }

    /// When the worker was last redirected, if ever.
    pub fn redirected(&self) -> Option<Instant> {
        match self.redirected.load(Ordering::Relaxed) {
            NEVER => None,
            nanos => Some(from_nanos(nanos)),
        }
    }

    /// When the last beat arrived.
    pub fn last_beat(&self) -> Instant {
        from_nanos(self.last_beat.load(Ordering::Relaxed))
    }

    /// Whether the worker has been silent for longer than `timeout` at
    /// `now` (both monotonic).
    pub fn silent_at(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.last_beat()) > timeout
    }

    /// The `WorkerInfo` that `ListWorkers` reports.
    pub fn info(&self) -> crate::pb::WorkerInfo {
        let bits = self.load_bits.load(Ordering::Relaxed);
        // Display only: the wall clock now, less the monotonic age.
        let age = Instant::now().saturating_duration_since(self.last_beat());
        crate::pb::WorkerInfo {
            worker_id: self.worker_id.clone(),
            epoch: self.epoch,
            attached_since_ms: self.since_ms,
            last_beat_ms: crate::registry::now_ms()
                - i64::try_from(age.as_millis()).unwrap_or(i64::MAX),
            worker_addr: self.worker_addr.clone(),
            last_sequence: self.last_sequence.load(Ordering::Relaxed),
            load: (bits != NO_LOAD).then(|| f64::from_bits(bits)),
        }
    }
}

/// The beat timer wakes the stream's body through the same slot on each of
/// its phase's ticks.
impl super::beat::Listener for Stream {
    fn wake(&self) {
        Stream::wake(self);
    }
}

/// What a stream's first beat presents, checked by [`Attached::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A fresh adoption: take it.
    Adopted(Adoption),
    /// A second stream of an attached worker, under its epoch and secret.
    Reconnect { instance: String, secret: Secret },
    /// No adoption or stream here carries this epoch and secret.
    Denied,
}

impl PartialEq for Adoption {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch && self.secret == other.secret
    }
}

impl Eq for Adoption {}

/// The table of open streams and pending adoptions, keyed by worker id.
#[derive(Debug, Default)]
pub struct Attached {
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    /// Bounded by the load bound and capacity the registry enforces on
    /// adoptions, and emptied by [`Attached::expire_adoptions`].
    adoptions: Mutex<HashMap<String, Adoption>>,
}

/// One stream's identity, as [`Attached::insert`] takes it.
#[derive(Debug)]
pub struct NewStream {
    pub worker_id: String,
    pub epoch: u64,
    pub worker_addr: String,
    pub instance: String,
    pub secret: Secret,
}

impl Attached {
    /// Records an adoption before its registry call, so that a registry
    /// count taken meanwhile knows the worker (see `reconcile`).
    pub fn adopting(&self, worker_id: &str, adoption: Adoption) {
        self.adoptions_lock().insert(worker_id.to_owned(), adoption);
    }

    /// Drops an adoption whose registry call failed, unless another call
    /// replaced it meanwhile.
    pub fn abandon(&self, worker_id: &str, secret: Secret) {
        let mut map = self.adoptions_lock();
        if map.get(worker_id).is_some_and(|a| a.secret == secret) {
            map.remove(worker_id);
        }
    }

    /// Fills in the epoch the registry handed out.
    pub fn adopted(&self, worker_id: &str, secret: Secret, epoch: u64) {
        if let Some(a) = self.adoptions_lock().get_mut(worker_id) {
            if a.secret == secret {
                a.epoch = epoch;
            }
        }
    }

    /// Checks a stream's first beat against the adoptions and streams,
    /// changing nothing: a denied stream disturbs nobody.
    pub fn admit(&self, worker_id: &str, epoch: u64, secret: &str) -> Admission {
        if let Some(a) = self.adoptions_lock().get(worker_id) {
            if a.epoch == epoch && a.epoch != 0 && a.secret.matches(secret) {
                return Admission::Adopted(a.clone());
            }
        }
        if let Some(s) = self.lock().get(worker_id) {
            if s.epoch == epoch && s.secret.matches(secret) {
                return Admission::Reconnect {
                    instance: s.instance.clone(),
                    secret: s.secret,
                };
            }
        }
        Admission::Denied
    }

    /// Removes and returns the adoptions that expired at `now`.
    pub fn expire_adoptions(&self, now: Instant) -> Vec<(String, u64)> {
        let mut gone = Vec::new();
        self.adoptions_lock().retain(|worker, a| {
            let keep = a.expires > now;
            if !keep && a.epoch != 0 {
                gone.push((worker.clone(), a.epoch));
            }
            keep
        });
        gone
    }

    /// How many adoptions wait for their stream.
    pub fn adoptions_len(&self) -> usize {
        self.adoptions_lock().len()
    }

    /// Whether the head knows the worker, streaming or adopted.
    pub fn knows(&self, worker_id: &str) -> bool {
        self.lock().contains_key(worker_id) || self.adoptions_lock().contains_key(worker_id)
    }

    /// Adds a stream, and drops its adoption. A stream of the same worker
    /// already here is told to close: one worker, one stream.
    pub fn insert(&self, new: NewStream, now_ms: i64) -> Arc<Stream> {
        let NewStream {
            worker_id,
            epoch,
            worker_addr,
            instance,
            secret,
        } = new;
        let now = Instant::now();
        {
            let mut adoptions = self.adoptions_lock();
            if adoptions.get(&worker_id).is_some_and(|a| a.epoch == epoch) {
                adoptions.remove(&worker_id);
            }
        }
        let stream = Arc::new(Stream {
            worker_id: worker_id.clone(),
            epoch,
            worker_addr,
            instance,
            secret,
            since_ms: now_ms,
            since: now,
            last_beat: AtomicU64::new(to_nanos(now)),
            last_sequence: AtomicU64::new(0),
            load_bits: AtomicU64::new(NO_LOAD),
            replaced: AtomicBool::new(false),
            redirect: Mutex::new(None),
            redirect_pending: AtomicBool::new(false),
            waker: atomic_waker::AtomicWaker::new(),
            redirected: AtomicU64::new(NEVER),
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

    /// One page of `ListWorkers`: the first `limit` open streams whose
    /// worker id sorts after `after` ("" for the start), ordered by worker
    /// id. Only the page is sorted and turned into `WorkerInfo`s, so a
    /// head with 20,000 workers spends O(n) per page, not O(n log n).
    pub fn list(&self, after: &str, limit: usize) -> Vec<crate::pb::WorkerInfo> {
        let mut page: Vec<Arc<Stream>> = self
            .lock()
            .values()
            .filter(|s| s.worker_id.as_str() > after)
            .cloned()
            .collect();
        let by_id = |a: &Arc<Stream>, b: &Arc<Stream>| a.worker_id.cmp(&b.worker_id);
        if page.len() > limit {
            page.select_nth_unstable_by(limit, by_id);
            page.truncate(limit);
        }
        page.sort_unstable_by(by_id);
        page.iter().map(|s| s.info()).collect()
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

    fn adoptions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Adoption>> {
        self.adoptions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_stream(attached: &Attached, worker: &str, epoch: u64, secret: Secret) -> Arc<Stream> {
        attached.insert(
            NewStream {
                worker_id: worker.into(),
                epoch,
                worker_addr: String::new(),
                instance: "i".into(),
                secret,
            },
            // The wall clock is display only: a nonsense value changes
            // nothing below.
            -1,
        )
    }

    /// Silence is timed on tokio's monotonic clock, which this test
    /// drives by hand: the wall clock is not an input at all, so an NTP
    /// step can neither close a beating stream nor keep a silent one.
    #[tokio::test(start_paused = true)]
    async fn silence_is_timed_on_the_monotonic_clock_only() {
        let attached = Attached::default();
        let secret = Secret::generate().expect("randomness");
        let s = new_stream(&attached, "w", 7, secret);
        let timeout = Duration::from_millis(600);
        s.record(1, None, Instant::now());
        tokio::time::advance(Duration::from_millis(599)).await;
        assert!(!s.silent_at(Instant::now(), timeout));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(s.silent_at(Instant::now(), timeout));
        s.record(2, None, Instant::now());
        assert!(!s.silent_at(Instant::now(), timeout));
        // The display field follows the monotonic age, whatever since_ms.
        tokio::time::advance(Duration::from_millis(250)).await;
        let age = crate::registry::now_ms() - s.info().last_beat_ms;
        assert!((250..1_000).contains(&age), "age {age} ms");
    }

    #[test]
    fn a_stream_needs_the_adoptions_secret_and_epoch() {
        let attached = Attached::default();
        let secret = Secret::generate().expect("randomness");
        let expires = Instant::now() + Duration::from_secs(5);
        attached.adopting(
            "w",
            Adoption {
                epoch: 0,
                secret,
                instance: "i".into(),
                expires,
            },
        );
        // Not before the registry handed out the epoch.
        assert_eq!(attached.admit("w", 0, &secret.to_hex()), Admission::Denied);
        attached.adopted("w", secret, 9);
        assert_eq!(attached.admit("w", 9, ""), Admission::Denied);
        assert_eq!(attached.admit("w", 8, &secret.to_hex()), Admission::Denied);
        assert_eq!(attached.admit("x", 9, &secret.to_hex()), Admission::Denied);
        let other = Secret::generate().expect("randomness");
        assert_eq!(attached.admit("w", 9, &other.to_hex()), Admission::Denied);
        assert!(matches!(
            attached.admit("w", 9, &secret.to_hex()),
            Admission::Adopted(_)
        ));
        // Once the stream is open, a reconnect needs the same secret.
        new_stream(&attached, "w", 9, secret);
        assert_eq!(attached.adoptions_len(), 0);
        assert!(matches!(
            attached.admit("w", 9, &secret.to_hex()),
            Admission::Reconnect { .. }
        ));
        assert_eq!(attached.admit("w", 9, &other.to_hex()), Admission::Denied);
        assert!(!format!("{secret:?}").contains(&secret.to_hex()));
    }

    #[test]
    fn adoptions_expire_and_are_named_once() {
        let attached = Attached::default();
        let now = Instant::now();
        let secret = Secret::generate().expect("randomness");
        for (worker, epoch, ttl) in [("a", 1, 1), ("b", 2, 10), ("pending", 0, 1)] {
            attached.adopting(
                worker,
                Adoption {
                    epoch,
                    secret,
                    instance: String::new(),
                    expires: now + Duration::from_secs(ttl),
                },
            );
        }
        let gone = attached.expire_adoptions(now + Duration::from_secs(2));
        assert_eq!(gone, vec![("a".to_owned(), 1)]);
        assert!(attached.knows("b") && !attached.knows("a") && !attached.knows("pending"));
        assert!(attached
            .expire_adoptions(now + Duration::from_secs(2))
            .is_empty());
    }
}
