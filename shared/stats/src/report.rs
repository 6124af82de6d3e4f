//! Every statistic for one set of predictions, as `fedhcc stats` writes it (`stats.json` and the plots).
//!
//! Binary statistics use the labelled rows; survival statistics use every row. A statistic that is not
//! defined on the data is `null` in the report and `notes` says why, under the statistic's key.

use crate::binary::{
    self, Auc, BootstrapCi, Calibration, Confusion, NetBenefit, Proportion, RocCurve, Youden, auc_delong, bootstrap_auc,
};
use crate::predictions::Predictions;
use crate::survival::{self, Cox, KaplanMeier, LogRank, UnoC};
use crate::svg::{self, CalibrationBin};
use crate::{Result, StatsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Choices for [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatsOptions {
    /// Cut-off for sensitivity etc. and for the high/low risk groups (`score >= cutoff` is high). `None`:
    /// Youden's cut-off on these data (optimistic; the report says so).
    pub cutoff: Option<f64>,
    /// Times for the time-dependent AUC; the largest is also Uno's truncation τ.
    pub times: Vec<f64>,
    /// Confidence level of every interval.
    pub level: f64,
    /// Bootstrap replicates for the AUC interval (0 = no bootstrap).
    pub bootstrap_replicates: usize,
    /// Seed of the bootstrap.
    pub bootstrap_seed: u64,
    /// Threshold probabilities of the decision curve.
    pub net_benefit_thresholds: Vec<f64>,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions {
            cutoff: None,
            times: vec![365.0, 730.0, 1095.0],
            level: 0.95,
            bootstrap_replicates: 2000,
            bootstrap_seed: 20_240_605,
            net_benefit_thresholds: (1..100).map(|i| i as f64 / 100.0).collect(),
        }
    }
}

/// Kaplan–Meier curve of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KmGroup {
    /// Group name (`high`/`low` by the cut-off, or the `group` column's value).
    pub group: String,
    /// The curve.
    #[serde(flatten)]
    pub curve: KaplanMeier,
}

/// Time-dependent AUC at one time (`null` with a note when undefined there).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TdAucEntry {
    /// Time.
    pub time: f64,
    /// Cumulative/dynamic AUC.
    pub auc: Option<f64>,
}

/// What `stats.json` holds. Key names are part of the interface (the study report reads them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Patients (rows).
    pub n: usize,
    /// Patients with a binary label.
    pub n_labelled: usize,
    /// Labelled positives.
    pub n_positive: usize,
    /// Events (survival).
    pub n_events: usize,
    /// Whether every score is in [0, 1] (else Brier, calibration and net benefit are null).
    pub score_is_probability: bool,
    /// ROC AUC with DeLong SE and plain interval.
    pub auc: Option<Auc>,
    /// Stratified percentile-bootstrap interval of the AUC.
    pub auc_bootstrap: Option<BootstrapCi>,
    /// ROC curve points.
    pub roc: Option<RocCurve>,
    /// Youden's cut-off on these data.
    pub youden: Option<Youden>,
    /// The cut-off used (`score >= cutoff` is test-positive / high risk).
    pub cutoff: Option<f64>,
    /// `given` (from the command line) or `youden` (chosen on these data).
    pub cutoff_source: Option<String>,
    /// Sensitivity at the cut-off with Wilson interval.
    pub sensitivity: Option<Proportion>,
    /// Specificity.
    pub specificity: Option<Proportion>,
    /// Positive predictive value.
    pub ppv: Option<Proportion>,
    /// Negative predictive value.
    pub npv: Option<Proportion>,
    /// Brier score.
    pub brier: Option<f64>,
    /// Calibration intercept and slope.
    pub calibration: Option<Calibration>,
    /// Deciles of predicted risk: mean predicted vs observed (the calibration plot).
    pub calibration_bins: Option<Vec<CalibrationBin>>,
    /// Decision curve.
    pub net_benefit: Option<Vec<NetBenefit>>,
    /// Harrell's C.
    pub c_index_harrell: Option<f64>,
    /// Uno's C with τ = the largest requested time.
    pub c_index_uno: Option<UnoC>,
    /// Time-dependent AUC per requested time.
    pub td_auc: Vec<TdAucEntry>,
    /// What the log-rank groups are: `group` (the column) or `cutoff` (high vs low risk).
    pub logrank_by: Option<String>,
    /// Log-rank test across the groups.
    pub logrank: Option<LogRank>,
    /// Univariable Cox regression on the score (hazard ratio per unit of score).
    pub cox: Option<Cox>,
    /// Kaplan–Meier curve per group.
    pub km: Vec<KmGroup>,
    /// Why a statistic is null, or what to keep in mind, by key.
    pub notes: BTreeMap<String, String>,
}

