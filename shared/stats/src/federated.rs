//! Federated evaluation: what one site reports about a global model on its held-out split
//! ([`SiteEvaluation`]), how the server checks such a report before it stores it
//! ([`SiteEvaluation::decode`]), and how it pools the reports ([`PooledEvaluation::pool`]).
//!
//! A site computes everything from its own patients' scores ([`SitePredictions`], which never
//! leave it) and sends aggregates only:
//! - its own statistics: AUC with DeLong interval, Brier score, calibration intercept and slope,
//!   sensitivity / specificity / PPV / NPV at the cut-off with Wilson intervals, Harrell's C for
//!   RFS and OS;
//! - what pooling needs: a [`ScoreHistogram`] per label, and [`SurvivalCounts`] per risk group
//!   (`high`: score ≥ cut-off, `low`; `all` when there is no cut-off) on a time grid, for RFS and OS.
//!
//! **Cut-off.** The study's fixed `[evaluation] cutoff` when it has one; otherwise Youden's cut-off
//! on the site's *training* split, scored by the same model at evaluation time, then frozen for the
//! held-out split (never chosen on the held-out patients). The server reports the training-sample
//! weighted mean of the sites' cut-offs as the study cut-off to freeze in `[evaluation] cutoff` for
//! later evaluations and external validation. With per-site cut-offs, the pooled `high` group is
//! the union of each site's `high` group.
//!
//! **Minimum cell.** Every released figure describes groups of at least `min_cell` patients (the
//! site policy's `min_group_size`, default 10): AUC, Brier and calibration need `min_cell`
//! positives and negatives; a proportion needs a denominator of `min_cell`; a C-index needs
//! `min_cell` patients and events; a histogram needs `min_cell` per class; survival counts follow
//! [`SurvivalCounts::check_min_cell`]. A figure that fails is left out (`null`) and `notes` says
//! why in fixed words, never with a patient's value. The server refuses a report that breaks the
//! rule it declares, or declares a rule below the study's floor.
//!
//! Size: the site's evaluation summary, the server's checks of it and the pooling are one format: a
//! field added to one is checked and pooled in the others in the same change. A sixth of the file
//! is the tests of those checks.

use crate::binary::{self, Auc, Calibration, Confusion, Proportion};
use crate::pooled::{ScoreHistogram, SurvivalCounts};
use crate::report::KmGroup;
use crate::survival::{self, GroupCounts, LogRank};
use crate::{Result, StatsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the [`SiteEvaluation`] encoding.
pub const SITE_EVALUATION_VERSION: u32 = 1;
/// Largest encoded [`SiteEvaluation`] a site sends and the server accepts (bytes of JSON).
pub const MAX_SUMMARY_BYTES: usize = 768 * 1024;
/// Most histogram bins.
pub const MAX_HISTOGRAM_BINS: usize = 10_000;
/// Most distinct times in one risk group's survival counts.
pub const MAX_SURVIVAL_TIMES: usize = 2_000;
/// Most patients a summary may describe (guards the sums against overflow).
pub const MAX_PATIENTS: u64 = 10_000_000;
/// Most entries in `notes`.
pub const MAX_NOTES: usize = 32;
/// Longest note key and text (bytes).
pub const MAX_NOTE_LEN: usize = 512;
/// Histogram bins when the study does not say (pooled AUC within about 1e-3 of the exact one).
pub const DEFAULT_HISTOGRAM_BINS: usize = 1000;
/// Survival time grid in days when the study does not say.
pub const DEFAULT_TIME_GRID_DAYS: f64 = 30.0;
/// Minimum cell size when the site's policy does not say.
pub const DEFAULT_MIN_CELL: u64 = 10;
/// Confidence level of every interval in a summary.
pub const LEVEL: f64 = 0.95;
/// Risk group at or above the cut-off.
pub const HIGH: &str = "high";
/// Risk group below the cut-off.
pub const LOW: &str = "low";
/// The single group when there is no cut-off.
pub const ALL: &str = "all";

/// How a site summarises its evaluation: the study's `[evaluation]` choices and the site's minimum
/// cell size.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationSettings {
    /// The study's fixed cut-off; `None`: Youden's on the site's training split.
    pub cutoff: Option<f64>,
    /// Bins of the score histograms on [0, 1].
    pub histogram_bins: usize,
    /// Survival times are rounded up to multiples of this many days.
    pub time_grid_days: f64,
    /// Smallest group a released figure may describe.
    pub min_cell: u64,
}

impl Default for EvaluationSettings {
    fn default() -> Self {
        EvaluationSettings {
            cutoff: None,
            histogram_bins: DEFAULT_HISTOGRAM_BINS,
            time_grid_days: DEFAULT_TIME_GRID_DAYS,
            min_cell: DEFAULT_MIN_CELL,
        }
    }
}

impl EvaluationSettings {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A non-finite cut-off, bins outside 1..=[`MAX_HISTOGRAM_BINS`], a grid that is not a positive
    /// number, or a minimum cell of 0.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(StatsError::undefined("evaluation settings", reason));
        if let Some(c) = self.cutoff
            && !c.is_finite()
        {
            return bad(format!("cut-off {c} is not a number"));
        }
        if !(1..=MAX_HISTOGRAM_BINS).contains(&self.histogram_bins) {
            return bad(format!("{} histogram bins (1 to {MAX_HISTOGRAM_BINS})", self.histogram_bins));
        }
        if !(self.time_grid_days.is_finite() && self.time_grid_days > 0.0) {
            return bad(format!("time grid {} is not a positive number of days", self.time_grid_days));
        }
        if self.min_cell == 0 {
            return bad("the minimum cell size must be at least 1".into());
        }
        Ok(())
    }
}

/// One site's patients as scored by a model: patient-level, never sent anywhere. Entry `i` of every
/// column belongs to the same patient.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SitePredictions {
    /// Predicted probability (higher = higher risk).
    pub score: Vec<f64>,
    /// Binary outcome; `None`: unlabelled.
    pub label: Vec<Option<bool>>,
    /// Recurrence-free survival (days, event), when known.
    pub rfs: Vec<Option<(f64, bool)>>,
    /// Overall survival (days, event), when known.
    pub os: Vec<Option<(f64, bool)>>,
}

