//! The head's one beat timer. Stream bodies listen to it, so a head with
//! ten thousand workers runs one timer, not ten thousand.
//!
//! Its ticks are spread over the interval in [`PHASES`] phases, and each
//! stream beats on one phase: a head sends an eighth of its beats every
//! eighth of an interval instead of all of them at once. In one burst, a
//! stream's place in the queue changes from tick to tick, so with many
//! streams its beats arrived up to the burst's length early or late; with
//! 16,000 streams that was more than half an interval.
//!
//! A phase keeps the listeners that joined it and wakes each of them on its
//! tick; a listener reads the tick with one atomic load. A `watch` channel
//! per phase did the same with a new wait future and a lock on the
//! channel's waiter list per stream per tick: at ten thousand workers the
//! head spent a fifth more user time per beat with it (docs/BENCHMARKS.md,
//! "Where the CPU goes").

use crate::server::lock;
use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Phases per interval.
pub const PHASES: usize = 8;

/// One tick of the beat timer, on one phase.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// Counts intervals from 1; 0 before the first. Every phase sends the
    /// same value within an interval.
    pub sequence: u64,
    /// When the tick fired, on the monotonic clock: silence is measured
    /// against it, so a step of the wall clock (NTP) moves nobody.
    pub at: Instant,
}

/// What a phase wakes on each tick: the stream's own waker slot, which its
/// body registers on every poll anyway.
pub trait Listener: Send + Sync + 'static {
    /// Wakes the task that polls the listener, if one is registered.
    fn wake(&self);
}

/// One phase: its last tick and the listeners to wake on the next.
struct Phase {
    /// Counts the ticks sent; a listener compares it with the count it saw.
    sent: AtomicU64,
    /// The last tick; read once per tick per listener, never contended for
    /// longer than a copy.
    tick: Mutex<Tick>,
    /// Set when the timer stopped (shutdown): no tick will come again.
    closed: AtomicBool,
    /// Bounded by the streams open: each joins once and leaves when its
    /// body is dropped.
    listeners: Mutex<slab::Slab<Arc<dyn Listener>>>,
}

impl Phase {
    fn send(&self, tick: Tick) {
        *lock(&self.tick) = tick;
        self.sent.fetch_add(1, Ordering::Release);
        self.wake_all();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        for (_, listener) in lock(&self.listeners).iter() {
            listener.wake();
        }
    }
}

/// The beat timer's phases. Cheap to clone.
#[derive(Clone)]
pub struct Beats {
    phases: Arc<[Arc<Phase>]>,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Beats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beats")
            .field("phases", &self.phases.len())
            .finish()
    }
}

impl Beats {
    /// Joins `listener` to a phase, round robin so that the phases stay
    /// even. It is woken on every tick of that phase until the returned
    /// membership is dropped.
    pub fn join(&self, listener: Arc<dyn Listener>) -> Membership {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.phases.len();
        let phase = self.phases[i].clone();
        let key = lock(&phase.listeners).insert(listener);
        // Seen: the next tick is the next one sent, not the last.
        let seen = phase.sent.load(Ordering::Acquire);
        Membership { phase, key, seen }
    }
}

/// A listener's place in one phase.
pub struct Membership {
    phase: Arc<Phase>,
    key: usize,
    /// The phase's tick count when this membership last looked.
    seen: u64,
}

impl Membership {
    /// The phase's last tick (at first, the one before joining).
    pub fn last(&self) -> Tick {
        *lock(&self.phase.tick)
    }

