//! `fedhcc study`: the cross-center study — does the model predict aggressive recurrence at a center
//! it did not learn from?
//!
//! A simulation on one machine that holds every site's data (the synthetic cohort, or a study's data
//! brought together under an agreement). For each model of the study file (`[[model]]`: its site
//! configurations, which name the model's study file), it trains
//!
//! - `federated`: the study's federation over every site — a real one in this process (mutual TLS on
//!   loopback, the study's strategy, secure aggregation and DP as the study file sets them);
//! - `leave_one_center_out`: the same federation without one center, once per center (with one
//!   center left, secure aggregation is off: there is no sum to hide a single update in);
//! - `local_only`: each site's model on its own data alone (what `fedhcc train --mode local` trains);
//! - `central`: one model on every site's data pooled (`fedhcc train --mode central`): the upper
//!   bound a federation can approach;
//!
//! each with the study's rounds × local epochs and seeds, and scores every trained model on every
//! site's held-out test split (the study's split seed: the same patients in a column, so rows compare)
//! and on all those patients together (`pooled`), with the site executor's own code (as `fedhcc
//! validate --split test`). Each cell holds the AUC of aggressive recurrence (DeLong 95% CI) and
//! Harrell's C of the same score for recurrence-free and overall survival.
//!
//! Writes into `--out` (built in a temporary folder beside it and renamed into place: a failed study
//! leaves no partial folder; a previous study's folder is replaced whole): per model
//! `<name>/cross-center.json` (the matrix `fedhcc report --cross-center` and the dashboard read),
//! `<name>/cross-center.csv` (every cell with its counts and intervals) and `<name>/runs/` (each
//! federation's server state, for `fedhcc report --server-state`); `study.json` and `study.md` over
//! every model. Only aggregate statistics are written; no patient-level value.
//!
//! Size: the cross-center simulation (local, central and federated models per center, then every
//! model validated at every center) is one experiment whose steps share the same loaded sites.

use crate::dev::simulation::{SimSite, run_federation};
use crate::lead::report::{CrossCenter, CrossCenterMatrix, CrossCenterRow};
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_core::config::SiteConfig;
use fedhcc_core::params::ParameterSet;
use fedhcc_site::train::{StudySites, Trainer, backend_for, fit, load_study_sites, with_pooled_statistics};
use fedhcc_stats::federated::SitePredictions;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Marks a folder `fedhcc study` made (and may replace).
const MARKER: &str = ".fedhcc-study";
/// The column of every site's test patients together.
const POOLED: &str = "pooled";

/// `fedhcc study`.
#[derive(Args)]
pub struct StudyArgs {
    /// The cross-center study file (see configs/cross-center.toml): `[[model]]` entries with their
    /// site configurations, and which settings to run.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder (default: the file's `out`, else `cross-center` beside the file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rounds of every federation, and successive local trainings of the local and central models
    /// (default: the file's `rounds`, else each study's `[federation] rounds`).
    #[arg(long)]
    pub rounds: Option<u32>,
}

/// What one cross-center study trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setting {
    Federated,
    LeaveOneCenterOut,
    LocalOnly,
    Central,
}

const ALL_SETTINGS: [Setting; 4] =
    [Setting::Federated, Setting::LeaveOneCenterOut, Setting::LocalOnly, Setting::Central];

/// The study file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    /// Output folder, relative to the file.
    #[serde(default)]
    out: Option<PathBuf>,
    /// Settings to run (default: all four).
    #[serde(default)]
    settings: Option<Vec<Setting>>,
    /// Rounds (default: each study's `[federation] rounds`).
    #[serde(default)]
    rounds: Option<u32>,
    /// The models.
    #[serde(default)]
    model: Vec<ModelEntry>,
}

/// One model of the study: a name (its output folder) and the sites' configurations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    name: String,
    /// Site configurations, relative to the study file; each names the model's study file.
    site_configs: Vec<PathBuf>,
}

/// One trained model.
struct Trained {
    setting: Setting,
    /// Row label (`federated: all centers`, `center_a only`, …).
    label: String,
    trained_on: Vec<String>,
    params: ParameterSet,
    seconds: f64,
}

