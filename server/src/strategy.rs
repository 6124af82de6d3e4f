//! Aggregation strategies. A [`Strategy`] is pure: given the global model and the round's results
//! (as streams of values) and failures, it returns the next global model. It sees named f32
//! tensors only, never a burn type, and does no IO beyond reading the update streams it is given.

use fedhcc_core::params::{Layout, ParameterSet, ParamsError};
use std::collections::BTreeMap;

/// One site's update (a delta against the round's global model), readable as a stream of values.
pub trait UpdateSource {
    fn site(&self) -> &str;
    /// FedAvg weight: the number of training samples.
    fn samples(&self) -> u64;
    /// Reads the update from the start, handing `(flat offset, values)` to `on_values` in order.
    ///
    /// # Errors
    /// The update could not be read or is not of `layout`.
    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError>;
}

/// Why aggregation failed.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("no update to aggregate")]
    NoUpdates,
    #[error("site {site}: total sample count is zero")]
    ZeroSamples { site: String },
    #[error("site {site}: {message}")]
    Update { site: String, message: String },
    #[error(transparent)]
    Params(#[from] ParamsError),
}

/// A server-side aggregation rule.
pub trait Strategy: Send {
    fn name(&self) -> &'static str;
    /// Folds the updates (given in a fixed site order) into the global model.
    ///
    /// # Errors
    /// An unreadable update or a degenerate weighting.
    fn aggregate(
        &mut self,
        global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError>;
}

/// Federated averaging (McMahan et al. 2017) weighted by sample count:
/// `w ← w + Σ_k (n_k / n) · Δ_k`.
///
/// Memory is the global model alone: each update is streamed and folded into it in place, in the
/// order given (the caller sorts by site id), so a rerun with the same inputs is bit-identical.
#[derive(Debug, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(
        &mut self,
        mut global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        if updates.is_empty() {
            return Err(StrategyError::NoUpdates);
        }
        let total: u64 = updates.iter().map(|u| u.samples()).sum();
        if total == 0 {
            return Err(StrategyError::ZeroSamples { site: "all sites".into() });
        }
        let layout = global.layout().clone();
        for u in updates.iter_mut() {
            // Weights in f64, applied in f32: the per-value work stays one fused multiply-add.
            let w = (u.samples() as f64 / total as f64) as f32;
            if w == 0.0 {
                continue;
            }
            let g = global.values_mut();
            u.read(&layout, &mut |off, vals| {
                for (gi, d) in g[off..off + vals.len()].iter_mut().zip(vals) {
                    *gi += w * d;
                }
            })?;
        }
        if let Err(e) = global.check_finite() {
            return Err(StrategyError::Update { site: "aggregate".into(), message: e.to_string() });
        }
        Ok(global)
    }
}

/// An update held in memory (tests, small models).
pub struct MemoryUpdate {
    pub site: String,
    pub samples: u64,
    pub delta: ParameterSet,
}

impl UpdateSource for MemoryUpdate {
    fn site(&self) -> &str {
        &self.site
    }
    fn samples(&self) -> u64 {
        self.samples
    }
    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError> {
        if self.delta.fingerprint() != layout.fingerprint() {
            return Err(StrategyError::Update {
                site: self.site.clone(),
                message: "layout differs from the global model".into(),
            });
        }
        on_values(0, self.delta.values());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let global = ps(vec![1.0, 1.0, 1.0]);
        let mut a = MemoryUpdate { site: "a".into(), samples: 1, delta: ps(vec![3.0, 0.0, -3.0]) };
        let mut b = MemoryUpdate { site: "b".into(), samples: 3, delta: ps(vec![-1.0, 4.0, 1.0]) };
        let out = FedAvg.aggregate(global, &mut [&mut a, &mut b], &BTreeMap::new()).unwrap();
        // 1 + (1*3 + 3*-1)/4 = 1 ; 1 + (0 + 12)/4 = 4 ; 1 + (-3 + 3)/4 = 1
        assert_eq!(out.values(), &[1.0, 4.0, 1.0]);
    }

    #[test]
    fn fedavg_skips_a_zero_sample_site_and_refuses_all_zero() {
        let global = ps(vec![0.0]);
        let mut a = MemoryUpdate { site: "a".into(), samples: 0, delta: ps(vec![100.0]) };
        let mut b = MemoryUpdate { site: "b".into(), samples: 2, delta: ps(vec![2.0]) };
        let out = FedAvg.aggregate(global.clone(), &mut [&mut a, &mut b], &BTreeMap::new()).unwrap();
        assert_eq!(out.values(), &[2.0]);
        let mut a = MemoryUpdate { site: "a".into(), samples: 0, delta: ps(vec![1.0]) };
        assert!(matches!(
            FedAvg.aggregate(global.clone(), &mut [&mut a], &BTreeMap::new()),
            Err(StrategyError::ZeroSamples { .. })
        ));
        assert!(matches!(FedAvg.aggregate(global, &mut [], &BTreeMap::new()), Err(StrategyError::NoUpdates)));
    }

    #[test]
    fn fedavg_is_bit_identical_for_the_same_order() {
        let global = ps((0..1000).map(|i| (i as f32).sin()).collect());
        let mk = |s: &str, n, k: f32| MemoryUpdate {
            site: s.into(),
            samples: n,
            delta: ps((0..1000).map(|i| ((i as f32) * k).cos() * 1e-3).collect()),
        };
        let run = || {
            let (mut a, mut b, mut c) = (mk("a", 17, 0.3), mk("b", 290, 0.7), mk("c", 33, 1.1));
            FedAvg.aggregate(global.clone(), &mut [&mut a, &mut b, &mut c], &BTreeMap::new()).unwrap()
        };
        let x: Vec<u32> = run().values().iter().map(|v| v.to_bits()).collect();
        let y: Vec<u32> = run().values().iter().map(|v| v.to_bits()).collect();
        assert_eq!(x, y);
    }
}
