//! Configuration of the multimodal models (`kind = "preop"` and `kind = "postop"`).
//!
//! [`MultimodalSection`] is what a study's `[model]` table holds besides `kind` (every field has a
//! default, unknown keys are refused); [`MultimodalConfig`] adds the model kind and the clinical
//! design-matrix width, which the cohort specification determines.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which multimodal model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MultimodalKind {
    /// Preoperative model: MRI + preoperative clinical columns.
    Preop,
    /// Postoperative model: MRI + whole-slide image + clinical columns (pathology included).
    Postop,
}

impl MultimodalKind {
    /// The name used in configs (`preop`, `postop`).
    pub fn as_str(self) -> &'static str {
        match self {
            MultimodalKind::Preop => "preop",
            MultimodalKind::Postop => "postop",
        }
    }

    /// Whether the model has a whole-slide-image branch.
    pub fn uses_wsi(self) -> bool {
        self == MultimodalKind::Postop
    }
}

impl fmt::Display for MultimodalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Non-linearity of the MRI branch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, x)`.
    #[default]
    Relu,
    /// Gaussian error linear unit (exact, erf-based).
    Gelu,
}

/// MRI branch: a small 3D CNN over the multi-phase tumour crop.
///
/// Each entry of `channels` is one stage `Conv3d(3×3×3, stride 2, padding 1) → GroupNorm(groups) →
/// activation`; global average pooling (the mean over every voxel of each channel) follows, then
/// `Linear(channels.last + 2·phases → embed) → activation` over the pooled features, the per-phase
/// crop means and the per-phase presence flags; a missing phase's channel is zeroed (mean 0, flag 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MriConfig {
    /// MRI phases (input channels), in the order the preprocessing writes them.
    pub phases: usize,
    /// Crop size `[depth, height, width]` in voxels. It does not change the parameter layout
    /// (global pooling), but every crop must have it.
    pub crop: [usize; 3],
    /// Output channels of each stride-2 stage.
    pub channels: Vec<usize>,
    /// GroupNorm groups; must divide every entry of `channels`.
    pub groups: usize,
    /// Embedding width.
    pub embed: usize,
    /// Non-linearity after each normalisation and after the embedding.
    pub activation: Activation,
}

impl Default for MriConfig {
    fn default() -> Self {
        Self {
            phases: 5,
            crop: [32, 64, 64],
            channels: vec![8, 16, 32, 64],
            groups: 4,
            embed: 64,
            activation: Activation::Relu,
        }
    }
}

impl MriConfig {
    /// Values per phase (`depth · height · width`).
    pub fn voxels(&self) -> usize {
        self.crop.iter().product()
    }

    /// Values per crop (`phases · depth · height · width`).
    pub fn crop_len(&self) -> usize {
        self.phases * self.voxels()
    }
}

/// WSI branch: gated-attention multiple-instance pooling (Ilse et al. 2018) over a slide's patch
/// feature bag.
///
/// `h = ReLU(W_p x + b_p)` per patch (`features → hidden`); attention logit
/// `a = w^T (tanh(V h) ⊙ sigmoid(U h))` (`V`, `U`: `hidden → attention`); softmax over the patches of
/// one bag; the embedding is the attention-weighted sum of `h` (`hidden` wide).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsiConfig {
    /// Features per patch.
    pub features: usize,
    /// Width of the per-patch representation and of the slide embedding.
    pub hidden: usize,
    /// Width of the attention network.
    pub attention: usize,
    /// Patches drawn (without replacement, from the training seed) per slide per training step;
    /// evaluation uses every patch.
    pub max_train_patches: usize,
}

impl Default for WsiConfig {
    fn default() -> Self {
        Self { features: 35, hidden: 64, attention: 32, max_train_patches: 64 }
    }
}

/// Clinical branch: `Linear → ReLU (→ dropout)` per hidden width over the design matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClinicalBranchConfig {
    /// Width of each hidden layer; empty passes the design matrix to the fusion unchanged.
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden ReLU, during training only; 0 turns it off.
    pub dropout: f64,
}

impl Default for ClinicalBranchConfig {
    fn default() -> Self {
        Self { hidden: vec![32], dropout: 0.0 }
    }
}

