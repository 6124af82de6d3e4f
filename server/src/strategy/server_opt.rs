//! Server optimizers: FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization",
//! ICLR 2021, Algorithm 2). The sample-weighted mean of the sites' deltas is a pseudo-gradient
//! `Δ = Σ_k (n_k/n) Δ_k`, and the server takes one adaptive step along it:
//!
//! ```text
//! m ← β₁ m + (1 − β₁) Δ
//! v ← β₂ v + (1 − β₂) Δ²                      (Adam)
//! v ← v − (1 − β₂) Δ² · sign(v − Δ²)          (Yogi)
//! w ← w + η m / (√v + τ)
//! ```
//!
//! with `m₀ = 0` and `v₀ = τ²` (the paper asks `v₋₁ ≥ τ²`) and, as in the paper, no bias
//! correction. Per coordinate the arithmetic is f64; `m`, `v` and `w` are stored as f32.
//!
//! The moments and the step count are the strategy's state ([`Strategy::state`]): a
//! [`ParameterSet`] of three tensors (`server_optimizer.m` and `.v`, one value per model value,
//! and `server_optimizer.step`) that the server saves with every committed round and restores on
//! start, so a restarted server takes exactly the step an uninterrupted one would.

use super::{StrategyError, UpdateSource, contributing, finite, for_each_block};
use crate::strategy::Strategy;
use fedhcc_core::aggregation::ServerOptimizerConfig;
use fedhcc_core::params::{Layout, ParameterSet, TensorSpec};
use std::collections::BTreeMap;

/// Which second-moment rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerRule {
    Adam,
    Yogi,
}

/// FedAdam or FedYogi (see the module docs).
#[derive(Debug)]
pub struct ServerOptimizer {
    rule: OptimizerRule,
    cfg: ServerOptimizerConfig,
    /// `[m (n), v (n), step (1)]`; `None` before the first round.
    state: Option<ParameterSet>,
}

const M: &str = "server_optimizer.m";
const V: &str = "server_optimizer.v";
const STEP: &str = "server_optimizer.step";

fn state_layout(n: usize) -> Result<Layout, StrategyError> {
    Ok(Layout::new(vec![
        TensorSpec { name: M.into(), shape: vec![n] },
        TensorSpec { name: V.into(), shape: vec![n] },
        TensorSpec { name: STEP.into(), shape: vec![] },
    ])?)
}

/// Model values the state holds moments for, if `layout` is a state layout.
fn moments_len(layout: &Layout) -> Option<usize> {
    match layout.specs() {
        [m, v, s] if m.name == M && v.name == V && s.name == STEP && m.shape.len() == 1 && m.shape == v.shape => {
            s.shape.is_empty().then_some(m.shape[0])
        }
        _ => None,
    }
}

impl ServerOptimizer {
    /// An optimizer with fresh state.
    pub fn new(rule: OptimizerRule, cfg: ServerOptimizerConfig) -> Self {
        Self { rule, cfg, state: None }
    }

    /// Optimizer steps taken (committed rounds since the run started).
    pub fn steps(&self) -> u64 {
        self.state.as_ref().and_then(|s| s.values().last()).map(|&v| v as u64).unwrap_or(0)
    }

    fn fresh_state(&self, n: usize) -> Result<ParameterSet, StrategyError> {
        let mut values = vec![0f32; 2 * n + 1];
        values[n..2 * n].fill((self.cfg.tau * self.cfg.tau) as f32);
        Ok(ParameterSet::new(state_layout(n)?, values)?)
    }
}

