//! `MultimodalExecutor`: what a site's client does with a task when the study trains the
//! preoperative (MRI + clinical) or postoperative (MRI + slides + clinical) model.
//!
//! The cohort, its splits and the clinical design matrices come from the same code as the clinical
//! model ([`SiteSplits`]); each patient's MRI crop and slide features come from the site's
//! `fedhcc preprocess` outputs ([`Preprocessed`]). Patients without a usable MRI are left out (as
//! `fedhcc data check` announces); patients without a slide keep an empty slide input (the
//! postoperative model has a "slide present" flag). Clinical columns and patch features are
//! standardised with the pooled statistics the global model carries ([`crate::standardise`]);
//! the executor keeps the unstandardised inputs to redo that when they change.

use crate::executor::{GroupStats, SiteData, SiteExecutor, SiteSplits, SplitEvaluation, train_params};
use crate::preprocess::{Preprocessed, extractor, mri_settings, wsi_settings};
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use fedhcc_client::{ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_cohort::DesignMatrix;
use fedhcc_core::params::ParameterSet;
use fedhcc_model::{
    BackendKind, MultimodalConfig, MultimodalDataset, MultimodalEvalOutcome, MultimodalSample, MultimodalTrainOutcome,
    PatchBag, Survival, TrainParams,
};
use fedhcc_stats::federated::SitePredictions;
use std::path::Path;

/// Most patches kept per patient when several slides are concatenated (in slide-name order);
/// training samples `wsi.max_train_patches` of them per step, evaluation uses all.
pub const MAX_PATCHES_PER_PATIENT: usize = 4096;

/// A patient's unstandardised inputs: the clinical row and the slide's patch features.
type RawInputs = (Vec<f32>, Option<PatchBag>);

/// Overall survival (days, event) of a split's patients, in dataset order.
type OsColumn = Vec<Option<(f64, bool)>>;

/// Trains and evaluates the study's multimodal model on one site's prepared data.
pub type MultimodalExecutor = SiteExecutor<MultimodalData>;

/// One site's (or several sites' pooled) patients for the multimodal model, unstandardised and as
/// the model reads them.
pub struct MultimodalData {
    cfg: MultimodalConfig,
    backend: BackendKind,
    train: MultimodalDataset,
    val: MultimodalDataset,
    test: MultimodalDataset,
    /// Unstandardised inputs of `train`, `val`, `test`, sample by sample.
    raw: [Vec<RawInputs>; 3],
    positions: Vec<(usize, usize)>,
    /// Overall survival of `train`, `val`, `test`, sample by sample (evaluation summaries).
    os: [OsColumn; 3],
}

/// What loading found, for the log (counts only).
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    without_mri: usize,
    without_outcome: usize,
    without_slide: usize,
    truncated_bags: usize,
}

