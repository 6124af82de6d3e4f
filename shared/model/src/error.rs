//! Errors of this crate.

use crate::config::BackendKind;

/// Why training or evaluation could not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The given weights were made for a different model (another config or another version).
    #[error(
        "parameter layout {found} does not match this model's layout {expected}; \
         check that the server and the site use the same model configuration"
    )]
    LayoutMismatch {
        /// Short fingerprint of the layout the config describes.
        expected: String,
        /// Short fingerprint of the parameter set that was given.
        found: String,
    },
    /// The dataset has no rows.
    #[error("the dataset has no rows")]
    EmptyDataset,
    /// The dataset's feature count differs from the model's inputs.
    #[error("the dataset has {found} features per row but the model expects {expected}")]
    DimensionMismatch { expected: usize, found: usize },
    /// The dataset's buffers are inconsistent or hold invalid values.
    #[error("malformed dataset: {0}")]
    MalformedDataset(String),
    /// The cancel closure asked to stop.
    #[error("training was cancelled")]
    Cancelled,
    /// The training loss became NaN or infinite.
    #[error("training diverged: the loss is not finite in epoch {epoch}; lower the learning rate")]
    NonFiniteLoss {
        /// 1-based epoch in which the loss was first seen non-finite.
        epoch: usize,
    },
    /// The model configuration is not usable.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// The training parameters are not usable.
    #[error("invalid training parameters: {0}")]
    InvalidTrainParams(String),
    /// A backend name that this build does not know.
    #[error("unknown backend '{name}' (this build has: {available})")]
    UnknownBackend { name: String, available: String },
    /// The compute backend failed (for example, no CUDA device), or panicked.
    #[error("the {backend} backend failed: {message}")]
    Backend { backend: BackendKind, message: String },
}
