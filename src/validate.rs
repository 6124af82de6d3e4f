//! `fedhcc validate`: external validation of an exported model at a site, offline. Reads the
//! safetensors file `fedhcc export` writes ([`read_safetensors`]: bounds-checked, F32 tensors laid
//! end to end, the export's metadata), refuses a model of another study or another layout than the
//! site's study model, scores the site's patients with the site executor's own code (standardised
//! with the statistics the model carries), and writes into the output folder, atomically:
//!
//! - `predictions.csv` (`score,label,time,event,os_time,os_event`, one row per patient with RFS):
//!   patient-level, it stays at the site;
//! - `stats.json` and the plots, exactly what `fedhcc stats` makes of `predictions.csv`
//!   (`fedhcc_stats::report`), with the cut-off's origin in `cutoff_source` and `notes`;
//! - `validation.json`: which model, which patients, which cut-off and why.
//!
//! An external site scores all its patients (`--split all`): it has no training split, so without a
//! cut-off (`--cutoff`, or the study's `[evaluation] cutoff`) sensitivity and the risk groups use
//! Youden's cut-off on these same patients, flagged as optimistic. A site that took part can
//! score one of its own splits (`--split test`), with Youden's cut-off on its training split, as the
//! federated evaluation does.

use crate::study::StudyModel;
use crate::train::{Trainer, backend_for};
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_core::params::ParameterSet;
use fedhcc_model::BackendKind;
use fedhcc_stats::federated::SitePredictions;
use fedhcc_stats::report::{StatsOptions, evaluate, plots, predictions_from_columns};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest safetensors header accepted (bytes of JSON).
const MAX_HEADER_BYTES: u64 = 64 << 20;

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
}

/// A model read from a safetensors file: its `__metadata__` and its tensors in file order.
pub struct SafetensorsModel {
    /// The metadata (`study_id`, `model_kind`, `fingerprint`, … as `fedhcc export` writes them).
    pub metadata: BTreeMap<String, String>,
    /// The tensors, in data-offset order (the model's order when `fedhcc export` wrote it).
    pub params: ParameterSet,
}

/// Parses a safetensors file of F32 tensors: an 8-byte little-endian header length, a JSON header
/// (`__metadata__` of strings, then per tensor `dtype`, `shape`, `data_offsets`), then the data,
/// which the tensors must cover end to end without gaps or overlaps. `file` names it in errors.
///
/// # Errors
/// A truncated file, a header that is not such JSON, another dtype, offsets outside the data or not
/// matching the shape, gaps or overlaps, or tensors the parameter set refuses (duplicate names).
pub fn read_safetensors(bytes: &[u8], file: &str) -> Result<SafetensorsModel> {
    let bad = |what: String| anyhow::anyhow!("{file} is not a usable safetensors model: {what}");
    let len = bytes.get(..8).ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len.try_into().map_err(|_| bad("no header length".into()))?);
    if n > MAX_HEADER_BYTES || n > (bytes.len() - 8) as u64 {
        return Err(bad(format!("a header of {n} bytes in a file of {} bytes", bytes.len())));
    }
    let header_end = 8 + n as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end]).map_err(|e| bad(format!("its header is not JSON: {e}")))?;
    let data = &bytes[header_end..];
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).map_err(|e| bad(format!("__metadata__ is not text: {e}")))?;
            continue;
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: [usize; 2],
        }
        let e: Entry = serde_json::from_value(v).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        if e.dtype != "F32" {
            return Err(bad(format!("tensor '{name}' is {} (fedhcc models are F32)", e.dtype)));
        }
        let numel = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let [a, b] = e.data_offsets;
        if a > b || b > data.len() || numel.and_then(|k| k.checked_mul(4)) != Some(b - a) {
            return Err(bad(format!(
                "tensor '{name}' of shape {:?} has data offsets {a}..{b} in {} bytes of data",
                e.shape,
                data.len()
            )));
        }
        tensors.push((a, b, name, e.shape));
    }
    tensors.sort_by_key(|t| (t.0, t.1));
    let mut end = 0;
    for (a, b, name, _) in &tensors {
        if *a != end {
            return Err(bad(format!("tensor '{name}' starts at byte {a}, the previous tensor ends at {end}")));
        }
        end = *b;
    }
    if end != data.len() {
        return Err(bad(format!("the tensors cover {end} of {} bytes of data", data.len())));
    }
    let params = ParameterSet::from_tensors(
        tensors
            .into_iter()
            .map(|(a, b, name, shape)| {
                let values = data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                (name, shape, values)
            })
            .collect(),
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(SafetensorsModel { metadata, params })
}

