//! `fedhcc report`: the study report, from what a federated run leaves behind at the study lead.
//!
//! Reads, and never writes, the server's state folder: `server.db` (round and evaluation records, the run's
//! recorded identity, through [`Store::open_read_only`]), the final checkpoint (its SHA-256 checked against
//! the record), `effective-config.toml` (or `--study F`) for the study settings, the run's last
//! evaluation file `evaluation/<task_id>.json` when the server pooled one (see [`evaluation`]), and
//! `cross-center.json` (or `--cross-center F`) when a cross-center study was run. Participant flow comes
//! from the sites' data-check JSON files (`fedhcc data check --json`, counts only) given with
//! `--data-check [SITE=]FILE`; the server never holds them.
//!
//! Writes into `--out`: `report.html` (self-contained: inline CSS, inline SVG, no script, no external
//! reference; opens from disk), `report.json` ([`StudyReport`]), and CSV tables (`participant_flow.csv`,
//! `performance.csv`, `training_rounds.csv`, `evaluations.csv`, `survival_km.csv`, and `cross_center.csv`
//! when there is a matrix). Everything is gathered before anything is written; the files are written
//! into a temporary folder beside `--out` that is renamed into place, so a failed report leaves no
//! partial folder, and a previous report in `--out` is replaced whole.
//!
//! `cross-center.json` format: `{"metric": "auc", "rows": [{"trained_on": "center_a", "evaluated_at":
//! {"center_a": 0.71, "center_b": 0.64}}, …], "note": "…"}` (a `null` cell: not evaluated).
//!
//! Nothing patient-level is read: only counts and aggregate statistics.
//!
//! Size: reading the run's records, checking them against the checkpoint and the study's identity,
//! and the text and JSON outputs share one set of loaded facts, so that every number the report
//! prints has one source. The evaluation tables and the HTML page are already rooms of their own
//! (`report/`).

mod evaluation;
mod html;

