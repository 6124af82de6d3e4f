//! The clinical model's site data: `clinical.csv`, split and encoded
//! ([`crate::executor::SiteSplits`]), trained and scored by the study's clinical burn model.

use crate::executor::{GroupStats, SiteData, SiteExecutor, SiteSplits, SplitEvaluation, train_params};
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use fedhcc_client::{ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_cohort::{Cohort, DesignMatrix};
use fedhcc_core::params::ParameterSet;
use fedhcc_model::{BackendKind, ClinicalModelConfig, Dataset};
use fedhcc_stats::federated::SitePredictions;
use std::path::Path;

/// Trains and evaluates the study's clinical model on one site's data.
pub type ClinicalExecutor = SiteExecutor<ClinicalData>;

/// A site's labelled rows, encoded for the model.
#[derive(Clone)]
struct Rows {
    x: Vec<f32>,
    y: Vec<f32>,
    n: usize,
    /// Patient ids, row by row (never sent anywhere; `fedhcc train --test-ids`).
    ids: Vec<String>,
}

impl Rows {
    fn from_matrix(m: &DesignMatrix, cohort: &Cohort) -> Self {
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut ids = Vec::new();
        for (i, label) in m.labels.iter().enumerate() {
            if let Some(l) = label {
                x.extend_from_slice(m.row(i));
                y.push(*l);
                ids.push(cohort.patients[m.patient_rows[i]].id.clone());
            }
        }
        let n = y.len();
        Self { x, y, n, ids }
    }

    fn dataset(&self, d: usize) -> Dataset<'_> {
        Dataset { x: &self.x, n: self.n, d, y: &self.y }
    }
}

/// Every patient of a split with a label or a survival outcome, encoded: what an evaluation scores.
/// Patient-level: never sent anywhere.
#[derive(Clone, Default)]
struct Scored {
    x: Vec<f32>,
    n: usize,
    label: Vec<Option<bool>>,
    rfs: Vec<Option<(f64, bool)>>,
    os: Vec<Option<(f64, bool)>>,
}

impl Scored {
    fn from_matrix(m: &DesignMatrix, cohort: &Cohort) -> Self {
        let mut s = Self::default();
        for i in 0..m.n {
            let label = m.labels[i].map(|l| l > 0.5);
            let (rfs, os) = (m.survival[i], cohort.patients[m.patient_rows[i]].os);
            if label.is_none() && rfs.is_none() && os.is_none() {
                continue;
            }
            s.x.extend_from_slice(m.row(i));
            s.label.push(label);
            s.rfs.push(rfs);
            s.os.push(os);
            s.n += 1;
        }
        s
    }

    fn append(&mut self, other: Scored) {
        self.x.extend(other.x);
        self.n += other.n;
        self.label.extend(other.label);
        self.rfs.extend(other.rfs);
        self.os.extend(other.os);
    }
}

/// One site's (or several sites' pooled) clinical rows, unstandardised and as the model reads them.
pub struct ClinicalData {
    cfg: ClinicalModelConfig,
    backend: BackendKind,
    /// Unstandardised labelled rows per split (train, val, test) and the standardised copies the
    /// model reads.
    raw: [Rows; 3],
    rows: [Rows; 3],
    positions: Vec<(usize, usize)>,
    /// Every patient to score per split: unstandardised, and the copies the model reads.
    scored_raw: [Scored; 3],
    scored: [Scored; 3],
}

impl ClinicalExecutor {
    /// Loads `data_dir/clinical.csv`, splits it, and encodes it (standardised with the statistics
    /// each task's model carries; see [`crate::standardise`]).
    ///
    /// # Errors
    /// The cohort cannot be read, or too few labelled patients remain to train.
    pub fn load(data_dir: &Path, study: &StudyModel, backend: BackendKind) -> Result<Self> {
        let cfg = study.clinical_config().context("this study's model is not a clinical model")?;
        let site = SiteSplits::load(data_dir, study)?;
        let raw = [&site.train, &site.val, &site.test].map(|m| Rows::from_matrix(m, &site.cohort));
        if raw[0].n < 2 {
            bail!("{}: only {} labelled training patients; at least 2 are needed", site.csv.display(), raw[0].n);
        }
        let fingerprint = study.initial_params(0)?.fingerprint();
        tracing::info!(train = raw[0].n, val = raw[1].n, test = raw[2].n, "site cohort ready");
        let local = crate::standardise::clinical_sums(&site.stats);
        let scored_raw = [&site.train, &site.val, &site.test].map(|m| Scored::from_matrix(m, &site.cohort));
        let data = ClinicalData {
            cfg,
            backend,
            rows: raw.clone(),
            raw,
            positions: site.positions,
            scored: scored_raw.clone(),
            scored_raw,
        };
        Ok(Self::new(data, fingerprint, vec![local], study.evaluation.clone()))
    }

