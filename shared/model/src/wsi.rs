//! The WSI branch: gated-attention multiple-instance pooling (Ilse, Tomczak & Welling 2018) over
//! a slide's patch feature bag, the padded batch assembly of bags, and federated-ready feature
//! standardisation.
//!
//! Bags of one batch have different sizes: they are padded to the largest, and the attention
//! logits of padded patches are replaced by −10⁹ before the softmax, so their weight is exactly 0
//! in f32 (no infinities enter the arithmetic). Only patients with a slide enter the branch; their
//! embeddings are scattered back into the batch, and a patient without a slide gets a zero
//! embedding plus a "slide present" flag of 0 (the flag is part of the fusion input).

use burn::module::{Initializer, Module};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid, softmax, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fusion::{ParamInit, join};
use crate::mm_config::WsiConfig;

/// Attention logit given to padding: `exp(−10⁹ − max)` is 0 in f32.
const PAD_LOGIT: f32 = -1e9;

/// A slide's patch features, row-major `n × d`. Its `Debug` shows the shape only.
#[derive(Clone, PartialEq)]
pub struct PatchBag {
    /// Patches.
    pub n: usize,
    /// Features per patch.
    pub d: usize,
    /// `n · d` values, patch after patch.
    pub values: Vec<f32>,
}

impl std::fmt::Debug for PatchBag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchBag").field("n", &self.n).field("d", &self.d).finish_non_exhaustive()
    }
}

/// The gated-attention MIL encoder. Parameter names: `wsi.patch.*`, `wsi.attention_v.*`,
/// `wsi.attention_u.*`, `wsi.attention_w.*` (`weight`, `bias`).
#[derive(Module, Debug)]
pub(crate) struct WsiEncoder<B: Backend> {
    patch: Linear<B>,
    attention_v: Linear<B>,
    attention_u: Linear<B>,
    attention_w: Linear<B>,
}

impl<B: Backend> WsiEncoder<B> {
    /// An encoder with lazily initialised zero weights (a parameter set is loaded next).
    pub(crate) fn new(cfg: &WsiConfig, device: &B::Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_initializer(Initializer::Zeros).init(device);
        Self {
            patch: lin(cfg.features, cfg.hidden),
            attention_v: lin(cfg.hidden, cfg.attention),
            attention_u: lin(cfg.hidden, cfg.attention),
            attention_w: lin(cfg.attention, 1),
        }
    }

    /// Per-patch representations and attention weights.
    ///
    /// # Shapes
    /// `bags: [m, n, features]`, `pad: [m, n]` (true = padding) → `([m, n, hidden], [m, n])`; each
    /// row of the weights sums to 1 over its real patches and is 0 on padding.
    pub(crate) fn attend(&self, bags: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [m, n, _] = bags.dims();
        let h = relu(self.patch.forward(bags));
        let gate = tanh(self.attention_v.forward(h.clone())) * sigmoid(self.attention_u.forward(h.clone()));
        let logits = self.attention_w.forward(gate).reshape([m, n]).mask_fill(pad, PAD_LOGIT);
        (h, softmax(logits, 1))
    }

    /// Slide embeddings: the attention-weighted sums of the patch representations.
    ///
    /// # Shapes
    /// `bags: [m, n, features]`, `pad: [m, n]` → `[m, hidden]`.
    pub(crate) fn forward(&self, bags: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
        let (h, weights) = self.attend(bags, pad);
        let [m, n, hidden] = h.dims();
        weights.reshape([m, 1, n]).matmul(h).reshape([m, hidden])
    }
}

/// Names, shapes and initialisation of the WSI branch's tensors, in burn's visiting order.
/// `prefix` is the encoder's path in the model (`wsi`), or empty for the encoder alone.
pub(crate) fn wsi_params(cfg: &WsiConfig, prefix: &str) -> Vec<ParamInit> {
    let mut out = ParamInit::linear(&join(prefix, "patch"), cfg.features, cfg.hidden);
    out.extend(ParamInit::linear(&join(prefix, "attention_v"), cfg.hidden, cfg.attention));
    out.extend(ParamInit::linear(&join(prefix, "attention_u"), cfg.hidden, cfg.attention));
    out.extend(ParamInit::linear(&join(prefix, "attention_w"), cfg.attention, 1));
    out
}

/// The bags of one batch, padded: only the patients that have a slide.
#[derive(Debug)]
pub(crate) struct BagBatch {
    /// Position in the batch of each bag.
    pub(crate) rows: Vec<usize>,
    /// Patches per (padded) bag.
    pub(crate) n_max: usize,
    /// `rows.len() × n_max × d` values, padding zero.
    pub(crate) values: Vec<f32>,
    /// `rows.len() × n_max`, true on padding.
    pub(crate) pad: Vec<bool>,
}