/// Which survival outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Recurrence-free survival.
    Rfs,
    /// Overall survival.
    Os,
}

impl Outcome {
    /// `rfs` or `os`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rfs => "rfs",
            Outcome::Os => "os",
        }
    }
}

impl SitePredictions {
    /// Patients.
    pub fn len(&self) -> usize {
        self.score.len()
    }

    /// Whether there are no patients.
    pub fn is_empty(&self) -> bool {
        self.score.is_empty()
    }

    /// Appends `other`'s patients.
    pub fn extend(&mut self, other: SitePredictions) {
        self.score.extend(other.score);
        self.label.extend(other.label);
        self.rfs.extend(other.rfs);
        self.os.extend(other.os);
    }

    /// `n` made-up patients for tests and examples, the same for the same `seed`: scores spread over
    /// (0, 1), labels and survival that follow the score with noise, every patient with a label, RFS
    /// and OS. No patient's data.
    pub fn synthetic(n: usize, seed: u64) -> Self {
        let mut p = SitePredictions::default();
        // xorshift64* → a uniform draw in [0, 1).
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut unit = || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..n {
            let s = 0.02 + 0.96 * unit();
            p.score.push(s);
            p.label.push(Some(unit() < s));
            let t = (30.0 + 2000.0 * unit() * (1.2 - s)).round();
            p.rfs.push(Some((t, unit() < 0.3 + 0.5 * s)));
            p.os.push(Some((t + 100.0, unit() < 0.2 + 0.3 * s)));
        }
        p
    }

    /// Checks that the columns align and every score and time is a finite number (times ≥ 0).
    ///
    /// # Errors
    /// Columns of different lengths, or a bad value (named by row).
    pub fn check(&self) -> Result<()> {
        let n = self.score.len();
        for (what, len) in [("label", self.label.len()), ("rfs", self.rfs.len()), ("os", self.os.len())] {
            if len != n {
                return Err(StatsError::LengthMismatch { what, got: len, expected: n });
            }
        }
        crate::numeric::check_finite("score", &self.score)?;
        for (what, column) in [("RFS time", &self.rfs), ("OS time", &self.os)] {
            if let Some(i) = column.iter().position(|o| o.is_some_and(|(t, _)| !(t.is_finite() && t >= 0.0))) {
                return Err(StatsError::BadValue {
                    what,
                    row: i + 1,
                    value: column[i].map_or(String::new(), |(t, _)| t.to_string()),
                    expected: "a time of zero or more",
                });
            }
        }
        Ok(())
    }

    /// Labels and scores of the labelled patients.
    pub fn labelled(&self) -> (Vec<bool>, Vec<f64>) {
        self.label.iter().zip(&self.score).filter_map(|(l, s)| l.map(|l| (l, *s))).unzip()
    }

    /// Time, event and score of the patients with the outcome.
    pub fn survival(&self, outcome: Outcome) -> (Vec<f64>, Vec<bool>, Vec<f64>) {
        let column = match outcome {
            Outcome::Rfs => &self.rfs,
            Outcome::Os => &self.os,
        };
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for (o, s) in column.iter().zip(&self.score) {
            if let Some((t, e)) = o {
                out.0.push(*t);
                out.1.push(*e);
                out.2.push(*s);
            }
        }
        out
    }
}

/// Where a summary's cut-off came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoffSource {
    /// The study's `[evaluation] cutoff`.
    Study,
    /// Youden's cut-off on the site's training split (same model), frozen for the held-out split.
    SiteTrainingYouden,
    /// No cut-off (not given, and Youden's not defined or suppressed on the training split).
    None,
}

/// Counts and survival figures of one outcome at a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSurvival {
    /// Patients with this outcome.
    pub n: u64,
    /// Events among them.
    pub n_events: u64,
    /// Harrell's C of the score (`null`: suppressed or undefined, see `notes`).
    pub c_index_harrell: Option<f64>,
    /// Events and censorings per risk group on the time grid (`null`: refused by the minimum cell).
    pub counts: Option<SurvivalCounts>,
}

/// What a site reports about a model on its held-out split: aggregates only (see the module docs).
/// Key names are part of the protocol (version [`SITE_EVALUATION_VERSION`]) and of
/// `evaluation/<task>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEvaluation {
    /// Encoding version.
    pub version: u32,
    /// The minimum cell size the site applied.
    pub min_cell: u64,
    /// The survival time grid (days).
    pub time_grid_days: f64,
    /// Patients scored (with a label or a survival outcome).
    pub n: u64,
    /// Labelled patients.
    pub n_labelled: u64,
    /// Labelled positives.
    pub n_positive: u64,
    /// The cut-off (`score >= cutoff` is test-positive / high risk).
    pub cutoff: Option<f64>,
    /// Where the cut-off came from.
    pub cutoff_source: CutoffSource,
    /// Labelled training patients behind a Youden cut-off (its weight in the study cut-off).
    pub n_train_labelled: Option<u64>,
    /// ROC AUC with DeLong SE and interval.
    pub auc: Option<Auc>,
    /// Brier score.
    pub brier: Option<f64>,
    /// Calibration intercept and slope.
    pub calibration: Option<Calibration>,
    /// Sensitivity at the cut-off.
    pub sensitivity: Option<Proportion>,
    /// Specificity at the cut-off.
    pub specificity: Option<Proportion>,
    /// Positive predictive value at the cut-off.
    pub ppv: Option<Proportion>,
    /// Negative predictive value at the cut-off.
    pub npv: Option<Proportion>,
    /// Score histogram per label (`null`: refused by the minimum cell, or the score is not a
    /// probability).
    pub histogram: Option<ScoreHistogram>,
    /// Recurrence-free survival (`null`: no patient has it).
    pub rfs: Option<SiteSurvival>,
    /// Overall survival (`null`: no patient has it).
    pub os: Option<SiteSurvival>,
    /// Why a figure is null, by key, in fixed words (no patient value).
    pub notes: BTreeMap<String, String>,
}

