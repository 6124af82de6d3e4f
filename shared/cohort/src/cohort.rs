//! Loading a site's CSV into a [`Cohort`].
//!
//! Two stages, as everywhere in fedhcc: the header is checked against the spec (a missing column is fatal),
//! then each row is parsed on its own. A row with any problem becomes one [`RowIssue`] per problem column
//! and is excluded; the other rows go on. Rows are numbered as a spreadsheet shows them: the header is row 1.
//!
//! Which columns are required depends only on the spec:
//!
//! - every feature column;
//! - [`LabelSpec::Column`]: its column; [`LabelSpec::Horizon`]: its time and event columns;
//! - [`LabelSpec::AggressiveRecurrence`]: if the CSV carries `aggressive_2y`, it is used as it is (with
//!   `label_reason`, `os_days`/`os_event` when present) and the survival columns must be in the CSV too;
//!   otherwise the raw follow-up columns are required and the outcomes are derived ([`crate::outcomes`]),
//!   including survival columns named `rfs_*`, `ttr_*` or `os_*`;
//! - the survival columns, unless derived;
//! - the id column only when the spec names it.
//!
//! `mri_date` and `center_id` are read when present (the data check uses them). Extra columns are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::error::CohortError;
use crate::outcomes::{FollowUp, LabelReason, OutcomeConfig};
use crate::spec::{CohortSpec, FeatureKind, LabelSpec};

/// The raw follow-up columns the HCC outcome derivation needs.
pub const RAW_FOLLOW_UP_COLUMNS: [&str; 8] = [
    "surgery_date",
    "recurrence_date",
    "rec_n_nodules",
    "rec_max_diam_cm",
    "rec_macrovascular",
    "rec_extrahepatic",
    "death_date",
    "last_followup_date",
];

/// A loaded cohort: the patients whose rows had no problem, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Cohort {
    /// The file it was read from.
    pub source: PathBuf,
    /// The spec's feature columns, in layout order; [`Patient::features`] follows it.
    pub feature_columns: Vec<String>,
    pub patients: Vec<Patient>,
}

/// One patient's model-relevant values.
#[derive(Debug, Clone, PartialEq)]
pub struct Patient {
    /// The id column's value, or `row<N>` when the CSV has no id column.
    pub id: String,
    /// The CSV row (header = row 1).
    pub row: usize,
    pub center_id: Option<String>,
    /// One value per [`Cohort::feature_columns`], as read (before any log transform).
    pub features: Vec<FeatureValue>,
    pub label: Option<u8>,
    /// Set for HCC cohorts (derived, or read from a `label_reason` column).
    pub label_reason: Option<LabelReason>,
    /// (days, event) of the spec's survival outcome.
    pub survival: Option<(f64, bool)>,
    /// (days, event) of overall survival, for HCC cohorts.
    pub os: Option<(f64, bool)>,
    /// Days from MRI to surgery (positive: MRI before surgery), when both dates are present.
    pub mri_to_surgery_days: Option<i64>,
    /// For outcomes derived from raw follow-up: which of `rec_macrovascular` and `rec_extrahepatic` a row
    /// with a `recurrence_date` leaves empty (read as absent, so such a recurrence can only look within
    /// Milan on those criteria). Empty otherwise.
    pub recurrence_extent_missing: Vec<&'static str>,
}

/// A feature value as read: numeric and binary features are numbers, categorical ones text.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValue {
    Numeric(Option<f64>),
    Categorical(Option<String>),
}

impl FeatureValue {
    pub fn is_missing(&self) -> bool {
        matches!(self, FeatureValue::Numeric(None) | FeatureValue::Categorical(None))
    }
}

/// A problem with one field of one row. The row is excluded from the cohort.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowIssue {
    /// CSV row, header = row 1.
    pub row: usize,
    pub column: String,
    pub patient_id: Option<String>,
    pub kind: IssueKind,
    /// For the site's own operator; may quote the offending field. Never send it off-site; the
    /// [`crate::DataCheck`] uses only `row`, `column` and `kind`.
    pub problem: String,
}