/// Fusion MLP over the concatenated branch embeddings: `Linear → ReLU (→ dropout)` per hidden
/// width, then the two heads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FusionConfig {
    /// Width of each hidden layer; empty puts the heads directly on the concatenation.
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden ReLU, during training only; 0 turns it off.
    pub dropout: f64,
}

impl Default for FusionConfig {
    fn default() -> Self {
        Self { hidden: vec![64], dropout: 0.1 }
    }
}

/// Output width of an MLP block given its input width.
pub(crate) fn block_out_width(hidden: &[usize], inputs: usize) -> usize {
    hidden.last().copied().unwrap_or(inputs)
}

/// `(inputs, outputs)` of each linear layer of an MLP block.
pub(crate) fn block_layer_dims(hidden: &[usize], inputs: usize) -> Vec<(usize, usize)> {
    let mut widths = vec![inputs];
    widths.extend_from_slice(hidden);
    widths.windows(2).map(|w| (w[0], w[1])).collect()
}

fn validate_block(hidden: &[usize], dropout: f64, what: &str) -> Result<(), ModelError> {
    if let Some(i) = hidden.iter().position(|&h| h == 0) {
        return Err(invalid(format!("{what}.hidden[{i}] is 0; every hidden layer needs a width")));
    }
    if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
        return Err(invalid(format!("{what}.dropout {dropout} is outside [0, 1)")));
    }
    Ok(())
}

/// How tied event times enter the Cox partial likelihood.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoxTies {
    /// Every tied event sees the full risk set.
    Breslow,
    /// Efron's approximation: the tied events leave the risk set in equal fractions.
    #[default]
    Efron,
}

/// The training objective: `bce_weight · BCE + cox_weight · Cox`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of the aggressive-recurrence BCE (positive class weighted by
    /// `TrainParams::pos_weight`, or `n_neg / n_pos` of the labelled training patients).
    pub bce_weight: f64,
    /// Weight of the Cox negative partial log-likelihood (averaged per event).
    pub cox_weight: f64,
    /// Tie handling of the Cox term.
    pub ties: CoxTies,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { bce_weight: 1.0, cox_weight: 1.0, ties: CoxTies::Efron }
    }
}

/// Learning-rate schedule over one local training (all its epochs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `TrainParams::lr` throughout.
    Constant,
    /// Cosine decay per step from `lr` to `lr · min_lr_frac`.
    #[default]
    Cosine,
    /// `lr · step_gamma^(completed_epochs / step_epochs)`.
    Step,
}

/// Augmentation of the MRI crop during training (never during evaluation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random flips along x (width) and y (height), each with probability ½, the same for all
    /// phases of a crop.
    pub flip: bool,
    /// Each present phase is multiplied by a factor drawn from `[1 − s, 1 + s]`.
    pub intensity_scale: f64,
    /// Each present phase is shifted by a value drawn from `[−b, b]` (the crops are z-scored).
    pub intensity_shift: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { flip: true, intensity_scale: 0.1, intensity_shift: 0.1 }
    }
}

/// Local-training options that do not change the parameter layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalTrainConfig {
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Final learning rate of the cosine schedule, as a fraction of `lr`.
    pub min_lr_frac: f64,
    /// Epochs between decays of the step schedule.
    pub step_epochs: usize,
    /// Factor of each decay of the step schedule.
    pub step_gamma: f64,
    /// Early stopping: stop after this many epochs without improvement of the validation loss and
    /// return the best epoch's weights. Needs a validation set; 0 turns it off.
    pub patience: usize,
    /// MRI augmentation.
    pub augment: AugmentConfig,
}

impl Default for MultimodalTrainConfig {
    fn default() -> Self {
        Self {
            schedule: LrSchedule::Cosine,
            min_lr_frac: 0.1,
            step_epochs: 1,
            step_gamma: 0.5,
            patience: 3,
            augment: AugmentConfig::default(),
        }
    }
}

