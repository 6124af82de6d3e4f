//! Aggregation strategies. A [`Strategy`] is pure: given the global model and the round's results
//! (as streams of values) and failures, it returns the next global model. It sees named f32
//! tensors only, never a burn type, and does no IO beyond reading the update streams it is given.
//!
//! | `[federation] strategy` | server rule | memory beyond the global model |
//! |---|---|---|
//! | `fedavg`, `fedprox`, `fedbn` | [`FedAvg`]: `w ← w + Σ_k (n_k/n) Δ_k`, folded update by update | none |
//! | `fedadam`, `fedyogi` | [`ServerOptimizer`] on the weighted mean delta; state persisted per round | m and v (two models) + one block per site |
//! | `median`, `trimmed_mean` | [`Median`], [`TrimmedMean`]: coordinate-wise, unweighted | one block per site |
//!
//! FedProx differs from FedAvg only at the sites (the proximal term μ in their loss); FedBN only in
//! what the model holds: the server's model and every upload carry the shared parameters alone
//! ([`server_model`]), each site keeps its normalisation layers.
//!
//! Common rules, tested for each strategy:
//! - updates arrive in site-id order and are combined in that order, so reruns are bit-identical;
//! - a site with zero training samples is left out (it has nothing to contribute, and a weight of
//!   zero would otherwise still count in an unweighted median); if every site has zero samples
//!   the round fails with [`StrategyError::ZeroSamples`], with no update at all
//!   [`StrategyError::NoUpdates`];
//! - `failures` (sites selected but lost) are already absent from `updates`: the rules combine the
//!   updates that arrived and do not reweight for the missing ones;
//! - on an error the round is not committed; a strategy's carried state (server optimizer) is then
//!   unspecified and the caller restores the last committed one with [`Strategy::restore_state`].
//!
//! The coordinate-wise rules need every site's update in the clear: they are refused with secure
//! aggregation (`fedhcc_core::aggregation::check_strategy`).

mod robust;
mod server_opt;

pub use robust::{Median, TrimmedMean};
pub use server_opt::{OptimizerRule, ServerOptimizer};

use fedhcc_core::aggregation::{LocalParameters, StrategyKind, check_strategy};
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::{Layout, ParameterSet, ParamsError};
use std::collections::BTreeMap;

/// Values read at a time per update by the block-wise strategies (32 KiB of f32 per site).
pub const BLOCK_VALUES: usize = 8192;

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
    /// Opens the update for reading in consecutive blocks of the caller's size, so that a
    /// strategy can walk several updates side by side holding one block of each.
    ///
    /// # Errors
    /// The update could not be opened or is not of `layout`.
    fn blocks(&mut self, layout: &Layout) -> Result<Box<dyn UpdateBlocks + '_>, StrategyError>;
}

/// An update being read block by block (see [`UpdateSource::blocks`]).
pub trait UpdateBlocks {
    /// Fills `out` with the next `out.len()` values.
    ///
    /// # Errors
    /// Unreadable, short or non-finite data.
    fn read_block(&mut self, out: &mut [f32]) -> Result<(), StrategyError>;
    /// Confirms that the whole update was read and nothing follows it.
    ///
    /// # Errors
    /// Values left or bytes beyond the end.
    fn finish(self: Box<Self>) -> Result<(), StrategyError>;
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
    /// The strategy's carried state (server optimizer moments) is missing or does not fit.
    #[error("server optimizer state: {0}")]
    State(String),
    /// The study's aggregation settings are not usable.
    #[error("{0}")]
    Config(String),
}

