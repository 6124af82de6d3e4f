//! `fedhcc train`: the study's model trained without federation, through the same executor code a
//! site runs for a federated train task.
//!
//! - `--mode local`: one site alone, on its own data (the "local-only" baseline of the report).
//! - `--mode central`: a simulation that pools several sites' prepared data into one dataset (the
//!   "centralised" upper bound). Each site's rows are encoded and standardised with that site's
//!   own statistics, exactly as in the federated run, then concatenated.
//!
//! The inputs are standardised with the sites' pooled statistics (sums and counts merged exactly
//! as the server merges them before round 1), written into the model like a federated run does.
//!
//! Both run the study's `[federation] rounds` (or `--rounds`) successive local trainings of
//! `[training] local_epochs` each, with the seeds a federated run would use, write the trained
//! model as a checkpoint (the server's `.fhcp` payload format, which `fedhcc export` reads) and
//! print the aggregate metrics on the held-out test split.

use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_client::{EvalResult, TaskControl};
use fedhcc_core::params::ParameterSet;
use fedhcc_site::train::{StudySites, Trainer, backend_for, fit, load_study_sites, with_pooled_statistics};
use std::path::PathBuf;
use std::time::Instant;

/// `fedhcc train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Site configuration file; give it once per site with `--mode central`.
    #[arg(long = "site-config", required = true)]
    pub site_config: Vec<PathBuf>,
    /// `local`: one site alone; `central`: every given site's data pooled (a simulation).
    #[arg(long, default_value = "local", value_parser = ["local", "central"])]
    pub mode: String,
    /// Where to write the trained model (a `.fhcp` checkpoint; `fedhcc export` converts it).
    #[arg(long)]
    pub out: PathBuf,
    /// Successive local trainings of `[training] local_epochs` each (default: the study's
    /// `[federation] rounds`, so the model sees as many epochs as in the federated run).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Compute backend (default: the site config's `backend`, else the fastest CPU backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// Start from this checkpoint (a `.fhcp` of the same study model, for instance a federated
    /// run's final model) instead of a fresh model; with `--rounds 0` it is only evaluated, on the
    /// same held-out patients as a model trained here.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Also write the held-out test patients' ids, one per line, to this file (to compare with a
    /// reference on the same patients, e.g. `scripts/best_auc.py --ids`). Ids only, no values.
    #[arg(long)]
    pub test_ids: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn metrics_json(m: &[(String, f64)]) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), serde_json::json!(v))).collect(),
    )
}

fn get(r: &EvalResult, k: &str) -> String {
    let digits = if k == "n_positive" { 0 } else { 3 };
    r.metrics.iter().find(|(n, _)| n == k).map_or_else(|| "n/a".into(), |(_, v)| format!("{v:.digits$}"))
}

pub fn train(args: &TrainArgs) -> Result<()> {
    if args.mode == "local" && args.site_config.len() != 1 {
        bail!("--mode local trains one site alone: give exactly one --site-config (or use --mode central)");
    }
    let t0 = Instant::now();
    let StudySites { study, model, initial: mut params, sites } = load_study_sites(&args.site_config)?;
    let parts = sites
        .iter()
        .map(|site| Trainer::load(&model, site, backend_for(args.backend.as_ref(), site)?))
        .collect::<Result<Vec<_>>>()?;
    let mut trainer = Trainer::pooled(parts)?;
    let sites: Vec<String> = sites.into_iter().map(|s| s.site_id).collect();
    if let Some(path) = &args.test_ids {
        fedhcc_core::pki::write_atomic(path, trainer.test_ids().join("\n").as_bytes(), false)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let exec = trainer.executor();
    let rounds = args.rounds.unwrap_or(study.federation.rounds);
    if rounds == 0 && args.init.is_none() {
        bail!("--rounds must be at least 1 (0 only evaluates a model given with --init)");
    }
    match &args.init {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let given =
                ParameterSet::decode(&bytes).with_context(|| format!("{}: not a fedhcc checkpoint", path.display()))?;
            if given.fingerprint() != params.fingerprint() {
                bail!(
                    "{}: model {} is not this study's model {}",
                    path.display(),
                    given.fingerprint().short(),
                    params.fingerprint().short()
                );
            }
            params = given;
        }
        None => with_pooled_statistics(exec, &mut params)?,
    }
    let ctl = TaskControl::default();
    let mut history = Vec::new();
    params = fit(exec, params, &study.training, rounds, |round, out| {
        if !args.json {
            let shown: Vec<String> = out.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!("round {round}/{rounds}: {} training patients; {}", out.num_samples, shown.join(", "));
        }
        history.push(metrics_json(&out.metrics));
    })?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fedhcc_core::pki::write_atomic(&args.out, &params.encode(), false)
        .with_context(|| format!("writing the model to {}", args.out.display()))?;
    let test =
        exec.evaluate(&params, "test", &ctl).map_err(|e| anyhow::anyhow!("evaluating on the test split: {e}"))?;
    let val = exec.evaluate(&params, "val", &ctl).ok();
    let seconds = t0.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "mode": args.mode, "model": model.kind(), "sites": sites, "rounds": rounds,
            "train_samples": exec.num_samples(), "fingerprint": params.fingerprint().to_hex(),
            "checkpoint": args.out, "seconds": seconds, "history": history,
            "test": { "n": test.num_samples, "metrics": metrics_json(&test.metrics) },
            "val": val.as_ref().map(|v| serde_json::json!({ "n": v.num_samples, "metrics": metrics_json(&v.metrics) })),
        });
        println!("{v}");
    } else {
        println!(
            "Trained the {} model ({} mode, {}) in {seconds:.1} s; model written to {} (fingerprint {}).",
            model.kind(),
            args.mode,
            sites.join(", "),
            args.out.display(),
            params.fingerprint().short()
        );
        println!(
            "Test split: n = {}, positives = {}, AUC = {}, C-index = {}, loss = {}",
            test.num_samples,
            get(&test, "n_positive"),
            get(&test, "auc"),
            get(&test, "c_index"),
            get(&test, "loss")
        );
    }
    Ok(())
}