impl std::fmt::Display for RowIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "row {}, column {}", self.row, self.column)?;
        if let Some(id) = &self.patient_id {
            write!(f, " (patient {id})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// The class of a row problem (what the data check counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// The row has more or fewer fields than the header, or is not UTF-8.
    MalformedRow,
    NotANumber,
    NotAnInteger,
    NotZeroOne,
    InvalidDate,
    UnknownLevel,
    Negative,
    BeforeSurgery,
    InconsistentDates,
    InconsistentRecurrence,
    MissingValue,
    DuplicateId,
}

impl IssueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::MalformedRow => "malformed_row",
            IssueKind::NotANumber => "not_a_number",
            IssueKind::NotAnInteger => "not_an_integer",
            IssueKind::NotZeroOne => "not_zero_one",
            IssueKind::InvalidDate => "invalid_date",
            IssueKind::UnknownLevel => "unknown_level",
            IssueKind::Negative => "negative",
            IssueKind::BeforeSurgery => "before_surgery",
            IssueKind::InconsistentDates => "inconsistent_dates",
            IssueKind::InconsistentRecurrence => "inconsistent_recurrence",
            IssueKind::MissingValue => "missing_value",
            IssueKind::DuplicateId => "duplicate_id",
        }
    }
}

/// The result of a load: the cohort and every row problem found.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub cohort: Cohort,
    /// Sorted by row, then by order found within the row.
    pub issues: Vec<RowIssue>,
}

impl LoadReport {
    /// Data rows read (loaded + excluded).
    pub fn rows_read(&self) -> usize {
        self.cohort.patients.len() + self.excluded_rows().len()
    }

    /// The distinct excluded rows, ascending.
    pub fn excluded_rows(&self) -> Vec<usize> {
        let mut rows: Vec<usize> = self.issues.iter().map(|i| i.row).collect();
        rows.dedup();
        rows
    }
}

impl Cohort {
    /// Number of patients.
    pub fn len(&self) -> usize {
        self.patients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patients.is_empty()
    }

    /// The labels, one per patient, for [`crate::Splits::stratified`].
    pub fn labels(&self) -> Vec<Option<u8>> {
        self.patients.iter().map(|p| p.label).collect()
    }

    /// Reads `path` as described in the module docs.
    ///
    /// # Errors
    ///
    /// Only for the whole file: [`CohortError::InvalidSpec`], [`CohortError::Read`],
    /// [`CohortError::BadHeader`], [`CohortError::MissingColumns`], [`CohortError::Empty`]. Row problems are
    /// [`LoadReport::issues`].
    pub fn load(path: &Path, spec: &CohortSpec, outcomes: &OutcomeConfig) -> Result<LoadReport, CohortError> {
        spec.validate()?;
        let read_err = |source: std::io::Error| CohortError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut reader =
            csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).has_headers(true).from_reader(file);
        let header = read_header(path, &mut reader)?;
        let plan = Plan::new(path, spec, &header)?;

        let mut patients = Vec::new();
        let mut issues = Vec::new();
        let mut first_row_of_id: HashMap<String, usize> = HashMap::new();
        let mut record = csv::StringRecord::new();
        let mut row = 1;
        loop {
            row += 1;
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => match e.kind() {
                    csv::ErrorKind::Io(_) => {
                        let problem = e.to_string();
                        return Err(read_err(std::io::Error::other(format!("row {row}: {problem}"))));
                    }
                    _ => {
                        issues.push(RowIssue {
                            row,
                            column: "*".to_owned(),
                            patient_id: None,
                            kind: IssueKind::MalformedRow,
                            problem: "is not valid UTF-8 CSV".to_owned(),
                        });
                        continue;
                    }
                },
            }
            if record.len() != header.len() {
                issues.push(RowIssue {
                    row,
                    column: "*".to_owned(),
                    patient_id: plan.raw_id(&record),
                    kind: IssueKind::MalformedRow,
                    problem: format!("has {} fields but the header has {}", record.len(), header.len()),
                });
                continue;
            }
            let mut parser = RowParser { record: &record, columns: &plan.index, problems: Vec::new() };
            let patient = plan.parse_row(&mut parser, row, outcomes);
            let mut problems = parser.problems;
            if let Some(id) = patient.as_ref().map(|p| p.id.clone()).or_else(|| plan.raw_id(&record)) {
                match first_row_of_id.get(&id) {
                    Some(first) if plan.id_from_column => problems.push((
                        plan.id_column.clone(),
                        IssueKind::DuplicateId,
                        format!("patient id is a duplicate of row {first}; the first row is kept"),
                    )),
                    _ => {
                        first_row_of_id.entry(id).or_insert(row);
                    }
                }
            }
            match patient {
                Some(p) if problems.is_empty() => patients.push(p),
                p => {
                    let patient_id = p.map(|p| p.id).or_else(|| plan.raw_id(&record));
                    let mut seen: Vec<String> = Vec::new();
                    for (column, kind, problem) in problems {
                        if seen.contains(&column) {
                            continue;
                        }
                        seen.push(column.clone());
                        issues.push(RowIssue { row, column, patient_id: patient_id.clone(), kind, problem });
                    }
                }
            }
        }
        if row == 2 {
            return Err(CohortError::Empty {
                path: path.to_owned(),
                problem: "has a header but no patient rows".to_owned(),
            });
        }
        Ok(LoadReport {
            cohort: Cohort { source: path.to_owned(), feature_columns: spec.feature_columns(), patients },
            issues,
        })
    }
}

