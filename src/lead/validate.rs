//! `fedhcc validate`: external validation of an exported model at a site, offline. Reads the
//! safetensors file `fedhcc export` writes ([`crate::lead::model_file`]: bounds-checked, F32 tensors laid
//! end to end, the export's metadata; the torch or the burn layout, mapped back onto the site study
//! model's), refuses a model of another study or another layout than the site's study model,
//! scores the site's patients with the site executor's own code (standardised with the statistics
//! the model carries), and writes into the output folder, atomically:
//!
//! - `predictions.csv` (`score,label,time,event,os_time,os_event`, one row per patient with RFS):
//!   patient-level, it stays at the site;
//! - with `--write-inputs` (clinical model), `inputs.csv`: the same patients' design-matrix rows
//!   before the model's standardisation, row for row, to reproduce the scores outside fedhcc
//!   (`scripts/fedhcc_model.py`); patient-level too;
//! - `stats.json` and the plots, exactly what `fedhcc stats` makes of `predictions.csv`
//!   (`fedhcc_stats::report`), with the cut-off's origin in `cutoff_source` and `notes`;
//! - `validation.json`: which model, which patients, which cut-off and why.
//!
//! An external site scores all its patients (`--split all`): it has no training split, so without a
//! cut-off (`--cutoff`, or the study's `[evaluation] cutoff`) sensitivity and the risk groups use
//! Youden's cut-off on these same patients, flagged as optimistic. A site that took part can
//! score one of its own splits (`--split test`), with Youden's cut-off on its training split, as the
//! federated evaluation does.

use crate::lead::model_file::{FileLayout, read_safetensors};
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_core::params::ParameterSet;
use fedhcc_model::BackendKind;
use fedhcc_site::train::{Trainer, backend_for};
use fedhcc_stats::federated::SitePredictions;
use fedhcc_stats::report::{StatsOptions, evaluate, plots, predictions_from_columns};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// `fedhcc validate`.
#[derive(Args)]
pub struct ValidateArgs {
    /// The model: a safetensors file written by `fedhcc export`.
    #[arg(long)]
    pub model: PathBuf,
    /// This site's configuration: its data, and the study file the model must belong to.
    #[arg(long = "site-config")]
    pub site_config: PathBuf,
    /// Output folder for predictions.csv, stats.json, validation.json and the SVG plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Which patients: `all` (an external site: every patient with what the model needs), or this
    /// site's `train`, `val` or `test` split (from the study's split seed; for a site that took part).
    #[arg(long, default_value = "all", value_parser = ["all", "train", "val", "test"])]
    pub split: String,
    /// Cut-off (`score >= cutoff` is high risk). Default: the study's `[evaluation] cutoff`; else,
    /// with `--split`, Youden's on this site's training split; else Youden's on these patients
    /// (optimistic, and stats.json says so).
    #[arg(long)]
    pub cutoff: Option<f64>,
    /// Times (days) for the time-dependent AUC; the largest is also Uno's C truncation time.
    #[arg(long, value_delimiter = ',', default_value = "365,730,1095")]
    pub times: Vec<f64>,
    /// Bootstrap replicates for the AUC interval (0: none).
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 20_240_605)]
    pub seed: u64,
    /// Compute backend (default: the site config's `backend`, else the fastest CPU backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// Also write inputs.csv: for each row of predictions.csv, the patient's clinical design-matrix
    /// row as the model receives it before its own standardisation (named columns), to reproduce
    /// the scores outside fedhcc (scripts/fedhcc_model.py). Patient-level: it stays at this site.
    /// Clinical model only.
    #[arg(long)]
    pub write_inputs: bool,
}

/// A model read from a safetensors file and checked against the site's study model.
pub struct SafetensorsModel {
    /// The metadata (`study_id`, `model_kind`, `fingerprint`, … as `fedhcc export` writes them).
    pub metadata: BTreeMap<String, String>,
    /// The file's layout.
    pub layout: FileLayout,
    /// The tensors in the study model's names, shapes and order (the torch layout undone).
    pub params: ParameterSet,
}