impl MultimodalTrainConfig {
    /// Learning rate of step `step` (0-based) of `total_steps`, in epoch `epoch` (0-based).
    pub(crate) fn lr_at(&self, base: f64, step: usize, total_steps: usize, epoch: usize) -> f64 {
        match self.schedule {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let min = base * self.min_lr_frac;
                let progress = step as f64 / total_steps.max(1) as f64;
                min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Step => {
                let decays = (epoch / self.step_epochs.max(1)) as i32;
                base * self.step_gamma.powi(decays)
            }
        }
    }
}

/// The `[model]` table of a study for `kind = "preop"` or `"postop"`, without `kind`.
///
/// ```toml
/// [model]
/// kind = "postop"
/// [model.mri]
/// phases = 5
/// channels = [8, 16, 32, 64]
/// [model.wsi]
/// max_train_patches = 64
/// [model.loss]
/// ties = "breslow"
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalSection {
    /// MRI branch.
    pub mri: MriConfig,
    /// WSI branch (postoperative model only; ignored for `preop`).
    pub wsi: WsiConfig,
    /// Clinical branch over the design matrix.
    pub clinical: ClinicalBranchConfig,
    /// Fusion MLP after concatenating the branch embeddings.
    pub fusion: FusionConfig,
    /// Loss weights and Cox ties.
    pub loss: LossConfig,
    /// Schedule, early stopping, augmentation.
    pub training: MultimodalTrainConfig,
}

impl MultimodalSection {
    /// The full model configuration for `kind` with `clinical_inputs` design-matrix columns.
    pub fn into_config(self, kind: MultimodalKind, clinical_inputs: usize) -> MultimodalConfig {
        let MultimodalSection { mri, wsi, clinical, fusion, loss, training } = self;
        MultimodalConfig { kind, clinical_inputs, mri, wsi, clinical, fusion, loss, training }
    }
}

/// Everything the multimodal model code needs: architecture, loss and local-training options.
///
/// The parameter layout depends on `kind`, `clinical_inputs`, `mri.phases`, `mri.channels`,
/// `mri.embed`, the `wsi` widths (postop), and the `clinical` and `fusion` hidden widths.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultimodalConfig {
    /// Preoperative or postoperative.
    pub kind: MultimodalKind,
    /// Columns of the clinical design matrix.
    pub clinical_inputs: usize,
    /// MRI branch.
    #[serde(default)]
    pub mri: MriConfig,
    /// WSI branch (used when `kind` is `postop`).
    #[serde(default)]
    pub wsi: WsiConfig,
    /// Clinical branch.
    #[serde(default)]
    pub clinical: ClinicalBranchConfig,
    /// Fusion MLP.
    #[serde(default)]
    pub fusion: FusionConfig,
    /// Loss weights and Cox ties.
    #[serde(default)]
    pub loss: LossConfig,
    /// Schedule, early stopping, augmentation.
    #[serde(default)]
    pub training: MultimodalTrainConfig,
}

impl MultimodalConfig {
    /// The default configuration of `kind` with `clinical_inputs` design-matrix columns.
    pub fn new(kind: MultimodalKind, clinical_inputs: usize) -> Self {
        MultimodalSection::default().into_config(kind, clinical_inputs)
    }

    /// Width of the clinical branch's output.
    pub(crate) fn clinical_width(&self) -> usize {
        block_out_width(&self.clinical.hidden, self.clinical_inputs)
    }

    /// Width of the concatenated branch embeddings: MRI, clinical, then (postop) WSI embedding and
    /// the slide-present flag.
    pub(crate) fn fusion_inputs(&self) -> usize {
        let wsi = if self.kind.uses_wsi() { self.wsi.hidden + 1 } else { 0 };
        self.mri.embed + self.clinical_width() + wsi
    }

    /// Width entering the two heads.
    pub(crate) fn head_inputs(&self) -> usize {
        block_out_width(&self.fusion.hidden, self.fusion_inputs())
    }