fn keep<T>(notes: &mut BTreeMap<String, String>, key: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            notes.insert(key.to_owned(), e.to_string());
            None
        }
    }
}

fn keep_opt<T>(notes: &mut BTreeMap<String, String>, key: &str, result: Result<Option<T>>, empty: &str) -> Option<T> {
    match keep(notes, key, result).flatten() {
        Some(v) => Some(v),
        None => {
            notes.entry(key.to_owned()).or_insert_with(|| empty.to_owned());
            None
        }
    }
}

/// Deciles of predicted risk (equal-count groups by sorted prediction).
fn calibration_bins(labels: &[bool], p: &[f64], groups: usize) -> Vec<CalibrationBin> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let groups = groups.min(p.len()).max(1);
    (0..groups)
        .map(|g| {
            let slice = &order[g * p.len() / groups..(g + 1) * p.len() / groups];
            let n = slice.len().max(1) as f64;
            CalibrationBin {
                predicted: slice.iter().map(|&i| p[i]).sum::<f64>() / n,
                observed: slice.iter().filter(|&&i| labels[i]).count() as f64 / n,
                n: slice.len(),
            }
        })
        .filter(|b| b.n > 0)
        .collect()
}

/// Computes every statistic. Never fails: what is undefined on these data is `None` with a note.
pub fn evaluate(p: &Predictions, options: &StatsOptions) -> StatsReport {
    let mut notes = BTreeMap::new();
    let level = options.level;
    let (labels, lscores): (Vec<bool>, Vec<f64>) =
        p.label.iter().zip(&p.score).filter_map(|(l, s)| l.map(|l| (l, *s))).unzip();
    let score_is_probability = p.score.iter().all(|s| (0.0..=1.0).contains(s));

    let auc = keep(&mut notes, "auc", auc_delong(&labels, &lscores, level));
    let auc_bootstrap = if options.bootstrap_replicates == 0 {
        None
    } else {
        keep(
            &mut notes,
            "auc_bootstrap",
            bootstrap_auc(&labels, &lscores, options.bootstrap_replicates, options.bootstrap_seed, level),
        )
    };
    let roc = keep(&mut notes, "roc", binary::roc_curve(&labels, &lscores));
    let youden = keep(&mut notes, "youden", binary::youden(&labels, &lscores));
    let (cutoff, cutoff_source) = match (options.cutoff, youden) {
        (Some(c), _) => (Some(c), Some("given".to_owned())),
        (None, Some(y)) => {
            notes.insert(
                "cutoff".into(),
                "chosen by Youden's index on these same data, so sensitivity and specificity are optimistic: \
                 pass the cut-off frozen on the training data with --cutoff"
                    .into(),
            );
            (Some(y.cutoff), Some("youden".to_owned()))
        }
        (None, None) => {
            notes.insert("cutoff".into(), "no --cutoff given and no Youden cut-off (see youden)".into());
            (None, None)
        }
    };
    let confusion = cutoff.and_then(|c| keep(&mut notes, "sensitivity", Confusion::at(&labels, &lscores, c)));
    let mut proportion = |key: &str, f: fn(&Confusion, f64) -> Result<Option<Proportion>>, empty: &str| {
        confusion.as_ref().and_then(|c| keep_opt(&mut notes, key, f(c, level), empty))
    };
    let sensitivity = proportion("sensitivity", Confusion::sensitivity, "no labelled positives");
    let specificity = proportion("specificity", Confusion::specificity, "no labelled negatives");
    let ppv = proportion("ppv", Confusion::ppv, "nobody scores at or above the cut-off");
    let npv = proportion("npv", Confusion::npv, "nobody scores below the cut-off");

    let (brier, calibration, calibration_bins, net_benefit) = if score_is_probability {
        (
            keep(&mut notes, "brier", binary::brier(&labels, &lscores)),
            keep(&mut notes, "calibration", binary::calibration(&labels, &lscores)),
            (!labels.is_empty()).then(|| calibration_bins(&labels, &lscores, 10)),
            keep(&mut notes, "net_benefit", binary::net_benefit(&labels, &lscores, &options.net_benefit_thresholds)),
        )
    } else {
        let why = "the score is not a probability in [0, 1] (some values are outside it), so Brier score, \
                   calibration and net benefit are not defined";
        for key in ["brier", "calibration", "net_benefit"] {
            notes.insert(key.into(), why.into());
        }
        (None, None, None, None)
    };

    let c_index_harrell = keep(&mut notes, "c_index_harrell", survival::harrell_c(&p.time, &p.event, &p.score));
    let tau = options.times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let c_index_uno = if tau.is_finite() {
        keep(&mut notes, "c_index_uno", survival::uno_c(&p.time, &p.event, &p.score, tau))
    } else {
        notes.insert("c_index_uno".into(), "no times given: Uno's C truncates at the largest of --times".into());
        None
    };
    let mut td_notes = Vec::new();
    let td_auc = options
        .times
        .iter()
        .map(|&t| match survival::time_dependent_auc(&p.time, &p.event, &p.score, &[t]) {
            Ok(v) => TdAucEntry { time: t, auc: v.first().map(|a| a.auc) },
            Err(e) => {
                td_notes.push(format!("at {t}: {e}"));
                TdAucEntry { time: t, auc: None }
            }
        })
        .collect();
    if !td_notes.is_empty() {
        notes.insert("td_auc".into(), td_notes.join("; "));
    }

    let groups: Option<(String, Vec<String>)> = match (&p.group, cutoff) {
        (Some(g), _) => Some(("group".into(), g.clone())),
        (None, Some(c)) => Some((
            "cutoff".into(),
            p.score.iter().map(|&s| if s >= c { "high".to_owned() } else { "low".to_owned() }).collect(),
        )),
        (None, None) => None,
    };
    let (logrank_by, logrank, km) = match groups {
        Some((by, g)) => {
            let logrank = keep(&mut notes, "logrank", survival::logrank(&p.time, &p.event, &g));
            let counts = crate::pooled::SurvivalCounts::from_rows(&p.time, &p.event, &g);
            let km = match counts {
                Ok(c) => c
                    .groups
                    .keys()
                    .filter_map(|name| {
                        let curve = keep(&mut notes, "km", c.kaplan_meier(name, level))?;
                        Some(KmGroup { group: name.clone(), curve })
                    })
                    .collect(),
                Err(e) => {
                    notes.insert("km".into(), e.to_string());
                    Vec::new()
                }
            };
            (Some(by), logrank, km)
        }
        None => {
            notes.insert("logrank".into(), "no groups: neither a group column nor a cut-off".into());
            let km = keep(&mut notes, "km", survival::kaplan_meier(&p.time, &p.event, level))
                .map(|curve| vec![KmGroup { group: "all".into(), curve }])
                .unwrap_or_default();
            (None, None, km)
        }
    };
    let cox = keep(&mut notes, "cox", survival::cox_univariable(&p.time, &p.event, &p.score, level));

    StatsReport {
        n: p.len(),
        n_labelled: labels.len(),
        n_positive: labels.iter().filter(|l| **l).count(),
        n_events: p.event.iter().filter(|e| **e).count(),
        score_is_probability,
        auc,
        auc_bootstrap,
        roc,
        youden,
        cutoff,
        cutoff_source,
        sensitivity,
        specificity,
        ppv,
        npv,
        brier,
        calibration,
        calibration_bins,
        net_benefit,
        c_index_harrell,
        c_index_uno,
        td_auc,
        logrank_by,
        logrank,
        cox,
        km,
        notes,
    }
}

