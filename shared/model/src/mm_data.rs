//! A site's multimodal data (one [`MultimodalSample`] per patient) and its assembly into batches.

use std::fmt;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use crate::cox::Survival;
use crate::error::ModelError;
use crate::fusion::{NetInput, SlideInput};
use crate::mm_config::{AugmentConfig, MultimodalConfig};
use crate::mri::{CropAugment, write_crop};
use crate::wsi::{PatchBag, assemble_bags};

/// One patient. Its `Debug` shows the id and shapes only: the values are patient data.
#[derive(Clone, PartialEq)]
pub struct MultimodalSample {
    /// Patient id, used in error messages (never a value).
    pub id: String,
    /// The MRI crop, `phases × depth × height × width` f32, z-scored per phase; `None` when the
    /// patient has no usable MRI (every phase is then treated as missing).
    pub crop: Option<Vec<f32>>,
    /// Whether each phase of `crop` is present; a missing phase is zeroed whatever `crop` holds
    /// there. Ignored when `crop` is `None`.
    pub phase_present: Vec<bool>,
    /// The slide's patch features (postoperative model); `None` (or a bag of 0 patches) when the
    /// patient has no slide. Ignored by the preoperative model.
    pub bag: Option<PatchBag>,
    /// The patient's row of the clinical design matrix (already encoded and standardised).
    pub clinical: Vec<f32>,
    /// Aggressive recurrence (true = positive); `None` leaves the patient out of the BCE term.
    pub label: Option<bool>,
    /// Recurrence-free survival; `None` leaves the patient out of the Cox term.
    pub survival: Option<Survival>,
}

impl fmt::Debug for MultimodalSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultimodalSample")
            .field("id", &self.id)
            .field("crop", &self.crop.as_ref().map(Vec::len))
            .field("phase_present", &self.phase_present)
            .field("bag", &self.bag)
            .field("clinical", &self.clinical.len())
            .finish_non_exhaustive()
    }
}

impl MultimodalSample {
    /// Whether phase `p` enters the model.
    fn phase_in(&self, p: usize) -> bool {
        self.crop.is_some() && self.phase_present.get(p).copied().unwrap_or(false)
    }

    /// The slide, when it has at least one patch.
    pub(crate) fn slide(&self) -> Option<&PatchBag> {
        self.bag.as_ref().filter(|b| b.n > 0)
    }

    fn check(&self, cfg: &MultimodalConfig) -> Result<(), String> {
        if self.clinical.len() != cfg.clinical_inputs {
            return Err(format!(
                "has {} clinical values but the model expects {}",
                self.clinical.len(),
                cfg.clinical_inputs
            ));
        }
        if let Some(i) = self.clinical.iter().position(|v| !v.is_finite()) {
            return Err(format!("clinical value {i} is not finite (impute missing values first)"));
        }
        if let Some(crop) = &self.crop {
            let m = &cfg.mri;
            if self.phase_present.len() != m.phases {
                return Err(format!(
                    "has {} phase flags but the model has {} phases",
                    self.phase_present.len(),
                    m.phases
                ));
            }
            if crop.len() != m.crop_len() {
                return Err(format!(
                    "MRI crop holds {} values, not {} phases × {:?} = {}",
                    crop.len(),
                    m.phases,
                    m.crop,
                    m.crop_len()
                ));
            }
            let v = m.voxels();
            if let Some(p) =
                (0..m.phases).find(|&p| self.phase_in(p) && crop[p * v..(p + 1) * v].iter().any(|x| !x.is_finite()))
            {
                return Err(format!("MRI phase {p} holds a value that is not finite"));
            }
        }
        if cfg.kind.uses_wsi()
            && let Some(bag) = &self.bag
        {
            if bag.d != cfg.wsi.features {
                return Err(format!(
                    "slide has {} features per patch but the model expects {}",
                    bag.d, cfg.wsi.features
                ));
            }
            if Some(bag.values.len()) != bag.n.checked_mul(bag.d) {
                return Err(format!("slide holds {} values, not {} patches × {}", bag.values.len(), bag.n, bag.d));
            }
            if bag.values.iter().any(|x| !x.is_finite()) {
                return Err("slide holds a patch feature that is not finite".into());
            }
        }
        if let Some(s) = self.survival
            && !(s.time.is_finite() && s.time >= 0.0)
        {
            return Err("survival time is not a non-negative number".into());
        }
        Ok(())
    }
}

/// A site's patients for the multimodal model. Its `Debug` shows counts only.
#[derive(Clone, Default, PartialEq)]
pub struct MultimodalDataset {
    samples: Vec<MultimodalSample>,
}

impl fmt::Debug for MultimodalDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultimodalDataset").field("patients", &self.samples.len()).finish_non_exhaustive()
    }
}

impl MultimodalDataset {
    /// A dataset of these patients, in this order (scores are returned in it).
    pub fn new(samples: Vec<MultimodalSample>) -> Self {
        Self { samples }
    }