    /// The design-matrix rows, before standardisation, of the patients [`Self::predictions`] scores
    /// for `split`, in the same order (`inputs` values per patient). Patient-level: for this site
    /// only (`fedhcc validate --write-inputs`).
    ///
    /// # Errors
    /// An unknown split.
    pub fn raw_inputs(&self, split: &str) -> Result<Vec<f32>, ExecutorError> {
        let splits = if split == "all" {
            (0..crate::site_evaluation::SPLITS.len()).collect()
        } else {
            vec![crate::site_evaluation::split_index(split)?]
        };
        Ok(splits.into_iter().flat_map(|k| self.data().scored_raw[k].x.iter().copied()).collect())
    }
}

impl SiteData for ClinicalData {
    fn standardise(&mut self, stats: &GroupStats) {
        let (mean, std) = &stats[0];
        let d = self.cfg.inputs.max(1);
        for (raw, out) in self.raw.iter().zip(&mut self.rows) {
            // Whole rows: after pooling, the counts, labels and ids change with the values.
            out.clone_from(raw);
            for row in out.x.chunks_exact_mut(d) {
                fedhcc_cohort::standardise_row(&self.positions, row, mean, std);
            }
        }
        for (raw, out) in self.scored_raw.iter().zip(&mut self.scored) {
            out.clone_from(raw);
            for row in out.x.chunks_exact_mut(d) {
                fedhcc_cohort::standardise_row(&self.positions, row, mean, std);
            }
        }
    }

    fn append(&mut self, other: Self) {
        for (into, from) in self.raw.iter_mut().zip(other.raw) {
            into.x.extend(from.x);
            into.y.extend(from.y);
            into.n += from.n;
            into.ids.extend(from.ids);
        }
        for (into, from) in self.scored_raw.iter_mut().zip(other.scored_raw) {
            into.append(from);
        }
    }

    fn num_samples(&self) -> u64 {
        self.rows[0].n as u64
    }

    fn test_ids(&self) -> Vec<String> {
        self.raw[2].ids.clone()
    }

    fn train(&self, model: &ParameterSet, spec: &TrainSpec, ctl: &TaskControl) -> Result<TrainResult, ExecutorError> {
        let tp = train_params(spec);
        let cancel = || ctl.is_cancelled();
        let mut progress = |epoch: usize, epochs: usize, loss: f64| {
            ctl.report_progress(epoch as u64, epochs as u64);
            tracing::info!(round = spec.round, epoch, epochs, loss = format!("{loss:.4}"), "local training");
        };
        let [train, val, _] = &self.rows;
        let d = self.cfg.inputs;
        let out =
            fedhcc_model::train_local(&self.cfg, model, &train.dataset(d), &tp, self.backend, &cancel, &mut progress)
                .map_err(|e| ExecutorError(e.to_string()))?;
        let mut metrics = vec![("train_loss".to_string(), out.train_loss), ("steps".to_string(), out.steps as f64)];
        if val.n > 0
            && let Ok(ev) = fedhcc_model::evaluate(&self.cfg, &out.params, &val.dataset(d), self.backend)
        {
            metrics.push(("val_loss".into(), ev.loss));
            if let Some(auc) = fedhcc_model::auc(&ev.scores, &val.y) {
                metrics.push(("val_auc".into(), auc));
            }
        }
        Ok(TrainResult { params: out.params, num_samples: out.samples as u64, metrics })
    }

    fn evaluate(&self, model: &ParameterSet, k: usize) -> Result<SplitEvaluation, ExecutorError> {
        let rows = &self.rows[k];
        if rows.n == 0 {
            let split = crate::site_evaluation::SPLITS[k];
            return Err(ExecutorError(format!("the '{split}' split has no labelled patient")));
        }
        let ev = fedhcc_model::evaluate(&self.cfg, model, &rows.dataset(self.cfg.inputs), self.backend)
            .map_err(|e| ExecutorError(e.to_string()))?;
        let positives = rows.y.iter().filter(|&&v| v > 0.5).count();
        let mut metrics = vec![("loss".to_string(), ev.loss), ("n_positive".to_string(), positives as f64)];
        if let Some(auc) = fedhcc_model::auc(&ev.scores, &rows.y) {
            metrics.push(("auc".into(), auc));
        }
        Ok(SplitEvaluation { num_samples: ev.n as u64, metrics, predictions: self.score(model, k)? })
    }

    fn score(&self, model: &ParameterSet, k: usize) -> Result<SitePredictions, ExecutorError> {
        let s = &self.scored[k];
        let mut out = SitePredictions {
            score: Vec::with_capacity(s.n),
            label: s.label.clone(),
            rfs: s.rfs.clone(),
            os: s.os.clone(),
        };
        if s.n > 0 {
            let y = vec![0.0; s.n];
            let data = Dataset { x: &s.x, n: s.n, d: self.cfg.inputs, y: &y };
            let ev = fedhcc_model::evaluate(&self.cfg, model, &data, self.backend)
                .map_err(|e| ExecutorError(e.to_string()))?;
            out.score.extend(ev.scores.iter().map(|&p| f64::from(p)));
        }
        Ok(out)
    }
}