/// Why a statistic is missing, in fixed words: never the error's own text, which may carry a value.
fn reason(e: &StatsError) -> String {
    match e {
        StatsError::BadValue { what, .. } => format!("not computed: a {what} is not a valid number"),
        StatsError::LengthMismatch { .. } => "not computed: inputs of different lengths".into(),
        StatsError::Undefined { statistic, .. } => {
            format!("{statistic} is not defined on this split (one class only, no events or a constant score)")
        }
        StatsError::SmallCell { what, min_cell, .. } => {
            format!("suppressed: {what} has a group under the minimum cell size {min_cell}")
        }
        StatsError::Incompatible { what, .. } => format!("not computed: incompatible {what}"),
    }
}

/// The value, or `None` with the reason noted under `key`.
fn kept<T>(notes: &mut BTreeMap<String, String>, key: &str, r: Result<T>) -> Option<T> {
    r.map_err(|e| notes.insert(key.into(), reason(&e))).ok()
}

fn suppressed(what: &str, min_cell: u64) -> String {
    format!("suppressed: {what} fewer than the minimum cell size {min_cell}")
}

impl SiteEvaluation {
    /// Summarises `test` (the held-out split's predictions). `training` (the training split scored
    /// by the same model) gives the Youden cut-off when the study fixes none.
    ///
    /// # Errors
    /// Invalid settings, or predictions whose columns differ in length or hold a bad value.
    pub fn compute(
        test: &SitePredictions,
        training: Option<&SitePredictions>,
        settings: &EvaluationSettings,
    ) -> Result<Self> {
        settings.check()?;
        test.check()?;
        let m = settings.min_cell;
        let mut notes = BTreeMap::new();
        let (labels, scores) = test.labelled();
        let n_pos = labels.iter().filter(|l| **l).count() as u64;
        let n_neg = labels.len() as u64 - n_pos;
        let probability = test.score.iter().all(|s| (0.0..=1.0).contains(s));

        let (cutoff, cutoff_source, n_train_labelled) = match (settings.cutoff, training) {
            (Some(c), _) => (Some(c), CutoffSource::Study, None),
            (None, Some(train)) => {
                train.check()?;
                let (tl, ts) = train.labelled();
                let tp = tl.iter().filter(|l| **l).count() as u64;
                if tp < m || (tl.len() as u64 - tp) < m {
                    notes.insert("cutoff".into(), suppressed("the training split has", m) + " positives or negatives");
                    (None, CutoffSource::None, None)
                } else {
                    match binary::youden(&tl, &ts) {
                        Ok(y) => (Some(y.cutoff), CutoffSource::SiteTrainingYouden, Some(tl.len() as u64)),
                        Err(e) => {
                            notes.insert("cutoff".into(), reason(&e));
                            (None, CutoffSource::None, None)
                        }
                    }
                }
            }
            (None, None) => {
                notes.insert("cutoff".into(), "no study cut-off and no training split to choose one on".into());
                (None, CutoffSource::None, None)
            }
        };

        let classes_ok = n_pos >= m && n_neg >= m;
        let (auc, brier, calibration) = if !classes_ok {
            let why = suppressed("the split has", m) + " positives or negatives";
            for key in ["auc", "brier", "calibration", "histogram"] {
                notes.insert(key.into(), why.clone());
            }
            (None, None, None)
        } else {
            let auc = kept(&mut notes, "auc", binary::auc_delong(&labels, &scores, LEVEL));
            if probability {
                let brier = kept(&mut notes, "brier", binary::brier(&labels, &scores));
                let calibration = kept(&mut notes, "calibration", binary::calibration(&labels, &scores));
                (auc, brier, calibration)
            } else {
                let why = "the score is not a probability in [0, 1]".to_string();
                for key in ["brier", "calibration", "histogram"] {
                    notes.insert(key.into(), why.clone());
                }
                (auc, None, None)
            }
        };
        let histogram = if classes_ok && probability {
            match ScoreHistogram::from_scores(&labels, &scores, settings.histogram_bins)
                .and_then(|h| h.check_min_cell(m).map(|()| h))
            {
                Ok(h) => Some(h),
                Err(e) => {
                    notes.insert("histogram".into(), reason(&e));
                    None
                }
            }
        } else {
            None
        };

        let (mut sensitivity, mut specificity, mut ppv, mut npv) = (None, None, None, None);
        if let Some(c) = cutoff {
            let confusion = Confusion::at(&labels, &scores, c)?;
            let mut proportion = |key: &str, count: u64, total: u64, what: &str| {
                if total < m {
                    notes.insert(key.into(), suppressed(what, m));
                    return None;
                }
                match binary::wilson(count, total, LEVEL) {
                    Ok(p) => p,
                    Err(e) => {
                        notes.insert(key.into(), reason(&e));
                        None
                    }
                }
            };
            let Confusion { tp, fp, tn, fn_ } = confusion;
            sensitivity = proportion("sensitivity", tp, tp + fn_, "positives are");
            specificity = proportion("specificity", tn, tn + fp, "negatives are");
            ppv = proportion("ppv", tp, tp + fp, "patients at or above the cut-off are");
            npv = proportion("npv", tn, tn + fn_, "patients below the cut-off are");
        } else {
            for key in ["sensitivity", "specificity", "ppv", "npv"] {
                notes.insert(key.into(), "no cut-off (see cutoff)".into());
            }
        }

        let rfs = Self::survival(test, Outcome::Rfs, cutoff, settings, &mut notes)?;
        let os = Self::survival(test, Outcome::Os, cutoff, settings, &mut notes)?;
        Ok(SiteEvaluation {
            version: SITE_EVALUATION_VERSION,
            min_cell: m,
            time_grid_days: settings.time_grid_days,
            n: test.len() as u64,
            n_labelled: labels.len() as u64,
            n_positive: n_pos,
            cutoff,
            cutoff_source,
            n_train_labelled,
            auc,
            brier,
            calibration,
            sensitivity,
            specificity,
            ppv,
            npv,
            histogram,
            rfs,
            os,
            notes,
        })
    }