impl Strategy for ServerOptimizer {
    fn name(&self) -> &'static str {
        match self.rule {
            OptimizerRule::Adam => "fedadam",
            OptimizerRule::Yogi => "fedyogi",
        }
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        format!("{}(lr={}, beta1={}, beta2={}, tau={})", self.name(), c.lr, c.beta1, c.beta2, c.tau)
    }

    fn aggregate(
        &mut self,
        mut global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        let (chosen, total) = contributing(updates)?;
        let weights: Vec<f64> = chosen.iter().map(|&i| updates[i].samples() as f64 / total as f64).collect();
        let n = global.numel();
        if let Some(s) = &self.state
            && moments_len(s.layout()) != Some(n)
        {
            return Err(StrategyError::State(format!(
                "it holds moments for {} values, the model has {n}",
                moments_len(s.layout()).map(|m| m.to_string()).unwrap_or_else(|| "an unknown number of".into())
            )));
        }
        let mut state = match self.state.take() {
            Some(s) => s,
            None => self.fresh_state(n)?,
        };
        let (b1, b2, eta, tau) = (self.cfg.beta1, self.cfg.beta2, self.cfg.lr, self.cfg.tau);
        let rule = self.rule;
        let layout = global.layout().clone();
        let g = global.values_mut();
        let (m, rest) = state.values_mut().split_at_mut(n);
        let (v, step) = rest.split_at_mut(n);
        for_each_block(updates, &chosen, &layout, |off, rows| {
            for j in 0..rows[0].len() {
                let d: f64 = weights.iter().zip(rows).map(|(w, r)| w * f64::from(r[j])).sum();
                let i = off + j;
                let mi = b1 * f64::from(m[i]) + (1.0 - b1) * d;
                let (vi, d2) = (f64::from(v[i]), d * d);
                let vi = match rule {
                    OptimizerRule::Adam => b2 * vi + (1.0 - b2) * d2,
                    OptimizerRule::Yogi => vi - (1.0 - b2) * d2 * sign(vi - d2),
                };
                m[i] = mi as f32;
                v[i] = vi as f32;
                g[i] = (f64::from(g[i]) + eta * mi / (vi.sqrt() + tau)) as f32;
            }
        })?;
        step[0] += 1.0;
        self.state = Some(state);
        finite(global)
    }

    fn state(&self) -> Option<&ParameterSet> {
        self.state.as_ref()
    }

    fn restore_state(&mut self, state: Option<ParameterSet>, committed_rounds: u32) -> Result<(), StrategyError> {
        match state {
            None if committed_rounds == 0 => {
                self.state = None;
                Ok(())
            }
            None => Err(StrategyError::State(format!(
                "round {committed_rounds} was committed without a saved server optimizer state; the state folder \
                 was made with another strategy (use a new run_id or the original strategy)"
            ))),
            Some(s) => {
                if moments_len(s.layout()).is_none() {
                    return Err(StrategyError::State("the saved state is not a server optimizer state".into()));
                }
                let steps = s.values().last().copied().unwrap_or(-1.0);
                if steps != committed_rounds as f32 {
                    return Err(StrategyError::State(format!(
                        "the saved state counts {steps} steps, but {committed_rounds} rounds are committed"
                    )));
                }
                self.state = Some(s);
                Ok(())
            }
        }
    }
}