    /// Checks every size, probability, weight and schedule value.
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.clinical_inputs == 0 {
            return Err(invalid("clinical_inputs must be at least 1".into()));
        }
        let m = &self.mri;
        if m.phases == 0 {
            return Err(invalid("mri.phases must be at least 1".into()));
        }
        if m.crop.contains(&0) {
            return Err(invalid(format!("mri.crop {:?} has a zero size", m.crop)));
        }
        if m.phases
            .checked_mul(m.crop[0])
            .and_then(|v| v.checked_mul(m.crop[1]))
            .and_then(|v| v.checked_mul(m.crop[2]))
            .is_none_or(|v| v > 1 << 28)
        {
            return Err(invalid(format!("mri.crop {:?} × {} phases is too large", m.crop, m.phases)));
        }
        if m.channels.is_empty() {
            return Err(invalid("mri.channels needs at least one stage".into()));
        }
        if m.groups == 0 {
            return Err(invalid("mri.groups must be at least 1".into()));
        }
        if let Some(i) = m.channels.iter().position(|&c| c == 0 || c % m.groups != 0) {
            return Err(invalid(format!(
                "mri.channels[{i}] = {} must be a positive multiple of mri.groups = {}",
                m.channels[i], m.groups
            )));
        }
        if m.embed == 0 {
            return Err(invalid("mri.embed must be at least 1".into()));
        }
        if self.kind.uses_wsi() {
            let w = &self.wsi;
            for (name, v) in [
                ("features", w.features),
                ("hidden", w.hidden),
                ("attention", w.attention),
                ("max_train_patches", w.max_train_patches),
            ] {
                if v == 0 {
                    return Err(invalid(format!("wsi.{name} must be at least 1")));
                }
            }
        }
        validate_block(&self.clinical.hidden, self.clinical.dropout, "clinical")?;
        validate_block(&self.fusion.hidden, self.fusion.dropout, "fusion")?;
        let l = &self.loss;
        for (name, v) in [("bce_weight", l.bce_weight), ("cox_weight", l.cox_weight)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(format!("loss.{name} {v} must be a non-negative number")));
            }
        }
        if l.bce_weight == 0.0 && l.cox_weight == 0.0 {
            return Err(invalid("loss.bce_weight and loss.cox_weight are both 0; nothing would be learnt".into()));
        }
        let t = &self.training;
        if !(t.min_lr_frac.is_finite() && (0.0..=1.0).contains(&t.min_lr_frac)) {
            return Err(invalid(format!("training.min_lr_frac {} is outside [0, 1]", t.min_lr_frac)));
        }
        if t.step_epochs == 0 {
            return Err(invalid("training.step_epochs must be at least 1".into()));
        }
        if !(t.step_gamma.is_finite() && t.step_gamma > 0.0 && t.step_gamma <= 1.0) {
            return Err(invalid(format!("training.step_gamma {} is outside (0, 1]", t.step_gamma)));
        }
        let a = &t.augment;
        if !(a.intensity_scale.is_finite() && (0.0..1.0).contains(&a.intensity_scale)) {
            return Err(invalid(format!("training.augment.intensity_scale {} is outside [0, 1)", a.intensity_scale)));
        }
        if !(a.intensity_shift.is_finite() && a.intensity_shift >= 0.0) {
            return Err(invalid(format!(
                "training.augment.intensity_shift {} must be a non-negative number",
                a.intensity_shift
            )));
        }
        Ok(())
    }
}

