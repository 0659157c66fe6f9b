//! Capped exponential backoff with full jitter, so that many workers that
//! lost the same head do not retry in lock-step.

use std::time::Duration;

/// Delays that double from `base` up to `max`, each drawn uniformly from
/// `[base/2, current]` so that retries spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
    rng: Jitter,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `max`.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            current: base,
            rng: Jitter::new(seed),
        }
    }

    /// The next delay to wait; grows until `max`.
    pub fn next_delay(&mut self) -> Duration {
        let upper = self.current;
        self.current = (self.current * 2).min(self.max);
        let lower = self.base / 2;
        let span = upper.saturating_sub(lower).as_micros() as u64;
        lower + Duration::from_micros(self.rng.below(span + 1))
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// A tiny xorshift generator: jitter needs spread, not cryptography, and
/// this keeps a dependency out of the tree.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// A generator seeded with `seed` mixed with the clock and pid, so that
    /// processes started together still diverge.
    pub fn new(seed: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mixed = crate::placement::mix(seed ^ nanos ^ u64::from(std::process::id()) << 32);
        Self(mixed | 1)
    }

    /// A value uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }

    /// A duration uniform in `0..=max`.
    pub fn up_to(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.below(max.as_micros() as u64 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(50), "{d:?}");
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        // After many rounds the window is [50ms, 2s]; draws must spread.
        let draws: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.iter().any(|d| *d > Duration::from_millis(500)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
