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

use crate::executor::ClinicalExecutor;
use crate::mm_executor::MultimodalExecutor;
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_client::{EvalResult, Executor, TaskControl, TrainResult, TrainSpec};
use fedhcc_core::config::{SiteConfig, StudyConfig, load_site};
use fedhcc_core::params::ParameterSet;
use fedhcc_model::BackendKind;
use fedhcc_stats::federated::SitePredictions;
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

/// The executor a non-federated training runs (or a simulation scores with): the study model's own.
pub enum Trainer {
    Clinical(Box<ClinicalExecutor>),
    Multimodal(Box<MultimodalExecutor>),
}

impl Trainer {
    /// The executor `fedhcc client` would run for `model` at `site` (its data, its prepared images).
    ///
    /// # Errors
    /// Unusable site data, or a model kind without an executor.
    pub fn load(model: &StudyModel, site: &SiteConfig, backend: BackendKind) -> Result<Self> {
        Ok(match model.kind() {
            "clinical" => Trainer::Clinical(Box::new(ClinicalExecutor::load(&site.data_dir, model, backend)?)),
            "preop" | "postop" => Trainer::Multimodal(Box::new(MultimodalExecutor::load(
                &site.data_dir,
                &site.state_dir,
                model,
                backend,
            )?)),
            other => bail!("site '{}': the study's model kind '{other}' cannot be trained here", site.site_id),
        })
    }

    /// Several sites' executors as one pooled dataset (each site's rows encoded as at that site).
    ///
    /// # Errors
    /// No parts, or parts of different kinds.
    pub fn pooled(parts: Vec<Trainer>) -> Result<Self> {
        let (mut clinical, mut multimodal) = (Vec::new(), Vec::new());
        for p in parts {
            match p {
                Trainer::Clinical(e) => clinical.push(*e),
                Trainer::Multimodal(e) => multimodal.push(*e),
            }
        }
        match (clinical.is_empty(), multimodal.is_empty()) {
            (false, true) => Ok(Trainer::Clinical(Box::new(ClinicalExecutor::pooled(clinical)?))),
            (true, false) => Ok(Trainer::Multimodal(Box::new(MultimodalExecutor::pooled(multimodal)?))),
            _ => bail!("pooling needs sites of one study model"),
        }
    }

    pub fn executor(&mut self) -> &mut dyn Executor {
        match self {
            Trainer::Clinical(e) => e.as_mut(),
            Trainer::Multimodal(e) => e.as_mut(),
        }
    }

    /// The held-out test patients' ids (local use only).
    pub fn test_ids(&self) -> Vec<String> {
        match self {
            Trainer::Clinical(e) => e.test_ids(),
            Trainer::Multimodal(e) => e.test_ids(),
        }
    }

    /// The clinical model's inputs, before standardisation, of the patients [`Self::predictions`]
    /// scores for `split`, row after row in the same order (patient-level: for this machine only).
    ///
    /// # Errors
    /// Not the clinical model, or an unknown split.
    pub fn clinical_inputs(&self, split: &str) -> Result<Vec<f32>> {
        match self {
            Trainer::Clinical(e) => Ok(e.raw_inputs(split)?),
            Trainer::Multimodal(_) => bail!("the model's inputs can be written for the clinical model only"),
        }
    }

    /// `split`'s patients scored by `params` (patient-level: for this machine only).
    ///
    /// # Errors
    /// An unknown split, or a model the executor refuses.
    pub fn predictions(&mut self, params: &ParameterSet, split: &str) -> Result<SitePredictions> {
        Ok(match self {
            Trainer::Clinical(e) => e.predictions(params, split)?,
            Trainer::Multimodal(e) => e.predictions(params, split)?,
        })
    }
}

/// The compute backend: `given` (`--backend`), else the site config's, else the fastest CPU one.
///
/// # Errors
/// An unknown backend name.
pub fn backend_for(given: Option<&String>, site: &SiteConfig) -> Result<BackendKind> {
    match given.or(site.backend.as_ref()) {
        Some(b) => b.parse().map_err(|e| anyhow::anyhow!("backend: {e}")),
        None => Ok(BackendKind::default()),
    }
}

/// Several sites' configurations that share one study file and model.
pub struct StudySites {
    pub study: StudyConfig,
    pub model: StudyModel,
    /// The model before training (the study's seed).
    pub initial: ParameterSet,
    pub sites: Vec<SiteConfig>,
}

/// Reads site configurations that must name the same study (same id, same model layout).
///
/// # Errors
/// An unreadable configuration, no site, or a site of another study or model.
pub fn load_study_sites(paths: &[PathBuf]) -> Result<StudySites> {
    let mut first: Option<StudySites> = None;
    for path in paths {
        let (site, study) = load_site(path)?;
        let model = StudyModel::from_study(&study).with_context(|| format!("{}: its study", path.display()))?;
        let initial = model.initial_params(study.training.seed)?;
        match &mut first {
            None => first = Some(StudySites { study, model, initial, sites: vec![site] }),
            Some(f) => {
                if f.study.study_id != study.study_id || f.initial.fingerprint() != initial.fingerprint() {
                    bail!(
                        "{}: study '{}' with model {} differs from the first site's study '{}' with model {}; \
                         pooled sites must share one study file",
                        path.display(),
                        study.study_id,
                        initial.fingerprint().short(),
                        f.study.study_id,
                        f.initial.fingerprint().short()
                    );
                }
                if f.sites.iter().any(|s| s.site_id == site.site_id) {
                    bail!("{}: site '{}' is given twice", path.display(), site.site_id);
                }
                f.sites.push(site);
            }
        }
    }
    first.context("no site configuration given")
}

/// What the server does before round 1: the sites' feature sums pooled into the model's
/// standardisation tensors (here from the executor's own, possibly pooled, training split).
///
/// # Errors
/// Statistics the executor cannot make, or that do not fit the model.
pub fn with_pooled_statistics(exec: &mut dyn Executor, params: &mut ParameterSet) -> Result<()> {
    let sums = exec.statistics().map_err(|e| anyhow::anyhow!("feature statistics: {e}"))?;
    fedhcc_core::standardisation::write(params, &sums).context("pooled feature statistics")
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

/// `rounds` successive local trainings (`[training] local_epochs` each) from `params`, with the seeds a
/// federated run's server would send for each round and no proximal term; `each` sees every round's
/// outcome. The training `fedhcc train` and the local-only and centralised models of `fedhcc study` run.
///
/// # Errors
/// What the executor refuses, naming the round.
pub fn fit(
    exec: &mut dyn Executor,
    mut params: ParameterSet,
    t: &fedhcc_core::config::TrainingConfig,
    rounds: u32,
    mut each: impl FnMut(u32, &TrainResult),
) -> Result<ParameterSet> {
    let ctl = TaskControl::default();
    for round in 1..=rounds {
        // The seed a federated run's server would send for this round.
        let spec = TrainSpec {
            round,
            total_rounds: rounds,
            local_epochs: t.local_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            weight_decay: t.weight_decay,
            prox_mu: 0.0,
            seed: t.seed.wrapping_add(u64::from(round)),
        };
        let out = exec.train(&params, &spec, &ctl).map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
        each(round, &out);
        params = out.params;
    }
    Ok(params)
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