    /// A tick sent since the last call, `Ready(None)` once the timer has
    /// stopped, or `Pending`. The caller registers its waker with its
    /// listener before calling, so a tick sent in between wakes it. Ticks
    /// missed while the caller was busy collapse into the latest.
    pub fn poll_tick(&mut self) -> Poll<Option<Tick>> {
        let sent = self.phase.sent.load(Ordering::Acquire);
        if sent != self.seen {
            self.seen = sent;
            return Poll::Ready(Some(self.last()));
        }
        if self.phase.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Whether `self` and `other` are on the same phase.
    #[cfg(test)]
    fn same_phase(&self, other: &Membership) -> bool {
        Arc::ptr_eq(&self.phase, &other.phase)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        lock(&self.phase.listeners).try_remove(self.key);
    }
}

/// Starts the timer; it stops at shutdown, which closes the phases.
pub fn start(interval: Duration, mut shutdown: Shutdown) -> Beats {
    let phases: Arc<[Arc<Phase>]> = (0..PHASES)
        .map(|_| {
            Arc::new(Phase {
                sent: AtomicU64::new(0),
                tick: Mutex::new(Tick {
                    sequence: 0,
                    at: Instant::now(),
                }),
                closed: AtomicBool::new(false),
                listeners: Mutex::new(slab::Slab::new()),
            })
        })
        .collect();
    let timer_phases = phases.clone();
    tokio::spawn(async move {
        let phases = timer_phases;
        // However the task ends (shutdown, or the runtime dropping it),
        // the listeners learn that no tick will come.
        struct CloseOnDrop(Arc<[Arc<Phase>]>);
        impl Drop for CloseOnDrop {
            fn drop(&mut self) {
                for phase in self.0.iter() {
                    phase.close();
                }
            }
        }
        let _close = CloseOnDrop(phases.clone());
        let mut timer = tokio::time::interval(interval / PHASES as u32);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = timer.tick() => {
                    let sequence = ticks / PHASES as u64 + 1;
                    let at = Instant::now();
                    // The timer did not run for a whole interval: the head
                    // was paused (SIGSTOP, a stalled machine). Every stream
                    // checks its worker's silence at once, as with a single
                    // tick, so that a woken head lets go of the workers
                    // that left meanwhile without waiting for its phases.
                    let stalled = last.elapsed() > interval;
                    last = at;
                    let due = if stalled {
                        ticks = sequence * PHASES as u64;
                        &phases[..]
                    } else {
                        let phase = (ticks % PHASES as u64) as usize;
                        ticks += 1;
                        &phases[phase..=phase]
                    };
                    for phase in due {
                        phase.send(Tick { sequence, at });
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    });
    Beats {
        phases,
        next: Arc::new(AtomicUsize::new(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that a test awaits.
    #[derive(Default)]
    struct Woken(tokio::sync::Notify);

    impl Listener for Woken {
        fn wake(&self) {
            self.0.notify_one();
        }
    }

    async fn next_tick(woken: &Woken, member: &mut Membership) -> Option<Tick> {
        loop {
            let notified = woken.0.notified();
            if let Poll::Ready(tick) = member.poll_tick() {
                return tick;
            }
            notified.await;
        }
    }

    #[tokio::test]
    async fn phases_beat_in_turn_once_an_interval() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let beats = start(Duration::from_millis(160), shutdown);
        let mut phases: Vec<_> = (0..PHASES)
            .map(|_| {
                let woken = Arc::new(Woken::default());
                let member = beats.join(woken.clone());
                (woken, member)
            })
            .collect();
        for round in 1..=2u64 {
            let mut fired = Vec::new();
            for (woken, member) in &mut phases {
                let tick = next_tick(woken, member).await.expect("the timer runs");
                assert_eq!(
                    tick.sequence, round,
                    "every phase sends the interval's number"
                );
                fired.push(tick.at);
            }
            assert!(
                fired.windows(2).all(|w| w[0] <= w[1]),
                "phases fired out of turn: {fired:?}"
            );
        }
        // A ninth stream shares the first phase: round robin.
        let ninth = beats.join(Arc::new(Woken::default()));
        assert!(ninth.same_phase(&phases[0].1));
        // A stream that left is not woken any more.
        drop(ninth);
        assert_eq!(lock(&phases[0].1.phase.listeners).len(), 1);
        // Shutdown ends every listener's ticks.
        trigger.trigger();
        for (woken, member) in &mut phases {
            let end = tokio::time::timeout(Duration::from_secs(10), async {
                while next_tick(woken, member).await.is_some() {}
            })
            .await;
            assert!(
                end.is_ok(),
                "a listener was not told that the timer stopped"
            );
        }
    }
}