impl MultimodalExecutor {
    /// Loads `data_dir/clinical.csv` and the crops and slide features under
    /// `state_dir/preprocessed`, splits and encodes them.
    ///
    /// # Errors
    /// The study's model is not multimodal; the cohort cannot be read; nothing was prepared (the
    /// message says to run `fedhcc preprocess`); a prepared file is damaged; no training patient
    /// with an MRI and an outcome remains.
    pub fn load(data_dir: &Path, state_dir: &Path, study: &StudyModel, backend: BackendKind) -> Result<Self> {
        let cfg = study.multimodal_config()?.context("this study's model is not a multimodal (preop/postop) model")?;
        let site = SiteSplits::load(data_dir, study)?;
        let prepared = Preprocessed::open(state_dir)?;
        let folder = state_dir.join(crate::preprocess::FOLDER);
        if prepared.manifest().patients.is_empty() {
            bail!(
                "no prepared images in {}: the {} model needs each patient's MRI crop{}; run `fedhcc preprocess \
                 --site-config <this site's config>` first",
                folder.display(),
                cfg.kind,
                if cfg.kind.uses_wsi() { " and slide features" } else { "" }
            );
        }
        let mri_key = mri_settings(&study.imaging.mri);
        let ex = extractor(&study.imaging.extractor)?;
        let wsi_key = wsi_settings(&study.imaging.wsi, ex.as_ref());
        let mut tally = Tally::default();
        let mut build = |m: &DesignMatrix| -> Result<(MultimodalDataset, OsColumn)> {
            let mut samples = Vec::with_capacity(m.n);
            let mut os = Vec::with_capacity(m.n);
            for i in 0..m.n {
                let patient = &site.cohort.patients[m.patient_rows[i]];
                let label = m.labels[i].map(|l| l > 0.5);
                let survival = m.survival[i].map(|(time, event)| Survival { time, event });
                if label.is_none() && survival.is_none() {
                    tally.without_outcome += 1;
                    continue;
                }
                let Some(crop) = prepared
                    .mri(&patient.id, &mri_key)
                    .with_context(|| format!("patient {}: reading the prepared MRI crop", patient.id))?
                else {
                    tally.without_mri += 1;
                    continue;
                };
                if crop.grid != cfg.mri.crop || crop.present.len() != cfg.mri.phases {
                    bail!(
                        "patient {}: the prepared MRI crop is {:?} with {} phases but the study wants {:?} with {}; \
                         rerun `fedhcc preprocess`",
                        patient.id,
                        crop.grid,
                        crop.present.len(),
                        cfg.mri.crop,
                        cfg.mri.phases
                    );
                }
                let bag = if cfg.kind.uses_wsi() {
                    let slides = prepared
                        .wsi(&patient.id, &wsi_key)
                        .with_context(|| format!("patient {}: reading the prepared slide features", patient.id))?;
                    let mut values = Vec::new();
                    let mut n = 0;
                    for s in &slides {
                        if s.dim != cfg.wsi.features {
                            bail!(
                                "patient {}: prepared slide features have {} values per patch, the study's \
                                 extractor {}; rerun `fedhcc preprocess`",
                                patient.id,
                                s.dim,
                                cfg.wsi.features
                            );
                        }
                        let take = s.n().min(MAX_PATCHES_PER_PATIENT - n);
                        if take < s.n() {
                            tally.truncated_bags += 1;
                        }
                        values.extend_from_slice(&s.features[..take * s.dim]);
                        n += take;
                        if n == MAX_PATCHES_PER_PATIENT {
                            break;
                        }
                    }
                    if n == 0 {
                        tally.without_slide += 1;
                        None
                    } else {
                        Some(PatchBag { n, d: cfg.wsi.features, values })
                    }
                } else {
                    None
                };
                os.push(patient.os);
                samples.push(MultimodalSample {
                    id: patient.id.clone(),
                    phase_present: crop.present,
                    crop: Some(crop.data),
                    bag,
                    clinical: m.row(i).to_vec(),
                    label,
                    survival,
                });
            }
            Ok((MultimodalDataset::new(samples), os))
        };
        let ((train, os_train), (val, os_val), (test, os_test)) =
            (build(&site.train)?, build(&site.val)?, build(&site.test)?);
        let (labelled, _, events) = train.counts();
        if train.len() < 2 || (labelled == 0 && events == 0) {
            bail!(
                "{}: only {} training patients with a prepared MRI and an outcome ({} labelled, {} events); \
                 at least 2 are needed (run `fedhcc data check` and `fedhcc preprocess`)",
                site.csv.display(),
                train.len(),
                labelled,
                events
            );
        }
        let fingerprint = study.initial_params(0)?.fingerprint();
        tracing::info!(
            model = %cfg.kind, train = train.len(), val = val.len(), test = test.len(),
            left_out_without_mri = tally.without_mri, left_out_without_outcome = tally.without_outcome,
            without_slide = tally.without_slide, slides_capped = tally.truncated_bags,
            "site data ready"
        );
        let mut local = vec![crate::standardise::clinical_sums(&site.stats)];
        if cfg.kind.uses_wsi() {
            let bags = train.samples().iter().filter_map(|s| s.bag.as_ref());
            local.push(crate::standardise::bag_sums(bags, cfg.wsi.features).context("slide feature statistics")?);
        }
        let raw =
            [&train, &val, &test].map(|d| d.samples().iter().map(|s| (s.clinical.clone(), s.bag.clone())).collect());
        let data = MultimodalData {
            cfg,
            backend,
            train,
            val,
            test,
            raw,
            positions: site.positions,
            os: [os_train, os_val, os_test],
        };
        Ok(Self::new(data, fingerprint, local, study.evaluation.clone()))
    }
}

