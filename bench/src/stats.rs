//! Small statistics helpers for benchmarks.

use serde::Serialize;

/// min / p50 / max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Smallest value.
    pub min: f64,
    /// Median (lower median for even counts).
    pub p50: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// Summarises `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            min: v[0],
            p50: v[(v.len() - 1) / 2],
            max: v[v.len() - 1],
        })
    }
}

/// A latency sample with its tail: count, min, p50, p99 and max (ms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TailSummary {
    /// Samples.
    pub n: usize,
    /// Smallest value.
    pub min: f64,
    /// Median (lower median for even counts).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl TailSummary {
    /// Summarises `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let s = Summary::of(values)?;
        Some(TailSummary {
            n: values.len(),
            min: s.min,
            p50: s.p50,
            p99: percentile(values, 99.0)?,
            max: s.max,
        })
    }
}

/// The `p`-th percentile (nearest rank) of `values`; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_samples() {
        assert_eq!(
            Summary::of(&[3.0, 1.0, 2.0]).unwrap(),
            Summary {
                min: 1.0,
                p50: 2.0,
                max: 3.0
            }
        );
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().p50, 2.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn tail_summary() {
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let t = TailSummary::of(&v).unwrap();
        assert_eq!(
            (t.n, t.min, t.p50, t.p99, t.max),
            (200, 1.0, 100.0, 198.0, 200.0)
        );
        assert!(TailSummary::of(&[]).is_none());
    }
}