    /// Patients.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no patient.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The patients.
    pub fn samples(&self) -> &[MultimodalSample] {
        &self.samples
    }

    /// The samples, mutable (a site re-standardises its inputs in place when the study's pooled
    /// statistics arrive).
    pub fn samples_mut(&mut self) -> &mut [MultimodalSample] {
        &mut self.samples
    }

    /// Gives the patients back.
    pub fn into_samples(self) -> Vec<MultimodalSample> {
        self.samples
    }

    /// Patients with a label, of them positive, and patients with an observed event.
    pub fn counts(&self) -> (usize, usize, usize) {
        let labelled = self.samples.iter().filter(|s| s.label.is_some()).count();
        let positive = self.samples.iter().filter(|s| s.label == Some(true)).count();
        let events = self.samples.iter().filter(|s| s.survival.is_some_and(|s| s.event)).count();
        (labelled, positive, events)
    }

    /// Checks every patient against the model's shapes.
    ///
    /// # Errors
    /// [`ModelError::EmptyDataset`], or [`ModelError::MalformedDataset`] naming the patient id and
    /// what is wrong (never a value).
    pub fn validate(&self, cfg: &MultimodalConfig) -> Result<(), ModelError> {
        if self.samples.is_empty() {
            return Err(ModelError::EmptyDataset);
        }
        for s in &self.samples {
            s.check(cfg).map_err(|e| ModelError::MalformedDataset(format!("patient '{}': {e}", s.id)))?;
        }
        Ok(())
    }
}

/// The random draws of training: crop augmentation and patch sampling, each from its own
/// `ChaCha8Rng` stream.
pub(crate) struct TrainDraws<'a> {
    pub(crate) augment: &'a AugmentConfig,
    pub(crate) augment_rng: ChaCha8Rng,
    pub(crate) patch_rng: ChaCha8Rng,
}

/// Builds one batch on `device`. With `draws` (training) crops are augmented and bags sampled to
/// `wsi.max_train_patches`; without, crops are used as given and bags whole.
///
/// The samples must have passed [`MultimodalDataset::validate`] for `cfg`.
pub(crate) fn build_input<B: Backend>(
    cfg: &MultimodalConfig,
    samples: &[&MultimodalSample],
    mut draws: Option<&mut TrainDraws>,
    device: &B::Device,
) -> NetInput<B> {
    let b = samples.len();
    let (phases, per_crop) = (cfg.mri.phases, cfg.mri.crop_len());
    let mut crops = vec![0.0f32; b * per_crop];
    let mut presence = vec![0.0f32; b * phases];
    for (i, s) in samples.iter().enumerate() {
        let present: Vec<bool> = (0..phases).map(|p| s.phase_in(p)).collect();
        let augment = draws.as_deref_mut().map(|d| CropAugment::draw(d.augment, phases, &mut d.augment_rng));
        if let Some(crop) = &s.crop {
            write_crop(&mut crops[i * per_crop..][..per_crop], crop, &present, cfg.mri.crop, augment.as_ref());
        }
        for (p, &is) in present.iter().enumerate() {
            presence[i * phases + p] = if is { 1.0 } else { 0.0 };
        }
    }
    let [d, h, w] = cfg.mri.crop;
    let clinical: Vec<f32> = samples.iter().flat_map(|s| s.clinical.iter().copied()).collect();
    let slides = cfg.kind.uses_wsi().then(|| {
        let bags: Vec<Option<&PatchBag>> = samples.iter().map(|s| s.slide()).collect();
        let present: Vec<f32> = bags.iter().map(|bag| if bag.is_some() { 1.0 } else { 0.0 }).collect();
        let sample = draws.map(|d| (cfg.wsi.max_train_patches, &mut d.patch_rng));
        let bags = assemble_bags(&bags, cfg.wsi.features, sample).map(|bb| {
            let m = bb.rows.len();
            let mut scatter = vec![0.0f32; b * m];
            for (j, &row) in bb.rows.iter().enumerate() {
                scatter[row * m + j] = 1.0;
            }
            (
                Tensor::<B, 3>::from_data(TensorData::new(bb.values, [m, bb.n_max, cfg.wsi.features]), device),
                Tensor::<B, 2, Bool>::from_data(TensorData::new(bb.pad, [m, bb.n_max]), device),
                Tensor::<B, 2>::from_data(TensorData::new(scatter, [b, m]), device),
            )
        });
        SlideInput { bags, present: Tensor::from_data(TensorData::new(present, [b, 1]), device) }
    });
    NetInput {
        crops: Tensor::from_data(TensorData::new(crops, [b, phases, d, h, w]), device),
        presence: Tensor::from_data(TensorData::new(presence, [b, phases]), device),
        clinical: Tensor::from_data(TensorData::new(clinical, [b, cfg.clinical_inputs]), device),
        slides,
    }
}
