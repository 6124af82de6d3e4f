//! `fedhcc stats`: every statistic of the study report for one predictions file, for anyone (a site,
//! an external validator, the study lead). Reads `score,label,time,event[,group]`, writes
//! `stats.json` and the plots (`roc.svg`, `km.svg`, `calibration.svg`, `decision_curve.svg`) into the
//! output folder. Nothing is written unless the whole input is valid, and the output appears whole:
//! a new folder is filled under a temporary name and renamed; in an existing folder every file is
//! written to a temporary name and renamed, `stats.json` last.

use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_stats::predictions::read_predictions;
use fedhcc_stats::report::{StatsOptions, evaluate, plots};
use std::fs::File;
use std::path::{Path, PathBuf};

/// `fedhcc stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// Predictions CSV: columns `score` (higher = higher risk), `label` (0/1, empty = unlabelled),
    /// `time` (days), `event` (0/1), optionally `group`; other columns are ignored.
    #[arg(long)]
    pub predictions: PathBuf,
    /// Cut-off for sensitivity, specificity, PPV, NPV and the high/low risk groups (`score >= cutoff`
    /// is high risk). Pass the cut-off chosen on the training data; without it, Youden's cut-off on
    /// these data is used and stats.json says so.
    #[arg(long)]
    pub cutoff: Option<f64>,
    /// Times (days) for the time-dependent AUC; the largest is also Uno's C truncation time.
    #[arg(long, value_delimiter = ',', default_value = "365,730,1095")]
    pub times: Vec<f64>,
    /// Output folder for stats.json and the SVG plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Bootstrap replicates for the AUC interval (0: none).
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    /// Bootstrap seed (the same seed gives the same interval).
    #[arg(long, default_value_t = 20_240_605)]
    pub seed: u64,
}

/// Runs `fedhcc stats`.
pub fn stats(args: &StatsArgs) -> Result<()> {
    if let Some(c) = args.cutoff
        && !c.is_finite()
    {
        bail!("--cutoff {c} is not a number");
    }
    if let Some(t) = args.times.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        bail!("--times: {t} is not a positive number of days");
    }
    let name = args.predictions.display().to_string();
    let file = File::open(&args.predictions).with_context(|| format!("cannot open the predictions file {name}"))?;
    let predictions = read_predictions(std::io::BufReader::new(file), &name)?;
    let options = StatsOptions {
        cutoff: args.cutoff,
        times: args.times.clone(),
        bootstrap_replicates: args.bootstrap,
        bootstrap_seed: args.seed,
        ..StatsOptions::default()
    };
    let report = evaluate(&predictions, &options);
    let mut files: Vec<(&str, Vec<u8>)> =
        plots(&report).into_iter().map(|(name, svg)| (name, svg.into_bytes())).collect();
    let mut json = serde_json::to_vec_pretty(&report).context("cannot encode stats.json")?;
    json.push(b'\n');
    files.push(("stats.json", json));
    write_atomically(&args.out, &files)?;

    println!(
        "{} patients ({} labelled, {} positive; {} events) from {name}",
        report.n, report.n_labelled, report.n_positive, report.n_events
    );
    match &report.auc {
        Some(a) => println!("AUC {:.3} (95% CI {:.3}–{:.3}, DeLong)", a.estimate, a.ci_low, a.ci_high),
        None => println!("AUC not available: {}", report.notes.get("auc").map_or("", String::as_str)),
    }
    if let (Some(c), Some(source)) = (report.cutoff, &report.cutoff_source) {
        println!(
            "cut-off {c} ({}){}",
            source,
            if source == "youden" { " — chosen on these data; pass the training cut-off with --cutoff" } else { "" }
        );
    }
    if let Some(c) = report.c_index_harrell {
        println!("Harrell's C {c:.3}");
    }
    println!("wrote {} (stats.json, roc.svg, km.svg, calibration.svg, decision_curve.svg)", args.out.display());
    Ok(())
}

/// Writes `files` into `dir` so that a reader never sees a partial set (see the module docs).
pub(crate) fn write_atomically(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("--out {} exists and is not a folder", dir.display());
        }
        // stats.json is last in `files`: once it is renamed, every plot beside it is complete.
        for (name, bytes) in files {
            let tmp = dir.join(format!(".{name}.partial"));
            crate::outdir::write_file(&tmp, bytes)?;
            std::fs::rename(&tmp, dir.join(name))
                .with_context(|| format!("cannot move {} into place", tmp.display()))?;
        }
        return Ok(());
    }
    crate::outdir::replace_folder_with(dir, "stats.json", "statistics folder", files)
}
