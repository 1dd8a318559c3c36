//! Latency figures of a run, read from HDR histograms of microseconds: the percentiles of the
//! summary, and the percentile curve that `--report` draws.
//!
//! The curve's points are evenly spaced the way HdrHistogram's percentile plots space them:
//! on `x = -log10(1 - p)`, so 0%, 90%, 99%, 99.9% and 99.99% are one step apart.

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, up to this (longer ones count as this).
pub(super) const MAX_LATENCY_MICROS: u64 = 300_000_000;
/// Nines the curve reaches: its last point is the 99.99th percentile.
pub(super) const CURVE_NINES: u32 = 4;
/// Points of the curve per nine (per step of `-log10(1 - p)`).
const CURVE_STEPS_PER_NINE: u32 = 20;

/// An empty histogram of latencies in microseconds (1 µs to 300 s, 3 significant digits).
pub(super) fn histogram() -> Histogram<u64> {
    // Bounds fixed and valid.
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Latency percentiles of one class of deliveries, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    /// Deliveries measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Worst.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `histogram` (all zero when it is empty).
    pub(super) fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p99_9: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

/// One point of a percentile curve: this share of the deliveries took at most `ms`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CurvePoint {
    /// Percentile, 0 to 99.99.
    pub percentile: f64,
    /// Latency at that percentile, in milliseconds.
    pub ms: f64,
}

/// The percentile curve of `histogram`, from 0% to 99.99% (no points when it is empty).
pub(super) fn curve(histogram: &Histogram<u64>) -> Vec<CurvePoint> {
    if histogram.is_empty() {
        return Vec::new();
    }
    (0..=CURVE_NINES * CURVE_STEPS_PER_NINE)
        .map(|step| {
            let nines = f64::from(step) / f64::from(CURVE_STEPS_PER_NINE);
            let quantile = 1.0 - 10f64.powf(-nines);
            CurvePoint {
                // Rounded, so that 99.99 reads as 99.99 in the JSON.
                percentile: (quantile * 100.0 * 1e6).round() / 1e6,
                ms: ms(histogram.value_at_quantile(quantile)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_runs_from_the_fastest_delivery_to_the_99_99th_percentile() {
        let mut h = histogram();
        for micros in 1..=100_000u64 {
            h.record(micros).expect("in bounds");
        }
        let points = curve(&h);
        assert_eq!(points.len(), 81);
        assert_eq!(points[0].percentile, 0.0);
        assert!((points[0].ms - 0.001).abs() < 1e-9, "{:?}", points[0]);
        assert_eq!(points[20].percentile, 90.0);
        assert_eq!(points[40].percentile, 99.0);
        assert_eq!(points[80].percentile, 99.99);
        // 3 significant digits: within 0.1% of the true value.
        assert!((points[40].ms - 99.0).abs() < 0.1, "{:?}", points[40]);
        assert!((points[80].ms - 99.99).abs() < 0.1, "{:?}", points[80]);
        assert!(
            points
                .windows(2)
                .all(|w| w[0].percentile < w[1].percentile && w[0].ms <= w[1].ms),
            "{points:?}"
        );
    }

    #[test]
    fn an_empty_histogram_has_no_curve_and_zero_percentiles() {
        assert!(curve(&histogram()).is_empty());
        assert_eq!(Percentiles::of(&histogram()).count, 0);
    }
}