/// One cell: a trained model scored on one site's test patients (or all of them).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cell {
    pub setting: Setting,
    pub trained_on: String,
    pub evaluated_at: String,
    /// Test patients scored.
    pub n: usize,
    pub n_labelled: usize,
    pub n_positive: usize,
    pub auc: Option<f64>,
    pub auc_ci_low: Option<f64>,
    pub auc_ci_high: Option<f64>,
    pub n_rfs: usize,
    pub rfs_events: usize,
    pub c_index_rfs: Option<f64>,
    pub n_os: usize,
    pub os_events: usize,
    pub c_index_os: Option<f64>,
    /// Why a figure is missing (too few positives or events, one class only).
    pub notes: Vec<String>,
}

/// The figures of one cell from the patients' scores.
pub fn cell(setting: Setting, trained_on: &str, evaluated_at: &str, p: &SitePredictions) -> Cell {
    let mut notes = Vec::new();
    let (labels, scores) = p.labelled();
    let auc = match fedhcc_stats::binary::auc_delong(&labels, &scores, 0.95) {
        Ok(a) => Some(a),
        Err(e) => {
            notes.push(format!("AUC: {e}"));
            None
        }
    };
    let survival = |which: &[Option<(f64, bool)>], name: &str, notes: &mut Vec<String>| {
        let (mut t, mut e, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for (v, score) in which.iter().zip(&p.score) {
            if let Some((time, event)) = v {
                t.push(*time);
                e.push(*event);
                s.push(*score);
            }
        }
        let c = match fedhcc_stats::survival::harrell_c(&t, &e, &s) {
            Ok(c) => Some(c),
            Err(err) => {
                notes.push(format!("{name}: {err}"));
                None
            }
        };
        (t.len(), e.iter().filter(|x| **x).count(), c)
    };
    let (n_rfs, rfs_events, c_index_rfs) = survival(&p.rfs, "C-index (RFS)", &mut notes);
    let (n_os, os_events, c_index_os) = survival(&p.os, "C-index (OS)", &mut notes);
    Cell {
        setting,
        trained_on: trained_on.into(),
        evaluated_at: evaluated_at.into(),
        n: p.len(),
        n_labelled: labels.len(),
        n_positive: labels.iter().filter(|l| **l).count(),
        auc: auc.as_ref().map(|a| a.estimate),
        auc_ci_low: auc.as_ref().map(|a| a.ci_low),
        auc_ci_high: auc.as_ref().map(|a| a.ci_high),
        n_rfs,
        rfs_events,
        c_index_rfs,
        n_os,
        os_events,
        c_index_os,
        notes,
    }
}

/// The report's matrix of one metric over the cells (rows in training order, columns the sites
/// and `pooled`).
fn matrix(cells: &[Cell], rows: &[String], metric: impl Fn(&Cell) -> Option<f64>) -> Vec<CrossCenterRow> {
    rows.iter()
        .map(|r| CrossCenterRow {
            trained_on: r.clone(),
            evaluated_at: cells
                .iter()
                .filter(|c| &c.trained_on == r)
                .map(|c| (c.evaluated_at.clone(), metric(c)))
                .collect(),
        })
        .collect()
}

/// `cross-center.json` of one model: the AUC matrix, with RFS and OS C-index matrices beside it.
pub fn cross_center(cells: &[Cell], rows: &[String], model_name: &str) -> CrossCenter {
    CrossCenter {
        metric: "auc".into(),
        rows: matrix(cells, rows, |c| c.auc),
        note: Some(format!(
            "{model_name}: every trained model scored on each center's held-out test split (the study's split seed) \
             and on all those patients together (pooled). Rows: the federated model of all centers, each \
             leave-one-center-out federation (its held-out center is the external validation), each center's \
             local-only model, and the centralised model on pooled data (the upper bound). AUC of aggressive \
             recurrence; the secondary matrices are Harrell's C of the same score for recurrence-free and overall \
             survival."
        )),
        secondary: vec![
            CrossCenterMatrix { metric: "c_index_rfs".into(), rows: matrix(cells, rows, |c| c.c_index_rfs) },
            CrossCenterMatrix { metric: "c_index_os".into(), rows: matrix(cells, rows, |c| c.c_index_os) },
        ],
    }
}

fn f3(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.3}"))
}

