//! The multimodal network (MRI + clinical, + WSI for the postoperative model): branch embeddings
//! are concatenated, passed through the fusion MLP, and read by two linear heads — the
//! aggressive-recurrence logit and the Cox risk score. Also the parameter layout and seeded
//! initial weights, computed without burn.
//!
//! # Names (burn's visiting order)
//!
//! `mri.stages.{i}.conv.{weight,bias}`, `mri.stages.{i}.norm.{gamma,beta}`, `mri.embed.*`;
//! postop only: `wsi.patch.*`, `wsi.attention_v.*`, `wsi.attention_u.*`, `wsi.attention_w.*`;
//! `clinical.{i}.*`, `fusion.{i}.*`, `recurrence.*`, `risk.*` (`weight`, `bias`). Linear weights are
//! `[inputs, outputs]`, convolution weights `[out, in, 3, 3, 3]`.
//!
//! # Fusion input, in order
//!
//! MRI embedding (`mri.embed`), clinical branch output, then for postop the slide embedding
//! (`wsi.hidden`, zeros without a slide) and one "slide present" flag (1 or 0).

use burn::module::{Initializer, Module};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use fedhcc_core::params::{Layout, ParameterSet, TensorSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ModelError;
use crate::mm_config::{MultimodalConfig, block_layer_dims};
use crate::mri::{MriEncoder, mri_params};
use crate::wsi::{WsiEncoder, wsi_params};

/// How a tensor's initial values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    /// `U(−b, b)`.
    Uniform(f32),
    /// All ones (GroupNorm scale).
    Ones,
    /// All zeros (GroupNorm shift).
    Zeros,
}

impl Init {
    /// `U(±1/√fan_in)`: the bound of burn's and PyTorch's default `Linear` and `Conv` init.
    pub(crate) fn fan_in(fan_in: usize) -> Self {
        Init::Uniform(1.0 / (fan_in.max(1) as f32).sqrt())
    }
}

/// A tensor of the layout and how to initialise it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParamInit {
    pub(crate) spec: TensorSpec,
    pub(crate) init: Init,
}

impl ParamInit {
    /// `{prefix}.weight [inputs, outputs]` and `{prefix}.bias [outputs]`, both `U(±1/√inputs)`.
    pub(crate) fn linear(prefix: &str, inputs: usize, outputs: usize) -> Vec<ParamInit> {
        let init = Init::fan_in(inputs);
        vec![
            ParamInit { spec: TensorSpec { name: join(prefix, "weight"), shape: vec![inputs, outputs] }, init },
            ParamInit { spec: TensorSpec { name: join(prefix, "bias"), shape: vec![outputs] }, init },
        ]
    }
}

/// `prefix.name`, or `name` when the prefix is empty.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

/// Every tensor of the model `cfg` describes, in burn's visiting order.
pub(crate) fn multimodal_params(cfg: &MultimodalConfig) -> Vec<ParamInit> {
    let mut out = mri_params(&cfg.mri, "mri");
    if cfg.kind.uses_wsi() {
        out.extend(wsi_params(&cfg.wsi, "wsi"));
    }
    for (i, (d_in, d_out)) in block_layer_dims(&cfg.clinical.hidden, cfg.clinical_inputs).into_iter().enumerate() {
        out.extend(ParamInit::linear(&format!("clinical.{i}"), d_in, d_out));
    }
    for (i, (d_in, d_out)) in block_layer_dims(&cfg.fusion.hidden, cfg.fusion_inputs()).into_iter().enumerate() {
        out.extend(ParamInit::linear(&format!("fusion.{i}"), d_in, d_out));
    }
    out.extend(ParamInit::linear("recurrence", cfg.head_inputs(), 1));
    out.extend(ParamInit::linear("risk", cfg.head_inputs(), 1));
    out
}

/// Values for `params`, drawn in order from one `ChaCha8Rng` seeded with `seed`.
pub(crate) fn init_tensors(params: &[ParamInit], seed: u64) -> Result<ParameterSet, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = params
        .iter()
        .map(|p| {
            let n = p.spec.numel();
            let values = match p.init {
                Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..=b)).collect(),
                Init::Ones => vec![1.0; n],
                Init::Zeros => vec![0.0; n],
            };
            (p.spec.name.clone(), p.spec.shape.clone(), values)
        })
        .collect();
    ParameterSet::from_tensors(tensors).map_err(|e| ModelError::InvalidConfig(e.to_string()))
}

