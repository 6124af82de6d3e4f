//! Executors: what a site's client does with a task.
//!
//! One [`SiteExecutor`] serves every study model: it owns what all of them share (the model
//! fingerprint, the site's feature sums, federated standardisation of the inputs, pooling sites,
//! the evaluation summary), and a [`SiteData`] does the model's own part (standardise its inputs,
//! train, score). [`crate::clinical::ClinicalExecutor`] runs it over `clinical.csv`,
//! [`crate::mm_executor::MultimodalExecutor`] over the MRI crops, slide features and clinical rows.
//! `NoiseExecutor` (benchmarks) returns the global model plus small noise without training, to
//! measure the framework alone.

use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use fedhcc_client::local_layers::LocalLayers;
use fedhcc_client::{EvalResult, Executor, ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_cohort::{Cohort, DesignMatrix, FeatureStats, Splits};
use fedhcc_core::aggregation::LocalParameters;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::{Fingerprint, ParameterSet};
use fedhcc_core::standardisation::GroupSums;
use fedhcc_model::TrainParams;
use fedhcc_stats::federated::{EvaluationSettings, SitePredictions};
use std::path::Path;

pub use crate::clinical::ClinicalExecutor;

/// The `(mean, std)` of each group of a site's feature sums, in the order of those sums.
pub type GroupStats = Vec<(Vec<f32>, Vec<f32>)>;

/// A split's evaluation before the summary: what [`SiteData::evaluate`] returns.
pub struct SplitEvaluation {
    /// Patients the aggregate metrics are over.
    pub num_samples: u64,
    /// Aggregate metrics (`loss`, `auc`, `n_positive`, …).
    pub metrics: Vec<(String, f64)>,
    /// Every patient of the split, scored (patient-level: stays at the site).
    pub predictions: SitePredictions,
}

/// One study model's site data: the part of an executor that differs from model to model. It holds
/// its inputs unstandardised and a standardised copy the model reads. Splits are numbered as
/// [`crate::site_evaluation::SPLITS`] (train 0, val 1, test 2); every `model` given is the
/// trainable part of a global model, the inputs already standardised with the statistics it carries.
pub trait SiteData: Send + 'static {
    /// Remakes the standardised copy from the unstandardised inputs with `stats` (one entry per
    /// group of the site's feature sums).
    fn standardise(&mut self, stats: &GroupStats);
    /// Appends `other`'s patients, split by split (several sites pooled).
    fn append(&mut self, other: Self);
    /// The training patients: the site's FedAvg weight.
    fn num_samples(&self) -> u64;
    /// The ids of the test split's patients, in evaluation order.
    fn test_ids(&self) -> Vec<String>;
    /// Local training from `model`; the result's parameters are the trainable part.
    ///
    /// # Errors
    /// What the model refuses, or cancellation.
    fn train(&self, model: &ParameterSet, spec: &TrainSpec, ctl: &TaskControl) -> Result<TrainResult, ExecutorError>;
    /// Split `k`'s aggregate metrics and scored patients.
    ///
    /// # Errors
    /// An empty split, or what the model refuses.
    fn evaluate(&self, model: &ParameterSet, k: usize) -> Result<SplitEvaluation, ExecutorError>;
    /// Split `k`'s patients scored by `model`.
    ///
    /// # Errors
    /// What the model refuses.
    fn score(&self, model: &ParameterSet, k: usize) -> Result<SitePredictions, ExecutorError>;
}

/// Trains and evaluates the study's model on one site's data (or several sites' pooled).
pub struct SiteExecutor<D> {
    data: D,
    fingerprint: Fingerprint,
    /// This site's training-split sums, one per group the model standardises (pooled over the
    /// parts in `--mode central`).
    local: Vec<GroupSums>,
    /// The statistics the data are standardised with.
    applied: Option<GroupStats>,
    /// How an evaluation is summarised.
    evaluation: EvaluationSettings,
}

impl<D: SiteData> SiteExecutor<D> {
    /// An executor over `data`, standardised with the site's own statistics until a task's model
    /// carries pooled ones.
    pub(crate) fn new(
        data: D,
        fingerprint: Fingerprint,
        local: Vec<GroupSums>,
        evaluation: EvaluationSettings,
    ) -> Self {
        let mut exec = Self { data, fingerprint, local, applied: None, evaluation };
        let own = exec.local.iter().map(GroupSums::mean_std).collect();
        exec.apply(own);
        exec
    }

    /// The model-specific data.
    pub(crate) fn data(&self) -> &D {
        &self.data
    }

    /// The ids of the test split's patients, in evaluation order.
    pub fn test_ids(&self) -> Vec<String> {
        self.data.test_ids()
    }

    /// Every patient of `split` (`train`, `val`, `test`, or `all` of them in that order) with an
    /// outcome, scored by `global` (standardised with the statistics it carries, else this site's
    /// own). Patient-level: for this site only (`fedhcc validate`).
    ///
    /// # Errors
    /// An unknown split, or a model the site's inputs do not fit.
    pub fn predictions(&mut self, global: &ParameterSet, split: &str) -> Result<SitePredictions, ExecutorError> {
        let model = self.prepare(global)?;
        crate::site_evaluation::split_predictions(split, |k| self.data.score(&model, k))
    }

