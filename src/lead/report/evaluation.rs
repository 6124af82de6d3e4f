//! The evaluation half of the study report: one row per site and a pooled row, the curves and the
//! survival figures.
//!
//! Source, best first:
//! 1. the server's evaluation file `state_dir/evaluation/<task_id>.json` of the run's last evaluation:
//!    each site's aggregate statistics and its summaries (a [`ScoreHistogram`] per label, a
//!    [`SurvivalCounts`] per outcome by risk group). The pooled row is computed here from the summaries
//!    with `fedhcc-stats`, and only when *every* evaluated site sent the summary it needs (a pooled
//!    figure silently missing a site would misstate the study): AUC with DeLong interval, ROC, net
//!    benefit and calibration groups of the binned scores; sensitivity, specificity, PPV and NPV from the
//!    summed counts with Wilson intervals; the Brier score as the labelled-patient-weighted mean of the
//!    sites' (exact); Kaplan–Meier, log-rank and the high-vs-low hazard ratio from the merged counts
//!    (exact). Calibration intercept/slope and the C-index need pairs or rows across sites: per site only.
//! 2. otherwise the evaluation records in `server.db`: the aggregate metrics each site reported (n,
//!    positives, AUC, C-index, loss), without intervals; pooled figures are then unavailable and the
//!    report says so.
//!
//! Each site's entry in the evaluation file is a [`SiteEvaluation`] (`fedhcc_stats::federated`), at the
//! top of the entry or under one of its members; nothing patient-level is read.
//!
//! Size: the per-site and pooled evaluation rows, their confidence intervals and the survival
//! figures are built from the same records and must agree with one another.

use fedhcc_server::store::EvaluationRecord;
use fedhcc_stats::binary::{Calibration, NetBenefit, Proportion, RocCurve, wilson};
use fedhcc_stats::federated::{CutoffSource, PooledEvaluation, SiteEvaluation, SummaryRules};
use fedhcc_stats::pooled::{ScoreHistogram, SurvivalCounts};
use fedhcc_stats::survival::{Cox, KaplanMeier, LogRank};
use fedhcc_stats::svg::CalibrationBin;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// Confidence level of every interval the report computes.
pub const LEVEL: f64 = 0.95;

/// An estimate with its 95% interval (the interval is absent where the source gave none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// Point estimate.
    pub estimate: f64,
    /// Lower bound.
    pub ci_low: Option<f64>,
    /// Upper bound.
    pub ci_high: Option<f64>,
}

/// The performance of the final model at one site, or pooled over the sites.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PerformanceRow {
    /// Site id, or `pooled`.
    pub name: String,
    /// Patients evaluated (the held-out split).
    pub n: Option<u64>,
    /// Labelled patients among them.
    pub n_labelled: Option<u64>,
    /// Labelled positives among them.
    pub n_positive: Option<u64>,
    /// Events (recurrence-free survival).
    pub n_events: Option<u64>,
    /// The cut-off of sensitivity etc. and of the risk groups at this site.
    pub cutoff: Option<f64>,
    /// ROC AUC with DeLong interval.
    pub auc: Option<Interval>,
    /// Sensitivity at the study cut-off, Wilson interval.
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
    /// Harrell's C (recurrence-free survival).
    pub c_index: Option<f64>,
    /// Hazard ratio of the high- against the low-risk group (at the cut-off), Efron ties, Wald p.
    pub hazard_ratio: Option<Cox>,
    /// Mean binary cross-entropy of the held-out patients (as the site reported it).
    pub loss: Option<f64>,
    /// Why a figure is missing, by key.
    pub notes: BTreeMap<String, String>,
}

/// A Kaplan–Meier curve of one risk group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KmGroup {
    /// Risk group (`high`, `low`).
    pub group: String,
    /// The curve, with numbers at risk.
    pub curve: KaplanMeier,
}

/// One site's Kaplan–Meier curves by risk group for one outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteKm {
    /// Site id.
    pub site: String,
    /// Curves per risk group.
    pub km: Vec<KmGroup>,
    /// Log-rank test across its risk groups.
    pub logrank: Option<LogRank>,
}