use anyhow::{Context, Result, bail};
use clap::Args;
use evaluation::EvaluationSection;
use fedhcc_server::store::{EvaluationRecord, RoundRecord, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `fedhcc report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The server's state folder (`state_dir` of server.toml): server.db, checkpoints/, evaluation/.
    #[arg(long)]
    pub server_state: PathBuf,
    /// The run to report (default: the study configuration's run, or the only run in server.db).
    #[arg(long)]
    pub run: Option<String>,
    /// The study file (default: the `[study]` the server recorded in `effective-config.toml`).
    #[arg(long)]
    pub study: Option<PathBuf>,
    /// A site's `fedhcc data check --json` output, for the participant flow (counts only); `SITE=FILE`,
    /// or `FILE` named after the site (`center_a.json`). Repeat for each site.
    #[arg(long = "data-check", value_name = "[SITE=]FILE")]
    pub data_check: Vec<String>,
    /// The cross-center matrix (default: `cross-center.json` in the state folder, when present).
    #[arg(long)]
    pub cross_center: Option<PathBuf>,
    /// Output folder (created; a previous report there is replaced whole).
    #[arg(long)]
    pub out: PathBuf,
}

/// A file the report was made from, with its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputFile {
    /// What it is.
    pub what: String,
    /// Where it was read.
    pub path: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
}

/// The final checkpoint, checked against the round record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointCheck {
    /// The round it ends.
    pub round: u32,
    /// The file (as recorded, or found in `checkpoints/` when the folder moved).
    pub file: String,
    /// SHA-256 recorded with the round.
    pub sha256: String,
    /// Whether the file is there and has that hash.
    pub verified: bool,
    /// What is wrong when it is not verified.
    pub problem: Option<String>,
}

/// The model and data fingerprints the report was made from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fingerprints {
    /// The study id recorded in server.db at the run's first start.
    pub study_id_recorded: Option<String>,
    /// The model layout fingerprint recorded for the run (names, shapes, kind).
    pub model_layout: Option<String>,
    /// The final model.
    pub final_checkpoint: Option<CheckpointCheck>,
    /// Input files with their hashes.
    pub inputs: Vec<InputFile>,
}

/// The study settings the run used (from the study configuration).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudySection {
    /// Study id.
    pub study_id: Option<String>,
    /// Run id.
    pub run_id: String,
    /// `[model] kind`.
    pub model_kind: Option<String>,
    /// `[cohort] preset`.
    pub cohort_preset: Option<String>,
    /// Aggregation strategy.
    pub strategy: Option<String>,
    /// Rounds the study asks for.
    pub rounds_planned: Option<u64>,
    /// Rounds committed.
    pub rounds_committed: usize,
    /// Sites that took part in a round or an evaluation.
    pub sites: Vec<String>,
    /// The configuration file these settings were read from.
    pub config: Option<String>,
    /// `[federation] secure_aggregation` (`None`: no configuration to read).
    pub secure_aggregation: Option<bool>,
    /// The differential-privacy settings as the configuration writes them (`None`: off).
    pub differential_privacy: Option<Value>,
    /// ε spent, as recorded with the last round (differential privacy).
    pub epsilon_spent: Option<f64>,
    /// Rounds the server aggregated securely (it saw only the masked sum).
    pub rounds_securely_aggregated: usize,
}

/// One site's participant flow, from its data check (counts only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteFlow {
    /// Site id.
    pub site: String,
    /// Rows in clinical.csv.
    pub patients_read: usize,
    /// Rows excluded (unusable).
    pub excluded_rows: usize,
    /// Issues by kind among the excluded rows (a row can have several).
    pub exclusion_issues: BTreeMap<String, usize>,
    /// Patients loaded.
    pub patients_loaded: usize,
    /// Loaded patients without a binary label.
    pub unlabelled: usize,
    /// Why they are unlabelled.
    pub unlabelled_by_reason: BTreeMap<String, usize>,
    /// Labelled positives.
    pub positive: usize,
    /// Labelled negatives.
    pub negative: usize,
    /// Patients with a recurrence-free survival time, and their events.
    pub survival: Option<(usize, usize)>,
    /// Patients without a usable MRI (left out of the image models; `None`: no imaging check).
    pub without_usable_mri: Option<usize>,
    /// Patients in the evaluated (held-out) split, from the evaluation.
    pub evaluated: Option<u64>,
}

/// The participant flow of every site that gave a data check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowSection {
    /// Per site.
    pub sites: Vec<SiteFlow>,
    /// Sites that took part but gave no data check.
    pub missing: Vec<String>,
}

/// One site's part in a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteRound {
    /// Site id.
    pub site: String,
    /// Training patients (the FedAvg weight).
    pub samples: u64,
    /// Mean training loss it reported.
    pub loss: Option<f64>,
}

/// A committed round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    /// Round.
    pub round: u32,
    /// Attempt that was committed.
    pub attempt: u32,
    /// Sites aggregated.
    pub sites: Vec<SiteRound>,
    /// Training loss weighted by samples.
    pub weighted_loss: Option<f64>,
    /// Sites that failed, with the reason.
    pub failures: Vec<String>,
    /// Seconds from announcement to commit.
    pub duration_s: f64,
    /// Seconds of aggregation.
    pub aggregate_s: f64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Whether the server saw only the masked sum of the updates.
    pub secure_aggregation: bool,
    /// ε after this round (differential privacy).
    pub epsilon: Option<f64>,
}

/// One site's evaluation metrics at one round (from server.db).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationPoint {
    /// Round of the evaluated model.
    pub round: u32,
    /// Site id.
    pub site: String,
    /// Patients evaluated.
    pub samples: u64,
    /// Aggregate metrics (finite only).
    pub metrics: BTreeMap<String, f64>,
}

/// Training as the server recorded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingSection {
    /// Committed rounds, oldest first.
    pub rounds: Vec<RoundRow>,
    /// Every evaluation record of the run.
    pub evaluations: Vec<EvaluationPoint>,
}

/// A cross-center matrix (`cross-center.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenter {
    /// The metric in the cells (e.g. `auc`).
    pub metric: String,
    /// One row per training setting.
    pub rows: Vec<CrossCenterRow>,
    /// What the matrix is (e.g. local-only models, leave-one-center-out).
    #[serde(default)]
    pub note: Option<String>,
    /// Further matrices of the same models (e.g. `c_index_rfs`, `c_index_os`), as `fedhcc study` writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary: Vec<CrossCenterMatrix>,
}

/// A further matrix of a cross-center study: one metric, the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenterMatrix {
    /// The metric in the cells.
    pub metric: String,
    /// One row per training setting.
    pub rows: Vec<CrossCenterRow>,
}

impl CrossCenter {
    /// Every matrix, the main one first: (metric, rows).
    pub fn matrices(&self) -> impl Iterator<Item = (&str, &[CrossCenterRow])> {
        std::iter::once((self.metric.as_str(), self.rows.as_slice()))
            .chain(self.secondary.iter().map(|m| (m.metric.as_str(), m.rows.as_slice())))
    }
}

/// One row of the cross-center matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenterRow {
    /// What the model was trained on (a site, `federated`, `central`, `all but center_b`).
    pub trained_on: String,
    /// The metric at each evaluating site (`null`: not evaluated).
    pub evaluated_at: BTreeMap<String, Option<f64>>,
}