/// A server-side aggregation rule.
pub trait Strategy: Send {
    /// The name used in study files (`[federation] strategy`).
    fn name(&self) -> &'static str;
    /// The name with every setting that changes the result, e.g.
    /// `fedadam(lr=0.01, beta1=0.9, beta2=0.99, tau=0.001)`. The server records it with the run and
    /// refuses to resume a run under another description.
    fn describe(&self) -> String {
        self.name().to_string()
    }
    /// Folds the updates (given in a fixed site order) into the global model.
    ///
    /// # Errors
    /// An unreadable update, a degenerate weighting, or unusable carried state. The strategy's
    /// carried state is then unspecified until [`Strategy::restore_state`].
    fn aggregate(
        &mut self,
        global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError>;
    /// State carried from round to round, to be saved with each committed round (`None` for a
    /// stateless rule, and before the first round).
    fn state(&self) -> Option<&ParameterSet> {
        None
    }
    /// Replaces the carried state with the one saved with the last committed round
    /// (`committed_rounds` of them; `None` if that round saved none).
    ///
    /// # Errors
    /// A state that does not belong to this strategy or to that round.
    fn restore_state(&mut self, state: Option<ParameterSet>, committed_rounds: u32) -> Result<(), StrategyError> {
        let _ = committed_rounds;
        match state {
            None => Ok(()),
            Some(_) => Err(StrategyError::State(format!(
                "a saved state was found, but strategy '{}' keeps none; was the state folder made with \
                 another strategy?",
                self.name()
            ))),
        }
    }
}

/// The strategy a study names.
///
/// # Errors
/// Invalid aggregation settings ([`check_strategy`]).
pub fn from_study(study: &StudyConfig) -> Result<Box<dyn Strategy>, StrategyError> {
    let kind = check_strategy(study).map_err(StrategyError::Config)?;
    let f = &study.federation;
    Ok(match kind {
        StrategyKind::FedAvg => Box::new(FedAvg),
        StrategyKind::FedProx => Box::new(FedProx),
        StrategyKind::FedAdam => {
            Box::new(ServerOptimizer::new(OptimizerRule::Adam, f.server_optimizer.unwrap_or_default()))
        }
        StrategyKind::FedYogi => {
            Box::new(ServerOptimizer::new(OptimizerRule::Yogi, f.server_optimizer.unwrap_or_default()))
        }
        StrategyKind::FedBn => Box::new(FedBn {
            rule: LocalParameters::from_config(&f.fedbn.clone().unwrap_or_default()).map_err(StrategyError::Config)?,
        }),
        StrategyKind::Median => Box::new(Median),
        StrategyKind::TrimmedMean => Box::new(TrimmedMean::new(f.trimmed_mean.unwrap_or_default().trim_fraction)?),
    })
}

/// The part of the study's initial model that the server holds and the wire carries: all of it,
/// or under FedBN the shared parameters only (each site keeps its local layers).
///
/// # Errors
/// Invalid aggregation settings, or a FedBN rule that leaves nothing to share.
pub fn server_model(study: &StudyConfig, initial: ParameterSet) -> Result<ParameterSet, StrategyError> {
    let Some(rule) = LocalParameters::for_study(study).map_err(StrategyError::Config)? else {
        return Ok(initial);
    };
    let (shared, local) = rule.split(&initial)?;
    if shared.layout().specs().is_empty() {
        return Err(StrategyError::Config(format!(
            "federation.fedbn: every parameter of the model matches the local rule ({}); nothing would be shared",
            rule.describe()
        )));
    }
    if local.layout().specs().is_empty() {
        tracing::warn!(
            rule = %rule.describe(),
            "fedbn: no parameter of this model is local, so FedBN aggregates exactly as FedAvg"
        );
    } else {
        tracing::info!(
            local_tensors = local.layout().specs().len(),
            local_values = local.numel(),
            shared_values = shared.numel(),
            "fedbn: local layers stay at the sites; the server holds the shared parameters"
        );
    }
    Ok(shared)
}

/// The updates that count (those with samples), by index, and their total sample count.
pub(crate) fn contributing(updates: &[&mut dyn UpdateSource]) -> Result<(Vec<usize>, u64), StrategyError> {
    if updates.is_empty() {
        return Err(StrategyError::NoUpdates);
    }
    let idx: Vec<usize> = (0..updates.len()).filter(|&i| updates[i].samples() > 0).collect();
    if idx.is_empty() {
        return Err(StrategyError::ZeroSamples { site: "all sites".into() });
    }
    let total = idx.iter().map(|&i| updates[i].samples()).sum();
    Ok((idx, total))
}

/// Walks the chosen updates side by side, [`BLOCK_VALUES`] values at a time: `f(offset, rows)`
/// gets one slice per update (in the given order) for the values at `offset..offset + len`.
///
/// # Errors
/// Any update that cannot be read to its end.
pub(crate) fn for_each_block(
    updates: &mut [&mut dyn UpdateSource],
    chosen: &[usize],
    layout: &Layout,
    mut f: impl FnMut(usize, &[&[f32]]),
) -> Result<(), StrategyError> {
    let mut readers: Vec<Box<dyn UpdateBlocks + '_>> = Vec::with_capacity(chosen.len());
    for (i, u) in updates.iter_mut().enumerate() {
        if chosen.contains(&i) {
            readers.push(u.blocks(layout)?);
        }
    }
    let n = layout.numel();
    let mut bufs = vec![vec![0f32; BLOCK_VALUES.min(n)]; readers.len()];
    let mut off = 0;
    while off < n {
        let len = BLOCK_VALUES.min(n - off);
        for (r, b) in readers.iter_mut().zip(bufs.iter_mut()) {
            r.read_block(&mut b[..len])?;
        }
        let rows: Vec<&[f32]> = bufs.iter().map(|b| &b[..len]).collect();
        f(off, &rows);
        off += len;
    }
    for r in readers {
        r.finish()?;
    }
    Ok(())
}

fn finite(global: ParameterSet) -> Result<ParameterSet, StrategyError> {
    match global.check_finite() {
        Ok(()) => Ok(global),
        Err(e) => Err(StrategyError::Update { site: "aggregate".into(), message: e.to_string() }),
    }
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
        global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        weighted_mean(global, updates)
    }
}