/// Survival by risk group for one outcome: pooled over the sites when every site sent its counts, and
/// per site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SurvivalOutcome {
    /// The outcome (`rfs`, `os`).
    pub outcome: String,
    /// Kaplan–Meier curves per risk group (pooled, exact from the sites' counts; empty when not pooled).
    pub km: Vec<KmGroup>,
    /// Each site's curves, for the sites that sent counts.
    pub sites: Vec<SiteKm>,
    /// Log-rank test across the risk groups.
    pub logrank: Option<LogRank>,
    /// High- against low-risk hazard ratio.
    pub hazard_ratio: Option<Cox>,
    /// Why something is missing.
    pub notes: Vec<String>,
}

/// A named ROC curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedRoc {
    /// Site id or `pooled`.
    pub name: String,
    /// The curve (of the binned scores).
    pub curve: RocCurve,
}

/// Named calibration groups.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedCalibration {
    /// Site id or `pooled`.
    pub name: String,
    /// Groups by predicted risk.
    pub groups: Vec<CalibrationBin>,
}

/// Everything the report shows about the final model's evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvaluationSection {
    /// The evaluation task the figures come from (e.g. `e5a1`).
    pub task_id: Option<String>,
    /// Its round.
    pub round: Option<u32>,
    /// What the figures were computed from, in words.
    pub source: String,
    /// The cut-off of sensitivity etc. and of the risk groups, when every site used the same one.
    pub cutoff: Option<f64>,
    /// The study cut-off to freeze for later evaluations and external validation, when the sites chose
    /// their own (the training-weighted mean of their Youden cut-offs).
    pub proposed_cutoff: Option<f64>,
    /// One row per site, in site-id order.
    pub sites: Vec<PerformanceRow>,
    /// The pooled row, when every site sent what pooling needs.
    pub pooled: Option<PerformanceRow>,
    /// Why there is no pooled row.
    pub pooled_unavailable: Option<String>,
    /// Pooled survival by risk group, per outcome.
    pub survival: Vec<SurvivalOutcome>,
    /// ROC curves: each site's, then the pooled one.
    pub roc: Vec<NamedRoc>,
    /// Calibration groups: each site's, then the pooled ones.
    pub calibration: Vec<NamedCalibration>,
    /// Pooled decision curve.
    pub net_benefit: Option<Vec<NetBenefit>>,
    /// What to keep in mind (missing sites, unreadable entries).
    pub notes: Vec<String>,
}

/// One site's evaluation as the server holds it (a database record, or an entry of the evaluation
/// file).
pub struct SiteInput {
    /// Site id.
    pub site: String,
    /// Patients evaluated, as the site reported.
    pub samples: u64,
    /// The aggregate metrics the site reported (loss, AUC, …).
    pub metrics: BTreeMap<String, f64>,
    /// The site's evaluation summary, when it sent one.
    pub summary: Option<SiteEvaluation>,
}

impl SiteInput {
    /// From a database record (non-finite metrics left out; a summary that fails its checks left out,
    /// noted in `notes`).
    pub fn from_record(r: &EvaluationRecord, notes: &mut Vec<String>) -> Self {
        let summary = r.summary.clone().and_then(|s| {
            checked(s)
                .map_err(|why| notes.push(format!("the evaluation summary of {} is not used: {why}", r.site)))
                .ok()
        });
        SiteInput {
            site: r.site.clone(),
            samples: r.samples,
            metrics: r.metrics.iter().filter(|(_, v)| v.is_finite()).cloned().collect(),
            summary,
        }
    }
}

/// One site, read: its row and what pooling needs.
struct SiteSummary {
    row: PerformanceRow,
    histogram: Option<ScoreHistogram>,
    survival: BTreeMap<String, SurvivalCounts>,
}

/// Checks a summary read from a file or the database as the server checks one on receipt (lengths,
/// ordering, counts, ranges, minimum cell), against the bins, grid and cut-off it declares itself: a
/// damaged or edited file gives a reason, never a wrong figure or a panic.
fn checked(s: SiteEvaluation) -> Result<SiteEvaluation, String> {
    let rules = SummaryRules {
        histogram_bins: s.histogram.as_ref().map_or(1, ScoreHistogram::bins),
        time_grid_days: s.time_grid_days,
        study_cutoff: s.cutoff.filter(|_| s.cutoff_source == CutoffSource::Study),
        min_cell_floor: 1,
    };
    s.check(&rules).map(|()| s).map_err(|e| e.to_string())
}