/// Reads `path` and checks that it is a model of the site's study: its study id must be the site's,
/// its tensors (in the layout its metadata names) the study model's, and the fingerprint the export
/// recorded theirs (else the file was altered).
///
/// # Errors
/// Unreadable or invalid file; a model of another study or another layout, with the reason.
pub fn read_study_model(path: &Path, study_id: &str, model: &StudyModel, seed: u64) -> Result<SafetensorsModel> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the model {}", path.display()))?;
    let file = path.display().to_string();
    let f = read_safetensors(&bytes, &file)?;
    let meta = |k: &str| f.metadata.get(k).map_or("(not recorded)", String::as_str);
    if meta("study_id") != study_id {
        bail!(
            "{file} is a model of study '{}', but this site's configuration is for study '{study_id}': validate it \
             with a site configuration whose study file is the one the model was trained under",
            meta("study_id")
        );
    }
    let expected = model.initial_params(seed)?;
    let params = f.to_params(expected.layout()).map_err(|problems| {
        anyhow::anyhow!(
            "{file} is a {} model whose {} tensors do not fit this site's study, which describes a {} model with \
             layout {} ({problems}): the model does not fit this study file (another model kind, other [model] sizes \
             or other [cohort] columns)",
            meta("model_kind"),
            f.tensor_count(),
            model.kind(),
            expected.fingerprint().short()
        )
    })?;
    let own = params.fingerprint();
    let recorded = meta("fingerprint");
    if recorded != own.to_hex() {
        bail!(
            "{file}: the tensors' layout fingerprint {} differs from the one recorded at export ({}); the file was \
             altered or not written by `fedhcc export`",
            own.short(),
            &recorded[..recorded.len().min(12)]
        );
    }
    Ok(SafetensorsModel { metadata: f.metadata, layout: f.layout, params })
}

/// Scores the site's patients with `params` through the executor the study's model uses; with
/// `inputs`, also the clinical inputs of the first split's patients (before standardisation).
fn score(
    model: &StudyModel,
    site: &fedhcc_core::config::SiteConfig,
    backend: BackendKind,
    params: &ParameterSet,
    splits: &[&str],
    inputs: bool,
) -> Result<(Vec<SitePredictions>, Option<Vec<f32>>)> {
    let mut e = Trainer::load(model, site, backend)?;
    let scored = splits.iter().map(|s| e.predictions(params, s)).collect::<Result<Vec<_>>>()?;
    let rows = match (inputs, splits.first()) {
        (true, Some(split)) => Some(e.clinical_inputs(split)?),
        _ => None,
    };
    Ok((scored, rows))
}

/// `predictions.csv`: one row per patient with RFS (what `fedhcc stats` reads), OS beside it.
fn predictions_csv(p: &SitePredictions) -> String {
    let mut csv = String::from("score,label,time,event,os_time,os_event\n");
    for i in 0..p.len() {
        let Some((t, e)) = p.rfs[i] else { continue };
        let label = p.label[i].map_or(String::new(), |l| u8::from(l).to_string());
        let (ot, oe) =
            p.os[i].map_or((String::new(), String::new()), |(t, e)| (t.to_string(), u8::from(e).to_string()));
        let _ = writeln!(csv, "{},{label},{t},{},{ot},{oe}", p.score[i], u8::from(e));
    }
    csv
}

/// `inputs.csv`: the design-matrix row (before standardisation) of each patient of
/// [`predictions_csv`], row for row; `rows` holds one row of `columns.len()` values per patient of `p`.
fn inputs_csv(p: &SitePredictions, columns: &[String], rows: &[f32]) -> Result<Vec<u8>> {
    let d = columns.len();
    if rows.len() != p.len() * d {
        bail!("{} input values for {} patients of {d} columns", rows.len(), p.len());
    }
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(columns)?;
    for (i, row) in rows.chunks_exact(d.max(1)).enumerate() {
        if p.rfs[i].is_some() {
            w.write_record(row.iter().map(f32::to_string))?;
        }
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("writing inputs.csv: {e}"))
}