/// Pads the bags of one batch (`None` = no slide). With `sample = Some((k, rng))` a bag of more
/// than `k` patches contributes `k` patches drawn without replacement (training); otherwise every
/// patch. Returns `None` when no patient of the batch has a slide.
pub(crate) fn assemble_bags(
    bags: &[Option<&PatchBag>],
    d: usize,
    mut sample: Option<(usize, &mut ChaCha8Rng)>,
) -> Option<BagBatch> {
    let chosen: Vec<(usize, Vec<usize>)> = bags
        .iter()
        .enumerate()
        .filter_map(|(row, bag)| {
            let bag = (*bag)?;
            let patches = match sample.as_mut() {
                Some((k, rng)) if bag.n > *k => {
                    let mut idx = rand::seq::index::sample(*rng, bag.n, *k).into_vec();
                    idx.sort_unstable();
                    idx
                }
                _ => (0..bag.n).collect(),
            };
            Some((row, patches))
        })
        .collect();
    let n_max = chosen.iter().map(|(_, p)| p.len()).max()?;
    let m = chosen.len();
    let mut values = vec![0.0; m * n_max * d];
    let mut pad = vec![true; m * n_max];
    for (j, (row, patches)) in chosen.iter().enumerate() {
        let Some(bag) = bags[*row] else { continue };
        for (slot, &p) in patches.iter().enumerate() {
            values[(j * n_max + slot) * d..][..d].copy_from_slice(&bag.values[p * d..][..d]);
            pad[j * n_max + slot] = false;
        }
    }
    Some(BagBatch { rows: chosen.into_iter().map(|(r, _)| r).collect(), n_max, values, pad })
}

/// Per-feature sums over patches, for standardising patch features with statistics pooled across
/// sites: each site sends its [`PatchFeatureMoments`] (counts and sums, never values), the server
/// [`merge`](Self::merge)s them, and every site applies the same [`standardize`](Self::standardize).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PatchFeatureMoments {
    /// Patches counted.
    pub count: u64,
    /// Per-feature sum.
    pub sum: Vec<f64>,
    /// Per-feature sum of squares.
    pub sum_sq: Vec<f64>,
}

impl PatchFeatureMoments {
    /// Adds every patch of `bag`.
    ///
    /// # Errors
    /// The bag's width differs from earlier bags, its buffer does not hold `n × d` values, or a
    /// value is not finite.
    pub fn add_bag(&mut self, bag: &PatchBag) -> Result<(), String> {
        if self.sum.is_empty() && self.count == 0 {
            self.sum = vec![0.0; bag.d];
            self.sum_sq = vec![0.0; bag.d];
        }
        if bag.d != self.sum.len() {
            return Err(format!("bag has {} features per patch, earlier bags {}", bag.d, self.sum.len()));
        }
        if Some(bag.values.len()) != bag.n.checked_mul(bag.d) {
            return Err(format!("bag holds {} values, not {} × {}", bag.values.len(), bag.n, bag.d));
        }
        if bag.values.iter().any(|v| !v.is_finite()) {
            return Err("bag holds a value that is not finite".into());
        }
        for patch in bag.values.chunks_exact(bag.d.max(1)) {
            for (k, &v) in patch.iter().enumerate() {
                self.sum[k] += f64::from(v);
                self.sum_sq[k] += f64::from(v) * f64::from(v);
            }
        }
        self.count += bag.n as u64;
        Ok(())
    }

