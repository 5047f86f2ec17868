//! Summaries of a series of measured durations: nearest-rank percentiles, mean, minimum and maximum, in
//! milliseconds.
//!
//! Every benchmark collects one `Duration` per timed iteration and turns the series into a [`Summary`] here, so all
//! rows of the report are computed the same way. Nearest-rank means a percentile is always one of the measured
//! values (with 30 samples, p95 and p99 are the largest one or two), never an interpolation.

use std::time::Duration;

/// Percentiles and moments of one series, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`, or `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        Some(Self {
            n,
            p50: nearest_rank(&ms, 50.0),
            p95: nearest_rank(&ms, 95.0),
            p99: nearest_rank(&ms, 99.0),
            mean: ms.iter().sum::<f64>() / n as f64,
            min: ms[0],
            max: ms[n - 1],
        })
    }
}

/// The `p`th percentile of the sorted, non-empty `sorted` by the nearest-rank method.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn empty_series_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let s = Summary::of(&ms(&[7])).unwrap();
        assert_eq!(
            (s.n, s.p50, s.p95, s.p99, s.mean, s.min, s.max),
            (1, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn percentiles_are_nearest_rank_of_the_sorted_series() {
        // 1..=100 shuffled: p50 is the 50th value, p95 the 95th, p99 the 99th.
        let mut values: Vec<u64> = (1..=100).collect();
        values.reverse();
        let s = Summary::of(&ms(&values)).unwrap();
        assert_eq!((s.p50, s.p95, s.p99), (50.0, 95.0, 99.0));
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn small_series_take_the_top_values_for_high_percentiles() {
        let s = Summary::of(&ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])).unwrap();
        assert_eq!((s.p50, s.p95, s.p99), (5.0, 10.0, 10.0));
    }
}
