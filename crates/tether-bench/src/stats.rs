//! Summaries of a set of durations: nearest-rank percentiles, so that
//! every reported value is one that was actually measured.

use crate::report::{obj, Json, Report};
use std::time::Duration;

/// The distribution of a set of durations.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    sorted: Vec<Duration>,
}

impl Summary {
    /// Summarises `samples` (in any order).
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// How many samples.
    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    /// The nearest-rank percentile `p` (0 < p ≤ 100): the smallest sample
    /// with at least p% of the samples at or below it.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.sorted[rank.clamp(1, n) - 1])
    }

    pub fn min(&self) -> Option<Duration> {
        self.sorted.first().copied()
    }

    pub fn max(&self) -> Option<Duration> {
        self.sorted.last().copied()
    }

    pub fn mean(&self) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        let total: Duration = self.sorted.iter().sum();
        Some(total / self.sorted.len() as u32)
    }

    /// Adds rows `{key}_p50`, `_p99`, `_max` (and min, mean, count) to
    /// `report`, labelled with `label`.
    pub fn add_to(&self, report: &mut Report, key: &str, label: &str) {
        report.metric_count(
            &format!("{key}_count"),
            &format!("{label}: samples"),
            self.count() as u64,
        );
        report.metric_ms(
            &format!("{key}_min_ms"),
            &format!("{label}: min"),
            self.min(),
        );
        report.metric_ms(
            &format!("{key}_p50_ms"),
            &format!("{label}: p50"),
            self.percentile(50.0),
        );
        report.metric_ms(
            &format!("{key}_p99_ms"),
            &format!("{label}: p99"),
            self.percentile(99.0),
        );
        report.metric_ms(
            &format!("{key}_max_ms"),
            &format!("{label}: max"),
            self.max(),
        );
        report.metric_ms(
            &format!("{key}_mean_ms"),
            &format!("{label}: mean"),
            self.mean(),
        );
    }

    /// A 10-bucket histogram from min to max, for the JSON details.
    pub fn histogram(&self) -> Json {
        let (Some(lo), Some(hi)) = (self.min(), self.max()) else {
            return Json::Array(Vec::new());
        };
        let buckets = 10usize;
        let span = (hi - lo).as_secs_f64().max(1e-9);
        let mut counts = vec![0u64; buckets];
        for d in &self.sorted {
            let i = (((*d - lo).as_secs_f64() / span) * buckets as f64) as usize;
            counts[i.min(buckets - 1)] += 1;
        }
        Json::Array(
            counts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let upper = lo.as_secs_f64() + span * (i + 1) as f64 / buckets as f64;
                    obj([
                        ("le_ms", Json::from((upper * 10_000.0).round() / 10.0)),
                        ("count", Json::from(*c)),
                    ])
                })
                .collect(),
        )
    }
}

/// Beats a worker missed, judged from its longest gap between two
/// `HeadBeat`s: a gap of `g` intervals hides `round(g) - 1` beats, so a
/// gap up to 1.5 intervals (a late beat) counts as none, one of 2
/// intervals as one missed beat.
pub fn missed_beats(max_gap: Duration, interval: Duration) -> u64 {
    let ratio = max_gap.as_secs_f64() / interval.as_secs_f64();
    ((ratio + 0.5).floor() as u64).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Summary::new((1..=100).rev().map(ms).collect());
        assert_eq!(s.percentile(50.0), Some(ms(50)));
        assert_eq!(s.percentile(99.0), Some(ms(99)));
        assert_eq!(s.percentile(100.0), Some(ms(100)));
        assert_eq!(s.max(), Some(ms(100)));
        let one = Summary::new(vec![ms(7)]);
        assert_eq!(one.percentile(99.0), Some(ms(7)));
        assert_eq!(Summary::default().percentile(50.0), None);
    }

    #[test]
    fn missed_beats_round_the_gap() {
        let i = ms(1000);
        assert_eq!(missed_beats(ms(0), i), 0);
        assert_eq!(missed_beats(ms(1000), i), 0);
        assert_eq!(missed_beats(ms(1499), i), 0);
        assert_eq!(missed_beats(ms(1500), i), 1);
        assert_eq!(missed_beats(ms(2000), i), 1);
        assert_eq!(missed_beats(ms(3600), i), 3);
    }
}
