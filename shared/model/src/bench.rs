//! What the training benchmarks need (`fedhcc bench train`, the `multimodal_epoch` example): a
//! synthetic site of random tensors of the right shapes, the analytic convolution FLOP count of
//! the MRI branch, and a conv3d throughput ceiling measured on the same backend.

use std::time::Instant;

use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{Dispatch, autodiff, read_f32};
use crate::config::BackendKind;
use crate::cox::Survival;
use crate::error::ModelError;
use crate::mm_config::MultimodalConfig;
use crate::mm_data::{MultimodalDataset, MultimodalSample};
use crate::train::guarded;
use crate::wsi::PatchBag;

/// Largest synthetic slide bag (patches); bags hold 64 to this many.
pub const SYNTHETIC_MAX_BAG: usize = 512;

/// A synthetic site of `n` patients for `cfg`, deterministic from `seed`: random crops (shifted
/// by the label, so that training has something to learn), every eighth patient missing the last
/// phase, every tenth without a slide, bags of 64 to [`SYNTHETIC_MAX_BAG`] patches, random
/// clinical rows, labels (40 % positive) and survival times.
pub fn synthetic_multimodal_site(cfg: &MultimodalConfig, n: usize, seed: u64) -> MultimodalDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let phases = cfg.mri.phases;
    let samples = (0..n)
        .map(|i| {
            let label = rng.random_bool(0.4);
            let offset = if label { 0.3 } else { -0.3 };
            let crop = (0..cfg.mri.crop_len()).map(|_| offset + rng.random_range(-1.0f32..1.0)).collect();
            let patches = rng.random_range(64..=SYNTHETIC_MAX_BAG);
            let d = cfg.wsi.features;
            let bag = (cfg.kind.uses_wsi() && i % 10 != 0).then(|| PatchBag {
                n: patches,
                d,
                values: (0..patches * d).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            });
            MultimodalSample {
                id: format!("S{i:04}"),
                crop: Some(crop),
                phase_present: (0..phases).map(|p| p + 1 != phases || i % 8 != 0).collect(),
                bag,
                clinical: (0..cfg.clinical_inputs).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
                label: Some(label),
                survival: Some(Survival { time: rng.random_range(1.0..60.0), event: rng.random_bool(0.5) }),
            }
        })
        .collect();
    MultimodalDataset::new(samples)
}

/// Floating-point operations (2 per multiply-add) of the MRI branch's convolutions for one crop,
/// forward only: each stage is a 3×3×3, stride-2, padding-1 convolution.
pub fn conv_forward_flops(cfg: &MultimodalConfig) -> f64 {
    let mut size = cfg.mri.crop;
    let mut c_in = cfg.mri.phases;
    let mut flops = 0.0;
    for &c in &cfg.mri.channels {
        size = size.map(|s| s.div_ceil(2));
        flops += 2.0 * (size.iter().product::<usize>() * c * c_in * 27) as f64;
        c_in = c;
    }
    flops
}

/// Convolution FLOPs of one training step per crop: the forward convolution and the two
/// backward ones (input and weight gradients), `3 ×` [`conv_forward_flops`].
pub fn conv_train_flops(cfg: &MultimodalConfig) -> f64 {
    3.0 * conv_forward_flops(cfg)
}

/// A measured conv3d throughput.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvCeiling {
    /// Forward + backward FLOPs of one repetition.
    pub flops: f64,
    /// Best seconds of one repetition.
    pub seconds: f64,
    /// `flops / seconds / 1e9`.
    pub gflops: f64,
}

/// Measures the backend's conv3d throughput on one large convolution (batch 8, 16 → 32 channels,
/// 32³ voxels, 3×3×3, stride 1, padding 1), forward and backward (input and weight gradients):
/// one warm-up, then the best of `reps` repetitions. The ceiling the model's convolutions are
/// compared with.
///
/// # Errors
/// [`ModelError::Backend`] when the backend fails.
pub fn conv3d_ceiling(backend: BackendKind, reps: usize) -> Result<ConvCeiling, ModelError> {
    const B: usize = 8;
    const C_IN: usize = 16;
    const C_OUT: usize = 32;
    const S: usize = 32;
    guarded(backend, || {
        let device = autodiff(backend.device());
        let xs: Vec<f32> = (0..B * C_IN * S * S * S).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
        let ws: Vec<f32> = (0..C_OUT * C_IN * 27).map(|i| ((i % 31) as f32 - 15.0) / 150.0).collect();
        let flops = 3.0 * 2.0 * (B * S * S * S * C_OUT * C_IN * 27) as f64;
        let mut best = f64::INFINITY;
        for rep in 0..=reps.max(1) {
            let x = Tensor::<Dispatch, 5>::from_data(TensorData::new(xs.clone(), [B, C_IN, S, S, S]), &device)
                .require_grad();
            let w = Tensor::<Dispatch, 5>::from_data(TensorData::new(ws.clone(), [C_OUT, C_IN, 3, 3, 3]), &device)
                .require_grad();
            let t = Instant::now();
            let y = conv3d(x.clone(), w.clone(), None, ConvOptions::new([1; 3], [1; 3], [1; 3], 1));
            let grads = y.sum().backward();
            let gx = x.grad(&grads).map(|g| g.sum());
            let gw = w.grad(&grads).map(|g| g.sum());
            // Reading the results waits for the device.
            for g in [gx, gw].into_iter().flatten() {
                read_f32(g).map_err(|message| ModelError::Backend { backend, message })?;
            }
            if rep > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok(ConvCeiling { flops, seconds: best, gflops: flops / best / 1e9 })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm_config::MultimodalKind;

    #[test]
    fn flop_count_of_the_default_branch() {
        let cfg = MultimodalConfig::new(MultimodalKind::Preop, 20);
        // Stages 32×64×64 → 16×32×32 (5→8), 8×16×16 (8→16), 4×8×8 (16→32), 2×4×4 (32→64).
        let expected = 2.0 * 27.0 * (16384.0 * 40.0 + 2048.0 * 128.0 + 256.0 * 512.0 + 32.0 * 2048.0);
        assert_eq!(conv_forward_flops(&cfg), expected);
        assert_eq!(conv_train_flops(&cfg), 3.0 * expected);
    }

    #[test]
    fn synthetic_site_matches_the_config_and_is_seeded() {
        let mut cfg = MultimodalConfig::new(MultimodalKind::Postop, 6);
        cfg.mri.crop = [4, 8, 8];
        cfg.mri.channels = vec![4];
        let a = synthetic_multimodal_site(&cfg, 12, 3);
        a.validate(&cfg).unwrap();
        assert_eq!(a, synthetic_multimodal_site(&cfg, 12, 3));
        assert_ne!(a, synthetic_multimodal_site(&cfg, 12, 4));
        assert!(a.samples()[0].bag.is_none() && a.samples()[1].bag.is_some());
        assert!(!a.samples()[0].phase_present[4] && a.samples()[1].phase_present[4]);
        cfg.kind = MultimodalKind::Preop;
        assert!(synthetic_multimodal_site(&cfg, 3, 3).samples().iter().all(|s| s.bag.is_none()));
    }
}