/// What `report.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyReport {
    /// fedhcc version that made the report.
    pub fedhcc_version: String,
    /// When (Unix seconds).
    pub generated_unix: u64,
    /// When (UTC, ISO 8601).
    pub generated_utc: String,
    /// Study settings.
    pub study: StudySection,
    /// Participant flow (`None`: no data check was given).
    pub participant_flow: Option<FlowSection>,
    /// Training rounds.
    pub training: TrainingSection,
    /// The final model's evaluation.
    pub evaluation: Option<EvaluationSection>,
    /// Cross-center matrix.
    pub cross_center: Option<CrossCenter>,
    /// Fingerprints.
    pub fingerprints: Fingerprints,
    /// What is missing and why, in words.
    pub notes: Vec<String>,
}

/// Reads a file and notes it as an input.
fn read_input(what: &str, path: &Path, inputs: &mut Vec<InputFile>) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    inputs.push(InputFile {
        what: what.to_owned(),
        path: path.display().to_string(),
        sha256: fedhcc_core::params::sha256_hex(&bytes),
    });
    Ok(bytes)
}

/// A value at a dotted path of a TOML table.
fn toml_at<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// The study table: from `--study` (validated), else from the server's `effective-config.toml`.
fn study_table(args: &ReportArgs, inputs: &mut Vec<InputFile>, notes: &mut Vec<String>) -> Result<Option<toml::Table>> {
    if let Some(path) = &args.study {
        let cfg = fedhcc_core::config::load_study(path)?;
        read_input("study configuration", path, inputs)?;
        return Ok(Some(toml::Table::try_from(&cfg).context("cannot read the study configuration back")?));
    }
    let path = args.server_state.join("effective-config.toml");
    if !path.is_file() {
        notes.push(format!(
            "no study configuration: {} is missing and no --study was given, so the model, strategy, secure \
             aggregation and DP settings are not shown",
            path.display()
        ));
        return Ok(None);
    }
    let bytes = read_input("effective configuration (written by the server)", &path, inputs)?;
    let parsed = std::str::from_utf8(&bytes).ok().and_then(|t| t.parse::<toml::Table>().ok());
    match parsed.and_then(|t| t.get("study").and_then(toml::Value::as_table).cloned()) {
        Some(study) => Ok(Some(study)),
        None => {
            notes.push(format!("{} has no readable [study] table: pass the study file with --study", path.display()));
            Ok(None)
        }
    }
}

/// Which run to report.
fn choose_run(args: &ReportArgs, store: &Store, study: Option<&toml::Table>) -> Result<String> {
    let runs = store.run_ids()?;
    let db = args.server_state.join("server.db");
    if let Some(run) = &args.run {
        if !runs.contains(run) {
            bail!("run '{run}' is not in {}; it holds: {}", db.display(), list_or_none(&runs));
        }
        return Ok(run.clone());
    }
    if let Some(run) = study.and_then(|s| s.get("run_id")).and_then(toml::Value::as_str)
        && runs.iter().any(|r| r == run)
    {
        return Ok(run.to_owned());
    }
    match runs.as_slice() {
        [only] => Ok(only.clone()),
        [] => bail!("{} holds no run yet: start the server and let a round finish first", db.display()),
        _ => bail!("{} holds several runs ({}): choose one with --run", db.display(), runs.join(", ")),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "no run".into() } else { items.join(", ") }
}

fn study_section(
    study: Option<&toml::Table>,
    config: Option<&InputFile>,
    run_id: &str,
    rounds: &[RoundRecord],
    evaluations: &[EvaluationRecord],
    epsilon_spent: Option<f64>,
) -> StudySection {
    let text = |p: &str| study.and_then(|s| toml_at(s, p)).and_then(toml::Value::as_str).map(str::to_owned);
    let sites: BTreeSet<String> = rounds
        .iter()
        .flat_map(|r| r.participants.iter().cloned())
        .chain(evaluations.iter().map(|e| e.site.clone()))
        .collect();
    let dp = study.and_then(|s| toml_at(s, "federation.dp").or_else(|| toml_at(s, "federation.differential_privacy")));
    StudySection {
        study_id: text("study_id"),
        run_id: run_id.to_owned(),
        model_kind: text("model.kind"),
        cohort_preset: text("cohort.preset"),
        strategy: text("federation.strategy").or_else(|| study.map(|_| "fedavg".to_owned())),
        rounds_planned: study
            .and_then(|s| toml_at(s, "federation.rounds"))
            .and_then(toml::Value::as_integer)
            .and_then(|r| u64::try_from(r).ok()),
        rounds_committed: rounds.len(),
        sites: sites.into_iter().collect(),
        config: config.map(|c| c.path.clone()),
        secure_aggregation: study
            .map(|s| toml_at(s, "federation.secure_aggregation").and_then(toml::Value::as_bool).unwrap_or(false)),
        differential_privacy: dp.and_then(|v| serde_json::to_value(v).ok()),
        epsilon_spent,
        rounds_securely_aggregated: rounds.iter().filter(|r| r.secure_aggregation).count(),
    }
}