/// `sign` with `sign(0) = 0`, as the Yogi rule needs (`f64::signum(0.0)` is 1).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::MemoryUpdate;

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    fn cfg() -> ServerOptimizerConfig {
        ServerOptimizerConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.01 }
    }

    /// Round 1: a (1 sample) [0.4, −0.2], b (3 samples) [0.0, −0.2] → Δ = [0.1, −0.2].
    /// Round 2: a [0.4, 0.2], b [0.0, 0.2] → Δ = [0.1, 0.2]. A zero-sample site c sends garbage.
    fn round(opt: &mut ServerOptimizer, global: ParameterSet, r: u32) -> Result<ParameterSet, StrategyError> {
        let s = if r == 1 { -1.0 } else { 1.0 };
        let mut a = MemoryUpdate { site: "a".into(), samples: 1, delta: ps(vec![0.4, 0.2 * s]) };
        let mut b = MemoryUpdate { site: "b".into(), samples: 3, delta: ps(vec![0.0, 0.2 * s]) };
        let mut c = MemoryUpdate { site: "c".into(), samples: 0, delta: ps(vec![1e3, -1e3]) };
        let mut failures = BTreeMap::new();
        failures.insert("d".to_string(), "disconnected".to_string());
        opt.aggregate(global, &mut [&mut a, &mut b, &mut c], &failures)
    }

    fn close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "got {got:?}, want {want:?}");
        }
    }

    // Hand computation (η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 0.01, v₀ = 1e-4, w₀ = [1, −1]):
    // Adam round 1, coord 0: m = 0.01, v = 0.99e-4 + 0.01·0.01 = 1.99e-4,
    //   w = 1 + 0.1·0.01 / (√1.99e-4 + 0.01) = 1.041482182.
    // Yogi round 1, coord 0: v = 1e-4 − 0.01·0.01·sign(1e-4 − 0.01) = 2e-4,
    //   w = 1 + 0.001 / (√2e-4 + 0.01) = 1 + 0.1(√2 − 1) = 1.041421356.
    #[test]
    fn fedadam_two_rounds_by_hand() {
        let mut opt = ServerOptimizer::new(OptimizerRule::Adam, cfg());
        let w1 = round(&mut opt, ps(vec![1.0, -1.0]), 1).unwrap();
        close(w1.values(), &[1.041482182, -1.061846155]);
        close(opt.state().unwrap().values(), &[0.01, -0.02, 0.000199, 0.000499, 1.0]);
        let w2 = round(&mut opt, w1, 2).unwrap();
        close(w2.values(), &[1.111247972, -1.056833624]);
        close(opt.state().unwrap().values(), &[0.019, 0.002, 0.00029701, 0.00089401, 2.0]);
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn fedyogi_two_rounds_by_hand() {
        let mut opt = ServerOptimizer::new(OptimizerRule::Yogi, cfg());
        let w1 = round(&mut opt, ps(vec![1.0, -1.0]), 1).unwrap();
        close(w1.values(), &[1.041421356, -1.061803399]);
        let w2 = round(&mut opt, w1, 2).unwrap();
        close(w2.values(), &[1.110966183, -1.056803399]);
        close(opt.state().unwrap().values(), &[0.019, 0.002, 0.0003, 0.0009, 2.0]);
        assert_eq!(sign(0.0), 0.0);
    }

    #[test]
    fn restored_state_gives_the_same_bits_as_an_uninterrupted_run() {
        for rule in [OptimizerRule::Adam, OptimizerRule::Yogi] {
            let mut straight = ServerOptimizer::new(rule, cfg());
            let w1 = round(&mut straight, ps(vec![1.0, -1.0]), 1).unwrap();
            let saved = ParameterSet::decode(&straight.state().unwrap().encode()).unwrap();
            let w2 = round(&mut straight, w1.clone(), 2).unwrap();

            let mut restarted = ServerOptimizer::new(rule, cfg());
            restarted.restore_state(Some(saved), 1).unwrap();
            let r2 = round(&mut restarted, w1.clone(), 2).unwrap();
            let bits = |p: &ParameterSet| p.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w2), bits(&r2), "{rule:?}");
            // Without the state the next model differs: the state matters.
            let mut fresh = ServerOptimizer::new(rule, cfg());
            assert_ne!(bits(&round(&mut fresh, w1, 2).unwrap()), bits(&w2));
        }
    }

    #[test]
    fn restore_refuses_state_from_another_round_strategy_or_model() {
        let mut opt = ServerOptimizer::new(OptimizerRule::Adam, cfg());
        round(&mut opt, ps(vec![1.0, -1.0]), 1).unwrap();
        let saved = opt.state().unwrap().clone();
        let mut other = ServerOptimizer::new(OptimizerRule::Adam, cfg());
        let e = other.restore_state(Some(saved.clone()), 3).unwrap_err().to_string();
        assert!(e.contains("1 steps") && e.contains("3 rounds"), "{e}");
        let e = other.restore_state(None, 2).unwrap_err().to_string();
        assert!(e.contains("round 2") && e.contains("another strategy"), "{e}");
        other.restore_state(None, 0).unwrap();
        assert!(other.restore_state(Some(ps(vec![0.0; 5])), 1).is_err());
        // A state for a 2-value model does not fit a 3-value model.
        other.restore_state(Some(saved), 1).unwrap();
        let mut a = MemoryUpdate { site: "a".into(), samples: 1, delta: ps(vec![0.0; 3]) };
        let e = other.aggregate(ps(vec![0.0; 3]), &mut [&mut a], &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("moments for 2 values, the model has 3"), "{e}");
    }

    #[test]
    fn all_zero_samples_or_no_update_is_an_error() {
        let mut opt = ServerOptimizer::new(OptimizerRule::Yogi, cfg());
        let mut a = MemoryUpdate { site: "a".into(), samples: 0, delta: ps(vec![1.0]) };
        assert!(matches!(
            opt.aggregate(ps(vec![0.0]), &mut [&mut a], &BTreeMap::new()),
            Err(StrategyError::ZeroSamples { .. })
        ));
        assert!(matches!(opt.aggregate(ps(vec![0.0]), &mut [], &BTreeMap::new()), Err(StrategyError::NoUpdates)));
        assert!(opt.state().is_none(), "a refused round leaves no state behind");
    }
}