/// The plots of a report, as (file name, SVG text): `roc.svg`, `km.svg`, `calibration.svg`,
/// `decision_curve.svg`. A plot whose statistic is undefined shows a message instead of a curve.
pub fn plots(report: &StatsReport) -> Vec<(&'static str, String)> {
    let ci = |lo: f64, hi: f64| format!("{:.0}% CI {lo:.3}–{hi:.3}", 95.0);
    let roc = match (&report.roc, &report.auc) {
        (Some(curve), Some(a)) => svg::roc(curve, &format!("AUC {:.3} ({})", a.estimate, ci(a.ci_low, a.ci_high))),
        (Some(curve), None) => svg::roc(curve, "AUC (no DeLong interval)"),
        _ => svg::roc(&RocCurve { fpr: vec![], tpr: vec![], threshold: vec![] }, &unavailable(report, "roc")),
    };
    let subtitle = match (report.logrank_by.as_deref(), report.cutoff) {
        (Some("cutoff"), Some(c)) => format!("high (score ≥ {c:.4}) vs low risk"),
        (Some("group"), _) => "by group".to_owned(),
        _ => String::new(),
    };
    let subtitle = match &report.logrank {
        Some(lr) if lr.p < 0.001 => format!("{subtitle}, log-rank p < 0.001"),
        Some(lr) => format!("{subtitle}, log-rank p = {:.3}", lr.p),
        None => subtitle,
    };
    let curves: Vec<(String, KaplanMeier)> = report.km.iter().map(|g| (g.group.clone(), g.curve.clone())).collect();
    let km = svg::kaplan_meier(&curves, "Time (days)", &subtitle);
    let calibration = match (&report.calibration_bins, &report.calibration) {
        (Some(bins), Some(c)) => {
            svg::calibration(bins, &format!("deciles; intercept {:.3}, slope {:.3}", c.intercept, c.slope))
        }
        (Some(bins), None) => svg::calibration(bins, &unavailable(report, "calibration")),
        _ => svg::calibration(&[], &unavailable(report, "calibration")),
    };
    let decision = svg::decision_curve(report.net_benefit.as_deref().unwrap_or(&[]));
    vec![("roc.svg", roc), ("km.svg", km), ("calibration.svg", calibration), ("decision_curve.svg", decision)]
}