impl MultimodalData {
    fn dataset(&self, k: usize) -> &MultimodalDataset {
        [&self.train, &self.val, &self.test][k]
    }

    /// Split `k`'s patients with these probabilities (one per patient, in dataset order).
    fn scored(&self, k: usize, probabilities: &[f32]) -> SitePredictions {
        let samples = self.dataset(k).samples();
        SitePredictions {
            score: probabilities.iter().map(|&p| f64::from(p)).collect(),
            label: samples.iter().map(|s| s.label).collect(),
            rfs: samples.iter().map(|s| s.survival.map(|v| (v.time, v.event))).collect(),
            os: self.os[k].clone(),
        }
    }

    /// Local training from `global`, the trainable part of the task's model with the inputs already
    /// standardised (see [`SiteExecutor`]) (the function behind every mode: federated train tasks,
    /// `fedhcc train --mode local` and `--mode central`). Logs one line per epoch (aggregates
    /// only). Returns the outcome and the aggregate metrics reported to the server.
    ///
    /// # Errors
    /// What [`fedhcc_model::train_multimodal`] refuses, or cancellation.
    fn train_from(
        &self,
        global: &ParameterSet,
        tp: &TrainParams,
        round: u32,
        ctl: &TaskControl,
    ) -> Result<(MultimodalTrainOutcome, Vec<(String, f64)>), fedhcc_model::ModelError> {
        let (mut sum, mut count) = (0.0, 0usize);
        let started = std::time::Instant::now();
        let cancel = || ctl.is_cancelled();
        let mut progress = |p: &fedhcc_model::BatchProgress| {
            // Batches done, for the client's status.json (and `fedhcc client status`).
            ctl.report_progress(((p.epoch - 1) * p.batches + p.batch) as u64, (p.epochs * p.batches) as u64);
            if let Some(l) = p.loss {
                sum += l;
                count += 1;
            }
            if p.batch == p.batches {
                tracing::info!(
                    round,
                    epoch = p.epoch,
                    epochs = p.epochs,
                    loss = format!("{:.4}", if count > 0 { sum / count as f64 } else { f64::NAN }),
                    lr = format!("{:.2e}", p.lr),
                    seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "local training"
                );
                (sum, count) = (0.0, 0);
            }
        };
        let val = (!self.val.is_empty()).then_some(&self.val);
        let out = fedhcc_model::train_multimodal(
            &self.cfg,
            global,
            &self.train,
            val,
            tp,
            self.backend,
            &cancel,
            &mut progress,
        )?;
        let mut metrics = vec![
            ("train_loss".to_string(), out.train_loss),
            ("steps".to_string(), out.steps as f64),
            ("epochs_run".to_string(), out.epochs_run as f64),
        ];
        if !self.val.is_empty()
            && let Ok(ev) = fedhcc_model::evaluate_multimodal(&self.cfg, &out.params, &self.val, self.backend)
        {
            if let Some(loss) = objective(&self.cfg, &ev) {
                metrics.push(("val_loss".into(), loss));
            }
            if let Some(auc) = ev.auc {
                metrics.push(("val_auc".into(), auc));
            }
            if let Some(c) = ev.c_index {
                metrics.push(("val_c_index".into(), c));
            }
        }
        Ok((out, metrics))
    }
}