fn read_header(path: &Path, reader: &mut csv::Reader<std::fs::File>) -> Result<Vec<String>, CohortError> {
    let bad = |problem: String| CohortError::BadHeader { path: path.to_owned(), problem };
    let header = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => match e.kind() {
            csv::ErrorKind::Io(_) => {
                return Err(CohortError::Read { path: path.to_owned(), source: std::io::Error::other(e.to_string()) });
            }
            _ => return Err(bad(format!("cannot be parsed: {e}"))),
        },
    };
    if header.is_empty() || (header.len() == 1 && header[0].trim().is_empty()) {
        return Err(CohortError::Empty { path: path.to_owned(), problem: "is empty (no header row)".to_owned() });
    }
    let names: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, h)| if i == 0 { h.trim_start_matches('\u{feff}') } else { h }.to_owned())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(bad(format!("column {} has an empty name", i + 1)));
        }
        if !seen.insert(name.as_str()) {
            return Err(bad(format!("column '{name}' appears more than once")));
        }
    }
    Ok(names)
}

/// How the rows of one file are read, decided from the spec and the header.
struct Plan<'a> {
    spec: &'a CohortSpec,
    index: HashMap<String, usize>,
    id_column: String,
    id_from_column: bool,
    hcc: Option<HccMode>,
    /// Survival taken from the derived outcomes: Some(which) with which in {"rfs", "ttr", "os"}.
    derived_survival: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HccMode {
    /// `aggressive_2y` and friends are in the CSV.
    Carried,
    /// Derived from the raw follow-up columns.
    Raw,
}

fn derived_outcome_name(time_column: &str, event_column: &str) -> Option<&'static str> {
    ["rfs", "ttr", "os"]
        .into_iter()
        .find(|n| time_column == format!("{n}_days") && event_column == format!("{n}_event"))
}

impl<'a> Plan<'a> {
    fn new(path: &Path, spec: &'a CohortSpec, header: &[String]) -> Result<Self, CohortError> {
        let index: HashMap<String, usize> = header.iter().enumerate().map(|(i, h)| (h.clone(), i)).collect();
        let mut required: Vec<(String, String)> = Vec::new();
        let mut need = |column: &str, purpose: &str| required.push((column.to_owned(), purpose.to_owned()));
        for f in &spec.features {
            need(&f.column, "feature");
        }
        let mut hcc = None;
        match &spec.label {
            LabelSpec::Column { column } => need(column, "label"),
            LabelSpec::Horizon { time_column, event_column, .. } => {
                need(time_column, "label time");
                need(event_column, "label event");
            }
            LabelSpec::AggressiveRecurrence => {
                if index.contains_key("aggressive_2y") {
                    hcc = Some(HccMode::Carried);
                } else {
                    hcc = Some(HccMode::Raw);
                    for c in RAW_FOLLOW_UP_COLUMNS {
                        need(c, "label: raw follow-up, or provide aggressive_2y");
                    }
                }
            }
        }
        let mut derived_survival = None;
        if let Some(s) = &spec.survival {
            derived_survival =
                derived_outcome_name(&s.time_column, &s.event_column).filter(|_| hcc == Some(HccMode::Raw));
            if derived_survival.is_none() {
                need(&s.time_column, "survival time");
                need(&s.event_column, "survival event");
            }
        }
        let id_column = spec.id_column_name().to_owned();
        if spec.id_column.is_some() {
            need(&id_column, "patient id");
        }
        let mut missing: Vec<(String, String)> = Vec::new();
        for (column, purpose) in required {
            if !index.contains_key(&column) && !missing.iter().any(|(c, _)| *c == column) {
                missing.push((column, purpose));
            }
        }
        if !missing.is_empty() {
            return Err(CohortError::MissingColumns {
                path: path.to_owned(),
                columns: missing.iter().map(|(c, _)| c.clone()).collect(),
                needed_for: missing.iter().map(|(c, p)| format!("{c}: {p}")).collect::<Vec<_>>().join("; "),
            });
        }
        let id_from_column = index.contains_key(&id_column);
        Ok(Plan { spec, index, id_column, id_from_column, hcc, derived_survival })
    }