fn unavailable(report: &StatsReport, key: &str) -> String {
    let why = report.notes.get(key).map_or("not available", String::as_str);
    let short: String = why.chars().take(28).collect();
    if short.len() < why.len() { format!("{short}…") } else { short }
}

/// Convenience for callers that hold rows: checks that `score`, `label`, `time` and `event` align.
///
/// # Errors
/// Lengths differ.
pub fn predictions_from_columns(
    score: Vec<f64>,
    label: Vec<Option<bool>>,
    time: Vec<f64>,
    event: Vec<bool>,
    group: Option<Vec<String>>,
) -> Result<Predictions> {
    let n = score.len();
    for (what, len) in [("label", label.len()), ("time", time.len()), ("event", event.len())] {
        if len != n {
            return Err(StatsError::LengthMismatch { what, got: len, expected: n });
        }
    }
    if let Some(g) = &group
        && g.len() != n
    {
        return Err(StatsError::LengthMismatch { what: "group", got: g.len(), expected: n });
    }
    Ok(Predictions { score, label, time, event, group })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predictions(score: Vec<f64>, label: Vec<Option<bool>>, time: Vec<f64>, event: Vec<bool>) -> Predictions {
        predictions_from_columns(score, label, time, event, None).unwrap()
    }

    #[test]
    fn degenerate_data_give_nulls_with_reasons_not_panics() {
        // One class only, no events, all-equal scores, a single patient, nobody labelled.
        let inputs = [
            predictions(vec![0.2, 0.4, 0.6], vec![Some(false); 3], vec![10.0, 20.0, 30.0], vec![false; 3]),
            predictions(
                vec![0.5; 4],
                vec![Some(true), Some(false), Some(true), Some(false)],
                vec![1.0, 2.0, 3.0, 4.0],
                vec![true, false, true, false],
            ),
            predictions(vec![0.7], vec![Some(true)], vec![5.0], vec![true]),
            predictions(vec![3.0, 1.0], vec![None, None], vec![5.0, 9.0], vec![true, false]),
        ];
        for p in &inputs {
            let r = evaluate(p, &StatsOptions { bootstrap_replicates: 50, ..StatsOptions::default() });
            assert!(r.auc.is_none());
            assert!(r.notes.contains_key("auc"), "{:?}", r.notes);
            let json = serde_json::to_string(&r).unwrap();
            assert!(json.contains("\"auc\":null"));
            for (name, svg) in plots(&r) {
                assert!(svg.ends_with("</svg>\n"), "{name}");
            }
        }
        let r = evaluate(&inputs[0], &StatsOptions::default());
        assert!(r.notes["auc"].contains("all 3 labelled patients are negative"), "{}", r.notes["auc"]);
        assert!(r.cox.is_none() && r.notes["cox"].contains("no events"));
        assert!(r.c_index_harrell.is_none());
    }

    #[test]
    fn non_probability_score_nulls_brier_and_calibration() {
        let p = predictions(
            vec![3.0, 1.0, 2.0, 5.0],
            vec![Some(true), Some(false), Some(false), Some(true)],
            vec![5.0, 9.0, 7.0, 2.0],
            vec![true, false, true, true],
        );
        let r = evaluate(&p, &StatsOptions { cutoff: Some(2.5), times: vec![6.0], ..StatsOptions::default() });
        assert!(!r.score_is_probability);
        assert!(r.brier.is_none() && r.calibration.is_none() && r.net_benefit.is_none());
        assert!(r.notes["brier"].contains("not a probability"));
        assert_eq!(r.cutoff_source.as_deref(), Some("given"));
        assert_eq!(r.sensitivity.unwrap().estimate, 1.0);
    }
}