fn training_section(rounds: &[RoundRecord], evaluations: &[EvaluationRecord]) -> TrainingSection {
    let rounds = rounds
        .iter()
        .map(|r| {
            let sites: Vec<SiteRound> = r
                .participants
                .iter()
                .enumerate()
                .map(|(i, site)| SiteRound {
                    site: site.clone(),
                    samples: r.samples.get(i).copied().unwrap_or(0),
                    loss: r.losses.get(i).copied().flatten().filter(|l| l.is_finite()),
                })
                .collect();
            let (num, den) = sites
                .iter()
                .filter_map(|s| s.loss.map(|l| (l * s.samples as f64, s.samples as f64)))
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            RoundRow {
                round: r.round,
                attempt: r.attempt,
                sites,
                weighted_loss: (den > 0.0).then(|| num / den),
                failures: r.failures.iter().map(|(s, why)| format!("{s}: {why}")).collect(),
                duration_s: r.duration_s,
                aggregate_s: r.aggregate_s,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                secure_aggregation: r.secure_aggregation,
                epsilon: r.epsilon.filter(|e| e.is_finite()),
            }
        })
        .collect();
    let evaluations = evaluations
        .iter()
        .map(|e| EvaluationPoint {
            round: e.round,
            site: e.site.clone(),
            samples: e.samples,
            metrics: e.metrics.iter().filter(|(_, v)| v.is_finite()).cloned().collect(),
        })
        .collect();
    TrainingSection { rounds, evaluations }
}

/// The final checkpoint: recorded path, or the same file name under `checkpoints/` when the state
/// folder was moved; hashed and compared with the record.
fn check_checkpoint(state: &Path, last: &RoundRecord) -> CheckpointCheck {
    let recorded = PathBuf::from(&last.checkpoint);
    let moved = recorded.file_name().map(|n| state.join("checkpoints").join(n));
    let path = if recorded.is_file() { Some(recorded.clone()) } else { moved.filter(|p| p.is_file()) };
    let mut check = CheckpointCheck {
        round: last.round,
        file: path.as_ref().unwrap_or(&recorded).display().to_string(),
        sha256: last.checkpoint_sha256.clone(),
        verified: false,
        problem: None,
    };
    match path.map(|p| std::fs::read(&p).map(|b| fedhcc_core::params::sha256_hex(&b))) {
        None => check.problem = Some("the file is missing (pruned or moved)".into()),
        Some(Err(e)) => check.problem = Some(format!("cannot read it: {e}")),
        Some(Ok(sha)) if sha == last.checkpoint_sha256 => check.verified = true,
        Some(Ok(sha)) => {
            check.problem = Some(format!("its SHA-256 is {sha}, not the recorded one: the file was altered or damaged"))
        }
    }
    check
}

/// Only the counts of a `fedhcc data check --json` file (everything else in it is ignored).
#[derive(Deserialize)]
struct CheckCounts {
    patients_read: usize,
    patients_loaded: usize,
    excluded: ExcludedCounts,
    label_flow: LabelFlowCounts,
    survival: Option<EventCountsJson>,
    imaging: Option<ImagingCounts>,
}