fn invalid(msg: String) -> ModelError {
    ModelError::InvalidConfig(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_widths_add_up() {
        let pre = MultimodalConfig::new(MultimodalKind::Preop, 20);
        pre.validate().unwrap();
        assert_eq!(pre.fusion_inputs(), 64 + 32);
        assert_eq!(pre.head_inputs(), 64);
        let post = MultimodalConfig::new(MultimodalKind::Postop, 20);
        post.validate().unwrap();
        assert_eq!(post.fusion_inputs(), 64 + 32 + 64 + 1);
        assert_eq!(post.mri.crop_len(), 5 * 32 * 64 * 64);
    }

    #[test]
    fn rejects_unusable_values_naming_the_field() {
        let ok = MultimodalConfig::new(MultimodalKind::Postop, 4);
        let check = |f: &dyn Fn(&mut MultimodalConfig), needle: &str| {
            let mut c = ok.clone();
            f(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        };
        check(&|c| c.clinical_inputs = 0, "clinical_inputs");
        check(&|c| c.mri.phases = 0, "mri.phases");
        check(&|c| c.mri.crop = [0, 4, 4], "mri.crop");
        check(&|c| c.mri.channels = vec![8, 6], "mri.channels[1]");
        check(&|c| c.mri.groups = 0, "mri.groups");
        check(&|c| c.wsi.max_train_patches = 0, "wsi.max_train_patches");
        check(&|c| c.fusion.dropout = 1.0, "fusion.dropout");
        check(&|c| c.clinical.hidden = vec![0], "clinical.hidden[0]");
        check(&|c| c.loss.cox_weight = f64::NAN, "loss.cox_weight");
        check(
            &|c| {
                c.loss.cox_weight = 0.0;
                c.loss.bce_weight = 0.0
            },
            "both 0",
        );
        check(&|c| c.training.step_gamma = 0.0, "step_gamma");
        check(&|c| c.training.augment.intensity_scale = 1.5, "intensity_scale");
        // The WSI branch is not checked for the preoperative model, which has none.
        let mut pre = MultimodalConfig::new(MultimodalKind::Preop, 4);
        pre.wsi.features = 0;
        pre.validate().unwrap();
    }

    #[test]
    fn schedules_start_at_lr_and_decay() {
        let mut t = MultimodalTrainConfig::default();
        assert!((t.lr_at(1e-3, 0, 10, 0) - 1e-3).abs() < 1e-15);
        assert!((t.lr_at(1e-3, 10, 10, 0) - 1e-4).abs() < 1e-15);
        assert!(t.lr_at(1e-3, 5, 10, 0) < 1e-3 && t.lr_at(1e-3, 5, 10, 0) > 1e-4);
        t.schedule = LrSchedule::Step;
        t.step_epochs = 2;
        assert_eq!([0, 1, 2, 4].map(|e| t.lr_at(1.0, 0, 1, e)), [1.0, 1.0, 0.5, 0.25]);
        t.schedule = LrSchedule::Constant;
        assert_eq!(t.lr_at(0.3, 7, 10, 3), 0.3);
    }

    /// How the root crate types the study's `[model]` table: an internally tagged enum whose
    /// `preop` / `postop` variants wrap a [`MultimodalSection`].
    #[derive(Debug, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum StudyModel {
        Preop(MultimodalSection),
        Postop(MultimodalSection),
    }

    #[test]
    fn a_study_model_table_maps_onto_the_section() {
        let toml = r#"
            kind = "postop"
            [mri]
            phases = 3
            crop = [16, 32, 32]
            channels = [8, 16]
            activation = "gelu"
            [wsi]
            max_train_patches = 32
            [loss]
            ties = "breslow"
            cox_weight = 0.5
            [training]
            schedule = "step"
            patience = 0
            [training.augment]
            flip = false
        "#;
        let StudyModel::Postop(section) = toml::from_str::<StudyModel>(toml).unwrap() else { panic!("kind = postop") };
        let cfg = section.into_config(MultimodalKind::Postop, 12);
        cfg.validate().unwrap();
        assert_eq!((cfg.mri.phases, cfg.mri.crop, cfg.mri.channels.clone()), (3, [16, 32, 32], vec![8, 16]));
        assert_eq!(cfg.mri.activation, Activation::Gelu);
        assert_eq!((cfg.wsi.max_train_patches, cfg.wsi.features), (32, 35));
        assert_eq!((cfg.loss.ties, cfg.loss.cox_weight, cfg.loss.bce_weight), (CoxTies::Breslow, 0.5, 1.0));
        assert_eq!((cfg.training.schedule, cfg.training.patience), (LrSchedule::Step, 0));
        assert!(!cfg.training.augment.flip);
        let StudyModel::Preop(pre) = toml::from_str::<StudyModel>("kind = \"preop\"").unwrap() else {
            panic!("kind = preop")
        };
        assert_eq!(pre, MultimodalSection::default());
        let err = toml::from_str::<StudyModel>("kind = \"preop\"\n[mri]\nphase = 4").unwrap_err().to_string();
        assert!(err.contains("phase"), "{err}");
    }
}