    /// Pools another site's moments into these.
    ///
    /// # Errors
    /// The feature counts differ.
    pub fn merge(&mut self, other: &PatchFeatureMoments) -> Result<(), String> {
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        if other.sum.len() != self.sum.len() || other.sum_sq.len() != self.sum_sq.len() {
            return Err(format!("moments of {} and {} features cannot be merged", self.sum.len(), other.sum.len()));
        }
        self.count += other.count;
        self.sum.iter_mut().zip(&other.sum).for_each(|(a, b)| *a += b);
        self.sum_sq.iter_mut().zip(&other.sum_sq).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Per-feature mean and standard deviation (population; 1 where a feature is constant).
    pub fn mean_std(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.count.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std = self
            .sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / n - m * m).max(0.0);
                if var > 1e-12 { var.sqrt() } else { 1.0 }
            })
            .collect();
        (mean, std)
    }

    /// Standardises `bag` in place with these moments: `(x − mean) / std` per feature.
    ///
    /// # Errors
    /// The bag's width differs from the moments'.
    pub fn standardize(&self, bag: &mut PatchBag) -> Result<(), String> {
        if bag.d != self.sum.len() {
            return Err(format!("bag has {} features per patch but the statistics {}", bag.d, self.sum.len()));
        }
        let (mean, std) = self.mean_std();
        for patch in bag.values.chunks_exact_mut(bag.d.max(1)) {
            for (k, v) in patch.iter_mut().enumerate() {
                *v = ((f64::from(*v) - mean[k]) / std[k]) as f32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use rand::SeedableRng;

    use super::*;
    use crate::backend::{Dispatch, flex, read_f32};
    use crate::convert;
    use crate::fusion::init_tensors;

    fn bag(n: usize, d: usize, offset: f32) -> PatchBag {
        PatchBag { n, d, values: (0..n * d).map(|v| offset + v as f32).collect() }
    }

    #[test]
    fn padding_and_sampling() {
        let (a, b) = (bag(3, 2, 0.0), bag(5, 2, 100.0));
        let all = assemble_bags(&[Some(&a), None, Some(&b)], 2, None).unwrap();
        assert_eq!((all.rows.clone(), all.n_max), (vec![0, 2], 5));
        assert_eq!(all.pad, [[false; 3].as_slice(), &[true; 2], &[false; 5]].concat());
        assert_eq!(&all.values[..6], &a.values[..]);
        assert_eq!(&all.values[6..10], &[0.0; 4]);
        assert_eq!(&all.values[10..], &b.values[..]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let some = assemble_bags(&[Some(&a), Some(&b)], 2, Some((4, &mut rng))).unwrap();
        assert_eq!(some.n_max, 4);
        // The 3-patch bag is kept whole; the 5-patch bag gives 4 distinct patches, in order.
        let firsts: Vec<f32> = some.values[8..].chunks(2).map(|p| p[0]).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]) && firsts.iter().all(|v| (v - 100.0) % 2.0 == 0.0));
        let again = assemble_bags(&[Some(&a), Some(&b)], 2, Some((4, &mut ChaCha8Rng::seed_from_u64(3)))).unwrap();
        assert_eq!(again.values, some.values);
        assert!(assemble_bags(&[None, None], 2, None).is_none());
    }

    #[test]
    fn attention_ignores_padding_and_sums_to_one() {
        let cfg = WsiConfig { features: 3, hidden: 4, attention: 2, max_train_patches: 8 };
        let device = flex();
        let params = init_tensors(&wsi_params(&cfg, ""), 9).unwrap();
        let enc = convert::import(WsiEncoder::<Dispatch>::new(&cfg, &device), &params).unwrap();
        // Bag 0 has 2 real patches, bag 1 has 3; the padded slot of bag 0 holds large garbage.
        let values = vec![0.1, 0.2, 0.3, -0.4, 0.5, 0.6, 50.0, 50.0, 50.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let bags = Tensor::<Dispatch, 3>::from_data(TensorData::new(values.clone(), [2, 3, 3]), &device);
        let pad = Tensor::<Dispatch, 2, Bool>::from_data(
            TensorData::new(vec![false, false, true, false, false, false], [2, 3]),
            &device,
        );
        let (_, w) = enc.attend(bags.clone(), pad.clone());
        let w: Vec<f32> = read_f32(w).unwrap();
        assert_eq!(w[2], 0.0);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && (w[3] + w[4] + w[5] - 1.0).abs() < 1e-6);
        // The padded bag's embedding equals that of the same bag given alone, unpadded.
        let emb: Vec<f32> = read_f32(enc.forward(bags, pad)).unwrap();
        let alone = Tensor::<Dispatch, 3>::from_data(TensorData::new(values[..6].to_vec(), [1, 2, 3]), &device);
        let no_pad = Tensor::<Dispatch, 2, Bool>::from_data(TensorData::new(vec![false, false], [1, 2]), &device);
        let single: Vec<f32> = read_f32(enc.forward(alone, no_pad)).unwrap();
        for (a, b) in emb[..4].iter().zip(&single) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn pooled_moments_standardise_like_the_pooled_data() {
        let (a, b) = (bag(3, 2, 0.0), bag(2, 2, 10.0));
        let (mut site_a, mut site_b, mut pooled) =
            (PatchFeatureMoments::default(), PatchFeatureMoments::default(), PatchFeatureMoments::default());
        site_a.add_bag(&a).unwrap();
        site_b.add_bag(&b).unwrap();
        pooled.add_bag(&a).unwrap();
        pooled.add_bag(&b).unwrap();
        site_a.merge(&site_b).unwrap();
        assert_eq!(site_a, pooled);
        // Feature 0 takes 0, 2, 4, 10, 12: mean 5.6.
        let (mean, std) = pooled.mean_std();
        assert!((mean[0] - 5.6).abs() < 1e-12 && std[0] > 0.0);
        let mut c = a.clone();
        pooled.standardize(&mut c).unwrap();
        assert!((f64::from(c.values[0]) - (0.0 - 5.6) / std[0]).abs() < 1e-6);
        assert!(pooled.add_bag(&bag(1, 3, 0.0)).is_err());
        assert!(pooled.add_bag(&PatchBag { n: 1, d: 2, values: vec![f32::NAN, 0.0] }).is_err());
    }
}