/// The layout (names, shapes, fingerprint) of the multimodal model `cfg` describes.
///
/// # Errors
/// [`ModelError::InvalidConfig`] when the config is invalid or the model exceeds the parameter
/// set limits.
pub fn multimodal_layout(cfg: &MultimodalConfig) -> Result<Layout, ModelError> {
    cfg.validate()?;
    Layout::new(multimodal_params(cfg).into_iter().map(|p| p.spec).collect())
        .map_err(|e| ModelError::InvalidConfig(e.to_string()))
}

/// Initial global weights of the multimodal model, deterministic in `seed` and the same on every
/// platform and backend.
///
/// Convolution and linear tensors are drawn from `U(±1/√fan_in)` (burn's and PyTorch's default
/// bound), GroupNorm scales are 1 and shifts 0; one `ChaCha8Rng` draws every tensor in layout
/// order.
///
/// # Errors
/// [`ModelError::InvalidConfig`] as [`multimodal_layout`].
pub fn init_multimodal_params(cfg: &MultimodalConfig, seed: u64) -> Result<ParameterSet, ModelError> {
    cfg.validate()?;
    init_tensors(&multimodal_params(cfg), seed)
}

/// The burn module. Field names give parameter names; renaming anything changes the layout.
#[derive(Module, Debug)]
pub(crate) struct MultimodalNet<B: Backend> {
    mri: MriEncoder<B>,
    wsi: Option<WsiEncoder<B>>,
    clinical: Vec<Linear<B>>,
    fusion: Vec<Linear<B>>,
    recurrence: Linear<B>,
    risk: Linear<B>,
    #[module(skip)]
    clinical_dropout: f64,
    #[module(skip)]
    fusion_dropout: f64,
    #[module(skip)]
    wsi_hidden: usize,
}

/// One batch, on the device.
pub(crate) struct NetInput<B: Backend> {
    /// `[batch, phases, depth, height, width]`, missing phases zero.
    pub(crate) crops: Tensor<B, 5>,
    /// `[batch, phases]`, 1 where the phase is present.
    pub(crate) presence: Tensor<B, 2>,
    /// `[batch, clinical_inputs]`.
    pub(crate) clinical: Tensor<B, 2>,
    /// Postop only.
    pub(crate) slides: Option<SlideInput<B>>,
}

/// Padded bags `[m, n, features]`, their padding mask `[m, n]` and the scatter matrix `[batch, m]`.
pub(crate) type PaddedBags<B> = (Tensor<B, 3>, Tensor<B, 2, Bool>, Tensor<B, 2>);

/// The slides of one batch.
pub(crate) struct SlideInput<B: Backend> {
    /// The padded bags of the patients with a slide: `[m, n, features]`, padding mask `[m, n]`,
    /// and the scatter matrix `[batch, m]` (1 where batch row `i` holds bag `j`). `None` when no
    /// patient of the batch has a slide.
    pub(crate) bags: Option<PaddedBags<B>>,
    /// `[batch, 1]`, 1 where the patient has a slide.
    pub(crate) present: Tensor<B, 2>,
}

/// The two heads' outputs, one value per patient.
pub(crate) struct NetOutput<B: Backend> {
    /// Aggressive-recurrence logit, `[batch]`.
    pub(crate) logit: Tensor<B, 1>,
    /// Cox risk score (log relative hazard), `[batch]`.
    pub(crate) risk: Tensor<B, 1>,
}

impl<B: Backend> MultimodalNet<B> {
    /// A model of the given shape on `device`, with lazily initialised zero weights: every caller
    /// loads a parameter set into it next, so burn's RNG is never consulted.
    pub(crate) fn new(cfg: &MultimodalConfig, device: &B::Device) -> Self {
        let linears = |dims: Vec<(usize, usize)>| -> Vec<Linear<B>> {
            dims.into_iter()
                .map(|(i, o)| LinearConfig::new(i, o).with_initializer(Initializer::Zeros).init(device))
                .collect()
        };
        let head = || LinearConfig::new(cfg.head_inputs(), 1).with_initializer(Initializer::Zeros).init(device);
        Self {
            mri: MriEncoder::new(&cfg.mri, device),
            wsi: cfg.kind.uses_wsi().then(|| WsiEncoder::new(&cfg.wsi, device)),
            clinical: linears(block_layer_dims(&cfg.clinical.hidden, cfg.clinical_inputs)),
            fusion: linears(block_layer_dims(&cfg.fusion.hidden, cfg.fusion_inputs())),
            recurrence: head(),
            risk: head(),
            clinical_dropout: cfg.clinical.dropout,
            fusion_dropout: cfg.fusion.dropout,
            wsi_hidden: cfg.wsi.hidden,
        }
    }

