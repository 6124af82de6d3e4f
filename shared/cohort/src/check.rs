//! The data check a site operator runs before anything trains: counts, exclusions, label flow, events,
//! missingness, out-of-range values and MRI timing, and the [`Finding`]s they lead to, each an
//! [`Severity::Error`] (the model cannot train on a patient or on the site until it is fixed) or a
//! [`Severity::Warning`] (it trains, but the data deserve a look).
//!
//! Invariant: a [`DataCheck`] holds counts, row numbers, column names and fixed reference ranges, and the
//! (pseudonymised) patient ids that a finding needs to be acted on; never a patient's value.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cohort::{FeatureValue, LoadReport};
use crate::outcomes::LabelReason;
use crate::spec::{CohortSpec, LabelSpec};

/// Plausible ranges (SCHEMA.md units); values outside are counted, not excluded.
pub const PLAUSIBLE_RANGES: [(&str, f64, f64); 17] = [
    ("age", 18.0, 100.0),
    ("afp", 0.0, 1_000_000.0),
    ("pivka2", 0.0, 1_000_000.0),
    ("albumin", 15.0, 60.0),
    ("total_bilirubin", 1.0, 500.0),
    ("alt", 1.0, 5000.0),
    ("ast", 1.0, 5000.0),
    ("ggt", 1.0, 5000.0),
    ("platelets", 10.0, 1000.0),
    ("inr", 0.5, 5.0),
    ("albi_score", -5.0, 0.0),
    ("tumor_number", 1.0, 10.0),
    ("tumor_max_diam_cm", 0.1, 30.0),
    ("es_grade", 1.0, 4.0),
    ("margin_mm", 0.0, 100.0),
    ("path_max_diam_cm", 0.1, 30.0),
    ("rec_max_diam_cm", 0.1, 30.0),
];

/// MRI more than this many days before surgery is flagged.
pub const MRI_MAX_DAYS_BEFORE_SURGERY: i64 = 31;

/// A feature column missing for more than this share of the loaded patients (percent) is a warning.
pub const MOSTLY_MISSING_PERCENT: f64 = 50.0;

/// Fewer labelled patients than this and the site cannot train (a training split needs two).
pub const MIN_LABELLED: usize = 2;

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The model cannot train on the patients named (or on the site at all) until it is fixed;
    /// `fedhcc data check` exits with code 3.
    Error,
    /// The model trains, but the data deserve a look (a likely unit error, a column left empty).
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One thing the data check found, for people (`message`) and for scripts (`severity`, `code`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A fixed short name (`phase_unreadable`, `not_a_number`, `recurrence_extent_missing`, …).
    pub code: String,
    /// What is wrong and what it does to training; names columns, files and counts, never a value.
    pub message: String,
    /// Patients (or rows) concerned.
    pub count: usize,
    /// Their ids, where the check knows them.
    pub patients: Vec<String>,
    /// Their `clinical.csv` rows (header = row 1), for rows that were not loaded.
    pub rows: Vec<usize>,
}

impl Finding {
    /// A finding about `count` patients or rows, without ids or rows yet.
    pub fn new(severity: Severity, code: &str, count: usize, message: String) -> Self {
        Finding { severity, code: code.to_owned(), message, count, patients: Vec::new(), rows: Vec::new() }
    }

