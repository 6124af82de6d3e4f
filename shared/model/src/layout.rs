//! The parameter layout a config implies, and seeded initial weights — both without burn.

use fedhcc_core::params::{Layout, ParameterSet, TensorSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ClinicalModelConfig;
use crate::error::ModelError;

/// Names and shapes of the model's tensors, in the order burn visits them:
/// `layers.{i}.weight [in, out]`, then `layers.{i}.bias [out]`, for each linear layer `i`.
pub(crate) fn layout_specs(cfg: &ClinicalModelConfig) -> Vec<TensorSpec> {
    cfg.layer_dims()
        .into_iter()
        .enumerate()
        .flat_map(|(i, (d_in, d_out))| {
            [
                TensorSpec { name: format!("layers.{i}.weight"), shape: vec![d_in, d_out] },
                TensorSpec { name: format!("layers.{i}.bias"), shape: vec![d_out] },
            ]
        })
        .collect()
}

/// The layout (names, shapes, fingerprint) of the model `cfg` describes.
///
/// # Errors
/// [`ModelError::InvalidConfig`] when the config is invalid or the model exceeds the parameter
/// set limits.
pub fn model_layout(cfg: &ClinicalModelConfig) -> Result<Layout, ModelError> {
    cfg.validate()?;
    Layout::new(layout_specs(cfg)).map_err(|e| ModelError::InvalidConfig(e.to_string()))
}

/// Initial global weights, deterministic in `seed`.
///
/// Every tensor of layer `i` is drawn from `U(-1/√fan_in, 1/√fan_in)` — the bound burn's (and
/// PyTorch's) default `Linear` initialisation uses — from one `ChaCha8Rng` in layout order, so the
/// result is the same on every platform and backend.
///
/// # Panics
/// When the config describes more tensors or values than a [`ParameterSet`] may hold
/// (`fedhcc_core::params::MAX_PARAMS`), which no clinical config comes near; call
/// [`model_layout`] first to get that as an error.
pub fn init_params(cfg: &ClinicalModelConfig, seed: u64) -> ParameterSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = |n: usize, bound: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..=bound)).collect() };
    let mut tensors = Vec::new();
    for (spec_pair, (d_in, _)) in layout_specs(cfg).chunks(2).zip(cfg.layer_dims()) {
        let bound = 1.0 / (d_in.max(1) as f32).sqrt();
        for spec in spec_pair {
            tensors.push((spec.name.clone(), spec.shape.clone(), uniform(spec.numel(), bound)));
        }
    }
    match ParameterSet::from_tensors(tensors) {
        Ok(p) => p,
        Err(e) => panic!("model config exceeds parameter set limits: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClinicalModelConfig {
        ClinicalModelConfig { inputs: 4, hidden: vec![32], dropout: 0.0 }
    }

    #[test]
    fn layout_names_shapes_and_count_for_4_32_1() {
        let layout = model_layout(&cfg()).unwrap();
        let got: Vec<_> = layout.specs().iter().map(|s| (s.name.as_str(), s.shape.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("layers.0.weight", vec![4, 32]),
                ("layers.0.bias", vec![32]),
                ("layers.1.weight", vec![32, 1]),
                ("layers.1.bias", vec![1]),
            ]
        );
        assert_eq!(layout.numel(), 4 * 32 + 32 + 32 + 1);
    }

    #[test]
    fn layout_depends_only_on_the_config_shape() {
        let a = model_layout(&cfg()).unwrap().fingerprint();
        let b = model_layout(&ClinicalModelConfig { dropout: 0.3, ..cfg() }).unwrap().fingerprint();
        let c = model_layout(&ClinicalModelConfig { hidden: vec![16], ..cfg() }).unwrap().fingerprint();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn init_params_is_deterministic_per_seed_and_bounded() {
        let a = init_params(&cfg(), 7);
        let b = init_params(&cfg(), 7);
        let c = init_params(&cfg(), 8);
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        assert_eq!(a.fingerprint(), model_layout(&cfg()).unwrap().fingerprint());
        let w0 = a.get("layers.0.weight").unwrap();
        assert!(w0.iter().all(|v| v.abs() <= 0.5), "fan_in 4 gives bound 0.5");
        let b1 = a.get("layers.1.bias").unwrap();
        assert!(b1.iter().all(|v| v.abs() <= 1.0 / 32f32.sqrt()));
        assert!(a.check_finite().is_ok());
    }

    fn bits(p: &ParameterSet) -> Vec<u32> {
        p.values().iter().map(|v| v.to_bits()).collect()
    }
}