#[derive(Deserialize)]
struct ExcludedCounts {
    rows: usize,
    by_kind: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct LabelFlowCounts {
    positive: usize,
    negative: usize,
    unlabelled: usize,
    by_reason: Vec<ReasonCountJson>,
}

#[derive(Deserialize)]
struct ReasonCountJson {
    reason: String,
    label: String,
    count: usize,
}

#[derive(Deserialize)]
struct EventCountsJson {
    with_time: usize,
    events: usize,
}

#[derive(Deserialize)]
struct ImagingCounts {
    patients: usize,
    mri_usable: usize,
}

/// `SITE=FILE`, or `FILE` named after its site.
fn parse_data_check_arg(arg: &str) -> Result<(String, PathBuf)> {
    let (site, path) = match arg.split_once('=') {
        Some((site, path)) if !site.is_empty() && !site.contains(['/', '\\']) => (site.to_owned(), PathBuf::from(path)),
        _ => {
            let path = PathBuf::from(arg);
            let site = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (site, path)
        }
    };
    fedhcc_core::pki::validate_name("site", &site).map_err(|e| {
        anyhow::anyhow!("--data-check {arg}: {e}; write SITE=FILE, or name the file after the site (center_a.json)")
    })?;
    Ok((site, path))
}

fn read_flow(args: &ReportArgs, inputs: &mut Vec<InputFile>, image_model: bool) -> Result<Vec<SiteFlow>> {
    let mut flows = Vec::new();
    for arg in &args.data_check {
        let (site, path) = parse_data_check_arg(arg)?;
        let bytes = read_input(&format!("data check of {site}"), &path, inputs)?;
        let c: CheckCounts = serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not the JSON of `fedhcc data check --json` (for site {site})", path.display())
        })?;
        if flows.iter().any(|f: &SiteFlow| f.site == site) {
            bail!("--data-check: site {site} is given twice");
        }
        let mut unlabelled_by_reason = BTreeMap::new();
        for r in c.label_flow.by_reason.iter().filter(|r| r.label == "unlabelled" && r.count > 0) {
            *unlabelled_by_reason.entry(r.reason.clone()).or_insert(0) += r.count;
        }
        flows.push(SiteFlow {
            site,
            patients_read: c.patients_read,
            excluded_rows: c.excluded.rows,
            exclusion_issues: c.excluded.by_kind,
            patients_loaded: c.patients_loaded,
            unlabelled: c.label_flow.unlabelled,
            unlabelled_by_reason,
            positive: c.label_flow.positive,
            negative: c.label_flow.negative,
            survival: c.survival.map(|s| (s.with_time, s.events)),
            without_usable_mri: c.imaging.filter(|_| image_model).map(|i| i.patients.saturating_sub(i.mri_usable)),
            evaluated: None,
        });
    }
    flows.sort_by(|a, b| a.site.cmp(&b.site));
    Ok(flows)
}

/// Parses an evaluation task id `e<round>a<attempt>`.
fn eval_task(id: &str) -> Option<(u32, u32)> {
    let (round, attempt) = id.strip_prefix('e')?.split_once('a')?;
    Some((round.parse().ok()?, attempt.parse().ok()?))
}

/// The run's last evaluation: from the server's evaluation file when there is a readable one, else
/// from the database records of that task (with the sites' summaries when they carry them).
fn evaluation_section(
    state: &Path,
    run_id: &str,
    records: &[EvaluationRecord],
    inputs: &mut Vec<InputFile>,
    notes: &mut Vec<String>,
) -> Result<Option<EvaluationSection>> {
    let Some(last) = records.iter().filter_map(|e| eval_task(&e.task_id).map(|k| (k, e))).max_by_key(|(k, _)| *k)
    else {
        notes.push("no evaluation was recorded for this run: the final model was not evaluated at the sites".into());
        return Ok(None);
    };
    let (task_id, round) = (last.1.task_id.clone(), last.1.round);
    let path = state.join("evaluation").join(format!("{task_id}.json"));
    let mut section = None;
    if path.is_file() {
        let bytes = read_input("evaluation file (written by the server)", &path, inputs)?;
        let why = match serde_json::from_slice::<Value>(&bytes) {
            Ok(file) => match file.get("run_id").and_then(Value::as_str).filter(|r| *r != run_id) {
                Some(r) => format!("{} belongs to run {r}, not {run_id}", path.display()),
                None => match evaluation::from_file(&file, &task_id, round, &path) {
                    Ok(s) => {
                        section = Some(s);
                        String::new()
                    }
                    Err(why) => why,
                },
            },
            Err(e) => format!("{} is not valid JSON ({e})", path.display()),
        };
        if section.is_none() {
            notes.push(format!("the evaluation file is not used: {why}; the figures come from server.db"));
        }
    }
    let section =
        section.unwrap_or_else(|| evaluation::from_records(records, &task_id, round, &state.join("server.db")));
    if let Some(why) = &section.pooled_unavailable {
        notes.push(format!("pooled figures are unavailable: {why}"));
    }
    Ok(Some(section))
}

fn read_cross_center(args: &ReportArgs, inputs: &mut Vec<InputFile>) -> Result<Option<CrossCenter>> {
    let (path, given) = match &args.cross_center {
        Some(p) => (p.clone(), true),
        None => (args.server_state.join("cross-center.json"), false),
    };
    if !given && !path.is_file() {
        return Ok(None);
    }
    let bytes = read_input("cross-center matrix", &path, inputs)?;
    let matrix: CrossCenter = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a cross-center matrix ({{\"metric\": …, \"rows\": [{{\"trained_on\": …, \"evaluated_at\": \
             {{site: value}}}}]}})",
            path.display()
        )
    })?;
    Ok(Some(matrix))
}