/// The shallowest object in `v` (itself included, breadth-first) that is a [`SiteEvaluation`].
fn site_evaluation(v: &Value) -> Result<SiteEvaluation, String> {
    let mut first_error = None;
    let mut queue: VecDeque<&Value> = VecDeque::from([v]);
    while let Some(Value::Object(map)) = queue.pop_front() {
        if map.contains_key("version") {
            match serde_json::from_value::<SiteEvaluation>(Value::Object(map.clone())) {
                Ok(s) => return checked(s),
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        queue.extend(map.values().filter(|x| x.is_object()));
    }
    Err(first_error.unwrap_or_else(|| "no site evaluation summary in it".into()))
}

fn read_site(input: SiteInput) -> SiteSummary {
    let SiteInput { site, samples, metrics, summary } = input;
    let Some(s) = summary else {
        let mut row = PerformanceRow {
            name: site,
            n: Some(samples),
            n_positive: metrics.get("n_positive").map(|v| v.max(0.0) as u64),
            n_events: metrics.get("n_events").map(|v| v.max(0.0) as u64),
            auc: metrics.get("auc").map(|&estimate| Interval { estimate, ci_low: None, ci_high: None }),
            c_index: metrics.get("c_index").copied(),
            loss: metrics.get("loss").copied(),
            brier: metrics.get("brier").copied(),
            ..PerformanceRow::default()
        };
        row.notes.insert(
            "summary".into(),
            "this site sent no evaluation summary (an older client, or an executor that makes none): only the \
             aggregate metrics it reported, without intervals"
                .into(),
        );
        return SiteSummary { row, histogram: None, survival: BTreeMap::new() };
    };
    let rfs = s.rfs.as_ref();
    let mut survival = BTreeMap::new();
    for (outcome, part) in [("rfs", &s.rfs), ("os", &s.os)] {
        if let Some(counts) = part.as_ref().and_then(|p| p.counts.clone()) {
            survival.insert(outcome.to_owned(), counts);
        }
    }
    let row = PerformanceRow {
        name: site,
        n: Some(s.n),
        n_labelled: Some(s.n_labelled),
        n_positive: Some(s.n_positive),
        n_events: rfs.map(|r| r.n_events),
        cutoff: s.cutoff,
        auc: s.auc.map(|a| Interval { estimate: a.estimate, ci_low: Some(a.ci_low), ci_high: Some(a.ci_high) }),
        sensitivity: s.sensitivity,
        specificity: s.specificity,
        ppv: s.ppv,
        npv: s.npv,
        brier: s.brier,
        calibration: s.calibration,
        c_index: rfs.and_then(|r| r.c_index_harrell),
        hazard_ratio: None,
        loss: metrics.get("loss").copied(),
        notes: s.notes,
    };
    SiteSummary { row, histogram: s.histogram, survival }
}

/// The outcome whose hazard ratio goes into the performance rows: recurrence-free survival when named,
/// else the first outcome that is not overall survival, else the first.
fn primary_outcome<'a>(names: impl Iterator<Item = &'a String> + Clone) -> Option<&'a String> {
    let overall = |k: &str| k.eq_ignore_ascii_case("os") || k.to_ascii_lowercase().contains("overall");
    names
        .clone()
        .find(|k| k.eq_ignore_ascii_case("rfs") || k.to_ascii_lowercase().contains("recurrence"))
        .or_else(|| names.clone().find(|k| !overall(k)))
        .or_else(|| names.clone().next())
}

/// Wilson interval of summed counts, when every site gave the proportion.
fn pooled_proportion(parts: &[Option<Proportion>]) -> Option<Proportion> {
    let (mut k, mut n) = (0, 0);
    for p in parts {
        let p = p.as_ref()?;
        (k, n) = (k + p.count, n + p.total);
    }
    wilson(k, n, LEVEL).ok().flatten()
}

/// The sites without something pooling needs, each with its own note on why (when it gave one).
fn lacking(summaries: &[SiteSummary], has: impl Fn(&SiteSummary) -> bool, note_keys: &[&str]) -> Vec<String> {
    summaries
        .iter()
        .filter(|s| !has(s))
        .map(|s| match note_keys.iter().find_map(|k| s.row.notes.get(*k)) {
            Some(why) => format!("{} ({why})", s.row.name),
            None => s.row.name.clone(),
        })
        .collect()
}