    /// A finding about these `patients` (its count is theirs).
    pub fn about(severity: Severity, code: &str, patients: Vec<String>, message: String) -> Self {
        Finding { severity, code: code.to_owned(), message, count: patients.len(), patients, rows: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataCheck {
    /// Data rows in the file (loaded + excluded).
    pub patients_read: usize,
    pub patients_loaded: usize,
    pub excluded: Exclusions,
    pub label_flow: LabelFlow,
    /// The spec's survival outcome (RFS for the HCC study).
    pub survival: Option<EventCounts>,
    /// Overall survival, when the cohort carries it.
    pub overall_survival: Option<EventCounts>,
    pub missingness: Vec<Missingness>,
    pub out_of_range: Vec<OutOfRange>,
    pub mri_interval: Option<MriInterval>,
    /// Recurrences whose extent columns are empty (outcomes derived from raw follow-up only).
    pub recurrence_extent_missing: RecurrenceExtentMissing,
}

/// Patients with a `recurrence_date` whose `rec_macrovascular` or `rec_extrahepatic` is empty. An empty
/// field is read as "absent", so these recurrences can only look within Milan on those two criteria: the
/// label leans towards 0 where the fact was simply not recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RecurrenceExtentMissing {
    /// Their ids.
    pub patients: Vec<String>,
    /// With `rec_macrovascular` empty.
    pub rec_macrovascular: usize,
    /// With `rec_extrahepatic` empty.
    pub rec_extrahepatic: usize,
    /// Of them, labelled `early_within_milan` (label 0): the ones whose label the missing field can change.
    pub early_within_milan: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exclusions {
    pub rows: usize,
    /// Issue kind → number of issues.
    pub by_kind: BTreeMap<String, usize>,
    /// Every issue: row (header = 1), column and kind.
    pub issues: Vec<IssueRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IssueRef {
    pub row: usize,
    pub column: String,
    pub kind: String,
}

/// TRIPOD-style flow of the loaded patients into labelled and unlabelled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelFlow {
    pub total: usize,
    pub positive: usize,
    pub negative: usize,
    pub unlabelled: usize,
    /// Positive share of the labelled patients (`null` when none is labelled).
    pub prevalence: Option<f64>,
    /// For the aggressive-recurrence label: share of the labelled patients with a first recurrence within the
    /// horizon (aggressive or within Milan); `null` for other labels.
    pub recurrence_within_horizon: Option<f64>,
    /// Per reason, in a fixed order; zero counts are kept so reports line up across sites.
    pub by_reason: Vec<ReasonCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasonCount {
    pub reason: String,
    /// "positive", "negative" or "unlabelled".
    pub label: String,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventCounts {
    pub with_time: usize,
    pub events: usize,
    pub censored: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Missingness {
    pub column: String,
    pub missing: usize,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutOfRange {
    pub column: String,
    pub low: f64,
    pub high: f64,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MriInterval {
    /// Patients with both an MRI and a surgery date.
    pub checked: usize,
    pub more_than_31_days_before_surgery: usize,
    pub after_surgery: usize,
}

fn label_name(label: Option<u8>) -> &'static str {
    match label {
        Some(0) => "negative",
        Some(_) => "positive",
        None => "unlabelled",
    }
}

/// The reason a patient's label has, for cohorts without [`LabelReason`]s.
fn generic_reason(spec: &CohortSpec, label: Option<u8>) -> &'static str {
    match (&spec.label, label) {
        (LabelSpec::Horizon { .. }, Some(0)) => "event_free_at_horizon",
        (LabelSpec::Horizon { .. }, Some(_)) => "event_before_horizon",
        (LabelSpec::Horizon { .. }, None) => "censored_before_horizon",
        (_, Some(_)) => "label_column",
        (_, None) => "label_missing",
    }
}

impl DataCheck {
    /// Summarises a load.
    pub fn run(report: &LoadReport, spec: &CohortSpec) -> DataCheck {
        let patients = &report.cohort.patients;
        let n = patients.len();

        let mut by_kind = BTreeMap::new();
        for issue in &report.issues {
            *by_kind.entry(issue.kind.as_str().to_owned()).or_insert(0) += 1;
        }
        let excluded = Exclusions {
            rows: report.excluded_rows().len(),
            by_kind,
            issues: report
                .issues
                .iter()
                .map(|i| IssueRef { row: i.row, column: i.column.clone(), kind: i.kind.as_str().to_owned() })
                .collect(),
        };

        let mut by_reason: Vec<ReasonCount> = Vec::new();
        if matches!(spec.label, LabelSpec::AggressiveRecurrence) {
            for reason in LabelReason::ALL {
                let with_reason = patients.iter().filter(|p| p.label_reason == Some(reason));
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for p in with_reason {
                    *counts.entry(label_name(p.label)).or_insert(0) += 1;
                }
                let default_label = match reason {
                    LabelReason::Aggressive => "positive",
                    LabelReason::CensoredBefore2y | LabelReason::DeathBefore2y => "unlabelled",
                    _ => "negative",
                };
                counts.entry(default_label).or_insert(0);
                for (label, count) in counts {
                    by_reason.push(ReasonCount { reason: reason.as_str().to_owned(), label: label.to_owned(), count });
                }
            }
            let without = patients.iter().filter(|p| p.label_reason.is_none());
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for p in without {
                *counts.entry(label_name(p.label)).or_insert(0) += 1;
            }
            for (label, count) in counts {
                by_reason.push(ReasonCount { reason: "no_reason_given".to_owned(), label: label.to_owned(), count });
            }
        } else {
            let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for p in patients {
                *counts.entry((generic_reason(spec, p.label), label_name(p.label))).or_insert(0) += 1;
            }
            for ((reason, label), count) in counts {
                by_reason.push(ReasonCount { reason: reason.to_owned(), label: label.to_owned(), count });
            }
        }
        let positive = patients.iter().filter(|p| matches!(p.label, Some(l) if l != 0)).count();
        let negative = patients.iter().filter(|p| p.label == Some(0)).count();
        let labelled = positive + negative;
        let share = |k: usize| (labelled > 0).then(|| k as f64 / labelled as f64);
        let recurrence_within_horizon = matches!(spec.label, LabelSpec::AggressiveRecurrence)
            .then(|| {
                let early = patients
                    .iter()
                    .filter(|p| p.label.is_some())
                    .filter(|p| matches!(p.label_reason, Some(LabelReason::Aggressive | LabelReason::EarlyWithinMilan)))
                    .count();
                share(early)
            })
            .flatten();
        let label_flow = LabelFlow {
            total: n,
            positive,
            negative,
            unlabelled: n - positive - negative,
            prevalence: share(positive),
            recurrence_within_horizon,
            by_reason,
        };

        let events = |times: Vec<Option<(f64, bool)>>| {
            let with_time = times.iter().flatten().count();
            let events = times.iter().flatten().filter(|(_, e)| *e).count();
            EventCounts { with_time, events, censored: with_time - events }
        };
        let survival = spec.survival.as_ref().map(|_| events(patients.iter().map(|p| p.survival).collect()));
        let overall_survival =
            patients.iter().any(|p| p.os.is_some()).then(|| events(patients.iter().map(|p| p.os).collect()));

        let percent = |count: usize| if n == 0 { 0.0 } else { 100.0 * count as f64 / n as f64 };
        let missingness = report
            .cohort
            .feature_columns
            .iter()
            .enumerate()
            .map(|(j, column)| {
                let missing =
                    patients.iter().filter(|p| p.features.get(j).is_none_or(FeatureValue::is_missing)).count();
                Missingness { column: column.clone(), missing, percent: percent(missing) }
            })
            .collect();

        let mut out_of_range = Vec::new();
        for (j, column) in report.cohort.feature_columns.iter().enumerate() {
            let Some(&(_, low, high)) = PLAUSIBLE_RANGES.iter().find(|(c, _, _)| c == column) else {
                continue;
            };
            let count = patients
                .iter()
                .filter(|p| matches!(p.features.get(j), Some(FeatureValue::Numeric(Some(v))) if *v < low || *v > high))
                .count();
            out_of_range.push(OutOfRange { column: column.clone(), low, high, count });
        }

        let intervals: Vec<i64> = patients.iter().filter_map(|p| p.mri_to_surgery_days).collect();
        let mri_interval = (!intervals.is_empty()).then(|| MriInterval {
            checked: intervals.len(),
            more_than_31_days_before_surgery: intervals.iter().filter(|&&d| d > MRI_MAX_DAYS_BEFORE_SURGERY).count(),
            after_surgery: intervals.iter().filter(|&&d| d < 0).count(),
        });

        let mut recurrence_extent_missing = RecurrenceExtentMissing::default();
        for p in patients.iter().filter(|p| !p.recurrence_extent_missing.is_empty()) {
            let r = &mut recurrence_extent_missing;
            r.patients.push(p.id.clone());
            r.rec_macrovascular += usize::from(p.recurrence_extent_missing.contains(&"rec_macrovascular"));
            r.rec_extrahepatic += usize::from(p.recurrence_extent_missing.contains(&"rec_extrahepatic"));
            r.early_within_milan += usize::from(p.label_reason == Some(LabelReason::EarlyWithinMilan));
        }

        DataCheck {
            patients_read: report.rows_read(),
            patients_loaded: n,
            excluded,
            label_flow,
            survival,
            overall_survival,
            missingness,
            out_of_range,
            mri_interval,
            recurrence_extent_missing,
        }
    }

    /// The findings of the clinical table: excluded rows (one error per kind of problem), too few labelled
    /// patients (error), mostly missing columns, out-of-range values, MRI timing and recurrences without
    /// their extent (warnings).
    pub fn findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        for kind in self.excluded.by_kind.keys() {
            let issues: Vec<&IssueRef> = self.excluded.issues.iter().filter(|i| &i.kind == kind).collect();
            let mut rows: Vec<usize> = issues.iter().map(|i| i.row).collect();
            rows.dedup();
            let mut columns: Vec<&str> = issues.iter().map(|i| i.column.as_str()).collect();
            columns.sort_unstable();
            columns.dedup();
            let columns = columns.iter().map(|c| if *c == "*" { "the whole row" } else { c }).collect::<Vec<_>>();
            let mut f = Finding::new(
                Severity::Error,
                kind,
                rows.len(),
                format!(
                    "{} row(s) of clinical.csv not loaded ({}; column {}): these patients are left out of \
                     training and evaluation; fix the rows and run the check again",
                    rows.len(),
                    kind.replace('_', " "),
                    columns.join(", ")
                ),
            );
            f.rows = rows;
            out.push(f);
        }
        let f = &self.label_flow;
        let labelled = f.positive + f.negative;
        if self.patients_loaded == 0 {
            out.push(Finding::new(
                Severity::Error,
                "no_patients",
                0,
                "no patient of clinical.csv could be loaded: this site cannot train".to_owned(),
            ));
        } else if labelled < MIN_LABELLED {
            out.push(Finding::new(
                Severity::Error,
                "too_few_labelled",
                labelled,
                format!(
                    "{labelled} patient(s) have a label (positive or negative); at least {MIN_LABELLED} are needed \
                     to train: this site cannot train (see the label flow above for why the others have none)"
                ),
            ));
        }
        for m in self.missingness.iter().filter(|m| m.percent > MOSTLY_MISSING_PERCENT) {
            out.push(Finding::new(
                Severity::Warning,
                "mostly_missing",
                m.missing,
                format!(
                    "column {} is empty for {} of {} patients ({:.0}%, more than {MOSTLY_MISSING_PERCENT}%): the \
                     model sees it as missing for them; check the export from your records system",
                    m.column, m.missing, self.patients_loaded, m.percent
                ),
            ));
        }
        for o in self.out_of_range.iter().filter(|o| o.count > 0) {
            out.push(Finding::new(
                Severity::Warning,
                "out_of_range",
                o.count,
                format!(
                    "column {}: {} value(s) outside the plausible range {}..{} (kept as they are; check the units \
                     against docs/data-schema.md)",
                    o.column, o.count, o.low, o.high
                ),
            ));
        }
        if let Some(m) = &self.mri_interval {
            if m.more_than_31_days_before_surgery > 0 {
                out.push(Finding::new(
                    Severity::Warning,
                    "mri_long_before_surgery",
                    m.more_than_31_days_before_surgery,
                    format!(
                        "{} patient(s) had their MRI more than {MRI_MAX_DAYS_BEFORE_SURGERY} days before surgery \
                         (the study expects at most {MRI_MAX_DAYS_BEFORE_SURGERY}); check mri_date",
                        m.more_than_31_days_before_surgery
                    ),
                ));
            }
            if m.after_surgery > 0 {
                out.push(Finding::new(
                    Severity::Warning,
                    "mri_after_surgery",
                    m.after_surgery,
                    format!(
                        "{} patient(s) have an mri_date after surgery_date: a preoperative MRI comes first; check \
                         the dates",
                        m.after_surgery
                    ),
                ));
            }
        }
        let r = &self.recurrence_extent_missing;
        if !r.patients.is_empty() {
            out.push(Finding::about(
                Severity::Warning,
                "recurrence_extent_missing",
                r.patients.clone(),
                format!(
                    "{} patient(s) with a recurrence_date leave rec_macrovascular ({}) or rec_extrahepatic ({}) \
                     empty; an empty field is read as \"absent\", which pulls the label towards \"within Milan\" \
                     (not aggressive); {} of them are labelled early_within_milan and would become aggressive if \
                     the field were 1; fill in 0 or 1 from the follow-up records",
                    r.patients.len(),
                    r.rec_macrovascular,
                    r.rec_extrahepatic,
                    r.early_within_milan
                ),
            ));
        }
        out
    }

    /// A plain-text report for the site's IT operator. It carries no patient value or id.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("Data check".to_owned());
        line(format!(
            "  patients read: {}, loaded: {}, rows excluded: {}",
            self.patients_read, self.patients_loaded, self.excluded.rows
        ));
        if !self.excluded.issues.is_empty() {
            line("Excluded rows (fix these in the CSV and rerun; the rest loaded):".to_owned());
            for (kind, count) in &self.excluded.by_kind {
                line(format!("  {kind}: {count}"));
            }
            for issue in &self.excluded.issues {
                line(format!("  row {}, column {}: {}", issue.row, issue.column, issue.kind));
            }
        }
        let f = &self.label_flow;
        line(format!(
            "Label flow: {} patients -> {} positive, {} negative, {} unlabelled",
            f.total, f.positive, f.negative, f.unlabelled
        ));
        for r in &f.by_reason {
            line(format!("  {:<26} {:<11} {}", r.reason, r.label, r.count));
        }
        if let Some(p) = f.prevalence {
            line(format!("  positive share of the labelled: {:.1}%", 100.0 * p));
        }
        if let Some(r) = f.recurrence_within_horizon {
            line(format!(
                "  first recurrence within the horizon (any pattern), share of the labelled: {:.1}%",
                100.0 * r
            ));
        }
        for (name, counts) in [("Survival outcome", &self.survival), ("Overall survival", &self.overall_survival)] {
            if let Some(c) = counts {
                line(format!("{name}: {} with time, {} events, {} censored", c.with_time, c.events, c.censored));
            }
        }
        line("Missing values per feature:".to_owned());
        for m in &self.missingness {
            line(format!("  {:<22} {:>6} ({:.1}%)", m.column, m.missing, m.percent));
        }
        let flagged: Vec<&OutOfRange> = self.out_of_range.iter().filter(|o| o.count > 0).collect();
        if flagged.is_empty() {
            line("Out-of-range values: none".to_owned());
        } else {
            line("Out-of-range values (kept; check units):".to_owned());
            for o in flagged {
                line(format!("  {:<22} {:>6} outside {}..{}", o.column, o.count, o.low, o.high));
            }
        }
        if let Some(m) = &self.mri_interval {
            line(format!(
                "MRI timing: {} checked, {} more than {} days before surgery, {} after surgery",
                m.checked, m.more_than_31_days_before_surgery, MRI_MAX_DAYS_BEFORE_SURGERY, m.after_surgery
            ));
        }
        let r = &self.recurrence_extent_missing;
        if !r.patients.is_empty() {
            line(format!(
                "Recurrence extent: {} recurrence(s) with rec_macrovascular ({}) or rec_extrahepatic ({}) empty, read \
                 as absent ({} labelled early_within_milan)",
                r.patients.len(),
                r.rec_macrovascular,
                r.rec_extrahepatic,
                r.early_within_milan
            ));
        }
        out
    }
}