    /// One executor over several sites' data (`fedhcc train --mode central`, a simulation): the
    /// data are concatenated split by split and standardised with the sites' pooled statistics,
    /// exactly what a federated run's statistics exchange gives.
    ///
    /// # Errors
    /// No part given, or parts of different models.
    pub fn pooled(parts: Vec<Self>) -> Result<Self> {
        let mut it = parts.into_iter();
        let first = it.next().context("no site to pool")?;
        let (mut data, fingerprint, evaluation) = (first.data, first.fingerprint, first.evaluation);
        let mut sums: Vec<Vec<GroupSums>> = first.local.into_iter().map(|g| vec![g]).collect();
        for p in it {
            if p.fingerprint != fingerprint || p.local.len() != sums.len() {
                bail!("the sites train different models (fingerprints {fingerprint} and {})", p.fingerprint);
            }
            data.append(p.data);
            for (into, g) in sums.iter_mut().zip(p.local) {
                into.push(g);
            }
        }
        let local = sums
            .iter()
            .map(|parts| GroupSums::merge(&parts.iter().collect::<Vec<_>>()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self::new(data, fingerprint, local, evaluation))
    }

    /// Standardises the data with `stats` unless they already are.
    fn apply(&mut self, stats: GroupStats) {
        if self.applied.as_ref() == Some(&stats) {
            return;
        }
        self.data.standardise(&stats);
        self.applied = Some(stats);
    }

    /// Applies the statistics `global` carries (else this site's own) and returns its trainable part.
    fn prepare(&mut self, global: &ParameterSet) -> Result<ParameterSet, ExecutorError> {
        let stats = self.local.iter().map(|g| crate::standardise::resolve(global, &g.group, g)).collect();
        self.apply(stats);
        crate::standardise::trainable(global)
    }
}

impl<D: SiteData> Executor for SiteExecutor<D> {
    fn fingerprint(&self) -> Option<Fingerprint> {
        Some(self.fingerprint)
    }

    fn num_samples(&self) -> u64 {
        self.data.num_samples()
    }

    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError> {
        let model = self.prepare(global)?;
        let out = self.data.train(&model, spec, ctl)?;
        let params = crate::standardise::with_frozen(out.params, global)?;
        Ok(TrainResult { params, ..out })
    }

    fn statistics(&mut self) -> Result<Vec<GroupSums>, ExecutorError> {
        Ok(self.local.clone())
    }