/// Calibration groups for `n` patients: about one per 10 patients, 2 to 10.
pub fn calibration_groups(n: u64) -> usize {
    (n / 10).clamp(2, 10) as usize
}

/// Thresholds of the decision curve: every percent from 1 to 99 that is a bin edge.
fn thresholds(bins: usize) -> Vec<f64> {
    (1..100)
        .map(|i| i as f64 / 100.0)
        .filter(|t| {
            let x = t * bins as f64;
            (x - x.round()).abs() < 1e-6
        })
        .collect()
}

fn pool(summaries: &[SiteSummary], section: &mut EvaluationSection) {
    let mut pooled = PerformanceRow { name: "pooled".into(), ..PerformanceRow::default() };
    let sum = |f: fn(&PerformanceRow) -> Option<u64>| summaries.iter().map(|s| f(&s.row)).sum::<Option<u64>>();
    pooled.n = sum(|r| r.n);
    pooled.n_labelled = sum(|r| r.n_labelled);
    pooled.n_positive = sum(|r| r.n_positive);
    pooled.n_events = sum(|r| r.n_events);

    let missing = lacking(summaries, |s| s.histogram.is_some(), &["histogram", "summary", "auc"]);
    if missing.is_empty() {
        let mut merged = summaries[0].histogram.clone();
        for s in &summaries[1..] {
            if let (Some(m), Some(h)) = (merged.as_mut(), &s.histogram)
                && let Err(e) = m.merge(h)
            {
                pooled.notes.insert("auc".into(), format!("{}: {e}", s.row.name));
                merged = None;
            }
        }
        if let Some(h) = merged {
            match h.auc_delong(LEVEL) {
                Ok(a) => {
                    pooled.auc =
                        Some(Interval { estimate: a.estimate, ci_low: Some(a.ci_low), ci_high: Some(a.ci_high) })
                }
                Err(e) => {
                    pooled.notes.insert("auc".into(), e.to_string());
                }
            }
            match h.roc_curve() {
                Ok(curve) => section.roc.push(NamedRoc { name: "pooled".into(), curve }),
                Err(e) => section.notes.push(format!("pooled ROC curve: {e}")),
            }
            let groups = calibration_groups(h.n_positive() + h.n_negative());
            section.calibration.push(NamedCalibration { name: "pooled".into(), groups: h.calibration_bins(groups) });
            match h.net_benefit(&thresholds(h.bins())) {
                Ok(nb) if !nb.is_empty() => section.net_benefit = Some(nb),
                Ok(_) => section
                    .notes
                    .push(format!("decision curve: the {} score bins have no edge at whole percents", h.bins())),
                Err(e) => section.notes.push(format!("decision curve: {e}")),
            }
        }
    } else {
        pooled.notes.insert(
            "auc".into(),
            format!(
                "not pooled: no score histogram from {}; pooling the other sites alone would leave those patients \
                 out of the pooled AUC, ROC, calibration and decision curves",
                missing.join(", ")
            ),
        );
    }

    type Column = fn(&PerformanceRow) -> Option<Proportion>;
    let proportions: [(&str, Column); 4] = [
        ("sensitivity", |r| r.sensitivity),
        ("specificity", |r| r.specificity),
        ("ppv", |r| r.ppv),
        ("npv", |r| r.npv),
    ];
    for (key, get) in proportions {
        let parts: Vec<Option<Proportion>> = summaries.iter().map(|s| get(&s.row)).collect();
        let value = pooled_proportion(&parts);
        match key {
            "sensitivity" => pooled.sensitivity = value,
            "specificity" => pooled.specificity = value,
            "ppv" => pooled.ppv = value,
            _ => pooled.npv = value,
        }
        if value.is_none() {
            let without = lacking(summaries, |s| get(&s.row).is_some(), &[key, "summary"]);
            pooled.notes.insert(
                key.into(),
                format!("not pooled (summed counts need every site's): none from {}", without.join(", ")),
            );
        }
    }
    // The Brier score is a mean over labelled patients: the weighted mean of the sites' is exact.
    let weighted: Option<(f64, f64)> = summaries
        .iter()
        .map(|s| Some((s.row.brier? * s.row.n_labelled? as f64, s.row.n_labelled? as f64)))
        .try_fold((0.0, 0.0), |acc, x: Option<(f64, f64)>| x.map(|(b, n)| (acc.0 + b, acc.1 + n)));
    match weighted {
        Some((b, n)) if n > 0.0 => pooled.brier = Some(b / n),
        _ => {
            let without =
                lacking(summaries, |s| s.row.brier.is_some() && s.row.n_labelled.is_some(), &["brier", "summary"]);
            pooled.notes.insert(
                "brier".into(),
                format!(
                    "not pooled (the mean weighted by labelled patients needs every site's): none from {}",
                    without.join(", ")
                ),
            );
        }
    }
    pooled.notes.insert(
        "calibration".into(),
        "calibration intercept and slope need every patient's prediction: per site only".into(),
    );
    pooled.notes.insert(
        "c_index".into(),
        "Harrell's C compares pairs of patients, also across sites: per site only (pooled survival by risk group \
         is below)"
            .into(),
    );

    // Survival: each site's curves; pooled per outcome only when every site has that outcome's counts.
    let mut outcomes: Vec<&String> =
        summaries.iter().flat_map(|s| s.survival.keys()).collect::<BTreeSet<_>>().into_iter().collect();
    // The primary outcome (recurrence-free survival) first.
    if let Some(first) = primary_outcome(outcomes.iter().copied()).cloned() {
        outcomes.sort_by_key(|o| **o != first);
    }
    for outcome in outcomes {
        let mut out = SurvivalOutcome {
            outcome: outcome.clone(),
            km: vec![],
            sites: vec![],
            logrank: None,
            hazard_ratio: None,
            notes: vec![],
        };
        let mut merged = SurvivalCounts::default();
        for s in summaries {
            if let Some(c) = s.survival.get(outcome) {
                merged.merge(c);
                let km = c
                    .groups
                    .keys()
                    .filter_map(|g| Some(KmGroup { group: g.clone(), curve: c.kaplan_meier(g, LEVEL).ok()? }));
                out.sites.push(SiteKm { site: s.row.name.clone(), km: km.collect(), logrank: c.logrank().ok() });
            }
        }
        let without = lacking(
            summaries,
            |s| s.survival.contains_key(outcome),
            &[&format!("{outcome}.counts"), outcome, "summary"],
        );
        if !without.is_empty() {
            out.notes.push(format!(
                "not pooled: no {outcome} counts from {}; the curves below are the other sites' own",
                without.join(", ")
            ));
            section.survival.push(out);
            continue;
        }
        for group in merged.groups.keys() {
            match merged.kaplan_meier(group, LEVEL) {
                Ok(curve) => out.km.push(KmGroup { group: group.clone(), curve }),
                Err(e) => out.notes.push(format!("Kaplan–Meier ({group}): {e}")),
            }
        }
        match merged.logrank() {
            Ok(l) => out.logrank = Some(l),
            Err(e) => out.notes.push(format!("log-rank: {e}")),
        }
        match merged.hazard_ratio("high", "low", LEVEL) {
            Ok(c) => out.hazard_ratio = Some(c),
            Err(e) => out.notes.push(format!("hazard ratio: {e}")),
        }
        section.survival.push(out);
    }
    let names = section.survival.iter().map(|o| &o.outcome);
    match primary_outcome(names).and_then(|name| section.survival.iter().find(|o| &o.outcome == name)) {
        Some(o) => match o.hazard_ratio {
            Some(hr) => pooled.hazard_ratio = Some(hr),
            None => {
                pooled.notes.insert("hazard_ratio".into(), o.notes.join("; "));
            }
        },
        None => {
            pooled.notes.insert("hazard_ratio".into(), "no site sent survival counts by risk group".into());
        }
    }
    section.pooled = Some(pooled);
}