/// UTC date and time of a Unix time, ISO 8601 (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Gathers everything the report shows. Reads only; fails before anything is written.
///
/// # Errors
/// The state folder is not a server's, the run is unknown or has no committed round, or an input
/// file that was named cannot be read.
pub fn gather(args: &ReportArgs) -> Result<StudyReport> {
    let state = &args.server_state;
    if !state.is_dir() {
        bail!("--server-state {}: no such folder (give the server's state_dir from server.toml)", state.display());
    }
    let mut inputs = Vec::new();
    let mut notes = Vec::new();
    // Open with a placeholder run first to list the runs, then reopen for the chosen one.
    let probe = Store::open_read_only(state, "").with_context(|| format!("--server-state {}", state.display()))?;
    let study = study_table(args, &mut inputs, &mut notes)?;
    let run_id = choose_run(args, &probe, study.as_ref())?;
    drop(probe);
    let store = Store::open_read_only(state, &run_id)?;
    let rounds = store.rounds()?;
    if rounds.is_empty() {
        bail!("run {run_id} in {} has no committed round yet: nothing to report", state.join("server.db").display());
    }
    let records = store.evaluations()?;
    let (study_id_recorded, model_layout) = store.identity()?;
    if let (Some(recorded), Some(configured)) =
        (&study_id_recorded, study.as_ref().and_then(|s| s.get("study_id")).and_then(toml::Value::as_str))
        && recorded != configured
    {
        bail!(
            "{} belongs to study {recorded}, but the study configuration says {configured}: pass the matching --study",
            state.join("server.db").display()
        );
    }
    let config_input = inputs.first().cloned();
    let image_model = study
        .as_ref()
        .and_then(|s| toml_at(s, "model.kind"))
        .and_then(toml::Value::as_str)
        .is_some_and(|k| k != "clinical");
    let mut flows = read_flow(args, &mut inputs, image_model)?;
    let evaluation = evaluation_section(state, &run_id, &records, &mut inputs, &mut notes)?;
    let cross_center = read_cross_center(args, &mut inputs)?;
    if cross_center.is_none() {
        notes.push(
            "no cross-center matrix: the cross-center study (local-only models, leave-one-center-out) was not run \
             for this state folder"
                .into(),
        );
    }
    let epsilon_spent = rounds.last().and_then(|r| r.epsilon).filter(|e| e.is_finite());
    let study_section = study_section(study.as_ref(), config_input.as_ref(), &run_id, &rounds, &records, epsilon_spent);
    if let Some(e) = &evaluation {
        for f in &mut flows {
            f.evaluated = e.sites.iter().find(|r| r.name == f.site).and_then(|r| r.n);
        }
    }
    let flow = if flows.is_empty() {
        notes.push(
            "participant flow is missing: the server holds no site's data check; pass each site's \
             `fedhcc data check --json` output with --data-check SITE=FILE"
                .into(),
        );
        None
    } else {
        let given: BTreeSet<&str> = flows.iter().map(|f| f.site.as_str()).collect();
        let missing: Vec<String> =
            study_section.sites.iter().filter(|s| !given.contains(s.as_str())).cloned().collect();
        if !missing.is_empty() {
            notes.push(format!("participant flow is missing for {}: no data check given", missing.join(", ")));
        }
        Some(FlowSection { sites: flows, missing })
    };
    let final_checkpoint = rounds.last().map(|last| check_checkpoint(state, last));
    if let Some(c) = final_checkpoint.as_ref().filter(|c| !c.verified) {
        notes.push(format!("the final checkpoint {} is not verified: {}", c.file, c.problem.as_deref().unwrap_or("")));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(StudyReport {
        fedhcc_version: env!("CARGO_PKG_VERSION").to_owned(),
        generated_unix: now,
        generated_utc: utc(now),
        study: study_section,
        participant_flow: flow,
        training: training_section(&rounds, &records),
        evaluation,
        cross_center,
        fingerprints: Fingerprints { study_id_recorded, model_layout, final_checkpoint, inputs },
        notes,
    })
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_bytes(name: &str, header: &[&str], rows: Vec<Vec<String>>) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header).with_context(|| format!("cannot write {name}"))?;
    for r in rows {
        w.write_record(&r).with_context(|| format!("cannot write {name}"))?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("cannot write {name}: {e}"))
}