/// `bce_weight · BCE + cox_weight · Cox` over the parts that exist; `None` when neither does.
fn objective(cfg: &MultimodalConfig, ev: &MultimodalEvalOutcome) -> Option<f64> {
    if ev.bce.is_none() && ev.cox.is_none() {
        return None;
    }
    Some(cfg.loss.bce_weight * ev.bce.unwrap_or(0.0) + cfg.loss.cox_weight * ev.cox.unwrap_or(0.0))
}

impl SiteData for MultimodalData {
    /// Every patient's clinical row and patch features (`stats`: clinical, then wsi for the
    /// postoperative model).
    fn standardise(&mut self, stats: &GroupStats) {
        let (cm, cs) = &stats[0];
        let wsi = stats.get(1);
        for (data, raw) in [&mut self.train, &mut self.val, &mut self.test].into_iter().zip(&self.raw) {
            for (sample, (row, bag)) in data.samples_mut().iter_mut().zip(raw) {
                sample.clinical.clone_from(row);
                fedhcc_cohort::standardise_row(&self.positions, &mut sample.clinical, cm, cs);
                sample.bag = match (bag, wsi) {
                    (Some(b), Some((m, s))) => Some(crate::standardise::standardise_bag(b, m, s)),
                    (b, _) => b.clone(),
                };
            }
        }
    }

    fn append(&mut self, other: Self) {
        for (into, from) in
            [&mut self.train, &mut self.val, &mut self.test].into_iter().zip([other.train, other.val, other.test])
        {
            let mut samples = std::mem::take(into).into_samples();
            samples.extend(from.into_samples());
            *into = MultimodalDataset::new(samples);
        }
        for (into, from) in self.raw.iter_mut().zip(other.raw) {
            into.extend(from);
        }
        for (into, from) in self.os.iter_mut().zip(other.os) {
            into.extend(from);
        }
    }

    fn num_samples(&self) -> u64 {
        self.train.len() as u64
    }

    fn test_ids(&self) -> Vec<String> {
        self.test.samples().iter().map(|s| s.id.clone()).collect()
    }

    fn train(&self, model: &ParameterSet, spec: &TrainSpec, ctl: &TaskControl) -> Result<TrainResult, ExecutorError> {
        let (out, metrics) =
            self.train_from(model, &train_params(spec), spec.round, ctl).map_err(|e| ExecutorError(e.to_string()))?;
        Ok(TrainResult { params: out.params, num_samples: out.samples as u64, metrics })
    }

    /// `auc`, `c_index`, `loss` (the training objective without regularisation), `bce`, `cox_nll`,
    /// `n_positive`.
    fn evaluate(&self, model: &ParameterSet, k: usize) -> Result<SplitEvaluation, ExecutorError> {
        let data = self.dataset(k);
        if data.is_empty() {
            let split = crate::site_evaluation::SPLITS[k];
            return Err(ExecutorError(format!("the '{split}' split has no patient with a prepared MRI")));
        }
        let ev = fedhcc_model::evaluate_multimodal(&self.cfg, model, data, self.backend)
            .map_err(|e| ExecutorError(e.to_string()))?;
        let (_, positives, _) = data.counts();
        let mut metrics = vec![("n_positive".to_string(), positives as f64)];
        let named = [
            ("loss", objective(&self.cfg, &ev)),
            ("bce", ev.bce),
            ("cox_nll", ev.cox),
            ("auc", ev.auc),
            ("c_index", ev.c_index),
        ];
        metrics.extend(named.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))));
        Ok(SplitEvaluation { num_samples: ev.n as u64, metrics, predictions: self.scored(k, &ev.probabilities) })
    }

    fn score(&self, model: &ParameterSet, k: usize) -> Result<SitePredictions, ExecutorError> {
        let data = self.dataset(k);
        if data.is_empty() {
            return Ok(SitePredictions::default());
        }
        let ev = fedhcc_model::evaluate_multimodal(&self.cfg, model, data, self.backend)
            .map_err(|e| ExecutorError(e.to_string()))?;
        Ok(self.scored(k, &ev.probabilities))
    }
}
