//! The clinical prediction model: a small MLP (or logistic regression) trained locally at a site.
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
//! - `net`: the burn module (internal).
//! - `convert`: module ⇄ [`ParameterSet`] through a `ModuleVisitor` / `ModuleMapper` (internal).
//! - `train`: [`train_local`] and [`evaluate`].
//! - `metrics`: [`auc`].

mod config;
mod convert;
mod error;
mod layout;
mod metrics;
mod net;
mod train;

pub use config::{BackendKind, ClinicalModelConfig, TrainParams};
pub use error::ModelError;
pub use layout::{init_params, model_layout};
pub use metrics::auc;
pub use train::{Dataset, EvalOutcome, TrainOutcome, evaluate, train_local};

/// Re-exported so callers can name the weights type without depending on `fedhcc-core` paths.
pub use fedhcc_core::params::ParameterSet;