fn weighted_mean(
    mut global: ParameterSet,
    updates: &mut [&mut dyn UpdateSource],
) -> Result<ParameterSet, StrategyError> {
    let (_, total) = contributing(updates)?;
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
    finite(global)
}

/// FedProx (Li et al. 2020): the sites add `μ/2 · ‖w − w_global‖²` to their loss
/// (`training.prox_mu`, sent with every train task); the server averages as [`FedAvg`].
#[derive(Debug, Default)]
pub struct FedProx;

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn aggregate(
        &mut self,
        global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        weighted_mean(global, updates)
    }
}

/// FedBN (Li et al., ICLR 2021): normalisation layers stay at each site. The server's model holds
/// only the shared parameters ([`server_model`]), so the updates carry nothing else and the rule
/// is [`FedAvg`] over them.
#[derive(Debug)]
pub struct FedBn {
    rule: LocalParameters,
}

impl FedBn {
    /// FedBN with the given rule for local parameters.
    pub fn new(rule: LocalParameters) -> Self {
        Self { rule }
    }
}

impl Strategy for FedBn {
    fn name(&self) -> &'static str {
        "fedbn"
    }

    fn describe(&self) -> String {
        format!("fedbn(local={})", self.rule.describe())
    }

    fn aggregate(
        &mut self,
        global: ParameterSet,
        updates: &mut [&mut dyn UpdateSource],
        _failures: &BTreeMap<String, String>,
    ) -> Result<ParameterSet, StrategyError> {
        weighted_mean(global, updates)
    }
}

/// An update held in memory (tests, small models).
pub struct MemoryUpdate {
    pub site: String,
    pub samples: u64,
    pub delta: ParameterSet,
}

impl MemoryUpdate {
    fn check_layout(&self, layout: &Layout) -> Result<(), StrategyError> {
        if self.delta.fingerprint() != layout.fingerprint() {
            return Err(StrategyError::Update {
                site: self.site.clone(),
                message: "layout differs from the global model".into(),
            });
        }
        Ok(())
    }
}

impl UpdateSource for MemoryUpdate {
    fn site(&self) -> &str {
        &self.site
    }
    fn samples(&self) -> u64 {
        self.samples
    }
    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError> {
        self.check_layout(layout)?;
        on_values(0, self.delta.values());
        Ok(())
    }
    fn blocks(&mut self, layout: &Layout) -> Result<Box<dyn UpdateBlocks + '_>, StrategyError> {
        self.check_layout(layout)?;
        Ok(Box::new(MemoryBlocks { site: &self.site, values: self.delta.values() }))
    }
}

struct MemoryBlocks<'a> {
    site: &'a str,
    values: &'a [f32],
}