/// Reads `path` and checks that it is a model of the site's study: the fingerprint the export
/// recorded must be the tensors' own (else the file was altered) and the study's model's.
///
/// # Errors
/// Unreadable or invalid file; a model of another study or another layout, with the reason.
pub fn read_study_model(path: &Path, study_id: &str, model: &StudyModel, seed: u64) -> Result<SafetensorsModel> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the model {}", path.display()))?;
    let file = path.display().to_string();
    let m = read_safetensors(&bytes, &file)?;
    let meta = |k: &str| m.metadata.get(k).map_or("(not recorded)", String::as_str);
    let own = m.params.fingerprint();
    let recorded = meta("fingerprint");
    if recorded != own.to_hex() {
        bail!(
            "{file}: the tensors' layout fingerprint {} differs from the one recorded at export ({}); the file was \
             altered or not written by `fedhcc export`",
            own.short(),
            &recorded[..recorded.len().min(12)]
        );
    }
    if meta("study_id") != study_id {
        bail!(
            "{file} is a model of study '{}', but this site's configuration is for study '{study_id}': validate it \
             with a site configuration whose study file is the one the model was trained under",
            meta("study_id")
        );
    }
    let expected = model.initial_params(seed)?.fingerprint();
    if own != expected {
        bail!(
            "{file} is a {} model with layout {}, but this site's study describes a {} model with layout {}: the \
             model does not fit this study file (another model kind, other [model] sizes or other [cohort] columns)",
            meta("model_kind"),
            own.short(),
            model.kind(),
            expected.short()
        );
    }
    Ok(m)
}

/// Scores the site's patients with `params` through the executor the study's model uses.
fn score(
    model: &StudyModel,
    site: &fedhcc_core::config::SiteConfig,
    backend: BackendKind,
    params: &ParameterSet,
    splits: &[&str],
) -> Result<Vec<SitePredictions>> {
    let mut e = Trainer::load(model, site, backend)?;
    splits.iter().map(|s| e.predictions(params, s)).collect()
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
    let m = read_study_model(&args.model, &study.study_id, &model, study.training.seed)?;
    let backend = backend_for(args.backend.as_ref(), &site)?;
    let groups = fedhcc_core::standardisation::groups(m.params.layout());
    let carried = groups.iter().all(|(g, _)| fedhcc_core::standardisation::read(&m.params, g).is_some());

    let external = args.split == "all";
    let wants_training = args.cutoff.is_none() && study.evaluation.cutoff.is_none() && !external;
    let splits: Vec<&str> = if wants_training { vec![args.split.as_str(), "train"] } else { vec![args.split.as_str()] };
    let mut scored = score(&model, &site, backend, &m.params, &splits)?.into_iter();
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
    files.extend(plots(&report).into_iter().map(|(name, svg)| (name, svg.into_bytes())));
    files.push(("validation.json", serde_json::to_vec_pretty(&validation)?));
    let mut json = serde_json::to_vec_pretty(&report).context("cannot encode stats.json")?;
    json.push(b'\n');
    files.push(("stats.json", json));
    crate::stats_cmd::write_atomically(&args.out, &files)?;

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
         predictions.csv holds patient-level scores: it stays at this site",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ParameterSet {
        ParameterSet::from_tensors(vec![
            ("a.weight".into(), vec![2, 2], vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE]),
            ("a.bias".into(), vec![2], vec![0.25, -0.0]),
        ])
        .unwrap()
    }

    fn exported() -> Vec<u8> {
        let meta = BTreeMap::from([("fingerprint".to_string(), model().fingerprint().to_hex())]);
        crate::export::safetensors_bytes(&model(), &meta).unwrap()
    }

    #[test]
    fn reads_back_what_export_writes_bit_for_bit() {
        let m = read_safetensors(&exported(), "m.safetensors").unwrap();
        assert_eq!(m.params, model());
        assert_eq!(m.metadata["fingerprint"], model().fingerprint().to_hex());
    }

    #[test]
    fn refuses_damaged_files_with_the_reason_and_never_panics() {
        let good = exported();
        let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(good[8..8 + hlen].to_vec()).unwrap();
        let with_header = |h: &str| {
            let mut h = h.as_bytes().to_vec();
            h.resize(hlen, b' ');
            let mut out = good[..8].to_vec();
            out.extend(h);
            out.extend(&good[8 + hlen..]);
            out
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..5].to_vec(), "shorter"),
            (good[..good.len() - 4].to_vec(), "data offsets"),
            (
                {
                    let mut b = good.clone();
                    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                "header of",
            ),
            (with_header(&header.replace("F32", "F16")), "F16"),
            (with_header(&header.replace("[2,2]", "[2,3]")), "data offsets"),
            (with_header(&header.replacen("{", "[", 1)), "not JSON"),
            ([good.clone(), vec![0; 4]].concat(), "cover"),
        ];
        for (bytes, needle) in cases {
            let e = read_safetensors(&bytes, "m.safetensors").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("m.safetensors") && e.contains(needle), "'{needle}' not in: {e}");
        }
        // Every truncation is an error, not a panic.
        for k in 0..good.len() {
            assert!(read_safetensors(&good[..k], "m").is_err(), "{k} bytes accepted");
        }
    }

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
    }
}