/// The evaluation section of one task from its sites' evaluations; `source` says where they were
/// read.
pub fn build(inputs: Vec<SiteInput>, task_id: &str, round: u32, source: String) -> EvaluationSection {
    let pairs: Vec<(&str, &SiteEvaluation)> =
        inputs.iter().filter_map(|i| i.summary.as_ref().map(|s| (i.site.as_str(), s))).collect();
    let federated = PooledEvaluation::pool(&pairs);
    let proposed_cutoff = federated.study_cutoff.filter(|_| federated.study_cutoff_source.as_deref() != Some("study"));
    let mut summaries: Vec<SiteSummary> = inputs.into_iter().map(read_site).collect();
    summaries.sort_by(|a, b| a.row.name.cmp(&b.row.name));
    let mut section = EvaluationSection {
        task_id: Some(task_id.to_owned()),
        round: Some(round),
        source,
        proposed_cutoff,
        ..EvaluationSection::default()
    };
    let cutoffs: BTreeSet<u64> = summaries.iter().filter_map(|s| s.row.cutoff.map(f64::to_bits)).collect();
    if cutoffs.len() > 1 {
        section.notes.push(
            "each site set its own cut-off (Youden's on its training split): sensitivity, specificity, PPV, NPV and \
             the risk groups are at each site's cut-off, and the pooled ones combine them"
                .into(),
        );
    } else if let Some(bits) = cutoffs.first() {
        section.cutoff = Some(f64::from_bits(*bits));
    }
    let with_summary = summaries.iter().filter(|s| !s.row.notes.contains_key("summary")).count();
    for s in summaries.iter_mut().filter(|s| !s.row.notes.contains_key("summary")) {
        let high_low = primary_outcome(s.survival.keys()).map(|k| s.survival[k].hazard_ratio("high", "low", LEVEL));
        match high_low {
            Some(Ok(c)) => s.row.hazard_ratio = Some(c),
            Some(Err(e)) => {
                s.row.notes.insert("hazard_ratio".into(), e.to_string());
            }
            None => {
                s.row.notes.entry("hazard_ratio".into()).or_insert_with(|| "no survival counts from this site".into());
            }
        }
        if let Some(h) = &s.histogram {
            if let Ok(curve) = h.roc_curve() {
                section.roc.push(NamedRoc { name: s.row.name.clone(), curve });
            }
            let groups = calibration_groups(h.n_positive() + h.n_negative());
            section.calibration.push(NamedCalibration { name: s.row.name.clone(), groups: h.calibration_bins(groups) });
        }
    }
    if with_summary == 0 {
        section.pooled_unavailable = Some(
            "no site sent an evaluation summary (score histograms, counts at the cut-off, survival counts by risk \
             group), which pooling needs"
                .into(),
        );
    } else if !summaries.is_empty() {
        // Site curves first, pooled last (pool appends).
        pool(&summaries, &mut section);
    }
    section.sites = summaries.into_iter().map(|s| s.row).collect();
    section
}