/// Runs `fedhcc validate`.
///
/// # Errors
/// Invalid arguments or configuration, a model that is not the site study's, unusable site data, or
/// an output folder that cannot be written (then nothing is written).
pub fn validate(args: &ValidateArgs) -> Result<()> {
    if let Some(c) = args.cutoff
        && !c.is_finite()
    {
        bail!("--cutoff {c} is not a number");
    }
    if let Some(t) = args.times.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        bail!("--times: {t} is not a positive number of days");
    }
    let (site, study) = fedhcc_core::config::load_site(&args.site_config)?;
    let model = StudyModel::from_study(&study).with_context(|| format!("{}: its study", args.site_config.display()))?;
    if args.write_inputs && model.clinical_config().is_none() {
        bail!("--write-inputs writes the clinical model's inputs; this site's study trains a {} model", model.kind());
    }
    let m = read_study_model(&args.model, &study.study_id, &model, study.training.seed)?;
    let backend = backend_for(args.backend.as_ref(), &site)?;
    let groups = fedhcc_core::standardisation::groups(m.params.layout());
    let carried = groups.iter().all(|(g, _)| fedhcc_core::standardisation::read(&m.params, g).is_some());

    let external = args.split == "all";
    let wants_training = args.cutoff.is_none() && study.evaluation.cutoff.is_none() && !external;
    let splits: Vec<&str> = if wants_training { vec![args.split.as_str(), "train"] } else { vec![args.split.as_str()] };
    let (scored, inputs) = score(&model, &site, backend, &m.params, &splits, args.write_inputs)?;
    let mut scored = scored.into_iter();
    let patients = scored.next().context("no predictions")?;
    let (cutoff, cutoff_source) = match (args.cutoff, study.evaluation.cutoff, scored.next()) {
        (Some(c), _, _) => (Some(c), "given"),
        (None, Some(c), _) => (Some(c), "study"),
        (None, None, Some(train)) => {
            let (labels, scores) = train.labelled();
            match fedhcc_stats::binary::youden(&labels, &scores) {
                Ok(y) => (Some(y.cutoff), "site_training_youden"),
                Err(e) => {
                    println!("No cut-off from this site's training split ({e}); Youden's on these patients is used.");
                    (None, "youden")
                }
            }
        }
        (None, None, None) => (None, "youden"),
    };

    let with_rfs: Vec<usize> = (0..patients.len()).filter(|&i| patients.rfs[i].is_some()).collect();
    if with_rfs.is_empty() {
        bail!(
            "{}: none of the {} patients scored has a recurrence-free survival time; the statistics need time and \
             event for every row",
            site.data_dir.display(),
            patients.len()
        );
    }
    let predictions = predictions_from_columns(
        with_rfs.iter().map(|&i| patients.score[i]).collect(),
        with_rfs.iter().map(|&i| patients.label[i]).collect(),
        with_rfs.iter().filter_map(|&i| patients.rfs[i].map(|(t, _)| t)).collect(),
        with_rfs.iter().filter_map(|&i| patients.rfs[i].map(|(_, e)| e)).collect(),
        None,
    )?;
    let options = StatsOptions {
        cutoff,
        times: args.times.clone(),
        bootstrap_replicates: args.bootstrap,
        bootstrap_seed: args.seed,
        ..StatsOptions::default()
    };
    let mut report = evaluate(&predictions, &options);
    let who = if external {
        format!(
            "external validation: every patient of site '{}' with what the model needs was scored ({}); an external \
             site has no training split",
            site.site_id,
            patients.len()
        )
    } else {
        format!("site '{}', its '{}' split (the study's split seed)", site.site_id, args.split)
    };
    report.notes.insert("validation".into(), who.clone());
    if cutoff_source == "youden" && report.cutoff.is_some() {
        report.notes.insert(
            "cutoff".into(),
            "chosen by Youden's index on these same patients, so sensitivity, specificity and the risk groups are \
             optimistic: pass the study's frozen cut-off with --cutoff (the federated evaluation reports one as \
             pooled.study_cutoff) or set [evaluation] cutoff in the study file"
                .into(),
        );
    }
    if cutoff_source != "youden" {
        report.cutoff_source = Some(cutoff_source.into());
        report.notes.insert(
            "cutoff".into(),
            match cutoff_source {
                "study" => "the study's [evaluation] cutoff".into(),
                "site_training_youden" => {
                    "Youden's cut-off on this site's training split (same model), frozen for these patients".into()
                }
                _ => "given with --cutoff".to_string(),
            },
        );
    }
    let validation = serde_json::json!({
        "model": args.model,
        "study_id": study.study_id,
        "model_kind": model.kind(),
        "fingerprint": m.params.fingerprint().to_hex(),
        "file_layout": m.layout.as_str(),
        "exported_by": m.metadata.get("producer"),
        "trained_in_run": m.metadata.get("run_id"),
        "site_id": site.site_id,
        "split": args.split,
        "external": external,
        "patients_scored": patients.len(),
        "patients_in_statistics": predictions.len(),
        "left_out_without_rfs": patients.len() - predictions.len(),
        "cutoff": report.cutoff,
        "cutoff_source": report.cutoff_source,
        "standardisation": if carried {
            "the pooled statistics the model carries"
        } else {
            "this site's own training-split statistics (the model carries none)"
        },
        "note": who,
        "predictions_csv": "patient-level: it stays at this site",
    });
    let mut files: Vec<(&str, Vec<u8>)> = vec![("predictions.csv", predictions_csv(&patients).into_bytes())];
    if let Some(rows) = &inputs {
        files.push(("inputs.csv", inputs_csv(&patients, &fedhcc_cohort::design_columns(&model.spec), rows)?));
    }
    files.extend(plots(&report).into_iter().map(|(name, svg)| (name, svg.into_bytes())));
    files.push(("validation.json", serde_json::to_vec_pretty(&validation)?));
    let mut json = serde_json::to_vec_pretty(&report).context("cannot encode stats.json")?;
    json.push(b'\n');
    files.push(("stats.json", json));
    crate::lead::stats_cmd::write_atomically(&args.out, &files)?;

    println!(
        "Validated the {} model {} (study '{}') at site '{}': {who}.",
        model.kind(),
        m.params.fingerprint().short(),
        study.study_id,
        site.site_id
    );
    println!(
        "{} patients in the statistics ({} labelled, {} positive; {} events)",
        report.n, report.n_labelled, report.n_positive, report.n_events
    );
    match &report.auc {
        Some(a) => println!("AUC {:.3} (95% CI {:.3}–{:.3}, DeLong)", a.estimate, a.ci_low, a.ci_high),
        None => println!("AUC not available: {}", report.notes.get("auc").map_or("", String::as_str)),
    }
    if let (Some(c), Some(source)) = (report.cutoff, &report.cutoff_source) {
        println!("cut-off {c} ({source})");
    }
    if let Some(c) = report.c_index_harrell {
        println!("Harrell's C {c:.3}");
    }
    println!(
        "wrote {} (stats.json, validation.json, roc.svg, km.svg, calibration.svg, decision_curve.svg); \
         predictions.csv{} holds patient-level {}: it stays at this site",
        args.out.display(),
        if inputs.is_some() { " (and inputs.csv)" } else { "" },
        if inputs.is_some() { "scores and inputs" } else { "scores" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_csv_is_what_fedhcc_stats_reads_and_keeps_values_exact() {
        let p = SitePredictions {
            score: vec![0.1234567890123, 0.9, 0.5],
            label: vec![Some(true), None, Some(false)],
            rfs: vec![Some((30.0, true)), Some((400.0, false)), None],
            os: vec![None, Some((500.0, true)), None],
        };
        let csv = predictions_csv(&p);
        let read = fedhcc_stats::predictions::read_predictions(csv.as_bytes(), "p.csv").unwrap();
        assert_eq!(read.score, vec![0.1234567890123, 0.9]);
        assert_eq!(read.label, vec![Some(true), None]);
        assert_eq!((read.time, read.event), (vec![30.0, 400.0], vec![true, false]));
        assert!(csv.contains(",500,1\n"), "{csv}");
        // inputs.csv: the rows of the same patients, values exact.
        let cols = vec!["a".to_string(), "b=x".to_string()];
        let inputs = inputs_csv(&p, &cols, &[0.1, 1.0, 2.5, 0.0, f32::MIN_POSITIVE, 1.0]).unwrap();
        let text = String::from_utf8(inputs).unwrap();
        assert_eq!(text, "a,b=x\n0.1,1\n2.5,0\n");
        assert!(inputs_csv(&p, &cols, &[0.0; 5]).is_err());
    }
}