impl UpdateBlocks for MemoryBlocks<'_> {
    fn read_block(&mut self, out: &mut [f32]) -> Result<(), StrategyError> {
        if out.len() > self.values.len() {
            return Err(StrategyError::Update { site: self.site.into(), message: "update ends early".into() });
        }
        let (head, rest) = self.values.split_at(out.len());
        out.copy_from_slice(head);
        self.values = rest;
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<(), StrategyError> {
        if self.values.is_empty() {
            Ok(())
        } else {
            Err(StrategyError::Update {
                site: self.site.into(),
                message: format!("{} values were left unread", self.values.len()),
            })
        }
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

    fn study(extra: &str) -> StudyConfig {
        toml::from_str(&format!("study_id = \"s\"\n[federation]\nrounds = 3\n{extra}")).unwrap()
    }

    #[test]
    fn fedprox_and_fedbn_average_like_fedavg_and_ignore_failures() {
        let global = ps(vec![1.0, 1.0, 1.0]);
        let mut failures = BTreeMap::new();
        failures.insert("c".to_string(), "deadline passed".to_string());
        let mut strategies: Vec<Box<dyn Strategy>> =
            vec![Box::new(FedAvg), Box::new(FedProx), Box::new(FedBn::new(LocalParameters::normalisation_layers()))];
        for s in &mut strategies {
            let mut a = MemoryUpdate { site: "a".into(), samples: 1, delta: ps(vec![3.0, 0.0, -3.0]) };
            let mut b = MemoryUpdate { site: "b".into(), samples: 3, delta: ps(vec![-1.0, 4.0, 1.0]) };
            let mut z = MemoryUpdate { site: "z".into(), samples: 0, delta: ps(vec![1e6, 1e6, 1e6]) };
            let out = s.aggregate(global.clone(), &mut [&mut a, &mut b, &mut z], &failures).unwrap();
            assert_eq!(out.values(), &[1.0, 4.0, 1.0], "{}", s.name());
            assert!(s.state().is_none());
            assert!(s.restore_state(Some(ps(vec![0.0])), 1).is_err(), "a stateless rule refuses a saved state");
        }
    }

    #[test]
    fn fedavg_refuses_an_update_of_another_layout_naming_the_site() {
        let mut a = MemoryUpdate { site: "a".into(), samples: 1, delta: ps(vec![1.0, 2.0]) };
        let e = FedAvg.aggregate(ps(vec![0.0, 0.0, 0.0]), &mut [&mut a], &BTreeMap::new()).unwrap_err();
        assert!(matches!(e, StrategyError::Update { ref site, .. } if site == "a"), "{e}");
    }

    #[test]
    fn from_study_builds_each_strategy_with_its_settings() {
        for (extra, want) in [
            ("", "fedavg"),
            ("strategy = \"fedavg\"\n", "fedavg"),
            ("strategy = \"fedprox\"\n[training]\nprox_mu = 0.1\n", "fedprox"),
            ("strategy = \"fedadam\"\n", "fedadam(lr=0.01, beta1=0.9, beta2=0.99, tau=0.001)"),
            (
                "strategy = \"fedyogi\"\n[federation.server_optimizer]\nlr = 0.5\n",
                "fedyogi(lr=0.5, beta1=0.9, beta2=0.99, tau=0.001)",
            ),
            ("strategy = \"fedbn\"\n", "fedbn(local=normalisation layers)"),
            ("strategy = \"fedbn\"\n[federation.fedbn]\nlocal_parameters = [\"*.gn.*\"]\n", "fedbn(local=[*.gn.*])"),
            ("strategy = \"median\"\n", "median"),
            ("strategy = \"trimmed_mean\"\n", "trimmed_mean(trim_fraction=0.1)"),
        ] {
            assert_eq!(from_study(&study(extra)).unwrap().describe(), want, "{extra}");
        }
        let e = from_study(&study("strategy = \"fedprox\"\n")).err().unwrap().to_string();
        assert!(e.contains("prox_mu"), "{e}");
        let e = from_study(&study("strategy = \"median\"\nsecure_aggregation = true\n")).err().unwrap().to_string();
        assert!(e.contains("secure aggregation"), "{e}");
    }

    #[test]
    fn server_model_keeps_only_shared_parameters_under_fedbn() {
        let full = ParameterSet::from_tensors(vec![
            ("conv.weight".into(), vec![2], vec![1.0, 2.0]),
            ("conv.bn.gamma".into(), vec![2], vec![3.0, 4.0]),
            ("head.bias".into(), vec![1], vec![5.0]),
        ])
        .unwrap();
        let shared = server_model(&study("strategy = \"fedbn\"\n"), full.clone()).unwrap();
        let names: Vec<&str> = shared.layout().specs().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["conv.weight", "head.bias"]);
        assert_eq!(shared.values(), &[1.0, 2.0, 5.0]);
        assert_eq!(server_model(&study(""), full.clone()).unwrap(), full, "other strategies keep the whole model");
        let all_local = study("strategy = \"fedbn\"\n[federation.fedbn]\nlocal_parameters = [\"*\"]\n");
        assert!(server_model(&all_local, full).unwrap_err().to_string().contains("nothing would be shared"));
    }
}
