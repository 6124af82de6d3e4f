//! Deterministic stratified train/validation/test splits.
//!
//! Strata are label 0, label 1 and unlabelled. Unlabelled patients are split like the others (not all put in
//! training) because the survival head and its C-index need censored patients in validation and test too;
//! the binary task simply skips them there. Each stratum is shuffled with a [`ChaCha8Rng`] seeded from
//! `seed` (strata in the fixed order 0, 1, unlabelled), then cut into test, validation and train with
//! `round(n · frac)` rows for test and validation. Every row is in exactly one split; each split is sorted.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// 0 for label 0, 1 for any other label, 2 for unlabelled.
fn stratum_of(label: Option<u8>) -> u8 {
    match label {
        Some(0) => 0,
        Some(_) => 1,
        None => 2,
    }
}

/// The three splits, as indices into the labels slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splits {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SplitError {
    #[error("split fractions must be ≥ 0 with val + test < 1; got val {val}, test {test}")]
    InvalidFractions { val: f64, test: f64 },
}

impl Splits {
    /// Splits `labels.len()` rows (see the module docs).
    ///
    /// # Errors
    ///
    /// [`SplitError::InvalidFractions`] unless `val_frac ≥ 0`, `test_frac ≥ 0` and their sum is `< 1`.
    pub fn stratified(labels: &[Option<u8>], seed: u64, val_frac: f64, test_frac: f64) -> Result<Splits, SplitError> {
        let valid = |f: f64| f.is_finite() && f >= 0.0;
        if !(valid(val_frac) && valid(test_frac) && val_frac + test_frac < 1.0) {
            return Err(SplitError::InvalidFractions { val: val_frac, test: test_frac });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut splits = Splits { train: Vec::new(), val: Vec::new(), test: Vec::new() };
        for stratum in 0..3 {
            let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| stratum_of(labels[i]) == stratum).collect();
            rows.shuffle(&mut rng);
            let n = rows.len();
            let n_test = (((n as f64) * test_frac).round() as usize).min(n);
            let n_val = (((n as f64) * val_frac).round() as usize).min(n - n_test);
            splits.test.extend_from_slice(&rows[..n_test]);
            splits.val.extend_from_slice(&rows[n_test..n_test + n_val]);
            splits.train.extend_from_slice(&rows[n_test + n_val..]);
        }
        splits.train.sort_unstable();
        splits.val.sort_unstable();
        splits.test.sort_unstable();
        Ok(splits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<Option<u8>> {
        (0..503)
            .map(|i| {
                if i % 7 == 0 {
                    None
                } else if i % 5 == 0 {
                    Some(1)
                } else {
                    Some(0)
                }
            })
            .collect()
    }

    #[test]
    fn same_seed_gives_the_same_split_and_another_seed_another() {
        let a = Splits::stratified(&labels(), 7, 0.15, 0.2).expect("valid");
        let b = Splits::stratified(&labels(), 7, 0.15, 0.2).expect("valid");
        let c = Splits::stratified(&labels(), 8, 0.15, 0.2).expect("valid");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_row_is_in_exactly_one_split_and_strata_keep_their_fractions() {
        let labels = labels();
        let s = Splits::stratified(&labels, 1, 0.15, 0.2).expect("valid");
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
        for stratum in [Some(0), Some(1), None] {
            let n = labels.iter().filter(|l| **l == stratum).count() as f64;
            let count = |rows: &[usize]| rows.iter().filter(|&&r| labels[r] == stratum).count() as f64;
            assert!((count(&s.test) - n * 0.2).abs() <= 1.0, "{stratum:?} test");
            assert!((count(&s.val) - n * 0.15).abs() <= 1.0, "{stratum:?} val");
            assert!((count(&s.train) - n * 0.65).abs() <= 1.0, "{stratum:?} train");
        }
    }

    #[test]
    fn rejects_fractions_that_leave_no_training_rows() {
        assert!(Splits::stratified(&labels(), 1, 0.5, 0.5).is_err());
        assert!(Splits::stratified(&labels(), 1, -0.1, 0.2).is_err());
        let tiny = Splits::stratified(&[Some(1)], 1, 0.2, 0.2).expect("valid");
        assert_eq!(tiny.train, vec![0]);
    }
}
