//! Repeated samples reduced to median, minimum and maximum.

/// The median, minimum and maximum of some samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The middle sample (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub samples: usize,
}

impl Summary {
    /// Summarises `values`, ignoring any that are not finite; `None` if
    /// none is left.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Summary { median, min: sorted[0], max: sorted[n - 1], samples: n })
    }

    /// One value, seen once.
    pub fn single(value: f64) -> Summary {
        Summary { median: value, min: value, max: value, samples: 1 }
    }

    /// Every figure multiplied by `factor` (a unit change).
    pub fn scaled(self, factor: f64) -> Summary {
        let (a, b) = (self.min * factor, self.max * factor);
        Summary { median: self.median * factor, min: a.min(b), max: a.max(b), samples: self.samples }
    }
}

/// `superos / host`, if both are positive.
pub fn ratio(superos: f64, host: f64) -> Option<f64> {
    (superos.is_finite() && host.is_finite() && superos > 0.0 && host > 0.0).then(|| superos / host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.samples), (3.0, 1.0, 5.0, 3));
        let s = Summary::of(&[4.0, 1.0, 3.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.samples), (3.5, 1.0, 10.0, 4));
        let s = Summary::of(&[7.0]).unwrap();
        assert_eq!(s, Summary::single(7.0));
    }

    #[test]
    fn empty_and_non_finite_samples() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN, f64::INFINITY]), None);
        let s = Summary::of(&[f64::NAN, 2.0, 4.0]).unwrap();
        assert_eq!((s.median, s.samples), (3.0, 2));
    }

    #[test]
    fn scaling_and_ratios() {
        let s = Summary::of(&[1.0, 2.0, 3.0]).unwrap().scaled(1000.0);
        assert_eq!((s.median, s.min, s.max), (2000.0, 1000.0, 3000.0));
        let s = Summary::of(&[1.0, 2.0]).unwrap().scaled(-1.0);
        assert!(s.min <= s.max);
        assert_eq!(ratio(10.0, 2.0), Some(5.0));
        assert_eq!(ratio(10.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }
}