    fn evaluate(
        &mut self,
        global: &ParameterSet,
        split: &str,
        _ctl: &TaskControl,
    ) -> Result<EvalResult, ExecutorError> {
        let model = self.prepare(global)?;
        let k = match split {
            "val" => 1,
            "test" => 2,
            other => return Err(ExecutorError(format!("unknown split '{other}' (test or val)"))),
        };
        let ev = self.data.evaluate(&model, k)?;
        // The summary: every patient of the split, the cut-off from the training split.
        let train = if self.evaluation.cutoff.is_none() { Some(self.data.score(&model, 0)?) } else { None };
        let summary = crate::site_evaluation::summarise(&ev.predictions, train.as_ref(), &self.evaluation);
        Ok(EvalResult { num_samples: ev.num_samples, metrics: ev.metrics, summary })
    }
}

/// One site's cohort, split and encoded: the part every executor shares.
///
/// The design matrices hold the numeric columns **unstandardised** (built with
/// `FeatureStats::identity`): the study's pooled statistics arrive with the global model and are
/// applied by the executor (see [`crate::standardise`]). `stats` are this site's training-split
/// sums, what it reports for the pooled statistics. Every patient of each split is kept (labelled
/// or not), in split order.
pub struct SiteSplits {
    /// The site's `clinical.csv`.
    pub csv: std::path::PathBuf,
    pub cohort: Cohort,
    pub train: DesignMatrix,
    pub val: DesignMatrix,
    pub test: DesignMatrix,
    pub stats: FeatureStats,
    /// Where the numeric columns sit in a row (`fedhcc_cohort::numeric_positions`).
    pub positions: Vec<(usize, usize)>,
}

impl SiteSplits {
    /// Loads `data_dir/clinical.csv`, splits it (stratified, from the study's split seed) and
    /// encodes each split.
    ///
    /// # Errors
    /// The cohort cannot be read or split.
    pub fn load(data_dir: &Path, study: &StudyModel) -> Result<Self> {
        let csv = data_dir.join("clinical.csv");
        let report = Cohort::load(&csv, &study.spec, &study.cohort.outcomes)
            .with_context(|| format!("reading the site's cohort {}", csv.display()))?;
        if !report.issues.is_empty() {
            tracing::warn!(
                rows = report.issues.len(),
                "rows excluded by the data check; run `fedhcc data check` for details"
            );
        }
        let cohort = report.cohort;
        let labels = cohort.labels();
        let splits =
            Splits::stratified(&labels, study.cohort.split_seed, study.cohort.val_frac, study.cohort.test_frac)
                .context("splitting the cohort")?;
        let stats = FeatureStats::local(&cohort, &study.spec, &splits.train).context("feature statistics")?;
        let raw = FeatureStats::identity(&study.spec);
        let enc = |rows: &[usize]| -> Result<DesignMatrix> {
            DesignMatrix::build(&cohort, &study.spec, &raw, rows).context("encoding features")
        };
        let (train, val, test) = (enc(&splits.train)?, enc(&splits.val)?, enc(&splits.test)?);
        let positions = fedhcc_cohort::numeric_positions(&study.spec);
        Ok(Self { csv, cohort, train, val, test, stats, positions })
    }
}

/// The local-training parameters of a train task.
pub fn train_params(spec: &TrainSpec) -> TrainParams {
    TrainParams {
        epochs: spec.local_epochs as usize,
        batch_size: spec.batch_size as usize,
        lr: spec.learning_rate,
        weight_decay: spec.weight_decay,
        seed: spec.seed,
        pos_weight: None,
        prox_mu: spec.prox_mu,
    }
}

/// The executor a site runs under the study's strategy: `inner` itself, or under FedBN `inner`
/// wrapped so that its normalisation layers stay at the site (kept in
/// `state_dir/fedbn-local-<run>.fhcp` between rounds and restarts) and only the shared parameters
/// travel.
///
/// # Errors
/// Invalid aggregation settings, or saved local layers that belong to another model.
pub fn site_executor<E: Executor>(
    inner: E,
    study: &StudyConfig,
    model: &StudyModel,
    state_dir: &Path,
) -> Result<Box<dyn Executor>> {
    let Some(rule) = LocalParameters::for_study(study).map_err(|e| anyhow::anyhow!("study: {e}"))? else {
        return Ok(Box::new(inner));
    };
    let initial = model.initial_params(study.training.seed)?;
    let file = state_dir.join(format!("fedbn-local-{}.fhcp", study.run_id));
    let wrapped = LocalLayers::new(inner, rule, &initial, Some(file)).map_err(|e| anyhow::anyhow!("fedbn: {e}"))?;
    tracing::info!(
        local_tensors = wrapped.local().layout().specs().len(),
        local_values = wrapped.local().numel(),
        "fedbn: these parameters stay at this site"
    );
    Ok(Box::new(wrapped))
}

/// An executor that trains nothing, for benchmarks, drills and the federation tests: the global
/// model plus uniform noise of ±1e-3 ([`Self::new`]), or plus one exact shift ([`Self::shift`]: an
/// update whose FedAvg is known to the last bit). The noise comes from xorshift64* (not a
/// cryptographic generator): the benchmark measures the framework, not the random number generator.
pub struct NoiseExecutor {
    pub samples: u64,
    state: u64,
    /// Added to every value after the noise.
    shift: f32,
    /// The noise's half-width; 0 adds `shift` alone.
    amplitude: f32,
    /// How long a train task takes (a site's training time), cancellable.
    pause: std::time::Duration,
}

impl NoiseExecutor {
    /// Noise of ±1e-3 from `seed`, reported with `samples` training patients.
    pub fn new(samples: u64, seed: u64) -> Self {
        Self {
            samples,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            shift: 0.0,
            amplitude: 1e-3,
            pause: std::time::Duration::ZERO,
        }
    }

    /// Every value moved by exactly `shift`, no noise.
    pub fn shift(shift: f32, samples: u64) -> Self {
        Self { shift, amplitude: 0.0, ..Self::new(samples, 0) }
    }

    /// Each train task takes `pause` before it answers (cancelled as a real training is).
    #[must_use]
    pub fn with_pause(self, pause: std::time::Duration) -> Self {
        Self { pause, ..self }
    }

    fn next_unit(&mut self) -> f32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl Executor for NoiseExecutor {
    fn fingerprint(&self) -> Option<Fingerprint> {
        None
    }
    fn num_samples(&self) -> u64 {
        self.samples
    }
    fn train(
        &mut self,
        global: &ParameterSet,
        _spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError> {
        let until = std::time::Instant::now() + self.pause;
        while std::time::Instant::now() < until {
            if ctl.is_cancelled() {
                return Err(ExecutorError("cancelled".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(5).min(self.pause));
        }
        let mut p = global.clone();
        if self.amplitude == 0.0 {
            p.values_mut().iter_mut().for_each(|v| *v += self.shift);
        } else {
            for v in p.values_mut() {
                *v += self.amplitude * self.next_unit() + self.shift;
            }
        }
        Ok(TrainResult { params: p, num_samples: self.samples, metrics: vec![("train_loss".into(), 0.0)] })
    }
    fn evaluate(
        &mut self,
        _global: &ParameterSet,
        _split: &str,
        _ctl: &TaskControl,
    ) -> Result<EvalResult, ExecutorError> {
        Ok(EvalResult { num_samples: self.samples, metrics: vec![], summary: None })
    }
}