/// The CSV tables, as (file name, bytes).
fn csv_tables(r: &StudyReport) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut flow = Vec::new();
    for f in r.participant_flow.iter().flat_map(|f| &f.sites) {
        let mut row = |stage: &str, reason: &str, count: String| {
            flow.push(vec![f.site.clone(), stage.to_owned(), reason.to_owned(), count]);
        };
        row("patients_read", "", f.patients_read.to_string());
        row("excluded_rows", "", f.excluded_rows.to_string());
        for (kind, n) in &f.exclusion_issues {
            row("exclusion_issue", kind, n.to_string());
        }
        row("patients_loaded", "", f.patients_loaded.to_string());
        row("unlabelled", "", f.unlabelled.to_string());
        for (reason, n) in &f.unlabelled_by_reason {
            row("unlabelled", reason, n.to_string());
        }
        row("labelled_positive", "", f.positive.to_string());
        row("labelled_negative", "", f.negative.to_string());
        if let Some((with_time, events)) = f.survival {
            row("survival_with_time", "", with_time.to_string());
            row("survival_events", "", events.to_string());
        }
        if let Some(n) = f.without_usable_mri {
            row("without_usable_mri", "left out of the image models", n.to_string());
        }
        if let Some(n) = f.evaluated {
            row("evaluated", "held-out split", n.to_string());
        }
    }
    out.push(("participant_flow.csv", csv_bytes("participant_flow.csv", &["site", "stage", "reason", "count"], flow)?));

    let header = [
        "name",
        "n",
        "n_positive",
        "n_events",
        "auc",
        "auc_ci_low",
        "auc_ci_high",
        "sensitivity",
        "sensitivity_ci_low",
        "sensitivity_ci_high",
        "specificity",
        "specificity_ci_low",
        "specificity_ci_high",
        "ppv",
        "ppv_ci_low",
        "ppv_ci_high",
        "npv",
        "npv_ci_low",
        "npv_ci_high",
        "brier",
        "calibration_intercept",
        "calibration_slope",
        "c_index",
        "hr_high_vs_low",
        "hr_ci_low",
        "hr_ci_high",
        "hr_p",
        "loss",
    ];
    let mut perf = Vec::new();
    if let Some(e) = &r.evaluation {
        for row in e.sites.iter().chain(&e.pooled) {
            let mut cells = vec![row.name.clone(), opt(row.n), opt(row.n_positive), opt(row.n_events)];
            cells.push(opt(row.auc.map(|a| a.estimate)));
            cells.push(opt(row.auc.and_then(|a| a.ci_low)));
            cells.push(opt(row.auc.and_then(|a| a.ci_high)));
            for p in [row.sensitivity, row.specificity, row.ppv, row.npv] {
                cells.extend([opt(p.map(|p| p.estimate)), opt(p.map(|p| p.ci_low)), opt(p.map(|p| p.ci_high))]);
            }
            cells.push(opt(row.brier));
            cells.push(opt(row.calibration.map(|c| c.intercept)));
            cells.push(opt(row.calibration.map(|c| c.slope)));
            cells.push(opt(row.c_index));
            let hr = row.hazard_ratio;
            cells.extend([
                opt(hr.map(|h| h.hr)),
                opt(hr.map(|h| h.ci_low)),
                opt(hr.map(|h| h.ci_high)),
                opt(hr.map(|h| h.p)),
            ]);
            cells.push(opt(row.loss));
            perf.push(cells);
        }
    }
    out.push(("performance.csv", csv_bytes("performance.csv", &header, perf)?));

    let mut rounds = Vec::new();
    for rr in &r.training.rounds {
        for s in &rr.sites {
            rounds.push(vec![
                rr.round.to_string(),
                rr.attempt.to_string(),
                s.site.clone(),
                s.samples.to_string(),
                opt(s.loss),
                rr.duration_s.to_string(),
                rr.aggregate_s.to_string(),
                rr.bytes_in.to_string(),
                rr.bytes_out.to_string(),
                rr.secure_aggregation.to_string(),
                opt(rr.epsilon),
            ]);
        }
    }
    let header = [
        "round",
        "attempt",
        "site",
        "samples",
        "train_loss",
        "duration_s",
        "aggregate_s",
        "bytes_in",
        "bytes_out",
        "secure_aggregation",
        "epsilon",
    ];
    out.push(("training_rounds.csv", csv_bytes("training_rounds.csv", &header, rounds)?));

    let mut evals = Vec::new();
    for e in &r.training.evaluations {
        for (metric, value) in &e.metrics {
            evals.push(vec![
                e.round.to_string(),
                e.site.clone(),
                e.samples.to_string(),
                metric.clone(),
                value.to_string(),
            ]);
        }
    }
    out.push((
        "evaluations.csv",
        csv_bytes("evaluations.csv", &["round", "site", "samples", "metric", "value"], evals)?,
    ));

    let mut km = Vec::new();
    for o in r.evaluation.iter().flat_map(|e| &e.survival) {
        let scopes = std::iter::once(("pooled", &o.km)).chain(o.sites.iter().map(|s| (s.site.as_str(), &s.km)));
        for (scope, groups) in scopes {
            for g in groups {
                let c = &g.curve;
                for i in 0..c.time.len() {
                    km.push(vec![
                        o.outcome.clone(),
                        scope.to_owned(),
                        g.group.clone(),
                        c.time[i].to_string(),
                        c.survival[i].to_string(),
                        c.ci_low[i].to_string(),
                        c.ci_high[i].to_string(),
                        c.at_risk[i].to_string(),
                        c.events[i].to_string(),
                        c.censored[i].to_string(),
                    ]);
                }
            }
        }
    }
    let header =
        ["outcome", "scope", "group", "time", "survival", "ci_low", "ci_high", "at_risk", "events", "censored"];
    out.push(("survival_km.csv", csv_bytes("survival_km.csv", &header, km)?));

    if let Some(m) = &r.cross_center {
        let columns: BTreeSet<&String> =
            m.matrices().flat_map(|(_, rows)| rows.iter().flat_map(|row| row.evaluated_at.keys())).collect();
        let mut header = vec!["metric", "trained_on"];
        header.extend(columns.iter().map(|c| c.as_str()));
        let rows = m
            .matrices()
            .flat_map(|(metric, rows)| {
                rows.iter().map(|row| {
                    let mut cells = vec![metric.to_string(), row.trained_on.clone()];
                    cells.extend(columns.iter().map(|c| opt(row.evaluated_at.get(*c).copied().flatten())));
                    cells
                })
            })
            .collect();
        out.push(("cross_center.csv", csv_bytes("cross_center.csv", &header, rows)?));
    }
    Ok(out)
}