    /// Both heads for one batch. `dropout` (training only) draws the dropout masks.
    pub(crate) fn forward(&self, input: NetInput<B>, mut dropout: Option<&mut ChaCha8Rng>) -> NetOutput<B> {
        let [batch, _] = input.clinical.dims();
        let mut parts = vec![self.mri.forward(input.crops, input.presence)];
        let mut clinical = input.clinical;
        for layer in &self.clinical {
            clinical = relu(layer.forward(clinical));
            clinical = apply_dropout(clinical, self.clinical_dropout, dropout.as_deref_mut());
        }
        parts.push(clinical);
        if let (Some(wsi), Some(slides)) = (&self.wsi, input.slides) {
            let device = slides.present.device();
            let embedding = match slides.bags {
                Some((bags, pad, scatter)) => scatter.matmul(wsi.forward(bags, pad)),
                None => Tensor::zeros([batch, self.wsi_hidden], &device),
            };
            parts.push(embedding);
            parts.push(slides.present);
        }
        let mut h = Tensor::cat(parts, 1);
        for layer in &self.fusion {
            h = relu(layer.forward(h));
            h = apply_dropout(h, self.fusion_dropout, dropout.as_deref_mut());
        }
        NetOutput {
            logit: self.recurrence.forward(h.clone()).reshape([batch]),
            risk: self.risk.forward(h).reshape([batch]),
        }
    }
}

/// Inverted dropout with a mask drawn from `rng` (training only; `prob = 0` or no `rng` is the
/// identity). Masks come from a seeded `ChaCha8Rng`, never from burn's process-global RNG.
fn apply_dropout<B: Backend>(x: Tensor<B, 2>, prob: f64, rng: Option<&mut ChaCha8Rng>) -> Tensor<B, 2> {
    let Some(rng) = rng.filter(|_| prob > 0.0) else { return x };
    let [rows, cols] = x.dims();
    let keep = 1.0 - prob;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..rows * cols).map(|_| if rng.random::<f64>() < keep { scale } else { 0.0 }).collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [rows, cols]), &x.device());
    x * mask
}

