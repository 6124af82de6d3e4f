//! Coordinate-wise robust aggregation (Yin et al., "Byzantine-robust distributed learning",
//! ICML 2018): every coordinate of the global model moves by the median, or the trimmed mean, of
//! that coordinate's deltas across sites.
//!
//! Both are **unweighted**, as in the paper and in Flower: a site's sample count does not change
//! its say in an order statistic (weighting would let one large site dictate the median, which is
//! what these rules exist to prevent). Sites with zero samples are left out. The updates are
//! walked side by side in blocks ([`super::for_each_block`]), so memory is one block per site.

use super::{StrategyError, UpdateSource, contributing, finite, for_each_block};
use crate::strategy::Strategy;
use fedhcc_core::params::ParameterSet;
use std::collections::BTreeMap;

/// Coordinate-wise median of the deltas: `w_i ← w_i + median_k Δ_k,i`. With an even number of
/// sites, the mean of the two middle values (so with two sites it is their unweighted mean).
#[derive(Debug, Default)]
pub struct Median;

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn aggregate(
        &mut self,
        mut global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        let (chosen, _) = contributing(updates)?;
        let layout = global.layout().clone();
        let g = global.values_mut();
        let mut column = Vec::with_capacity(chosen.len());
        for_each_block(updates, &chosen, &layout, |off, rows| {
            for (j, gi) in g[off..off + rows[0].len()].iter_mut().enumerate() {
                column.clear();
                column.extend(rows.iter().map(|r| r[j]));
                *gi += median(&mut column);
            }
        })?;
        finite(global)
    }
}

fn median(column: &mut [f32]) -> f32 {
    column.sort_unstable_by(f32::total_cmp);
    let n = column.len();
    if n % 2 == 1 { column[n / 2] } else { ((f64::from(column[n / 2 - 1]) + f64::from(column[n / 2])) / 2.0) as f32 }
}

/// Coordinate-wise trimmed mean: per coordinate, the ⌊β·n⌋ smallest and ⌊β·n⌋ largest deltas are
/// dropped and the rest averaged (unweighted). With fewer than 1/β sites nothing is dropped and it
/// is the unweighted mean.
#[derive(Debug)]
pub struct TrimmedMean {
    fraction: f64,
}

impl TrimmedMean {
    /// A trimmed mean dropping `fraction` (β, in [0, 0.5)) of the sites at each end.
    ///
    /// # Errors
    /// β outside [0, 0.5).
    pub fn new(fraction: f64) -> Result<Self, StrategyError> {
        if !(fraction.is_finite() && (0.0..0.5).contains(&fraction)) {
            return Err(StrategyError::Config(format!("trim_fraction = {fraction}: must be in [0, 0.5)")));
        }
        Ok(Self { fraction })
    }

    /// Values dropped at each end for `n` sites: ⌊β·n⌋ (with a hair of slack so that 0.3 × 10 is 3).
    pub fn trimmed_per_end(&self, n: usize) -> usize {
        ((self.fraction * n as f64) + 1e-9).floor() as usize
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed_mean"
    }

    fn describe(&self) -> String {
        format!("trimmed_mean(trim_fraction={})", self.fraction)
    }

