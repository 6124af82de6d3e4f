//! The MRI branch: a small 3D CNN over the multi-phase tumour crop, and the (CPU) assembly of a
//! batch of crops with phase masking and augmentation.
//!
//! A missing phase is masked, never invented: its channel is written as zeros (the crops are
//! z-scored per phase, so zero is the phase mean) and the per-phase presence flags are
//! concatenated to the pooled CNN features that enter the embedding layer, so the network knows
//! which zeros are absent phases.
//!
//! GroupNorm removes a crop's overall intensity level (the tumour's enhancement relative to the
//! z-scored volume), which is informative; the per-phase mean of the crop is therefore also
//! concatenated to the embedding input. Embedding input, in order: pooled CNN features
//! (`channels.last`), per-phase crop means (`phases`, 0 for a missing phase), presence flags
//! (`phases`).

use burn::module::{Initializer, Module};
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig3d};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, relu};
use burn::tensor::backend::Backend;
use fedhcc_core::params::TensorSpec;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::fusion::{Init, ParamInit, join};
use crate::mm_config::{Activation, AugmentConfig, MriConfig};

/// Kernel size of every convolution.
const KERNEL: usize = 3;

/// `Conv3d(3×3×3, stride 2, padding 1) → GroupNorm`; the activation is applied by the encoder.
#[derive(Module, Debug)]
pub(crate) struct ConvBlock<B: Backend> {
    conv: Conv3d<B>,
    norm: GroupNorm<B>,
}

/// The MRI encoder. Field names give parameter names: `mri.stages.{i}.conv.weight`,
/// `mri.stages.{i}.conv.bias`, `mri.stages.{i}.norm.gamma`, `mri.stages.{i}.norm.beta`,
/// `mri.embed.weight`, `mri.embed.bias`. The stages' output is average-pooled over all voxels
/// (a global average pool; it has no parameters).
#[derive(Module, Debug)]
pub(crate) struct MriEncoder<B: Backend> {
    stages: Vec<ConvBlock<B>>,
    embed: Linear<B>,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> MriEncoder<B> {
    /// An encoder with lazily initialised zero weights (a parameter set is loaded next).
    pub(crate) fn new(cfg: &MriConfig, device: &B::Device) -> Self {
        let mut c_in = cfg.phases;
        let stages = cfg
            .channels
            .iter()
            .map(|&c| {
                let conv = Conv3dConfig::new([c_in, c], [KERNEL; 3])
                    .with_stride([2; 3])
                    .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                    .with_initializer(Initializer::Zeros)
                    .init(device);
                let norm = GroupNormConfig::new(cfg.groups, c).init(device);
                c_in = c;
                ConvBlock { conv, norm }
            })
            .collect();
        let embed =
            LinearConfig::new(c_in + 2 * cfg.phases, cfg.embed).with_initializer(Initializer::Zeros).init(device);
        Self { stages, embed, activation: cfg.activation }
    }

    fn act<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.activation {
            Activation::Relu => relu(x),
            Activation::Gelu => gelu(x),
        }
    }

    /// The MRI embedding.
    ///
    /// # Shapes
    /// `crops: [batch, phases, depth, height, width]` (missing phases already zero),
    /// `presence: [batch, phases]` (1 present, 0 missing) → `[batch, embed]`.
    pub(crate) fn forward(&self, crops: Tensor<B, 5>, presence: Tensor<B, 2>) -> Tensor<B, 2> {
        let [batch, phases, d, h, w] = crops.dims();
        let means = crops.clone().reshape([batch, phases, d * h * w]).mean_dim(2).reshape([batch, phases]);
        let mut h = crops;
        for stage in &self.stages {
            h = self.act(stage.norm.forward(stage.conv.forward(h)));
        }
        // Global average pool: the mean over every voxel of each channel.
        let [_, channels, pd, ph, pw] = h.dims();
        let pooled = h.reshape([batch, channels, pd * ph * pw]).mean_dim(2).reshape([batch, channels]);
        self.act(self.embed.forward(Tensor::cat(vec![pooled, means, presence], 1)))
    }
}

/// Names, shapes and initialisation of the MRI branch's tensors, in burn's visiting order.
/// `prefix` is the encoder's path in the model (`mri`), or empty for the encoder alone.
pub(crate) fn mri_params(cfg: &MriConfig, prefix: &str) -> Vec<ParamInit> {
    let mut out = Vec::new();
    let mut c_in = cfg.phases;
    for (i, &c) in cfg.channels.iter().enumerate() {
        let fan_in = c_in * KERNEL.pow(3);
        let p = |name: &str, shape: Vec<usize>, init| ParamInit {
            spec: TensorSpec { name: join(prefix, &format!("stages.{i}.{name}")), shape },
            init,
        };
        out.push(p("conv.weight", vec![c, c_in, KERNEL, KERNEL, KERNEL], Init::fan_in(fan_in)));
        out.push(p("conv.bias", vec![c], Init::fan_in(fan_in)));
        out.push(p("norm.gamma", vec![c], Init::Ones));
        out.push(p("norm.beta", vec![c], Init::Zeros));
        c_in = c;
    }
    out.extend(ParamInit::linear(&join(prefix, "embed"), c_in + 2 * cfg.phases, cfg.embed));
    out
}