fn cells_csv(cells: &[Cell]) -> String {
    let o = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let mut out = String::from(
        "setting,trained_on,evaluated_at,n,n_labelled,n_positive,auc,auc_ci_low,auc_ci_high,n_rfs,rfs_events,\
         c_index_rfs,n_os,os_events,c_index_os\n",
    );
    for c in cells {
        let setting =
            serde_json::to_value(c.setting).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let _ = writeln!(
            out,
            "{setting},\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{}",
            c.trained_on,
            c.evaluated_at,
            c.n,
            c.n_labelled,
            c.n_positive,
            o(c.auc),
            o(c.auc_ci_low),
            o(c.auc_ci_high),
            c.n_rfs,
            c.rfs_events,
            o(c.c_index_rfs),
            c.n_os,
            c.os_events,
            o(c.c_index_os)
        );
    }
    out
}

/// The markdown tables of one model (AUC with CI, then the C-indices).
fn markdown(name: &str, kind: &str, cells: &[Cell], rows: &[String], columns: &[String]) -> String {
    let mut md = format!("## {name} ({kind} model)\n\n");
    let find = |r: &str, c: &str| cells.iter().find(|x| x.trained_on == r && x.evaluated_at == c);
    let header = |md: &mut String, title: &str| {
        let _ = writeln!(md, "{title}\n\n| trained on \\ evaluated at | {} |", columns.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(columns.len()));
    };
    header(&mut md, "AUC of aggressive recurrence (95% CI, DeLong)");
    for r in rows {
        let cols: Vec<String> = columns
            .iter()
            .map(|c| match find(r, c) {
                Some(x) if x.auc.is_some() => {
                    format!(
                        "{} ({}–{}), {}/{}",
                        f3(x.auc),
                        f3(x.auc_ci_low),
                        f3(x.auc_ci_high),
                        x.n_positive,
                        x.n_labelled
                    )
                }
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {r} | {} |", cols.join(" | "));
    }
    for (title, get) in [
        ("Harrell's C, recurrence-free survival", (|x: &Cell| x.c_index_rfs) as fn(&Cell) -> Option<f64>),
        ("Harrell's C, overall survival", |x: &Cell| x.c_index_os),
    ] {
        md.push('\n');
        header(&mut md, title);
        for r in rows {
            let cols: Vec<String> = columns.iter().map(|c| f3(find(r, c).and_then(get))).collect();
            let _ = writeln!(md, "| {r} | {} |", cols.join(" | "));
        }
    }
    md.push_str("\nCells: estimate (interval), positives/labelled test patients. `–`: not estimable (see cross-center.csv).\n\n");
    md
}

/// What a cross-center study left.
pub struct StudyOutcome {
    /// The output folder.
    pub out: PathBuf,
    /// `study.md`'s text: every model's matrices.
    pub summary: String,
    /// The first model's matrix.
    pub first: CrossCenter,
}

/// Runs `fedhcc study` and prints its summary.
///
/// # Errors
/// See [`run`].
pub fn study(args: &StudyArgs) -> Result<()> {
    let done = run(args)?;
    println!("\n{}", done.summary);
    println!(
        "Written: {} (study.md, study.json; per model cross-center.json for `fedhcc report --cross-center`, \
         cross-center.csv, runs/)",
        done.out.display()
    );
    Ok(())
}

/// Runs the cross-center study, printing progress only.
///
/// # Errors
/// An unreadable or invalid study file or site configuration, unusable site data, a federation
/// that fails, or an output folder that cannot be written (then nothing is left behind).
pub fn run(args: &StudyArgs) -> Result<StudyOutcome> {
    let Plan { out, settings, rounds_override, models } = plan(args)?;
    let (summary, first) = crate::outdir::replace_folder(&out, MARKER, "cross-center study", |tmp| {
        let summary = run_models(tmp, &models, &settings, rounds_override, &args.config)?;
        std::fs::write(tmp.join(MARKER), "made by fedhcc study; replaced whole by the next study with this --out\n")?;
        Ok(summary)
    })?;
    Ok(StudyOutcome { out, summary, first })
}

/// A study file read and checked, with every model's site configurations and study loaded.
struct Plan {
    out: PathBuf,
    settings: Vec<Setting>,
    rounds_override: Option<u32>,
    models: Vec<(String, StudySites)>,
}

/// Reads and checks everything before anything is trained or written.
///
/// # Errors
/// As [`run`], less the training and the writing.
fn plan(args: &StudyArgs) -> Result<Plan> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the cross-center study file {}", args.config.display()))?;
    let file: StudyFile =
        toml::from_str(&text).with_context(|| format!("{}: not a cross-center study file", args.config.display()))?;
    let base = args.config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if file.model.is_empty() {
        bail!("{}: no [[model]] entry (give each model a name and its site_configs)", args.config.display());
    }
    let settings = file.settings.clone().unwrap_or_else(|| ALL_SETTINGS.to_vec());
    if settings.is_empty() {
        bail!(
            "{}: settings is empty (use federated, leave_one_center_out, local_only, central)",
            args.config.display()
        );
    }
    let rounds_override = args.rounds.or(file.rounds);
    if rounds_override.is_some_and(|r| r == 0 || r > 1000) {
        bail!(
            "rounds = {} ({}): must be between 1 and 1000",
            rounds_override.unwrap_or_default(),
            if args.rounds.is_some() { "--rounds".to_string() } else { args.config.display().to_string() }
        );
    }
    let out = match (&args.out, &file.out) {
        (Some(o), _) => o.clone(),
        (None, Some(o)) => base.join(o),
        (None, None) => base.join("cross-center"),
    };
    // Everything is read and checked before anything is trained or written.
    let mut models = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for m in &file.model {
        fedhcc_core::pki::validate_name("model name", &m.name)
            .with_context(|| format!("{}: [[model]] name '{}'", args.config.display(), m.name))?;
        if !names.insert(m.name.clone()) {
            bail!("{}: two [[model]] entries are named '{}'", args.config.display(), m.name);
        }
        let paths: Vec<PathBuf> = m.site_configs.iter().map(|p| base.join(p)).collect();
        let ss = load_study_sites(&paths).with_context(|| format!("[[model]] '{}'", m.name))?;
        if ss.sites.len() < 2 && settings.iter().any(|s| *s != Setting::LocalOnly) {
            bail!("[[model]] '{}': a cross-center study needs at least two sites ({} given)", m.name, ss.sites.len());
        }
        models.push((m.name.clone(), ss));
    }
    Ok(Plan { out, settings, rounds_override, models })
}

/// Trains and scores every model; returns the markdown summary (also written as `study.md`) and the
/// first model's matrix.
fn run_models(
    dir: &Path,
    models: &[(String, StudySites)],
    settings: &[Setting],
    rounds_override: Option<u32>,
    config: &Path,
) -> Result<(String, CrossCenter)> {
    let mut first = None;
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut md = format!(
        "# Cross-center study\n\nStudy file: {}. Made by fedhcc {}.\n\n",
        config.display(),
        env!("CARGO_PKG_VERSION")
    );
    let mut json_models = Vec::new();
    for (name, ss) in models {
        let mdir = dir.join(name);
        std::fs::create_dir_all(&mdir)?;
        let rounds = rounds_override.unwrap_or(ss.study.federation.rounds);
        let site_ids: Vec<String> = ss.sites.iter().map(|s| s.site_id.clone()).collect();
        println!("Model '{name}' ({} model; sites {}; {rounds} rounds)", ss.model.kind(), site_ids.join(", "));
        // Each site's data is loaded once: it trains the site's local-only model and scores every model.
        let mut executors =
            ss.sites.iter().map(|s| Trainer::load(&ss.model, s, backend_for(None, s)?)).collect::<Result<Vec<_>>>()?;
        let trained = train_all(&rt, &mdir, ss, &mut executors, settings, rounds)?;
        // Score every model at every site's test split.
        let mut cells = Vec::new();
        let mut pooled: Vec<SitePredictions> = vec![SitePredictions::default(); trained.len()];
        for (site, scorer) in ss.sites.iter().zip(&mut executors) {
            for (t, pool) in trained.iter().zip(pooled.iter_mut()) {
                let p = scorer
                    .predictions(&t.params, "test")
                    .with_context(|| format!("scoring '{}' at site '{}'", t.label, site.site_id))?;
                cells.push(cell(t.setting, &t.label, &site.site_id, &p));
                pool.extend(p);
            }
        }
        for (t, p) in trained.iter().zip(&pooled) {
            cells.push(cell(t.setting, &t.label, POOLED, p));
        }
        let rows: Vec<String> = trained.iter().map(|t| t.label.clone()).collect();
        let mut columns = site_ids.clone();
        columns.push(POOLED.into());
        let matrix = cross_center(&cells, &rows, name);
        std::fs::write(mdir.join("cross-center.json"), serde_json::to_vec_pretty(&matrix)?)?;
        first.get_or_insert(matrix);
        std::fs::write(mdir.join("cross-center.csv"), cells_csv(&cells))?;
        md.push_str(&markdown(name, ss.model.kind(), &cells, &rows, &columns));
        json_models.push(serde_json::json!({
            "name": name,
            "model_kind": ss.model.kind(),
            "study_id": ss.study.study_id,
            "sites": site_ids,
            "rounds": rounds,
            "trained": trained.iter().map(|t| serde_json::json!({
                "setting": t.setting, "label": t.label, "trained_on": t.trained_on,
                "fingerprint": t.params.fingerprint().to_hex(), "seconds": t.seconds,
            })).collect::<Vec<_>>(),
            "cells": cells,
        }));
    }
    let _ = writeln!(md, "Whole study: {:.1} s.", t0.elapsed().as_secs_f64());
    let json = serde_json::json!({
        "fedhcc_version": env!("CARGO_PKG_VERSION"),
        "config": config,
        "settings": settings,
        "models": json_models,
    });
    std::fs::write(dir.join("study.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("study.md"), &md)?;
    Ok((md, first.context("no model")?))
}

/// Trains every setting's models of one study model, printing progress.
/// `executors` are the sites' own (in `ss.sites` order): they train the local-only models.
fn train_all(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    ss: &StudySites,
    executors: &mut [Trainer],
    settings: &[Setting],
    rounds: u32,
) -> Result<Vec<Trained>> {
    let ids: Vec<String> = ss.sites.iter().map(|s| s.site_id.clone()).collect();
    let mut plan: Vec<(Setting, String, Vec<&SiteConfig>)> = Vec::new();
    for s in settings {
        match s {
            Setting::Federated => plan.push((*s, "federated: all centers".into(), ss.sites.iter().collect())),
            Setting::LeaveOneCenterOut => {
                for held in &ss.sites {
                    let rest = ss.sites.iter().filter(|x| x.site_id != held.site_id).collect();
                    plan.push((*s, format!("federated without {}", held.site_id), rest));
                }
            }
            Setting::LocalOnly => {
                for site in &ss.sites {
                    plan.push((*s, format!("{} only", site.site_id), vec![site]));
                }
            }
            Setting::Central => plan.push((*s, "central: pooled data".into(), ss.sites.iter().collect())),
        }
    }
    let needs_certs = plan.iter().any(|(s, ..)| matches!(s, Setting::Federated | Setting::LeaveOneCenterOut));
    let certs = dir.join("runs").join("certs");
    if needs_certs {
        fedhcc_core::pki::init(&certs, &ss.study.study_id, "localhost", &ids, None, 30)?;
    }
    let total = plan.len();
    let mut out = Vec::new();
    for (k, (setting, label, sites)) in plan.into_iter().enumerate() {
        let t0 = Instant::now();
        let names: Vec<String> = sites.iter().map(|s| s.site_id.clone()).collect();
        print!("  [{}/{total}] {label} ({}) … ", k + 1, names.join(", "));
        let _ = std::io::stdout().flush();
        let params = match setting {
            Setting::Federated | Setting::LeaveOneCenterOut => {
                let run_dir = dir.join("runs").join(slug(&label));
                federate(rt, &run_dir, &certs, ss, &sites, rounds).with_context(|| label.clone())?
            }
            Setting::LocalOnly => {
                let k = ss.sites.iter().position(|s| s.site_id == names[0]).context("the site's executor")?;
                train_alone(executors[k].executor(), ss, rounds).with_context(|| label.clone())?
            }
            Setting::Central => {
                // Pooling takes the executors whole: the pooled one is loaded afresh.
                let parts = sites
                    .iter()
                    .map(|s| Trainer::load(&ss.model, s, backend_for(None, s)?))
                    .collect::<Result<Vec<_>>>()?;
                train_alone(Trainer::pooled(parts)?.executor(), ss, rounds).with_context(|| label.clone())?
            }
        };
        let seconds = t0.elapsed().as_secs_f64();
        println!("{seconds:.1} s");
        out.push(Trained { setting, label, trained_on: names, params, seconds });
    }
    Ok(out)
}

/// The study's model trained on `exec`'s data alone (a site, or sites pooled), with its own pooled
/// statistics, as `fedhcc train` does.
fn train_alone(exec: &mut dyn fedhcc_client::Executor, ss: &StudySites, rounds: u32) -> Result<ParameterSet> {
    let mut params = ss.initial.clone();
    with_pooled_statistics(exec, &mut params)?;
    fit(exec, params, &ss.study.training, rounds, |_, _| {})
}

/// A folder name for a row label.
fn slug(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out
}

/// One federation over `sites` with the study's settings (secure aggregation off when a single site
/// trains); returns its final model.
fn federate(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    certs: &Path,
    ss: &StudySites,
    sites: &[&SiteConfig],
    rounds: u32,
) -> Result<ParameterSet> {
    let mut study = ss.study.clone();
    study.run_id = format!("cross-{}", dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()));
    study.federation.rounds = rounds;
    study.federation.min_sites = sites.len();
    if sites.len() < 2 {
        study.federation.secure_aggregation = false;
    }
    let multimodal = ss.model.multimodal_config()?.is_some();
    let sim_sites: Vec<SimSite> = sites
        .iter()
        .map(|s| SimSite {
            id: s.site_id.clone(),
            data_dir: s.data_dir.clone(),
            prepared: multimodal.then(|| s.state_dir.join(crate::preprocess::FOLDER)),
        })
        .collect();
    let sim = rt.block_on(run_federation(dir, certs, &sim_sites, &study, study.training.seed))?;
    let bytes = std::fs::read(&sim.outcome.final_checkpoint)
        .with_context(|| format!("reading the final model {}", sim.outcome.final_checkpoint.display()))?;
    ParameterSet::decode(&bytes).with_context(|| format!("{}: the final model", sim.outcome.final_checkpoint.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preds() -> SitePredictions {
        SitePredictions {
            score: vec![0.9, 0.8, 0.3, 0.2, 0.6, 0.1],
            label: vec![Some(true), Some(false), Some(true), Some(false), None, Some(false)],
            rfs: vec![
                Some((100.0, true)),
                Some((400.0, false)),
                Some((200.0, true)),
                None,
                Some((50.0, true)),
                Some((900.0, false)),
            ],
            os: vec![
                Some((300.0, true)),
                None,
                Some((800.0, false)),
                Some((700.0, false)),
                Some((90.0, true)),
                Some((1000.0, false)),
            ],
        }
    }

    #[test]
    fn the_shipped_cross_center_file_names_the_preoperative_and_postoperative_models() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/cross-center.toml");
        let plan = plan(&StudyArgs { config, out: None, rounds: None }).unwrap();
        let kinds: Vec<(&str, &str)> = plan.models.iter().map(|(n, ss)| (n.as_str(), ss.model.kind())).collect();
        assert_eq!(kinds, [("preoperative", "preop"), ("postoperative", "postop")]);
        for (name, ss) in &plan.models {
            let sites: Vec<&str> = ss.sites.iter().map(|s| s.site_id.as_str()).collect();
            assert_eq!(sites, ["tongji", "center_b"], "{name}");
        }
        assert_eq!(plan.settings, ALL_SETTINGS);
    }

    #[test]
    fn run_folders_are_named_after_their_row() {
        assert_eq!(slug("federated: all centers"), "federated-all-centers");
        assert_eq!(slug("federated without center_a"), "federated-without-center_a");
    }

    #[test]
    fn a_cell_matches_the_statistics_crate_on_the_same_patients() {
        let p = preds();
        let c = cell(Setting::LocalOnly, "center_a only", "center_b", &p);
        let (labels, scores) = p.labelled();
        assert_eq!((c.n, c.n_labelled, c.n_positive), (6, 5, 2));
        assert_eq!(c.auc, Some(fedhcc_stats::binary::auc(&labels, &scores).unwrap()));
        // RFS: rows 0,1,2,4,5 in that order.
        let want = fedhcc_stats::survival::harrell_c(
            &[100.0, 400.0, 200.0, 50.0, 900.0],
            &[true, false, true, true, false],
            &[0.9, 0.8, 0.3, 0.6, 0.1],
        )
        .unwrap();
        assert_eq!((c.n_rfs, c.rfs_events, c.c_index_rfs), (5, 3, Some(want)));
        assert_eq!((c.n_os, c.os_events), (5, 2));
        assert!(c.notes.is_empty(), "{:?}", c.notes);
    }

    #[test]
    fn a_cell_without_positives_says_why_instead_of_a_number() {
        let mut p = preds();
        p.label = vec![Some(false); 6];
        let c = cell(Setting::Central, "central: pooled data", "pooled", &p);
        assert_eq!(c.auc, None);
        assert!(c.notes.iter().any(|n| n.starts_with("AUC")), "{:?}", c.notes);
        assert!(c.c_index_rfs.is_some());
    }

    #[test]
    fn the_matrix_has_one_row_per_trained_model_and_a_column_per_site_and_pooled() {
        let p = preds();
        let rows = vec!["federated: all centers".to_string(), "center_a only".to_string()];
        let mut cells = Vec::new();
        for r in &rows {
            for at in ["center_a", "center_b", POOLED] {
                cells.push(cell(Setting::Federated, r, at, &p));
            }
        }
        let m = cross_center(&cells, &rows, "preoperative");
        assert_eq!(m.metric, "auc");
        assert_eq!(
            m.rows.iter().map(|r| r.trained_on.as_str()).collect::<Vec<_>>(),
            ["federated: all centers", "center_a only"]
        );
        assert_eq!(m.rows[1].evaluated_at.keys().collect::<Vec<_>>(), ["center_a", "center_b", "pooled"]);
        assert_eq!(m.secondary.iter().map(|s| s.metric.as_str()).collect::<Vec<_>>(), ["c_index_rfs", "c_index_os"]);
        // What fedhcc report reads back.
        let back: CrossCenter = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        let csv = cells_csv(&cells);
        assert_eq!(csv.lines().count(), 1 + 6);
        assert!(csv.lines().nth(4).unwrap().starts_with("federated,\"center_a only\",center_a,6,5,2,"), "{csv}");
    }

    #[test]
    fn study_files_are_checked_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("", "no [[model]]"),
            ("settings = []\n[[model]]\nname = \"m\"\nsite_configs = []\n", "settings is empty"),
            ("settings = [\"everything\"]\n", "not a cross-center study file"),
            ("[[model]]\nname = \"a b\"\nsite_configs = [\"x.toml\"]\n", "name 'a b'"),
            ("[[model]]\nname = \"m\"\nsite_configs = [\"missing.toml\"]\n", "missing.toml"),
            ("rounds = 0\n[[model]]\nname = \"m\"\nsite_configs = []\n", "rounds"),
        ];
        for (text, needle) in cases {
            let f = dir.path().join("cc.toml");
            std::fs::write(&f, text).unwrap();
            let e = study(&StudyArgs { config: f, out: Some(dir.path().join("out")), rounds: None }).unwrap_err();
            assert!(format!("{e:#}").contains(needle), "'{needle}' not in: {e:#}");
            assert!(!dir.path().join("out").exists());
        }
    }
}