    fn aggregate(
        &mut self,
        mut global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        let (chosen, _) = contributing(updates)?;
        let k = self.trimmed_per_end(chosen.len());
        let layout = global.layout().clone();
        let g = global.values_mut();
        let mut column = Vec::with_capacity(chosen.len());
        for_each_block(updates, &chosen, &layout, |off, rows| {
            for (j, gi) in g[off..off + rows[0].len()].iter_mut().enumerate() {
                column.clear();
                column.extend(rows.iter().map(|r| r[j]));
                column.sort_unstable_by(f32::total_cmp);
                let kept = &column[k..column.len() - k];
                let sum: f64 = kept.iter().map(|&v| f64::from(v)).sum();
                *gi += (sum / kept.len() as f64) as f32;
            }
        })?;
        finite(global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{BLOCK_VALUES, MemoryUpdate};

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    fn up(site: &str, samples: u64, v: Vec<f32>) -> MemoryUpdate {
        MemoryUpdate { site: site.into(), samples, delta: ps(v) }
    }

    fn run(s: &mut dyn Strategy, global: Vec<f32>, ups: &mut [MemoryUpdate]) -> Result<Vec<f32>, StrategyError> {
        let mut refs: Vec<&mut dyn UpdateSource> = ups.iter_mut().map(|u| u as &mut dyn UpdateSource).collect();
        s.aggregate(ps(global), &mut refs, &BTreeMap::new()).map(|p| p.values().to_vec())
    }

    #[test]
    fn median_by_hand_odd_even_and_one_site() {
        // Three sites: the middle value per coordinate, whatever the sample counts.
        let mut ups =
            [up("a", 1, vec![1.0, -5.0, 100.0]), up("b", 1000, vec![2.0, 0.0, -1.0]), up("c", 7, vec![3.0, 5.0, 0.5])];
        assert_eq!(run(&mut Median, vec![10.0, 10.0, 10.0], &mut ups).unwrap(), [12.0, 10.0, 10.5]);
        // Two sites: mean of the two middle values = unweighted mean.
        let mut ups = [up("a", 1, vec![1.0, -4.0]), up("b", 99, vec![2.0, 8.0])];
        assert_eq!(run(&mut Median, vec![0.0, 1.0], &mut ups).unwrap(), [1.5, 3.0]);
        // One site: that site's delta.
        let mut ups = [up("a", 3, vec![0.25, -0.75])];
        assert_eq!(run(&mut Median, vec![1.0, 1.0], &mut ups).unwrap(), [1.25, 0.25]);
    }

    #[test]
    fn median_leaves_out_zero_sample_sites_and_refuses_all_zero_or_none() {
        // Without the zero-sample site c the median of {1, 2} is 1.5; with it, it would be 2.
        let mut ups = [up("a", 5, vec![1.0]), up("b", 5, vec![2.0]), up("c", 0, vec![50.0])];
        assert_eq!(run(&mut Median, vec![0.0], &mut ups).unwrap(), [1.5]);
        let mut ups = [up("a", 0, vec![1.0]), up("b", 0, vec![2.0])];
        assert!(matches!(run(&mut Median, vec![0.0], &mut ups), Err(StrategyError::ZeroSamples { .. })));
        assert!(matches!(run(&mut Median, vec![0.0], &mut []), Err(StrategyError::NoUpdates)));
    }

    #[test]
    fn median_ignores_failures_and_refuses_a_wrong_layout() {
        let mut failures = BTreeMap::new();
        failures.insert("c".to_string(), "disconnected".to_string());
        let mut a = up("a", 1, vec![1.0, 3.0]);
        let mut b = up("b", 1, vec![3.0, 5.0]);
        let out = Median.aggregate(ps(vec![0.0, 0.0]), &mut [&mut a, &mut b], &failures).unwrap();
        assert_eq!(out.values(), &[2.0, 4.0]);
        let mut bad = MemoryUpdate {
            site: "b".into(),
            samples: 1,
            delta: ParameterSet::from_tensors(vec![("v".into(), vec![2], vec![0.0, 0.0])]).unwrap(),
        };
        let e = Median.aggregate(ps(vec![0.0, 0.0]), &mut [&mut a, &mut bad], &failures).unwrap_err();
        assert!(matches!(e, StrategyError::Update { ref site, .. } if site == "b"), "{e}");
    }

    #[test]
    fn trimmed_mean_by_hand() {
        // Five sites, β = 0.2: drop one at each end per coordinate, average the middle three.
        let mut t = TrimmedMean::new(0.2).unwrap();
        assert_eq!(t.trimmed_per_end(5), 1);
        let mut ups = [
            up("a", 1, vec![1.0, 10.0]),
            up("b", 1, vec![2.0, -10.0]),
            up("c", 1, vec![3.0, 0.0]),
            up("d", 1, vec![4.0, 1.0]),
            up("e", 1, vec![100.0, 2.0]),
        ];
        // Coordinate 0: {1,2,3,4,100} → {2,3,4} → 3. Coordinate 1: {-10,0,1,2,10} → {0,1,2} → 1.
        assert_eq!(run(&mut t, vec![0.0, 0.0], &mut ups).unwrap(), [3.0, 1.0]);
        // β·n below one: nothing trimmed, the unweighted mean (not the sample-weighted one).
        let mut t = TrimmedMean::new(0.1).unwrap();
        let mut ups = [up("a", 1, vec![1.0]), up("b", 3, vec![4.0])];
        assert_eq!(run(&mut t, vec![0.0], &mut ups).unwrap(), [2.5]);
        assert_eq!(TrimmedMean::new(0.3).unwrap().trimmed_per_end(10), 3);
        assert!(TrimmedMean::new(0.5).is_err());
        assert!(TrimmedMean::new(-0.1).is_err());
    }

    #[test]
    fn trimmed_mean_with_zero_samples_and_one_site() {
        // The zero-sample site is out before trimming: n = 4, β = 0.25 → one dropped at each end.
        let mut t = TrimmedMean::new(0.25).unwrap();
        let mut ups = [
            up("a", 2, vec![1.0]),
            up("b", 2, vec![2.0]),
            up("c", 0, vec![-99.0]),
            up("d", 2, vec![3.0]),
            up("e", 2, vec![10.0]),
        ];
        assert_eq!(run(&mut t, vec![0.0], &mut ups).unwrap(), [2.5]);
        let mut ups = [up("a", 2, vec![-0.5])];
        assert_eq!(run(&mut t, vec![1.0], &mut ups).unwrap(), [0.5]);
        let mut ups = [up("a", 0, vec![-0.5])];
        assert!(matches!(run(&mut t, vec![1.0], &mut ups), Err(StrategyError::ZeroSamples { .. })));
    }

    #[test]
    fn block_walk_covers_models_larger_than_one_block() {
        let n = BLOCK_VALUES * 2 + 17;
        let mk = |site: &str, k: f32| up(site, 1, (0..n).map(|i| i as f32 * k).collect());
        let mut ups = [mk("a", 1.0), mk("b", 3.0), mk("c", 2.0)];
        let out = run(&mut Median, vec![0.0; n], &mut ups).unwrap();
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32 * 2.0));
    }
}