    fn survival(
        test: &SitePredictions,
        outcome: Outcome,
        cutoff: Option<f64>,
        settings: &EvaluationSettings,
        notes: &mut BTreeMap<String, String>,
    ) -> Result<Option<SiteSurvival>> {
        let (time, event, score) = test.survival(outcome);
        if time.is_empty() {
            notes.insert(outcome.as_str().into(), "no patient of this split has this outcome".into());
            return Ok(None);
        }
        let m = settings.min_cell;
        let n = time.len() as u64;
        let n_events = event.iter().filter(|e| **e).count() as u64;
        let key = |k: &str| format!("{}.{k}", outcome.as_str());
        let c_index_harrell = if n < m || n_events < m {
            notes.insert(key("c_index_harrell"), suppressed("patients or events are", m));
            None
        } else {
            match survival::harrell_c(&time, &event, &score) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.insert(key("c_index_harrell"), reason(&e));
                    None
                }
            }
        };
        let group: Vec<&str> = match cutoff {
            Some(c) => score.iter().map(|&s| if s >= c { HIGH } else { LOW }).collect(),
            None => vec![ALL; time.len()],
        };
        let counts = SurvivalCounts::from_rows_on_grid(&time, &event, &group, settings.time_grid_days)?;
        let counts = match counts.check_min_cell(m) {
            Ok(()) if counts.groups.values().all(|g| g.time.len() <= MAX_SURVIVAL_TIMES) => Some(counts),
            Ok(()) => {
                notes.insert(key("counts"), "too many distinct times: choose a coarser [evaluation] time grid".into());
                None
            }
            Err(e) => {
                notes.insert(key("counts"), reason(&e));
                None
            }
        };
        Ok(Some(SiteSurvival { n, n_events, c_index_harrell, counts }))
    }

    /// The JSON a site sends.
    ///
    /// # Errors
    /// Longer than [`MAX_SUMMARY_BYTES`] (a finer grid or more bins than the protocol carries).
    pub fn encode(&self) -> std::result::Result<Vec<u8>, SummaryError> {
        let bytes = serde_json::to_vec(self).map_err(|e| SummaryError(format!("cannot be encoded: {e}")))?;
        if bytes.len() > MAX_SUMMARY_BYTES {
            return Err(SummaryError(format!(
                "{} bytes, more than the {MAX_SUMMARY_BYTES} the protocol carries: use fewer [evaluation] \
                 histogram_bins or a coarser time_grid_days",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Parses and checks a site's report (see [`SiteEvaluation::check`]).
    ///
    /// # Errors
    /// Too long, not this version's JSON, or fails a check.
    pub fn decode(bytes: &[u8], rules: &SummaryRules) -> std::result::Result<Self, SummaryError> {
        if bytes.len() > MAX_SUMMARY_BYTES {
            return Err(SummaryError(format!("{} bytes (at most {MAX_SUMMARY_BYTES})", bytes.len())));
        }
        // The version first, so that a newer site gets a clear message rather than a field error.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version =
            serde_json::from_slice(bytes).map_err(|e| SummaryError(format!("not a site evaluation summary: {e}")))?;
        if v.version != SITE_EVALUATION_VERSION {
            return Err(SummaryError(format!(
                "version {} (this server reads version {SITE_EVALUATION_VERSION}): update the site's fedhcc",
                v.version
            )));
        }
        let s: SiteEvaluation =
            serde_json::from_slice(bytes).map_err(|e| SummaryError(format!("not a site evaluation summary: {e}")))?;
        s.check(rules)?;
        Ok(s)
    }

    /// Checks a report the way the server must before storing it: the study's bins and grid, a
    /// minimum cell at or above the floor and respected by every figure, consistent counts,
    /// finite values in range, sorted times on the grid, bounded sizes.
    ///
    /// # Errors
    /// The first failed check, named.
    pub fn check(&self, rules: &SummaryRules) -> std::result::Result<(), SummaryError> {
        let fail = |m: String| Err(SummaryError(m));
        let m = self.min_cell;
        if m < rules.min_cell_floor {
            return fail(format!("minimum cell size {m} is below the study's floor {}", rules.min_cell_floor));
        }
        if self.time_grid_days != rules.time_grid_days {
            return fail(format!(
                "time grid {} days, the study's is {} days: the site runs another study file",
                self.time_grid_days, rules.time_grid_days
            ));
        }
        if self.n > MAX_PATIENTS || self.n_labelled > self.n || self.n_positive > self.n_labelled {
            return fail(format!(
                "inconsistent counts: {} patients, {} labelled, {} positive",
                self.n, self.n_labelled, self.n_positive
            ));
        }
        let n_negative = self.n_labelled - self.n_positive;
        if let Some(c) = self.cutoff
            && !c.is_finite()
        {
            return fail("the cut-off is not a number".into());
        }
        match (self.cutoff_source, self.cutoff, self.n_train_labelled) {
            (CutoffSource::None, None, None) | (CutoffSource::Study, Some(_), None) => {}
            (CutoffSource::SiteTrainingYouden, Some(_), Some(n)) if (m..=MAX_PATIENTS).contains(&n) => {}
            _ => return fail("cut-off, its source and its training patients do not agree".into()),
        }
        // JSON numbers may come back one unit in the last place off (serde_json's fast parser).
        if let Some(c) = self.cutoff
            && self.cutoff_source == CutoffSource::Study
            && rules.study_cutoff.is_none_or(|s| (s - c).abs() > 1e-12 * s.abs().max(1.0))
        {
            return fail(format!("cut-off {c} is not the study's [evaluation] cutoff"));
        }
        let classes_ok = self.n_positive >= m && n_negative >= m;
        if let Some(a) = &self.auc {
            if !classes_ok {
                return fail(small("auc"));
            }
            let values = [a.estimate, a.se, a.ci_low, a.ci_high];
            let valid = values.iter().all(|v| v.is_finite())
                && (0.0..=1.0).contains(&a.estimate)
                && a.se >= 0.0
                && a.ci_low <= a.estimate
                && a.estimate <= a.ci_high;
            if !valid {
                return fail("auc is not a valid AUC with interval".into());
            }
        }
        if let Some(b) = self.brier {
            if !classes_ok {
                return fail(small("brier"));
            }
            if !(0.0..=1.0).contains(&b) {
                return fail("brier is not in [0, 1]".into());
            }
        }
        if let Some(c) = &self.calibration {
            if !classes_ok {
                return fail(small("calibration"));
            }
            if !(c.intercept.is_finite() && c.slope.is_finite()) {
                return fail("calibration is not finite".into());
            }
        }
        for (key, p) in [
            ("sensitivity", &self.sensitivity),
            ("specificity", &self.specificity),
            ("ppv", &self.ppv),
            ("npv", &self.npv),
        ] {
            if let Some(p) = p {
                if self.cutoff.is_none() {
                    return fail(format!("{key} without a cut-off"));
                }
                if p.total < m || p.total > self.n_labelled {
                    return fail(small(key));
                }
                let values = [p.estimate, p.ci_low, p.ci_high];
                // Wilson bounds of 0 % or 100 % may pass 0 or 1 by a rounding error.
                if p.count > p.total
                    || !values.iter().all(|v| (-1e-9..=1.0 + 1e-9).contains(v))
                    || (p.estimate - p.count as f64 / p.total as f64).abs() > 1e-9
                {
                    return fail(format!("{key} is not a valid proportion"));
                }
            }
        }
        if let Some(h) = &self.histogram {
            if h.bins() != rules.histogram_bins || h.negative.len() != h.positive.len() {
                return fail(format!(
                    "a histogram of {} bins, the study's has {}",
                    h.positive.len().max(h.negative.len()),
                    rules.histogram_bins
                ));
            }
            let (pos, neg) = (checked_sum(&h.positive), checked_sum(&h.negative));
            if pos != Some(self.n_positive) || neg != Some(n_negative) {
                return fail("the histogram's counts differ from the positives and negatives reported".into());
            }
            h.check_min_cell(m).map_err(|e| SummaryError(e.to_string()))?;
        }
        for (name, s) in [("rfs", &self.rfs), ("os", &self.os)] {
            if let Some(s) = s {
                check_survival(name, s, self.n, m, self.cutoff.is_some(), rules)?;
            }
        }
        if self.notes.len() > MAX_NOTES
            || self.notes.iter().any(|(k, v)| k.len() > MAX_NOTE_LEN || v.len() > MAX_NOTE_LEN)
        {
            return fail(format!("notes: at most {MAX_NOTES} of {MAX_NOTE_LEN} bytes each"));
        }
        Ok(())
    }

    /// Kaplan–Meier curve per risk group of one outcome's counts (empty without counts).
    pub fn kaplan_meier(&self, outcome: Outcome) -> Vec<KmGroup> {
        let s = match outcome {
            Outcome::Rfs => &self.rfs,
            Outcome::Os => &self.os,
        };
        s.as_ref().and_then(|s| s.counts.as_ref()).map(|c| km_groups(c, &mut BTreeMap::new(), "km")).unwrap_or_default()
    }
}

fn small(key: &str) -> String {
    format!("{key} describes a group under the declared minimum cell size")
}

fn checked_sum(values: &[u64]) -> Option<u64> {
    values.iter().try_fold(0u64, |a, &b| a.checked_add(b)).filter(|&s| s <= MAX_PATIENTS)
}

fn check_survival(
    name: &str,
    s: &SiteSurvival,
    n: u64,
    m: u64,
    has_cutoff: bool,
    rules: &SummaryRules,
) -> std::result::Result<(), SummaryError> {
    let fail = |msg: String| Err(SummaryError(format!("{name}: {msg}")));
    if s.n > n || s.n_events > s.n {
        return fail(format!("{} patients with {} events of {n} scored", s.n, s.n_events));
    }
    if let Some(c) = s.c_index_harrell {
        if s.n < m || s.n_events < m {
            return fail(small("c_index_harrell"));
        }
        if !(0.0..=1.0).contains(&c) {
            return fail("c_index_harrell is not in [0, 1]".into());
        }
    }
    let Some(counts) = &s.counts else { return Ok(()) };
    let allowed: &[&str] = if has_cutoff { &[HIGH, LOW] } else { &[ALL] };
    if counts.groups.is_empty() || counts.groups.keys().any(|g| !allowed.contains(&g.as_str())) {
        return fail(format!("risk groups must be {}", allowed.join(" and ")));
    }
    let (mut total, mut events) = (0u64, 0u64);
    for (group, g) in &counts.groups {
        check_group(g, rules.time_grid_days).map_err(|msg| SummaryError(format!("{name} group '{group}': {msg}")))?;
        total += checked_sum(&g.events).zip(checked_sum(&g.censored)).map_or(u64::MAX / 4, |(d, c)| d + c);
        events += checked_sum(&g.events).unwrap_or(u64::MAX / 4);
    }
    if total != s.n || events != s.n_events {
        return fail("the counts differ from the patients and events reported".into());
    }
    counts.check_min_cell(m).map_err(|e| SummaryError(format!("{name}: {e}")))
}

fn check_group(g: &GroupCounts, grid: f64) -> std::result::Result<(), String> {
    let k = g.time.len();
    if g.events.len() != k || g.censored.len() != k {
        return Err("times, events and censorings differ in length".into());
    }
    if k == 0 || k > MAX_SURVIVAL_TIMES {
        return Err(format!("{k} times (1 to {MAX_SURVIVAL_TIMES})"));
    }
    let mut last = -1.0;
    for &t in &g.time {
        if !(t.is_finite() && t >= 0.0 && t > last) {
            return Err("times must be increasing numbers of zero or more".into());
        }
        if ((t / grid).round() * grid - t).abs() > 1e-9 * t.max(1.0) {
            return Err(format!("time {t} is not on the {grid}-day grid"));
        }
        last = t;
    }
    if g.events.iter().zip(&g.censored).any(|(d, c)| d.checked_add(*c).is_none_or(|x| x == 0 || x > MAX_PATIENTS)) {
        return Err("a time with no patient, or with more than the largest count allowed".into());
    }
    Ok(())
}

/// What the server holds a site's report to: the study's `[evaluation]` choices and its floor for
/// the minimum cell size.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRules {
    /// The study's histogram bins.
    pub histogram_bins: usize,
    /// The study's time grid (days).
    pub time_grid_days: f64,
    /// The study's fixed cut-off, if any.
    pub study_cutoff: Option<f64>,
    /// The smallest minimum cell size a site may declare.
    pub min_cell_floor: u64,
}

/// Why a site's evaluation summary was refused (or could not be encoded).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("site evaluation summary: {0}")]
pub struct SummaryError(pub String);

/// Pooled survival of one outcome: the merged counts and what is exact from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PooledSurvival {
    /// Sites whose counts were merged (in site order).
    pub sites: Vec<String>,
    /// The merged counts per risk group.
    pub counts: SurvivalCounts,
    /// Kaplan–Meier curve per risk group.
    pub km: Vec<KmGroup>,
    /// Log-rank test between the risk groups.
    pub logrank: Option<LogRank>,
}

/// The pooled part of an evaluation: from the sites' summaries alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PooledEvaluation {
    /// Sites with a summary (in site order).
    pub sites: Vec<String>,
    /// Patients scored across them.
    pub n: u64,
    /// Labelled patients.
    pub n_labelled: u64,
    /// Positives.
    pub n_positive: u64,
    /// Sites whose histograms were merged.
    pub histogram_sites: Vec<String>,
    /// AUC of the merged histograms (scores in one bin tied: within about one bin width of the
    /// AUC of the pooled scores).
    pub auc: Option<f64>,
    /// The study cut-off: the study's fixed one, or the training-sample weighted mean of the sites'
    /// Youden cut-offs (to freeze in `[evaluation] cutoff`).
    pub study_cutoff: Option<f64>,
    /// `study` or `weighted_mean_of_site_training_youden`.
    pub study_cutoff_source: Option<String>,
    /// Recurrence-free survival.
    pub rfs: Option<PooledSurvival>,
    /// Overall survival.
    pub os: Option<PooledSurvival>,
    /// Why a pooled figure is null, or what to keep in mind.
    pub notes: BTreeMap<String, String>,
}

fn km_groups(counts: &SurvivalCounts, notes: &mut BTreeMap<String, String>, key: &str) -> Vec<KmGroup> {
    counts
        .groups
        .keys()
        .filter_map(|g| match counts.kaplan_meier(g, LEVEL) {
            Ok(curve) => Some(KmGroup { group: g.clone(), curve }),
            Err(e) => {
                notes.insert(format!("{key}.{g}"), e.to_string());
                None
            }
        })
        .collect()
}

impl PooledEvaluation {
    /// Pools checked summaries (give them in site order: the output lists them so).
    pub fn pool(sites: &[(&str, &SiteEvaluation)]) -> Self {
        let mut notes = BTreeMap::new();
        let mut histogram: Option<ScoreHistogram> = None;
        let mut histogram_sites = Vec::new();
        for (site, s) in sites {
            let Some(h) = &s.histogram else {
                notes.insert(format!("auc.{site}"), "this site sent no histogram (see its notes)".into());
                continue;
            };
            match &mut histogram {
                None => histogram = Some(h.clone()),
                Some(acc) => {
                    if let Err(e) = acc.merge(h) {
                        notes.insert(format!("auc.{site}"), e.to_string());
                        continue;
                    }
                }
            }
            histogram_sites.push((*site).to_owned());
        }
        let auc = match histogram.as_ref().map(ScoreHistogram::auc) {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                notes.insert("auc".into(), e.to_string());
                None
            }
            None => {
                notes.insert("auc".into(), "no site sent a score histogram".into());
                None
            }
        };

        let (study_cutoff, study_cutoff_source) = study_cutoff(sites, &mut notes);
        let rfs = pool_survival(sites, Outcome::Rfs, &mut notes);
        let os = pool_survival(sites, Outcome::Os, &mut notes);
        if sites.iter().any(|(_, s)| s.cutoff_source == CutoffSource::SiteTrainingYouden) {
            notes.insert(
                "risk_groups".into(),
                "each site split high/low risk at its own training-split Youden cut-off; the pooled groups are \
                 the union of the sites' groups"
                    .into(),
            );
        }
        PooledEvaluation {
            sites: sites.iter().map(|(s, _)| (*s).to_owned()).collect(),
            n: sites.iter().map(|(_, s)| s.n).sum(),
            n_labelled: sites.iter().map(|(_, s)| s.n_labelled).sum(),
            n_positive: sites.iter().map(|(_, s)| s.n_positive).sum(),
            histogram_sites,
            auc,
            study_cutoff,
            study_cutoff_source,
            rfs,
            os,
            notes,
        }
    }
}