/// The evaluation section from the server's evaluation file (`evaluation/<task>.json`): under
/// `sites`, per site its `site`, `samples`, `metrics` and `summary` (a [`SiteEvaluation`], or null);
/// `missing` lists the sites that did not report.
///
/// # Errors
/// Why the file cannot be used (no site entries, or a summary that cannot be read), in words.
pub fn from_file(file: &Value, task_id: &str, round: u32, path: &Path) -> Result<EvaluationSection, String> {
    let entries = match file.get("sites") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(format!("{} has no site entries (`sites`)", path.display())),
    };
    let mut inputs = Vec::with_capacity(entries.len());
    for e in entries {
        let site = e
            .get("site")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: a site entry names no `site`", path.display()))?
            .to_owned();
        let summary = match e.get("summary") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                site_evaluation(v)
                    .map_err(|why| format!("{}: the summary of site {site} cannot be read: {why}", path.display()))?,
            ),
        };
        let metrics = e
            .get("metrics")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64().filter(|x| x.is_finite())?))).collect())
            .unwrap_or_default();
        let samples = e.get("samples").and_then(Value::as_u64).or(summary.as_ref().map(|s| s.n)).unwrap_or(0);
        inputs.push(SiteInput { site, samples, metrics, summary });
    }
    let source = format!(
        "{}, the server's evaluation of this task: each site's aggregate statistics and summaries (score \
         histograms, counts at the cut-off, survival counts by risk group); pooled figures computed here from the \
         summaries",
        path.display()
    );
    let mut section = build(inputs, task_id, round, source);
    if let Some(Value::Array(missing)) = file.get("missing") {
        let names: Vec<&str> = missing.iter().filter_map(Value::as_str).collect();
        if !names.is_empty() {
            section.notes.push(format!(
                "{} did not report before the evaluation closed: not in the tables or the pooled figures",
                names.join(", ")
            ));
        }
    }
    Ok(section)
}

