//! The head's one beat timer. Stream tasks watch it, so a head with ten
//! thousand workers runs one timer, not ten thousand.
//!
//! Its ticks are spread over the interval in [`PHASES`] phases, and each
//! stream beats on one phase: a head sends an eighth of its beats every
//! eighth of an interval instead of all of them at once. In one burst, a
//! stream's place in the queue changes from tick to tick, so with many
//! streams its beats arrived up to the burst's length early or late; with
//! 16,000 streams that was more than half an interval.

use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
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

/// The beat timer's phases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Beats {
    phases: Arc<[watch::Receiver<Tick>]>,
    next: Arc<AtomicUsize>,
}

impl Beats {
    /// The phase a new stream beats on, round robin so that the phases
    /// stay even.
    pub fn next_phase(&self) -> watch::Receiver<Tick> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.phases.len();
        self.phases[i].clone()
    }
}

/// Starts the timer; it stops at shutdown, which closes the channels.
pub fn start(interval: Duration, mut shutdown: Shutdown) -> Beats {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..PHASES)
        .map(|_| {
            watch::channel(Tick {
                sequence: 0,
                at: Instant::now(),
            })
        })
        .unzip();
    tokio::spawn(async move {
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
                    let phases = if stalled {
                        ticks = sequence * PHASES as u64;
                        &senders[..]
                    } else {
                        let phase = (ticks % PHASES as u64) as usize;
                        ticks += 1;
                        &senders[phase..=phase]
                    };
                    for phase in phases {
                        if phase.send(Tick { sequence, at }).is_err() {
                            return;
                        }
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    });
    Beats {
        phases: receivers.into(),
        next: Arc::new(AtomicUsize::new(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_beat_in_turn_once_an_interval() {
        let (_trigger, shutdown) = crate::shutdown::channel();
        let beats = start(Duration::from_millis(160), shutdown);
        let mut phases: Vec<_> = (0..PHASES).map(|_| beats.next_phase()).collect();
        for round in 1..=2u64 {
            let mut fired = Vec::new();
            for phase in &mut phases {
                phase.changed().await.unwrap();
                let tick = *phase.borrow_and_update();
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
        assert!(beats.next_phase().same_channel(&phases[0]));
    }
}
