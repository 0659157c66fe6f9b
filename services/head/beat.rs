//! The head's one beat timer. Every stream task watches it, so a head with
//! ten thousand workers runs one timer, not ten thousand.

use std::time::Duration;
use tether::registry::now_ms;
use tether::shutdown::Shutdown;
use tokio::sync::watch;

/// One tick of the beat timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tick {
    /// Counts ticks from 1; 0 before the first.
    pub sequence: u64,
    /// When the tick fired, Unix ms.
    pub at_ms: i64,
}

/// Starts the timer; it stops at shutdown, which closes the channel.
pub fn start(interval: Duration, mut shutdown: Shutdown) -> watch::Receiver<Tick> {
    let (tx, rx) = watch::channel(Tick {
        sequence: 0,
        at_ms: now_ms(),
    });
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0;
        loop {
            tokio::select! {
                _ = timer.tick() => {
                    sequence += 1;
                    if tx.send(Tick { sequence, at_ms: now_ms() }).is_err() {
                        return;
                    }
                }
                _ = shutdown.wait() => return,
            }
        }
    });
    rx
}