/// A tiny configuration for fast debug-build tests: 2 phases × 8×16×16 crops, bags of 6 features.
#[cfg(test)]
pub(crate) fn tiny(kind: crate::mm_config::MultimodalKind) -> MultimodalConfig {
    let mut cfg = MultimodalConfig::new(kind, 4);
    cfg.mri.phases = 2;
    cfg.mri.crop = [8, 16, 16];
    cfg.mri.channels = vec![4, 8];
    cfg.mri.groups = 2;
    cfg.mri.embed = 8;
    cfg.wsi.features = 6;
    cfg.wsi.hidden = 8;
    cfg.wsi.attention = 4;
    cfg.wsi.max_train_patches = 4;
    cfg.clinical.hidden = vec![8];
    cfg.fusion.hidden = vec![16];
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Dispatch, autodiff, flex, read_f32};
    use crate::convert;
    use crate::mm_config::MultimodalKind;

    #[test]
    fn declared_layout_matches_burns_names_and_shapes() {
        for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
            for cfg in [tiny(kind), MultimodalConfig::new(kind, 20)] {
                let params = init_multimodal_params(&cfg, 1).unwrap();
                let net = convert::import(MultimodalNet::<Dispatch>::new(&cfg, &flex()), &params).unwrap();
                let exported = convert::export(&net).unwrap();
                assert_eq!(exported.layout(), &multimodal_layout(&cfg).unwrap(), "{kind}");
            }
        }
        let post = multimodal_layout(&MultimodalConfig::new(MultimodalKind::Postop, 20)).unwrap();
        let names: Vec<&str> = post.specs().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            &names[..4],
            ["mri.stages.0.conv.weight", "mri.stages.0.conv.bias", "mri.stages.0.norm.gamma", "mri.stages.0.norm.beta"]
        );
        assert!(names.contains(&"wsi.attention_w.weight") && names.ends_with(&["risk.weight", "risk.bias"]));
        assert_eq!(post.specs()[0].shape, vec![8, 5, 3, 3, 3]);
    }

    #[test]
    fn layout_depends_on_kind_and_widths_not_on_crop_size_or_training_options() {
        let base = multimodal_layout(&tiny(MultimodalKind::Preop)).unwrap().fingerprint();
        let mut other = tiny(MultimodalKind::Preop);
        other.mri.crop = [16, 32, 32];
        other.training.patience = 9;
        other.fusion.dropout = 0.4;
        assert_eq!(multimodal_layout(&other).unwrap().fingerprint(), base);
        assert_ne!(multimodal_layout(&tiny(MultimodalKind::Postop)).unwrap().fingerprint(), base);
        other.mri.phases = 3;
        assert_ne!(multimodal_layout(&other).unwrap().fingerprint(), base);
    }

    #[test]
    fn init_is_seeded_bounded_and_norms_start_at_identity() {
        let cfg = tiny(MultimodalKind::Postop);
        let (a, b, c) = (
            init_multimodal_params(&cfg, 7).unwrap(),
            init_multimodal_params(&cfg, 7).unwrap(),
            init_multimodal_params(&cfg, 8).unwrap(),
        );
        let bits = |p: &ParameterSet| p.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        assert!(a.get("mri.stages.1.norm.gamma").unwrap().iter().all(|&v| v == 1.0));
        assert!(a.get("mri.stages.1.norm.beta").unwrap().iter().all(|&v| v == 0.0));
        let bound = 1.0 / ((2 * 27) as f32).sqrt();
        assert!(a.get("mri.stages.0.conv.weight").unwrap().iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn round_trip_is_bit_exact_including_awkward_values() {
        for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
            let cfg = tiny(kind);
            let mut params = init_multimodal_params(&cfg, 3).unwrap();
            let awkward = [f32::MIN_POSITIVE, -0.0, 1e-45, f32::MAX, -f32::MAX, 0.1, 1.0 / 3.0];
            let n = params.numel();
            params.values_mut()[..awkward.len()].copy_from_slice(&awkward);
            params.values_mut()[n - awkward.len()..].copy_from_slice(&awkward);
            for device in [flex(), autodiff(flex())] {
                let back =
                    convert::export(&convert::import(MultimodalNet::<Dispatch>::new(&cfg, &device), &params).unwrap())
                        .unwrap();
                assert_eq!(back.fingerprint(), params.fingerprint());
                let bits = |p: &ParameterSet| p.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&back), bits(&params), "{kind}");
            }
        }
    }

    #[test]
    fn forward_gives_one_logit_and_one_risk_per_patient() {
        let device = flex();
        for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
            let cfg = tiny(kind);
            let net = convert::import(
                MultimodalNet::<Dispatch>::new(&cfg, &device),
                &init_multimodal_params(&cfg, 1).unwrap(),
            )
            .unwrap();
            let b = 3;
            let crops = Tensor::<Dispatch, 5>::ones([b, 2, 8, 16, 16], &device);
            let presence = Tensor::<Dispatch, 2>::ones([b, 2], &device);
            assert_eq!(net.mri.forward(crops.clone(), presence.clone()).dims(), [b, 8]);
            let slides = kind.uses_wsi().then(|| SlideInput {
                // Rows 0 and 2 have slides of (padded) 5 patches; row 1 has none.
                bags: Some((
                    Tensor::<Dispatch, 3>::ones([2, 5, 6], &device),
                    Tensor::<Dispatch, 2, Bool>::from_data(TensorData::new(vec![false; 10], [2, 5]), &device),
                    Tensor::<Dispatch, 2>::from_data(
                        TensorData::new(vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [b, 2]),
                        &device,
                    ),
                )),
                present: Tensor::<Dispatch, 2>::from_data(TensorData::new(vec![1.0, 0.0, 1.0], [b, 1]), &device),
            });
            let input = NetInput { crops, presence, clinical: Tensor::<Dispatch, 2>::zeros([b, 4], &device), slides };
            let out = net.forward(input, None);
            assert_eq!((out.logit.dims(), out.risk.dims()), ([b], [b]));
            let logits: Vec<f32> = read_f32(out.logit).unwrap();
            assert!(logits.iter().all(|v| v.is_finite()));
            if kind.uses_wsi() {
                // Same crop and clinical values: only the slide differs between rows.
                assert_eq!(logits[0].to_bits(), logits[2].to_bits());
                assert_ne!(logits[0].to_bits(), logits[1].to_bits());
            }
        }
    }
}