    fn raw_id(&self, record: &csv::StringRecord) -> Option<String> {
        let i = *self.index.get(&self.id_column)?;
        record.get(i).filter(|v| !v.is_empty()).map(str::to_owned)
    }

    /// Parses one row; problems go to `p.problems`. Returns `None` only when the id is unusable.
    fn parse_row(&self, p: &mut RowParser<'_>, row: usize, cfg: &OutcomeConfig) -> Option<Patient> {
        let id = if self.id_from_column {
            match p.text(&self.id_column) {
                Some(id) => id.to_owned(),
                None => {
                    p.problem(&self.id_column, IssueKind::MissingValue, "patient id is empty".to_owned());
                    return None;
                }
            }
        } else {
            format!("row{row}")
        };
        let mut features = Vec::with_capacity(self.spec.features.len());
        for f in &self.spec.features {
            features.push(match &f.kind {
                FeatureKind::Numeric { log } => {
                    let v = p.number(&f.column);
                    if *log && v.is_some_and(|v| v < 0.0) {
                        p.problem(
                            &f.column,
                            IssueKind::Negative,
                            "is negative; this column is log-transformed and needs values ≥ 0".to_owned(),
                        );
                    }
                    FeatureValue::Numeric(v)
                }
                FeatureKind::Binary => FeatureValue::Numeric(p.flag(&f.column).map(|b| if b { 1.0 } else { 0.0 })),
                FeatureKind::Categorical { levels } => FeatureValue::Categorical(match p.text(&f.column) {
                    Some(v) if levels.iter().any(|l| l == v) => Some(v.to_owned()),
                    Some(v) => {
                        let problem = format!("'{v}' is not one of the declared levels ({})", levels.join(", "));
                        p.problem(&f.column, IssueKind::UnknownLevel, problem);
                        None
                    }
                    None => None,
                }),
            });
        }

        let mut label = None;
        let mut label_reason = None;
        let mut os = None;
        let mut derived: Option<crate::outcomes::Outcome> = None;
        let mut recurrence_extent_missing = Vec::new();
        let surgery = if self.index.contains_key("surgery_date") { p.date("surgery_date") } else { None };
        match (&self.spec.label, self.hcc) {
            (LabelSpec::Column { column }, _) => label = p.flag(column).map(u8::from),
            (LabelSpec::Horizon { time_column, event_column, horizon_days }, _) => {
                let t = p.time(time_column);
                let e = p.flag(event_column);
                label = match (t, e) {
                    (Some(t), Some(true)) if t <= *horizon_days => Some(1),
                    (Some(t), Some(_)) if t >= *horizon_days => Some(0),
                    _ => None,
                };
            }
            (LabelSpec::AggressiveRecurrence, Some(HccMode::Raw)) => {
                let follow_up = FollowUp {
                    surgery_date: surgery.unwrap_or_default(),
                    recurrence_date: p.date("recurrence_date"),
                    rec_n_nodules: p.count("rec_n_nodules"),
                    rec_max_diam_cm: p.positive("rec_max_diam_cm"),
                    rec_macrovascular: p.flag("rec_macrovascular"),
                    rec_extrahepatic: p.flag("rec_extrahepatic"),
                    death_date: p.date("death_date"),
                    last_followup_date: p.date("last_followup_date"),
                };
                if follow_up.recurrence_date.is_some() {
                    for (column, value) in [
                        ("rec_macrovascular", follow_up.rec_macrovascular),
                        ("rec_extrahepatic", follow_up.rec_extrahepatic),
                    ] {
                        if value.is_none() && p.text(column).is_none() {
                            recurrence_extent_missing.push(column);
                        }
                    }
                }
                if surgery.is_none() && p.text("surgery_date").is_none() {
                    p.problem(
                        "surgery_date",
                        IssueKind::MissingValue,
                        "is empty; every outcome starts there".to_owned(),
                    );
                }
                if p.problems.is_empty() {
                    match follow_up.derive(cfg) {
                        Ok(o) => {
                            label = o.aggressive_2y;
                            label_reason = Some(o.label_reason);
                            os = Some((o.os_days as f64, o.os_event));
                            derived = Some(o);
                        }
                        Err(issue) => p.problem(issue.column, issue.kind, issue.problem),
                    }
                }
            }
            (LabelSpec::AggressiveRecurrence, _) => {
                label = p.flag("aggressive_2y").map(u8::from);
                if self.index.contains_key("label_reason") {
                    label_reason = match p.text("label_reason") {
                        Some(r) => match LabelReason::parse(r) {
                            Some(r) => Some(r),
                            None => {
                                p.problem(
                                    "label_reason",
                                    IssueKind::UnknownLevel,
                                    format!("'{r}' is not a label reason"),
                                );
                                None
                            }
                        },
                        None => None,
                    };
                }
                if self.index.contains_key("os_days") && self.index.contains_key("os_event") {
                    os = p.time("os_days").zip(p.flag("os_event"));
                }
            }
        }

        let survival = match (&self.spec.survival, self.derived_survival, derived) {
            (None, _, _) => None,
            (Some(_), Some(which), Some(o)) => Some(match which {
                "rfs" => (o.rfs_days as f64, o.rfs_event),
                "ttr" => (o.ttr_days as f64, o.ttr_event),
                _ => (o.os_days as f64, o.os_event),
            }),
            (Some(_), Some(_), None) => None, // derivation failed; the row is excluded
            (Some(s), None, _) => p.time(&s.time_column).zip(p.flag(&s.event_column)),
        };

        let center_id =
            if self.index.contains_key("center_id") { p.text("center_id").map(str::to_owned) } else { None };
        let mri = if self.index.contains_key("mri_date") { p.date("mri_date") } else { None };
        let mri_to_surgery_days = mri.zip(surgery).map(|(m, s)| (s - m).num_days());

        Some(Patient {
            id,
            row,
            center_id,
            features,
            label,
            label_reason,
            survival,
            os,
            mri_to_surgery_days,
            recurrence_extent_missing,
        })
    }
}

