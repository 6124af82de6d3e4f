//! The executors' side of federated standardisation (the protocol and the tensors are described
//! in `fedhcc_core::standardisation`).
//!
//! An executor keeps its inputs **unstandardised** (clinical rows built with
//! `FeatureStats::identity`, raw patch features) next to the standardised copy the model reads.
//! Whenever a task's global model carries other statistics than the ones applied, the copy is
//! redone from the raw inputs. A model without statistics (a fresh model outside a federated run)
//! is standardised with the site's own training-split statistics, as before the statistics
//! exchange existed.

use anyhow::{Result, bail};
use fedhcc_client::ExecutorError;
use fedhcc_cohort::FeatureStats;
use fedhcc_core::params::ParameterSet;
use fedhcc_core::standardisation::{self as st, GroupSums};
use fedhcc_model::PatchBag;

/// The clinical columns' group.
pub const CLINICAL: &str = "clinical";
/// The slide patch features' group (postoperative model).
pub const WSI: &str = "wsi";

/// The smallest cell a site reports: a clinical column observed for fewer training patients is
/// sent as "not observed", and slide features are summarised only over at least this many
/// patients' slides.
pub use fedhcc_core::standardisation::MIN_CELL;

/// A site's clinical sums, with small cells suppressed.
pub fn clinical_sums(stats: &FeatureStats) -> GroupSums {
    let mut g = GroupSums {
        group: CLINICAL.into(),
        columns: stats.columns.clone(),
        sum: stats.sum.clone(),
        sum_sq: stats.sum_sq.clone(),
        count: stats.count.clone(),
    };
    g.suppress_below(MIN_CELL);
    g
}

/// Sums of the patch features of `bags` (`d` features each), over every patch. Fewer than
/// [`MIN_CELL`] slides → every count is 0 (nothing reported).
///
/// # Errors
/// A bag of another width or holding a non-finite value.
pub fn bag_sums<'a>(bags: impl Iterator<Item = &'a PatchBag>, d: usize) -> Result<GroupSums> {
    let mut g = GroupSums::new(WSI, (0..d).map(|k| format!("feature_{k}")).collect());
    let mut slides = 0u64;
    for bag in bags.filter(|b| b.n > 0) {
        if bag.d != d || bag.values.len() != bag.n * d {
            bail!("slide features of {} values per patch where the model expects {d}", bag.d);
        }
        if bag.values.iter().any(|v| !v.is_finite()) {
            bail!("slide features hold a value that is not a finite number; rerun `fedhcc preprocess`");
        }
        for patch in bag.values.chunks_exact(d) {
            for (k, &v) in patch.iter().enumerate() {
                g.add(k, f64::from(v));
            }
        }
        slides += 1;
    }
    if slides < MIN_CELL {
        g.suppress_below(u64::MAX);
    }
    Ok(g)
}

/// `(mean, std)` to apply for `group`: the global model's when it carries them, else `local`'s.
pub fn resolve(global: &ParameterSet, group: &str, local: &GroupSums) -> (Vec<f32>, Vec<f32>) {
    st::read(global, group).unwrap_or_else(|| local.mean_std())
}

/// A standardised copy of a raw bag: `(x − mean) / std` per feature.
pub fn standardise_bag(raw: &PatchBag, mean: &[f32], std: &[f32]) -> PatchBag {
    let mut out = raw.clone();
    for patch in out.values.chunks_exact_mut(raw.d.max(1)) {
        for (k, v) in patch.iter_mut().enumerate() {
            *v = (*v - mean[k]) / std[k];
        }
    }
    out
}

/// `trained` (a model without standardisation tensors) with `global`'s tensors put back
/// unchanged: the update's delta there is exactly 0.
///
/// # Errors
/// A model that cannot be split or joined (not expected from valid ones).
pub fn with_frozen(trained: ParameterSet, global: &ParameterSet) -> Result<ParameterSet, ExecutorError> {
    let (_, frozen) = st::split(global).map_err(|e| ExecutorError(format!("model: {e}")))?;
    st::attach(trained, &frozen).map_err(|e| ExecutorError(format!("model: {e}")))
}

/// The trainable part of `global` (what the burn model is loaded from).
///
/// # Errors
/// A model that cannot be split (not expected from a valid one).
pub fn trainable(global: &ParameterSet) -> Result<ParameterSet, ExecutorError> {
    st::split(global).map(|(m, _)| m).map_err(|e| ExecutorError(format!("model: {e}")))
}