fn study_cutoff(
    sites: &[(&str, &SiteEvaluation)],
    notes: &mut BTreeMap<String, String>,
) -> (Option<f64>, Option<String>) {
    if let Some(c) = sites.iter().find(|(_, s)| s.cutoff_source == CutoffSource::Study).and_then(|(_, s)| s.cutoff) {
        return (Some(c), Some("study".into()));
    }
    let (mut weighted, mut weight) = (0.0, 0.0);
    for (_, s) in sites {
        if let (CutoffSource::SiteTrainingYouden, Some(c), Some(n)) = (s.cutoff_source, s.cutoff, s.n_train_labelled) {
            weighted += c * n as f64;
            weight += n as f64;
        }
    }
    if weight > 0.0 {
        (Some(weighted / weight), Some("weighted_mean_of_site_training_youden".into()))
    } else {
        notes.insert("study_cutoff".into(), "no site reported a cut-off".into());
        (None, None)
    }
}

fn pool_survival(
    sites: &[(&str, &SiteEvaluation)],
    outcome: Outcome,
    notes: &mut BTreeMap<String, String>,
) -> Option<PooledSurvival> {
    let key = outcome.as_str();
    let mut merged = SurvivalCounts::default();
    let mut pooled_sites = Vec::new();
    for (site, s) in sites {
        let survival = match outcome {
            Outcome::Rfs => &s.rfs,
            Outcome::Os => &s.os,
        };
        match survival.as_ref().and_then(|x| x.counts.as_ref()) {
            Some(c) => {
                merged.merge(c);
                pooled_sites.push((*site).to_owned());
            }
            None if survival.is_some() => {
                notes.insert(format!("{key}.{site}"), "this site sent no survival counts (see its notes)".into());
            }
            None => {}
        }
    }
    if pooled_sites.is_empty() {
        notes.insert(key.into(), "no site sent survival counts for this outcome".into());
        return None;
    }
    let km = km_groups(&merged, notes, &format!("{key}.km"));
    let logrank = match merged.logrank() {
        Ok(l) => Some(l),
        Err(e) => {
            notes.insert(format!("{key}.logrank"), e.to_string());
            None
        }
    };
    Some(PooledSurvival { sites: pooled_sites, counts: merged, km, logrank })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> SummaryRules {
        SummaryRules { histogram_bins: 1000, time_grid_days: 30.0, study_cutoff: None, min_cell_floor: 5 }
    }

    fn summary() -> SiteEvaluation {
        SiteEvaluation::compute(
            &SitePredictions::synthetic(200, 1),
            Some(&SitePredictions::synthetic(400, 2)),
            &EvaluationSettings::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_site_summary_matches_the_patient_level_statistics_and_round_trips() {
        let test = SitePredictions::synthetic(200, 1);
        let s = summary();
        let (labels, scores) = test.labelled();
        assert_eq!(s.auc.unwrap(), binary::auc_delong(&labels, &scores, LEVEL).unwrap());
        assert_eq!(s.brier.unwrap(), binary::brier(&labels, &scores).unwrap());
        let (tl, ts) = SitePredictions::synthetic(400, 2).labelled();
        assert_eq!(s.cutoff, Some(binary::youden(&tl, &ts).unwrap().cutoff));
        assert_eq!((s.cutoff_source, s.n_train_labelled), (CutoffSource::SiteTrainingYouden, Some(400)));
        let (t, e, sc) = test.survival(Outcome::Rfs);
        assert_eq!(s.rfs.as_ref().unwrap().c_index_harrell.unwrap(), survival::harrell_c(&t, &e, &sc).unwrap());
        let c = Confusion::at(&labels, &scores, s.cutoff.unwrap()).unwrap();
        assert_eq!(s.sensitivity.unwrap().count, c.tp);
        assert_eq!(s.histogram.as_ref().unwrap().n_positive(), s.n_positive);
        let bytes = s.encode().unwrap();
        assert_eq!(SiteEvaluation::decode(&bytes, &rules()).unwrap(), s);
        // What a site sends holds no score, time or row of a patient: only counts and figures.
        let text = String::from_utf8(bytes).unwrap();
        for (k, score) in test.score.iter().enumerate().take(20) {
            assert!(!text.contains(&score.to_string()), "patient {k}'s score is in the summary");
        }
    }

    #[test]
    fn small_groups_are_suppressed_with_a_reason_and_no_value() {
        let mut test = SitePredictions::synthetic(200, 3);
        // Only 6 positives left.
        let mut seen = 0;
        for l in test.label.iter_mut() {
            if *l == Some(true) {
                seen += 1;
                if seen > 6 {
                    *l = Some(false);
                }
            }
        }
        let s = SiteEvaluation::compute(&test, None, &EvaluationSettings::default()).unwrap();
        assert!(s.auc.is_none() && s.brier.is_none() && s.histogram.is_none() && s.sensitivity.is_none());
        assert!(s.notes["auc"].contains("minimum cell size 10"), "{:?}", s.notes);
        assert!(!s.notes.values().any(|v| v.contains('6')), "a note reveals the small count: {:?}", s.notes);
        assert_eq!(s.cutoff_source, CutoffSource::None);
        assert_eq!(s.rfs.as_ref().unwrap().counts.as_ref().unwrap().groups.keys().collect::<Vec<_>>(), vec![ALL]);
        SiteEvaluation::decode(&s.encode().unwrap(), &rules()).unwrap();
        // A fixed study cut-off is used as given.
        let fixed = EvaluationSettings { cutoff: Some(0.5), ..EvaluationSettings::default() };
        let s = SiteEvaluation::compute(&test, None, &fixed).unwrap();
        assert_eq!((s.cutoff, s.cutoff_source), (Some(0.5), CutoffSource::Study));
        assert!(s.sensitivity.is_none() && s.specificity.is_some());
        let e = SiteEvaluation::decode(&s.encode().unwrap(), &rules()).unwrap_err();
        assert!(e.to_string().contains("not the study's"), "{e}");
        SiteEvaluation::decode(&s.encode().unwrap(), &SummaryRules { study_cutoff: Some(0.5), ..rules() }).unwrap();
    }

    #[test]
    fn bad_reports_are_refused_naming_the_problem() {
        let good = summary();
        type Change = Box<dyn Fn(&mut SiteEvaluation)>;
        let cases: Vec<(&str, Change)> = vec![
            ("floor", Box::new(|s| s.min_cell = 2)),
            ("time grid", Box::new(|s| s.time_grid_days = 7.0)),
            ("inconsistent counts", Box::new(|s| s.n_positive = s.n_labelled + 1)),
            ("valid AUC", Box::new(|s| s.auc.as_mut().unwrap().estimate = 1.5)),
            ("valid AUC", Box::new(|s| s.auc.as_mut().unwrap().se = -0.1)),
            ("brier", Box::new(|s| s.brier = Some(-1.0))),
            ("valid proportion", Box::new(|s| s.ppv.as_mut().unwrap().count += 1)),
            ("histogram of 10 bins", Box::new(|s| s.histogram = Some(ScoreHistogram::new(10).unwrap()))),
            ("differ from the positives", Box::new(|s| s.histogram.as_mut().unwrap().positive[3] += 1)),
            (
                "minimum cell",
                Box::new(|s| {
                    let h = s.histogram.as_mut().unwrap();
                    let moved: u64 = h.positive.iter().sum::<u64>() - 3;
                    h.positive.iter_mut().for_each(|v| *v = 0);
                    h.positive[500] = 3;
                    h.negative[10] += moved;
                    s.n_positive = 3;
                    s.auc = None;
                    s.brier = None;
                    s.calibration = None;
                    s.sensitivity = None;
                    s.specificity = None;
                    s.ppv = None;
                    s.npv = None;
                }),
            ),
            ("not on the 30-day grid", Box::new(|s| grid_mut(s).time[0] += 1.0)),
            ("increasing", Box::new(|s| grid_mut(s).time.swap(0, 1))),
            (
                "differ in length",
                Box::new(|s| {
                    grid_mut(s).events.pop();
                }),
            ),
            ("risk groups", Box::new(|s| rename_group(s, "secret"))),
            ("cut-off, its source", Box::new(|s| s.n_train_labelled = None)),
            ("in [0, 1]", Box::new(|s| s.rfs.as_mut().unwrap().c_index_harrell = Some(2.0))),
            (
                "notes",
                Box::new(|s| {
                    s.notes.insert("x".into(), "y".repeat(600));
                }),
            ),
        ];
        for (needle, change) in cases {
            let mut s = good.clone();
            change(&mut s);
            let e = SiteEvaluation::decode(&serde_json::to_vec(&s).unwrap(), &rules()).unwrap_err().to_string();
            assert!(e.contains(needle), "expected '{needle}' in: {e}");
        }
        for (bytes, needle) in [
            (b"{\"version\":2}".to_vec(), "version 2"),
            (b"[1,2]".to_vec(), "not a site evaluation"),
            (vec![b' '; MAX_SUMMARY_BYTES + 1], "at most"),
            (
                String::from_utf8(serde_json::to_vec(&good).unwrap())
                    .unwrap()
                    .replacen("{", "{\"extra\":1,", 1)
                    .into_bytes(),
                "unknown field",
            ),
            (
                String::from_utf8(serde_json::to_vec(&good).unwrap())
                    .unwrap()
                    .replacen("\"brier\":0.", "\"brier\":NaN", 1)
                    .into_bytes(),
                "not a site evaluation",
            ),
        ] {
            let e = SiteEvaluation::decode(&bytes, &rules()).unwrap_err().to_string();
            assert!(e.contains(needle), "expected '{needle}' in: {e}");
        }
    }

    fn grid_mut(s: &mut SiteEvaluation) -> &mut GroupCounts {
        s.rfs.as_mut().unwrap().counts.as_mut().unwrap().groups.get_mut(HIGH).unwrap()
    }

    fn rename_group(s: &mut SiteEvaluation, to: &str) {
        let groups = &mut s.rfs.as_mut().unwrap().counts.as_mut().unwrap().groups;
        let g = groups.remove(HIGH).unwrap();
        groups.insert(to.into(), g);
    }

    #[test]
    fn pooled_figures_equal_those_of_the_pooled_rows() {
        let settings = EvaluationSettings::default();
        let (a, b) = (SitePredictions::synthetic(300, 5), SitePredictions::synthetic(250, 6));
        let (ta, tb) = (SitePredictions::synthetic(500, 7), SitePredictions::synthetic(450, 8));
        let sa = SiteEvaluation::compute(&a, Some(&ta), &settings).unwrap();
        let sb = SiteEvaluation::compute(&b, Some(&tb), &settings).unwrap();
        let pooled = PooledEvaluation::pool(&[("a", &sa), ("b", &sb)]);
        // AUC of the pooled rows within a bin width.
        let mut all = a.clone();
        all.extend(b.clone());
        let (labels, scores) = all.labelled();
        let exact = binary::auc(&labels, &scores).unwrap();
        assert!((pooled.auc.unwrap() - exact).abs() < 1e-3, "{} vs {exact}", pooled.auc.unwrap());
        // Kaplan–Meier and log-rank of the pooled rows (times on the grid, each site's own groups).
        let mut rows = (Vec::new(), Vec::new(), Vec::new());
        for (p, c) in [(&a, sa.cutoff.unwrap()), (&b, sb.cutoff.unwrap())] {
            let (t, e, s) = p.survival(Outcome::Rfs);
            rows.0.extend(t.iter().map(|t| (t / 30.0).ceil() * 30.0));
            rows.1.extend(e);
            rows.2.extend(s.iter().map(|&s| if s >= c { HIGH } else { LOW }));
        }
        let rfs = pooled.rfs.as_ref().unwrap();
        for g in &rfs.km {
            let (t, e): (Vec<f64>, Vec<bool>) =
                (0..rows.0.len()).filter(|&i| rows.2[i] == g.group).map(|i| (rows.0[i], rows.1[i])).unzip();
            assert_eq!(g.curve, survival::kaplan_meier(&t, &e, LEVEL).unwrap(), "group {}", g.group);
        }
        assert_eq!(rfs.km.len(), 2);
        assert_eq!(rfs.logrank.as_ref().unwrap(), &survival::logrank(&rows.0, &rows.1, &rows.2).unwrap());
        let w = (sa.cutoff.unwrap() * 500.0 + sb.cutoff.unwrap() * 450.0) / 950.0;
        assert!((pooled.study_cutoff.unwrap() - w).abs() < 1e-12);
        assert_eq!(pooled.n, 550);
        assert!(pooled.notes.contains_key("risk_groups"));
        assert_eq!(sa.kaplan_meier(Outcome::Rfs).len(), 2);
    }
}