/// Field access for one record; every parse failure is recorded against its column.
struct RowParser<'a> {
    record: &'a csv::StringRecord,
    columns: &'a HashMap<String, usize>,
    problems: Vec<(String, IssueKind, String)>,
}

impl RowParser<'_> {
    fn problem(&mut self, column: &str, kind: IssueKind, problem: String) {
        self.problems.push((column.to_owned(), kind, problem));
    }

    /// The trimmed field, `None` when empty or when the column is absent.
    fn text(&self, column: &str) -> Option<&str> {
        let i = *self.columns.get(column)?;
        self.record.get(i).filter(|v| !v.is_empty())
    }

    fn number(&mut self, column: &str) -> Option<f64> {
        let v = self.text(column)?;
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() => Some(x),
            _ => {
                let problem = format!("'{v}' is not a number");
                self.problem(column, IssueKind::NotANumber, problem);
                None
            }
        }
    }

    /// A number ≥ 0 (a time in days).
    fn time(&mut self, column: &str) -> Option<f64> {
        let v = self.number(column)?;
        if v < 0.0 {
            self.problem(column, IssueKind::Negative, "is negative; a time must be ≥ 0 days".to_owned());
            return None;
        }
        Some(v)
    }

    fn positive(&mut self, column: &str) -> Option<f64> {
        let v = self.number(column)?;
        if v <= 0.0 {
            self.problem(column, IssueKind::Negative, "must be greater than 0".to_owned());
            return None;
        }
        Some(v)
    }

    /// 0/1 (also written 0.0/1.0).
    fn flag(&mut self, column: &str) -> Option<bool> {
        let v = self.text(column)?;
        match v.parse::<f64>() {
            Ok(0.0) => Some(false),
            Ok(1.0) => Some(true),
            _ => {
                let problem = format!("'{v}' is not 0 or 1");
                self.problem(column, IssueKind::NotZeroOne, problem);
                None
            }
        }
    }

    /// A whole number ≥ 0.
    fn count(&mut self, column: &str) -> Option<u32> {
        let v = self.text(column)?;
        match v.parse::<f64>() {
            Ok(x) if x >= 0.0 && x.fract() == 0.0 && x <= f64::from(u32::MAX) => Some(x as u32),
            _ => {
                let problem = format!("'{v}' is not a whole number ≥ 0");
                self.problem(column, IssueKind::NotAnInteger, problem);
                None
            }
        }
    }

    fn date(&mut self, column: &str) -> Option<NaiveDate> {
        let v = self.text(column)?;
        match NaiveDate::parse_from_str(v, "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                let problem = format!("'{v}' is not a valid date (YYYY-MM-DD)");
                self.problem(column, IssueKind::InvalidDate, problem);
                None
            }
        }
    }
}
