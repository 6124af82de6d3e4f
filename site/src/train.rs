//! Training without federation, through the same executor code a site runs for a federated train
//! task: `fedhcc train` (one site, or several pooled) and the local-only and centralised models of
//! `fedhcc study`.

use crate::executor::ClinicalExecutor;
use crate::mm_executor::MultimodalExecutor;
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use fedhcc_client::{Executor, TaskControl, TrainResult, TrainSpec};
use fedhcc_core::config::{SiteConfig, StudyConfig, load_site};
use fedhcc_core::params::ParameterSet;
use fedhcc_model::BackendKind;
use fedhcc_stats::federated::SitePredictions;
use std::path::PathBuf;

/// The executor a non-federated training runs (or a simulation scores with): the study model's own.
pub enum Trainer {
    Clinical(Box<ClinicalExecutor>),
    Multimodal(Box<MultimodalExecutor>),
}

impl Trainer {
    /// The executor `fedhcc client` would run for `model` at `site` (its data, its prepared images).
    ///
    /// # Errors
    /// Unusable site data, or a model kind without an executor.
    pub fn load(model: &StudyModel, site: &SiteConfig, backend: BackendKind) -> Result<Self> {
        Ok(match model.kind() {
            "clinical" => Trainer::Clinical(Box::new(ClinicalExecutor::load(&site.data_dir, model, backend)?)),
            "preop" | "postop" => Trainer::Multimodal(Box::new(MultimodalExecutor::load(
                &site.data_dir,
                &site.state_dir,
                model,
                backend,
            )?)),
            other => bail!("site '{}': the study's model kind '{other}' cannot be trained here", site.site_id),
        })
    }

    /// Several sites' executors as one pooled dataset (each site's rows encoded as at that site).
    ///
    /// # Errors
    /// No parts, or parts of different kinds.
    pub fn pooled(parts: Vec<Trainer>) -> Result<Self> {
        let (mut clinical, mut multimodal) = (Vec::new(), Vec::new());
        for p in parts {
            match p {
                Trainer::Clinical(e) => clinical.push(*e),
                Trainer::Multimodal(e) => multimodal.push(*e),
            }
        }
        match (clinical.is_empty(), multimodal.is_empty()) {
            (false, true) => Ok(Trainer::Clinical(Box::new(ClinicalExecutor::pooled(clinical)?))),
            (true, false) => Ok(Trainer::Multimodal(Box::new(MultimodalExecutor::pooled(multimodal)?))),
            _ => bail!("pooling needs sites of one study model"),
        }
    }

    pub fn executor(&mut self) -> &mut dyn Executor {
        match self {
            Trainer::Clinical(e) => e.as_mut(),
            Trainer::Multimodal(e) => e.as_mut(),
        }
    }

    /// The held-out test patients' ids (local use only).
    pub fn test_ids(&self) -> Vec<String> {
        match self {
            Trainer::Clinical(e) => e.test_ids(),
            Trainer::Multimodal(e) => e.test_ids(),
        }
    }

    /// The clinical model's inputs, before standardisation, of the patients [`Self::predictions`]
    /// scores for `split`, row after row in the same order (patient-level: for this machine only).
    ///
    /// # Errors
    /// Not the clinical model, or an unknown split.
    pub fn clinical_inputs(&self, split: &str) -> Result<Vec<f32>> {
        match self {
            Trainer::Clinical(e) => Ok(e.raw_inputs(split)?),
            Trainer::Multimodal(_) => bail!("the model's inputs can be written for the clinical model only"),
        }
    }

    /// `split`'s patients scored by `params` (patient-level: for this machine only).
    ///
    /// # Errors
    /// An unknown split, or a model the executor refuses.
    pub fn predictions(&mut self, params: &ParameterSet, split: &str) -> Result<SitePredictions> {
        Ok(match self {
            Trainer::Clinical(e) => e.predictions(params, split)?,
            Trainer::Multimodal(e) => e.predictions(params, split)?,
        })
    }
}

/// The compute backend: `given` (`--backend`), else the site config's, else the fastest CPU one.
///
/// # Errors
/// An unknown backend name.
pub fn backend_for(given: Option<&String>, site: &SiteConfig) -> Result<BackendKind> {
    match given.or(site.backend.as_ref()) {
        Some(b) => b.parse().map_err(|e| anyhow::anyhow!("backend: {e}")),
        None => Ok(BackendKind::default()),
    }
}

/// Several sites' configurations that share one study file and model.
pub struct StudySites {
    pub study: StudyConfig,
    pub model: StudyModel,
    /// The model before training (the study's seed).
    pub initial: ParameterSet,
    pub sites: Vec<SiteConfig>,
}

/// Reads site configurations that must name the same study (same id, same model layout).
///
/// # Errors
/// An unreadable configuration, no site, or a site of another study or model.
pub fn load_study_sites(paths: &[PathBuf]) -> Result<StudySites> {
    let mut first: Option<StudySites> = None;
    for path in paths {
        let (site, study) = load_site(path)?;
        let model = StudyModel::from_study(&study).with_context(|| format!("{}: its study", path.display()))?;
        let initial = model.initial_params(study.training.seed)?;
        match &mut first {
            None => first = Some(StudySites { study, model, initial, sites: vec![site] }),
            Some(f) => {
                if f.study.study_id != study.study_id || f.initial.fingerprint() != initial.fingerprint() {
                    bail!(
                        "{}: study '{}' with model {} differs from the first site's study '{}' with model {}; \
                         pooled sites must share one study file",
                        path.display(),
                        study.study_id,
                        initial.fingerprint().short(),
                        f.study.study_id,
                        f.initial.fingerprint().short()
                    );
                }
                if f.sites.iter().any(|s| s.site_id == site.site_id) {
                    bail!("{}: site '{}' is given twice", path.display(), site.site_id);
                }
                f.sites.push(site);
            }
        }
    }
    first.context("no site configuration given")
}

/// What the server does before round 1: the sites' feature sums pooled into the model's
/// standardisation tensors (here from the executor's own, possibly pooled, training split).
///
/// # Errors
/// Statistics the executor cannot make, or that do not fit the model.
pub fn with_pooled_statistics(exec: &mut dyn Executor, params: &mut ParameterSet) -> Result<()> {
    let sums = exec.statistics().map_err(|e| anyhow::anyhow!("feature statistics: {e}"))?;
    fedhcc_core::standardisation::write(params, &sums).context("pooled feature statistics")
}

/// `rounds` successive local trainings (`[training] local_epochs` each) from `params`, with the seeds a
/// federated run's server would send for each round and no proximal term; `each` sees every round's
/// outcome. The training `fedhcc train` and the local-only and centralised models of `fedhcc study` run.
///
/// # Errors
/// What the executor refuses, naming the round.
pub fn fit(
    exec: &mut dyn Executor,
    mut params: ParameterSet,
    t: &fedhcc_core::config::TrainingConfig,
    rounds: u32,
    mut each: impl FnMut(u32, &TrainResult),
) -> Result<ParameterSet> {
    let ctl = TaskControl::default();
    for round in 1..=rounds {
        // The seed a federated run's server would send for this round.
        let spec = TrainSpec {
            round,
            total_rounds: rounds,
            local_epochs: t.local_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            weight_decay: t.weight_decay,
            prox_mu: 0.0,
            seed: t.seed.wrapping_add(u64::from(round)),
        };
        let out = exec.train(&params, &spec, &ctl).map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
        each(round, &out);
        params = out.params;
    }
    Ok(params)
}
