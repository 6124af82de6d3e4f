//! Model and training configuration, and the runtime choice of compute backend.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which compute backend trains and evaluates the model. Chosen at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend (threads + SIMD); the fast CPU default.
    #[default]
    Flex,
    /// burn-ndarray, kept selectable for the design card; deprecated upstream and slower.
    Ndarray,
    /// The first CUDA device.
    #[cfg(feature = "cuda")]
    Cuda,
}

impl BackendKind {
    /// The backends compiled into this build, as they are spelled in configs.
    pub fn available() -> &'static [BackendKind] {
        &[
            BackendKind::Flex,
            BackendKind::Ndarray,
            #[cfg(feature = "cuda")]
            BackendKind::Cuda,
        ]
    }

    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        BackendKind::available().iter().copied().find(|b| b.as_str() == wanted).ok_or_else(|| {
            let available = BackendKind::available().iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ");
            let hint = if wanted == "cuda" { " — rebuild with `--features cuda`" } else { "" };
            ModelError::UnknownBackend { name: s.to_string(), available: format!("{available}{hint}") }
        })
    }
}

/// Shape of the clinical model: `inputs → hidden[0] → … → 1 logit`, ReLU between layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClinicalModelConfig {
    /// Number of features per row.
    pub inputs: usize,
    /// Width of each hidden layer, e.g. `[32]`; empty gives logistic regression.
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden ReLU, during training only; 0 turns it off.
    #[serde(default)]
    pub dropout: f64,
}

impl ClinicalModelConfig {
    /// Checks sizes and the dropout probability.
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.inputs == 0 {
            return Err(ModelError::InvalidConfig("inputs must be at least 1".into()));
        }
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            return Err(ModelError::InvalidConfig(format!("hidden[{i}] is 0; every hidden layer needs a width")));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(ModelError::InvalidConfig(format!("dropout {} is outside [0, 1)", self.dropout)));
        }
        Ok(())
    }

    /// `(inputs, outputs)` of each linear layer, in order; the last has one output.
    pub(crate) fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.inputs);
        widths.extend_from_slice(&self.hidden);
        widths.push(1);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }
}

/// How one site trains in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Passes over the local data.
    pub epochs: usize,
    /// Rows per optimizer step; clamped to the number of rows.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds shuffling and dropout.
    pub seed: u64,
    /// Weight of the positive class in the loss; `None` uses `n_neg / n_pos` of the local data
    /// (1 when the data hold only one class).
    pub pos_weight: Option<f64>,
    /// FedProx proximal coefficient μ: adds `μ/2 · ‖w − w_global‖²` to the loss; 0 turns it off.
    pub prox_mu: f64,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self { epochs: 5, batch_size: 32, lr: 1e-3, weight_decay: 1e-4, seed: 0, pos_weight: None, prox_mu: 0.0 }
    }
}

impl TrainParams {
    /// Checks that every number is usable.
    ///
    /// # Errors
    /// [`ModelError::InvalidTrainParams`] naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidTrainParams(msg));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be a positive number", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} must be a non-negative number", self.weight_decay));
        }
        if let Some(w) = self.pos_weight
            && !(w.is_finite() && w > 0.0)
        {
            return bad(format!("pos_weight {w} must be a positive number"));
        }
        if !(self.prox_mu.is_finite() && self.prox_mu >= 0.0) {
            return bad(format!("prox_mu {} must be a non-negative number", self.prox_mu));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip_and_default_is_flex() {
        assert_eq!(BackendKind::default(), BackendKind::Flex);
        for b in BackendKind::available() {
            assert_eq!(b.as_str().parse::<BackendKind>().unwrap(), *b);
        }
        assert_eq!(" NDArray ".parse::<BackendKind>().unwrap(), BackendKind::Ndarray);
        assert!(matches!("tpu".parse::<BackendKind>(), Err(ModelError::UnknownBackend { .. })));
    }

    #[test]
    fn layer_dims_chain_inputs_hidden_and_one_logit() {
        let cfg = ClinicalModelConfig { inputs: 4, hidden: vec![32, 8], dropout: 0.0 };
        assert_eq!(cfg.layer_dims(), vec![(4, 32), (32, 8), (8, 1)]);
        let lr = ClinicalModelConfig { inputs: 4, hidden: vec![], dropout: 0.0 };
        assert_eq!(lr.layer_dims(), vec![(4, 1)]);
    }

    #[test]
    fn rejects_unusable_configs_and_params() {
        let ok = ClinicalModelConfig { inputs: 4, hidden: vec![8], dropout: 0.2 };
        assert!(ok.validate().is_ok());
        assert!(ClinicalModelConfig { inputs: 0, ..ok.clone() }.validate().is_err());
        assert!(ClinicalModelConfig { hidden: vec![8, 0], ..ok.clone() }.validate().is_err());
        assert!(ClinicalModelConfig { dropout: 1.0, ..ok.clone() }.validate().is_err());
        assert!(TrainParams::default().validate().is_ok());
        assert!(TrainParams { lr: f64::NAN, ..TrainParams::default() }.validate().is_err());
        assert!(TrainParams { batch_size: 0, ..TrainParams::default() }.validate().is_err());
        assert!(TrainParams { pos_weight: Some(0.0), ..TrainParams::default() }.validate().is_err());
    }

    #[test]
    fn configs_deserialize_with_defaults_and_reject_unknown_fields() {
        let cfg: ClinicalModelConfig = serde_json::from_str(r#"{"inputs": 3, "hidden": []}"#).unwrap();
        assert_eq!(cfg.dropout, 0.0);
        let tp: TrainParams = serde_json::from_str(r#"{"epochs": 2, "pos_weight": 3.0}"#).unwrap();
        assert_eq!((tp.epochs, tp.pos_weight, tp.batch_size), (2, Some(3.0), 32));
        assert!(serde_json::from_str::<TrainParams>(r#"{"epoch": 2}"#).is_err());
        let b: BackendKind = serde_json::from_str(r#""ndarray""#).unwrap();
        assert_eq!(b, BackendKind::Ndarray);
    }
}