/// Writes `files` as the folder `dir`: into a temporary folder beside it, renamed into place; a
/// previous report in `dir` is replaced (anything else there is refused).
fn write_folder(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    crate::outdir::replace_folder_with(dir, "report.json", "report", files)
}

/// Gathers and writes the report; returns it.
///
/// # Errors
/// As [`gather`], or the output folder cannot be written (nothing partial is left).
pub fn write_report(args: &ReportArgs) -> Result<StudyReport> {
    let report = gather(args)?;
    let mut files = csv_tables(&report)?;
    let mut json = serde_json::to_vec_pretty(&report).context("cannot encode report.json")?;
    json.push(b'\n');
    files.push(("report.json", json));
    files.push(("report.html", html::render(&report).into_bytes()));
    write_folder(&args.out, &files)?;
    Ok(report)
}

/// Runs `fedhcc report`.
pub fn report(args: &ReportArgs) -> Result<()> {
    let r = write_report(args)?;
    println!(
        "Study report for {} / run {}: {} rounds, {} sites",
        r.study.study_id.as_deref().unwrap_or("(unknown study)"),
        r.study.run_id,
        r.training.rounds.len(),
        r.study.sites.len()
    );
    if let Some(p) = r.evaluation.as_ref().and_then(|e| e.pooled.as_ref()).and_then(|p| p.auc) {
        println!(
            "pooled AUC {:.3} (95% CI {}–{})",
            p.estimate,
            p.ci_low.map_or("?".into(), |v| format!("{v:.3}")),
            p.ci_high.map_or("?".into(), |v| format!("{v:.3}"))
        );
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    println!("wrote {}", args.out.join("report.html").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_722_297_599), "2024-07-29T23:59:59Z");
    }

    #[test]
    fn data_check_arguments_name_their_site() {
        assert_eq!(
            parse_data_check_arg("center_b=/x/check.json").unwrap(),
            ("center_b".into(), "/x/check.json".into())
        );
        assert_eq!(parse_data_check_arg("/x/center_a.json").unwrap(), ("center_a".into(), "/x/center_a.json".into()));
        assert!(parse_data_check_arg("/x/.json").is_err());
        assert_eq!(eval_task("e12a3"), Some((12, 3)));
        assert_eq!(eval_task("r1a1"), None);
    }

    #[test]
    fn an_existing_folder_that_is_not_a_report_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("keep.txt"), "mine").unwrap();
        let e = write_folder(&out, &[("report.json", b"{}".to_vec())]).unwrap_err().to_string();
        assert!(e.contains("not a previous report"), "{e}");
        assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
        std::fs::remove_file(out.join("keep.txt")).unwrap();
        write_folder(&out, &[("report.json", b"{}".to_vec())]).unwrap();
        write_folder(&out, &[("report.json", b"{\"v\":2}".to_vec()), ("a.csv", b"x\n".to_vec())]).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("report.json")).unwrap(), "{\"v\":2}");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("out")], "no temporary folder is left");
    }
}
