//! The study's prediction models: the clinical MLP (or logistic regression) and the multimodal
//! preoperative / postoperative models (MRI + clinical, + WSI), trained locally at a site.
//!
//! # What this crate promises
//!
//! - Weights enter and leave only as [`ParameterSet`]s (named f32 tensors). No burn type appears in
//!   the public API: the server, the strategies and the client never see burn.
//! - The parameter layout (names, shapes, hence the fingerprint) depends only on the
//!   [`ClinicalModelConfig`]; [`model_layout`] computes it without touching burn.
//! - Training is deterministic on the CPU backends: the same global weights, data, config and
//!   [`TrainParams::seed`] give bit-identical weights. Shuffling and dropout masks come from
//!   `ChaCha8Rng` streams seeded by `seed`, never from burn's global RNG.
//!
//! # Names
//!
//! For `hidden = [32]` and `inputs = 4` the layout is `layers.0.weight [4, 32]`,
//! `layers.0.bias [32]`, `layers.1.weight [32, 1]`, `layers.1.bias [1]`. Weights are stored
//! `[inputs, outputs]` (burn's row layout), so `y = x · W + b`.
//!
//! # Code map
//!
//! - `config`: [`BackendKind`], [`ClinicalModelConfig`], [`TrainParams`] and their validation.
//! - `layout`: [`model_layout`] and [`init_params`] (pure Rust).
//! - `backend`: the one burn backend instantiated (`burn::Dispatch`, device chosen at run time)
//!   and reading tensors back (internal).
//! - `net`: the burn module (internal).
//! - `convert`: module ⇄ [`ParameterSet`] through a `ModuleVisitor` / `ModuleMapper` (internal).
//! - `train`: [`train_local`] and [`evaluate`].
//! - `metrics`: [`auc`].
//! - `torch`: [`torch_tensor`], the PyTorch name and shape of each tensor (`fedhcc export --layout
//!   torch`, burn-store's PyTorch adapter's mapping), and [`transpose`].
//!
//! # Multimodal models (`kind = "preop"` / `"postop"`)
//!
//! - `mm_config`: [`MultimodalConfig`] (built from a study's [`MultimodalSection`]), branch,
//!   loss and training options.
//! - `mri`, `wsi`, `fusion`: the 3D CNN, the gated-attention MIL pooling, the fusion MLP with the
//!   recurrence and Cox heads; [`multimodal_layout`] and [`init_multimodal_params`] (pure Rust).
//! - `cox`: the Cox partial likelihood (Breslow / Efron) on tensors and in f64, [`concordance_index`].
//! - `mm_data`: [`MultimodalSample`], [`MultimodalDataset`] and batch assembly.
//! - `multimodal`: [`train_multimodal`] and [`evaluate_multimodal`].
//! - `bench`: [`synthetic_multimodal_site`], [`conv_forward_flops`], [`conv3d_ceiling`] for the
//!   training benchmark.

mod backend;
mod bench;
mod config;
mod convert;
mod cox;
mod error;
mod fusion;
mod layout;
mod metrics;
mod mm_config;
mod mm_data;
mod mri;
mod multimodal;
mod net;
mod torch;
mod train;
mod wsi;

pub use bench::{
    ConvCeiling, SYNTHETIC_MAX_BAG, conv_forward_flops, conv_train_flops, conv3d_ceiling, synthetic_multimodal_site,
};
pub use config::{BackendKind, ClinicalModelConfig, TrainParams};
pub use error::ModelError;
pub use layout::{init_params, model_layout};
pub use metrics::auc;
pub use torch::{TorchTensor, torch_tensor, transpose};
pub use train::{Dataset, EvalOutcome, TrainOutcome, evaluate, train_local};

pub use cox::{Survival, concordance_index, cox_partial_nll};
pub use fusion::{init_multimodal_params, multimodal_layout};
pub use mm_config::{
    Activation, AugmentConfig, ClinicalBranchConfig, CoxTies, FusionConfig, LossConfig, LrSchedule, MriConfig,
    MultimodalConfig, MultimodalKind, MultimodalSection, MultimodalTrainConfig, WsiConfig,
};
pub use mm_data::{MultimodalDataset, MultimodalSample};
pub use multimodal::{
    BatchProgress, MultimodalEvalOutcome, MultimodalTrainOutcome, evaluate_multimodal, train_multimodal,
};
pub use wsi::{PatchBag, PatchFeatureMoments};

/// Re-exported so callers can name the weights type without depending on `fedhcc-core` paths.
pub use fedhcc_core::params::ParameterSet;