/// The evaluation section from the database's evaluation records of one task (with the sites'
/// summaries when the records carry them).
pub fn from_records(records: &[EvaluationRecord], task_id: &str, round: u32, db: &Path) -> EvaluationSection {
    let mut notes = Vec::new();
    let inputs: Vec<SiteInput> =
        records.iter().filter(|r| r.task_id == task_id).map(|r| SiteInput::from_record(r, &mut notes)).collect();
    let source = format!("{}: the evaluation records of this task as the sites reported them", db.display());
    let mut section = build(inputs, task_id, round, source);
    section.notes.extend(notes);
    section
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedhcc_stats::federated::{EvaluationSettings, SitePredictions};
    use serde_json::json;

    fn settings() -> EvaluationSettings {
        EvaluationSettings { cutoff: Some(0.5), histogram_bins: 100, min_cell: 5, ..EvaluationSettings::default() }
    }

    fn summary(p: &SitePredictions) -> Value {
        serde_json::to_value(SiteEvaluation::compute(p, None, &settings()).unwrap()).unwrap()
    }

    fn two_sites() -> (Value, SitePredictions) {
        let (a, b) = (SitePredictions::synthetic(120, 1), SitePredictions::synthetic(80, 2));
        let file = json!({
            "task_id": "e2a1",
            "sites": [
                {"site": "center_b", "samples": 80, "metrics": {"loss": 0.7}, "summary": summary(&b)},
                {"site": "center_a", "samples": 120, "metrics": {"loss": 0.6}, "summary": summary(&a)},
            ],
            "missing": [],
            "pooled": {"study_cutoff": 0.5},
        });
        let mut all = a;
        all.extend(b);
        (file, all)
    }

    #[test]
    fn pools_from_site_summaries_exactly_where_counts_allow() {
        let (file, all) = two_sites();
        let s = from_file(&file, "e2a1", 2, Path::new("evaluation/e2a1.json")).unwrap();
        assert_eq!(s.sites.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["center_a", "center_b"]);
        assert_eq!(s.cutoff, Some(0.5));
        let (a, b) = (&s.sites[0], &s.sites[1]);
        assert_eq!((a.n, b.n), (Some(120), Some(80)));
        assert!(a.auc.unwrap().ci_low.is_some() && a.c_index.is_some() && a.hazard_ratio.is_some());
        assert_eq!((a.loss, b.loss), (Some(0.6), Some(0.7)));
        let p = s.pooled.as_ref().unwrap();
        assert_eq!(p.n, Some(200));
        // Pooled sensitivity = summed true positives / summed positives, as on the pooled patients.
        let (labels, scores) = all.labelled();
        let c = fedhcc_stats::binary::Confusion::at(&labels, &scores, 0.5).unwrap();
        let sens = p.sensitivity.unwrap();
        assert_eq!((sens.count, sens.total), (c.tp, c.tp + c.fn_));
        // The Brier score of the pooled patients (a mean of squares: the weighted site means).
        let brier = fedhcc_stats::binary::brier(&labels, &scores).unwrap();
        assert!((p.brier.unwrap() - brier).abs() < 1e-12);
        // The pooled AUC is that of the pooled binned scores (100 bins).
        let binned: Vec<f64> = scores.iter().map(|s| ((s * 100.0) as usize).min(99) as f64).collect();
        let want = fedhcc_stats::binary::auc_delong(&labels, &binned, LEVEL).unwrap();
        let got = p.auc.unwrap();
        assert!((got.estimate - want.estimate).abs() < 1e-12 && (got.ci_low.unwrap() - want.ci_low).abs() < 1e-12);
        // Pooled survival: Kaplan–Meier per risk group over every patient, log-rank and hazard ratio (RFS first).
        let rfs = s.survival.iter().find(|o| o.outcome == "rfs").unwrap();
        assert_eq!(rfs.km.iter().map(|k| k.curve.at_risk[0]).sum::<u64>(), 200);
        assert!(rfs.logrank.is_some());
        assert_eq!(p.hazard_ratio, rfs.hazard_ratio);
        assert_eq!(s.roc.len(), 3, "two sites and pooled");
        assert_eq!(s.net_benefit.as_ref().map(Vec::len), Some(99));
        assert!(p.notes["c_index"].contains("per site only"));
    }

    #[test]
    fn a_site_without_a_histogram_makes_the_pooled_auc_unavailable_not_partial() {
        let (mut file, _) = two_sites();
        file["sites"][0]["summary"]["histogram"] = Value::Null;
        let s = from_file(&file, "e2a1", 2, Path::new("e.json")).unwrap();
        let p = s.pooled.unwrap();
        assert!(p.auc.is_none());
        assert!(p.notes["auc"].contains("center_b"), "{}", p.notes["auc"]);
        assert_eq!(s.roc.len(), 1, "only center_a's own curve");
        assert!(s.net_benefit.is_none());
    }

    #[test]
    fn a_site_without_a_summary_keeps_its_metrics_and_is_named_where_pooling_misses_it() {
        let (mut file, _) = two_sites();
        file["sites"][0]["summary"] = Value::Null;
        file["sites"][0]["metrics"] = json!({"auc": 0.64, "loss": 0.7});
        file["missing"] = json!(["center_c"]);
        let s = from_file(&file, "e2a1", 2, Path::new("e.json")).unwrap();
        let b = &s.sites[1];
        assert_eq!((b.n, b.auc.map(|a| a.estimate), b.auc.and_then(|a| a.ci_low)), (Some(80), Some(0.64), None));
        assert!(b.notes["summary"].contains("no evaluation summary"));
        let p = s.pooled.unwrap();
        assert!(p.auc.is_none() && p.notes["auc"].contains("center_b"));
        assert!(s.notes.iter().any(|n| n.contains("center_c did not report")), "{:?}", s.notes);
    }

    #[test]
    fn unreadable_files_give_reasons_and_records_give_rows_without_intervals() {
        let e = from_file(&json!({"pooled": {}}), "e1a1", 1, Path::new("e.json")).unwrap_err();
        assert!(e.contains("no site entries"), "{e}");
        let bad = json!({"sites": [{"site": "a", "summary": {"version": 1, "n": 3}}]});
        let e = from_file(&bad, "e1a1", 1, Path::new("e.json")).unwrap_err();
        assert!(e.contains("site a"), "{e}");
        // A damaged summary (bins of different lengths, times out of order) gives a reason, not a panic.
        let (mut damaged, _) = two_sites();
        damaged["sites"][1]["summary"]["histogram"]["negative"] = json!([1, 2]);
        let e = from_file(&damaged, "e2a1", 2, Path::new("e.json")).unwrap_err();
        assert!(e.contains("center_a") && e.contains("histogram"), "{e}");
        let (mut damaged, _) = two_sites();
        let times = &mut damaged["sites"][0]["summary"]["rfs"]["counts"]["groups"]["high"]["time"];
        times.as_array_mut().unwrap().reverse();
        assert!(from_file(&damaged, "e2a1", 2, Path::new("e.json")).unwrap_err().contains("center_b"));
        let rec = |task: &str| EvaluationRecord {
            round: 3,
            task_id: task.into(),
            site: "b".into(),
            samples: 20,
            metrics: vec![
                ("auc".into(), 0.61),
                ("loss".into(), 0.7),
                ("n_positive".into(), 4.0),
                ("c_index".into(), f64::NAN),
            ],
            summary: None,
        };
        let s = from_records(&[rec("e3a1"), rec("e2a1")], "e3a1", 3, Path::new("server.db"));
        assert_eq!(s.sites.len(), 1, "only the task's records");
        let r = &s.sites[0];
        assert_eq!((r.n, r.n_positive, r.loss), (Some(20), Some(4), Some(0.7)));
        assert_eq!(r.auc.unwrap().ci_low, None);
        assert_eq!(r.c_index, None, "a non-finite metric is not shown as a number");
        assert!(s.pooled.is_none());
        assert!(s.pooled_unavailable.unwrap().contains("no site sent an evaluation summary"));
    }
}