/// One crop's random augmentation: flips along y (height) and x (width), and per-phase intensity
/// scale and shift.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CropAugment {
    flip_y: bool,
    flip_x: bool,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl CropAugment {
    /// Draws one crop's augmentation from `rng`; the number of draws does not depend on which
    /// phases are present.
    pub(crate) fn draw(cfg: &AugmentConfig, phases: usize, rng: &mut ChaCha8Rng) -> Self {
        let flip_y = rng.random::<bool>() && cfg.flip;
        let flip_x = rng.random::<bool>() && cfg.flip;
        let (mut scale, mut shift) = (Vec::with_capacity(phases), Vec::with_capacity(phases));
        for _ in 0..phases {
            let s: f64 = rng.random_range(-1.0..=1.0);
            let b: f64 = rng.random_range(-1.0..=1.0);
            scale.push((1.0 + s * cfg.intensity_scale) as f32);
            shift.push((b * cfg.intensity_shift) as f32);
        }
        Self { flip_y, flip_x, scale, shift }
    }
}

/// Writes one crop into `dst` (`phases × depth × height × width`, zero-filled by the caller):
/// present phases are copied (flipped, scaled and shifted when `augment` is given), missing phases
/// are left at zero.
pub(crate) fn write_crop(
    dst: &mut [f32],
    src: &[f32],
    present: &[bool],
    [depth, height, width]: [usize; 3],
    augment: Option<&CropAugment>,
) {
    let voxels = depth * height * width;
    for (p, &is_present) in present.iter().enumerate() {
        if !is_present {
            continue;
        }
        let (src_p, dst_p) = (&src[p * voxels..(p + 1) * voxels], &mut dst[p * voxels..(p + 1) * voxels]);
        let Some(aug) = augment else {
            dst_p.copy_from_slice(src_p);
            continue;
        };
        let (scale, shift) = (aug.scale[p], aug.shift[p]);
        for z in 0..depth {
            for y in 0..height {
                let sy = if aug.flip_y { height - 1 - y } else { y };
                let from = &src_p[(z * height + sy) * width..][..width];
                let to = &mut dst_p[(z * height + y) * width..][..width];
                if aug.flip_x {
                    for (t, f) in to.iter_mut().zip(from.iter().rev()) {
                        *t = f * scale + shift;
                    }
                } else {
                    for (t, f) in to.iter_mut().zip(from) {
                        *t = f * scale + shift;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn flips_reverse_rows_and_columns_and_missing_phases_stay_zero() {
        // 2 phases × 1 × 2 × 3, values = index.
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut dst = vec![0.0; 12];
        let aug = CropAugment { flip_y: true, flip_x: true, scale: vec![2.0, 1.0], shift: vec![1.0, 0.0] };
        write_crop(&mut dst, &src, &[true, false], [1, 2, 3], Some(&aug));
        // Phase 0 rows [0 1 2] [3 4 5] → flipped [5 4 3] [2 1 0], then ×2 + 1.
        assert_eq!(&dst[..6], &[11.0, 9.0, 7.0, 5.0, 3.0, 1.0]);
        assert_eq!(&dst[6..], &[0.0; 6]);
        let mut plain = vec![0.0; 12];
        write_crop(&mut plain, &src, &[false, true], [1, 2, 3], None);
        assert_eq!(&plain[..6], &[0.0; 6]);
        assert_eq!(&plain[6..], &src[6..]);
    }

    #[test]
    fn augmentation_draws_are_seeded_and_bounded() {
        let cfg = AugmentConfig { flip: false, intensity_scale: 0.1, intensity_shift: 0.2 };
        let a = CropAugment::draw(&cfg, 3, &mut ChaCha8Rng::seed_from_u64(5));
        let b = CropAugment::draw(&cfg, 3, &mut ChaCha8Rng::seed_from_u64(5));
        assert_eq!(a, b);
        assert!(!a.flip_x && !a.flip_y);
        assert!(a.scale.iter().all(|s| (0.9..=1.1).contains(s)));
        assert!(a.shift.iter().all(|s| (-0.2..=0.2).contains(s)));
    }
}
