//! `fedhcc bench strategies`: every aggregation strategy on the same cohort, rounds and seeds.
//!
//! Each run is a real federation in this process: the server's `run` future and one client `run`
//! future per site, over mutual TLS on loopback with a fresh study CA, each site training the
//! study's model on its own `clinical.csv` with the same executor `fedhcc client` uses (FedBN's
//! local-layer keeper included). Every round is followed by an evaluation task, so the server's
//! database holds each site's held-out AUC and log-loss per round. The results go to `--out`:
//! `strategies.md` (comparison table), `strategies.json` (every number) and `convergence.svg`
//! (test AUC per round, one panel per site, one line per strategy, mean over seeds).
//!
//! Size: one benchmark: every strategy runs the same real federation on the same cohort, rounds and
//! seeds, and its comparison table is made from those runs.

use crate::dev::simulation::{SimSite, run_federation};
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_core::aggregation::StrategyKind;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::pki;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The study used when no `--config` is given: the demo's logistic model on the preoperative
/// clinical preset.
const DEFAULT_STUDY: &str = r#"study_id = "bench-strategies"
run_id = "run-1"
[federation]
rounds = 1
[training]
local_epochs = 3
batch_size = 32
learning_rate = 0.01
weight_decay = 0.0001
[model]
kind = "clinical"
hidden = []
dropout = 0.0
[cohort]
preset = "hcc_preoperative"
[cohort.outcomes]
cutoff = "2024-07-30"
horizon_days = 730
death_before_horizon = "exclude"
"#;

#[derive(Args)]
pub struct StrategiesArgs {
    /// Where the table (strategies.md, strategies.json), the plot (convergence.svg) and each run's
    /// state go.
    #[arg(long, default_value = "bench-strategies")]
    pub out: PathBuf,
    /// Training rounds per run.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Seeds, comma-separated: each gives the synthetic cohort (unless --data), the initial model
    /// and the training seed; every strategy runs with every seed.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2, 3])]
    pub seeds: Vec<u64>,
    /// Strategies to compare, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// A study file whose [model], [cohort], [training] and strategy tables are used (default: a
    /// logistic model on the preoperative clinical preset). Its rounds and strategy are replaced.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Site data: a folder with one sub-folder per site holding clinical.csv (default: a
    /// synthetic two-center cohort per seed).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// For image models: a folder with one sub-folder per site holding that site's `preprocessed/`
    /// (as `fedhcc preprocess` leaves it in the site's state folder); each run links it read-only
    /// into its fresh site state instead of preparing the images again.
    #[arg(long)]
    pub site_state: Option<PathBuf>,
    /// Patients of the synthetic cohort (both centers together).
    #[arg(long, default_value_t = 579)]
    pub patients: usize,
    /// FedProx's μ when the study's training.prox_mu is 0 (the other strategies train without it).
    #[arg(long, default_value_t = 0.01)]
    pub prox_mu: f64,
}

/// One site's held-out metrics after one round.
#[derive(Clone, Debug, Serialize)]
struct SitePoint {
    round: u32,
    samples: u64,
    auc: Option<f64>,
    loss: Option<f64>,
    /// Harrell's C of the risk score (models with a survival head only).
    c_index: Option<f64>,
}

/// One (strategy, seed) run.
#[derive(Clone, Debug, Serialize)]
struct RunResult {
    strategy: String,
    seed: u64,
    wall_s: f64,
    rounds: u32,
    bytes_per_round: f64,
    final_sha256: String,
    train_samples: BTreeMap<String, u64>,
    test: BTreeMap<String, Vec<SitePoint>>,
}

pub fn strategies(args: &StrategiesArgs) -> Result<()> {
    if args.rounds == 0 || args.rounds > 1000 {
        bail!("--rounds must be between 1 and 1000");
    }
    if args.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    let kinds: Vec<StrategyKind> = if args.strategies.is_empty() {
        StrategyKind::ALL.to_vec()
    } else {
        args.strategies
            .iter()
            .map(|s| s.parse::<StrategyKind>().map_err(|e| anyhow::anyhow!("--strategies: {e}")))
            .collect::<Result<_>>()?
    };
    let base = match &args.config {
        Some(p) => fedhcc_core::config::load_study(p)?,
        None => toml::from_str(DEFAULT_STUDY).context("the built-in bench study")?,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let t0 = Instant::now();
    let mut results = Vec::new();
    for &seed in &args.seeds {
        let seed_dir = args.out.join(format!("runs/seed-{seed}"));
        let data = match &args.data {
            Some(d) => d.clone(),
            None => {
                let d = seed_dir.join("data");
                if !d.exists() {
                    crate::commands::write_synthetic_cohort(&d, 2, args.patients, seed)?;
                }
                d
            }
        };
        let sites = site_folders(&data)?;
        let certs = seed_dir.join("certs");
        if !certs.join("ca.pem").exists() {
            pki::init(&certs, "bench-strategies", "localhost", &sites, None, 2)?;
        }
        for &kind in &kinds {
            let study = study_for(&base, kind, args.rounds, seed, args.prox_mu)?;
            let run_dir = seed_dir.join(kind.as_str());
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
            }
            let r = rt
                .block_on(run_one(&run_dir, &certs, &data, args.site_state.as_deref(), &sites, study, seed))
                .with_context(|| format!("strategy {kind}, seed {seed}"))?;
            let last: Vec<String> = r
                .test
                .iter()
                .map(|(s, pts)| {
                    format!("{s} {}", pts.last().and_then(|p| p.auc).map(|a| format!("{a:.3}")).unwrap_or("-".into()))
                })
                .collect();
            println!("{:<13} seed {seed}: {:.1} s; final test AUC {}", kind.as_str(), r.wall_s, last.join(", "));
            results.push(r);
        }
    }
    let report = Report::new(args, &kinds, &base, results);
    std::fs::write(args.out.join("strategies.json"), serde_json::to_string_pretty(&report.json())?)?;
    std::fs::write(args.out.join("strategies.md"), report.markdown())?;
    std::fs::write(args.out.join("convergence.svg"), report.svg())?;
    println!("\n{}", report.table());
    println!(
        "Whole benchmark {:.1} s. Written: {}, {}, {}",
        t0.elapsed().as_secs_f64(),
        args.out.join("strategies.md").display(),
        args.out.join("strategies.json").display(),
        args.out.join("convergence.svg").display()
    );
    Ok(())
}

/// Sub-folders of `data` that hold a `clinical.csv`, sorted.
fn site_folders(data: &Path) -> Result<Vec<String>> {
    let mut sites = Vec::new();
    for e in std::fs::read_dir(data).with_context(|| format!("reading {}", data.display()))? {
        let e = e?;
        if e.path().join("clinical.csv").is_file() {
            sites.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    sites.sort();
    if sites.is_empty() {
        bail!("{}: no sub-folder with a clinical.csv (one folder per site expected)", data.display());
    }
    for s in &sites {
        pki::validate_name("site", s).with_context(|| format!("site folder {}", data.join(s).display()))?;
    }
    Ok(sites)
}

/// The study of one run: the base study with this strategy, rounds and seed, evaluated every round.
fn study_for(base: &StudyConfig, kind: StrategyKind, rounds: u32, seed: u64, prox_mu: f64) -> Result<StudyConfig> {
    let mut s = base.clone();
    s.study_id = "bench-strategies".into();
    s.run_id = "run-1".into();
    let f = &mut s.federation;
    f.rounds = rounds;
    f.round_timeout_s = 300;
    f.evaluate_every = 1;
    f.strategy = kind.as_str().into();
    f.secure_aggregation = false;
    if !kind.uses_server_optimizer() {
        f.server_optimizer = None;
    }
    if kind != StrategyKind::TrimmedMean {
        f.trimmed_mean = None;
    }
    if kind != StrategyKind::FedBn {
        f.fedbn = None;
    }
    s.training.seed = seed;
    s.training.prox_mu = match kind {
        StrategyKind::FedProx if base.training.prox_mu > 0.0 => base.training.prox_mu,
        StrategyKind::FedProx => prox_mu,
        _ => 0.0,
    };
    fedhcc_core::aggregation::check_strategy(&s).map_err(|e| anyhow::anyhow!(e))?;
    Ok(s)
}

async fn run_one(
    dir: &Path,
    certs: &Path,
    data: &Path,
    site_state: Option<&Path>,
    sites: &[String],
    mut study: StudyConfig,
    seed: u64,
) -> Result<RunResult> {
    study.federation.min_sites = sites.len();
    let kind = study.federation.strategy.clone();
    let sim_sites: Vec<SimSite> = sites
        .iter()
        .map(|s| SimSite {
            id: s.clone(),
            data_dir: data.join(s),
            prepared: site_state.map(|p| p.join(s).join(crate::preprocess::FOLDER)),
        })
        .collect();
    let sim = run_federation(dir, certs, &sim_sites, &study, seed).await.with_context(|| kind.clone())?;
    let store = fedhcc_server::store::Store::open(&sim.server_state, &study.run_id)?;
    let recs = store.rounds()?;
    let bytes_per_round =
        recs.iter().map(|r| (r.bytes_in + r.bytes_out) as f64).sum::<f64>() / recs.len().max(1) as f64;
    let mut test: BTreeMap<String, Vec<SitePoint>> = BTreeMap::new();
    for e in store.evaluations()? {
        let get = |k: &str| e.metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        test.entry(e.site.clone()).or_default().push(SitePoint {
            round: e.round,
            samples: e.samples,
            auc: get("auc"),
            loss: get("loss"),
            c_index: get("c_index"),
        });
    }
    for pts in test.values_mut() {
        pts.sort_by_key(|p| p.round);
    }
    Ok(RunResult {
        strategy: kind,
        seed,
        wall_s: sim.wall_s,
        rounds: recs.len() as u32,
        bytes_per_round,
        final_sha256: sim.outcome.final_sha256,
        train_samples: sim.train_samples,
        test,
    })
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let sd =
        if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt() } else { 0.0 };
    Some((m, sd))
}

fn fmt_ms(v: Option<(f64, f64)>) -> String {
    match v {
        Some((m, sd)) => format!("{m:.3} ± {sd:.3}"),
        None => "n/a".into(),
    }
}

/// The results of every run and what is derived from them.
struct Report {
    rounds: u32,
    seeds: Vec<u64>,
    kinds: Vec<StrategyKind>,
    sites: Vec<String>,
    cohort: String,
    model: String,
    prox_mu: f64,
    runs: Vec<RunResult>,
}

impl Report {
    fn new(args: &StrategiesArgs, kinds: &[StrategyKind], base: &StudyConfig, runs: Vec<RunResult>) -> Self {
        let mut sites: Vec<String> = runs.iter().flat_map(|r| r.test.keys().cloned()).collect();
        sites.sort();
        sites.dedup();
        let cohort = match &args.data {
            Some(d) => format!("the site data in {}", d.display()),
            None => format!("the synthetic two-center cohort ({} patients, one cohort per seed)", args.patients),
        };
        let model = match &args.config {
            Some(p) => format!("the model and training of {}", p.display()),
            None => "logistic regression on the preoperative clinical preset (3 local epochs, AdamW lr 0.01)".into(),
        };
        let prox_mu = if base.training.prox_mu > 0.0 { base.training.prox_mu } else { args.prox_mu };
        Self {
            rounds: args.rounds,
            seeds: args.seeds.clone(),
            kinds: kinds.to_vec(),
            sites,
            cohort,
            model,
            prox_mu,
            runs,
        }
    }

    fn runs_of(&self, kind: StrategyKind) -> impl Iterator<Item = &RunResult> {
        self.runs.iter().filter(move |r| r.strategy == kind.as_str())
    }

    /// Final-round metric of `site` across seeds.
    fn final_metric(&self, kind: StrategyKind, site: &str, f: impl Fn(&SitePoint) -> Option<f64>) -> Vec<f64> {
        self.runs_of(kind).filter_map(|r| r.test.get(site).and_then(|p| p.last()).and_then(&f)).collect()
    }

    /// Mean over seeds of `site`'s test AUC after each round (`None` where no seed has one).
    fn curve(&self, kind: StrategyKind, site: &str) -> Vec<(u32, f64)> {
        (1..=self.rounds)
            .filter_map(|round| {
                let v: Vec<f64> = self
                    .runs_of(kind)
                    .filter_map(|r| r.test.get(site)?.iter().find(|p| p.round == round)?.auc)
                    .collect();
                mean_sd(&v).map(|(m, _)| (round, m))
            })
            .collect()
    }

    /// Whether every seed's final model is bit-identical to FedAvg's.
    fn same_as_fedavg(&self, kind: StrategyKind) -> bool {
        kind != StrategyKind::FedAvg
            && self.runs_of(kind).count() > 0
            && self.runs_of(kind).all(|r| {
                self.runs_of(StrategyKind::FedAvg).any(|a| a.seed == r.seed && a.final_sha256 == r.final_sha256)
            })
    }

    fn table(&self) -> String {
        let mut head = String::from("| strategy |");
        let mut rule = String::from("|---|");
        for s in &self.sites {
            let _ = write!(head, " {s} test AUC |");
            rule.push_str("---|");
        }
        head.push_str(" mean test AUC | mean test log-loss |");
        rule.push_str("---|---|");
        let with_c = self.runs.iter().any(|r| r.test.values().flatten().any(|p| p.c_index.is_some()));
        if with_c {
            head.push_str(" mean test C-index |");
            rule.push_str("---|");
        }
        head.push_str(" s per run | kB per round |");
        rule.push_str("---|---|");
        let mut out = format!("{head}\n{rule}\n");
        for &k in &self.kinds {
            let mut row = format!("| {}{} |", k.as_str(), if self.same_as_fedavg(k) { " ¹" } else { "" });
            let mut site_means = Vec::new();
            for s in &self.sites {
                let v = self.final_metric(k, s, |p| p.auc);
                let ms = mean_sd(&v);
                if let Some((m, _)) = ms {
                    site_means.push(m);
                }
                let _ = write!(row, " {} |", fmt_ms(ms));
            }
            // Per seed, the mean over sites; then mean ± sd over seeds.
            let per_seed = |f: &dyn Fn(&SitePoint) -> Option<f64>| -> Vec<f64> {
                self.runs_of(k)
                    .filter_map(|r| {
                        let v: Vec<f64> = r.test.values().filter_map(|p| p.last().and_then(f)).collect();
                        mean_sd(&v).map(|(m, _)| m)
                    })
                    .collect()
            };
            let auc = per_seed(&|p: &SitePoint| p.auc);
            let loss = per_seed(&|p: &SitePoint| p.loss);
            let c_index = per_seed(&|p: &SitePoint| p.c_index);
            let wall: Vec<f64> = self.runs_of(k).map(|r| r.wall_s).collect();
            let kb: Vec<f64> = self.runs_of(k).map(|r| r.bytes_per_round / 1e3).collect();
            let _ = write!(row, " {} | {} |", fmt_ms(mean_sd(&auc)), fmt_ms(mean_sd(&loss)));
            if with_c {
                let _ = write!(row, " {} |", fmt_ms(mean_sd(&c_index)));
            }
            let _ = writeln!(
                row,
                " {:.1} | {:.1} |",
                mean_sd(&wall).map(|x| x.0).unwrap_or(f64::NAN),
                mean_sd(&kb).map(|x| x.0).unwrap_or(f64::NAN)
            );
            out.push_str(&row);
        }
        out
    }

    fn markdown(&self) -> String {
        let mut md = String::from("# Aggregation strategies compared\n\n");
        let _ = writeln!(
            md,
            "{} rounds, seeds {:?}, on {}; model: {}. Each run is a real federation in one process (server and \
             one client per site over mutual TLS on loopback); every round is followed by an evaluation of the \
             global model on each site's held-out test split. Values are mean ± sd over seeds of the AUC and \
             log-loss (and C-index, for models with a survival head) after the last round. FedProx uses \
             μ = {}; the other strategies train without a proximal term. Server optimizers use the study's \
             [federation.server_optimizer] or the defaults (η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 0.001).\n",
            self.rounds, self.seeds, self.cohort, self.model, self.prox_mu
        );
        md.push_str(&self.table());
        if self.kinds.iter().any(|&k| self.same_as_fedavg(k)) {
            md.push_str(
                "\n¹ Final model bit-identical to FedAvg's for every seed (FedBN on a model without normalisation \
                 layers keeps nothing local).\n",
            );
        }
        if self.sites.len() <= 2 {
            md.push_str(
                "\nWith two sites the coordinate-wise median is the mean of the two updates and the trimmed mean \
                 trims nothing: both are the unweighted mean of the updates.\n",
            );
        }
        let n: Vec<String> = self
            .sites
            .iter()
            .map(|s| {
                let train = self.runs.first().and_then(|r| r.train_samples.get(s)).copied().unwrap_or(0);
                let test = self.runs.first().and_then(|r| r.test.get(s)?.last().map(|p| p.samples)).unwrap_or(0);
                format!("{s}: {train} training, {test} test patients")
            })
            .collect();
        let _ = writeln!(md, "\nFirst seed's labelled patients: {}.", n.join("; "));
        md.push_str("\nConvergence: `convergence.svg` (test AUC per round, per site, mean over seeds).\n");
        md
    }

    fn json(&self) -> serde_json::Value {
        let summary: Vec<serde_json::Value> = self
            .kinds
            .iter()
            .map(|&k| {
                let sites: serde_json::Map<String, serde_json::Value> = self
                    .sites
                    .iter()
                    .map(|s| {
                        let auc = mean_sd(&self.final_metric(k, s, |p| p.auc));
                        let loss = mean_sd(&self.final_metric(k, s, |p| p.loss));
                        let c = mean_sd(&self.final_metric(k, s, |p| p.c_index));
                        (
                            s.clone(),
                            serde_json::json!({
                                "final_auc_mean": auc.map(|x| x.0), "final_auc_sd": auc.map(|x| x.1),
                                "final_loss_mean": loss.map(|x| x.0), "final_loss_sd": loss.map(|x| x.1),
                                "final_c_index_mean": c.map(|x| x.0), "final_c_index_sd": c.map(|x| x.1),
                                "auc_per_round_mean": self.curve(k, s),
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "strategy": k.as_str(),
                    "bit_identical_to_fedavg": self.same_as_fedavg(k),
                    "sites": sites,
                })
            })
            .collect();
        serde_json::json!({
            "rounds": self.rounds, "seeds": self.seeds, "cohort": self.cohort, "model": self.model,
            "fedprox_mu": self.prox_mu, "summary": summary, "runs": self.runs,
        })
    }

    /// One panel per site: test AUC (mean over seeds) against the round, one line per strategy.
    fn svg(&self) -> String {
        const COLORS: [&str; 7] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
        let (pw, ph, left, top, gap) = (420.0, 300.0, 60.0, 50.0, 70.0);
        let n = self.sites.len().max(1) as f64;
        let width = left + n * pw + (n - 1.0) * gap + 30.0;
        let legend_rows = self.kinds.len().div_ceil(4) as f64;
        let height = top + ph + 60.0 + legend_rows * 22.0;
        let curves: Vec<Vec<Vec<(u32, f64)>>> =
            self.sites.iter().map(|s| self.kinds.iter().map(|&k| self.curve(k, s)).collect()).collect();
        // A strategy whose curves repeat an earlier one's (FedBN without local layers, median and
        // trimmed mean with two sites) is drawn dashed, so that both stay visible.
        let dashed: Vec<bool> =
            (0..self.kinds.len()).map(|k| (0..k).any(|j| curves.iter().all(|panel| panel[j] == panel[k]))).collect();
        let dash_attr = |k: usize| if dashed[k] { " stroke-dasharray=\"7,5\"" } else { "" };
        let all: Vec<f64> = curves.iter().flatten().flatten().map(|p| p.1).collect();
        let (mut lo, mut hi) =
            (all.iter().copied().fold(f64::INFINITY, f64::min), all.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        if !lo.is_finite() || !hi.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.1).max(0.01);
        lo = ((lo - pad) * 20.0).floor() / 20.0;
        hi = ((hi + pad) * 20.0).ceil() / 20.0;
        lo = lo.max(0.0);
        hi = hi.min(1.0).max(lo + 0.05);
        let rounds = self.rounds.max(1) as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
             viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"22\" font-size=\"15\">Test AUC per round (mean over seeds {:?})</text>\n",
            self.seeds
        );
        for (si, site) in self.sites.iter().enumerate() {
            let x0 = left + si as f64 * (pw + gap);
            let xs = |r: f64| x0 + if rounds > 1.0 { (r - 1.0) / (rounds - 1.0) * pw } else { pw / 2.0 };
            let ys = |v: f64| top + (hi - v) / (hi - lo) * ph;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n\
                 <rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" \
                 stroke=\"#444\"/>",
                x0 + pw / 2.0,
                top - 8.0,
                xml_escape(site)
            );
            let steps = ((hi - lo) / 0.05).round().max(1.0) as usize;
            let every = steps.div_ceil(8).max(1);
            for t in (0..=steps).step_by(every) {
                let v = lo + t as f64 * 0.05;
                let y = ys(v);
                let _ = writeln!(
                    svg,
                    "<line x1=\"{x0:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
                    x0 + pw,
                    x0 - 6.0,
                    y + 4.0
                );
            }
            let xevery = (self.rounds as usize).div_ceil(10).max(1);
            for r in (1..=self.rounds as usize).step_by(xevery) {
                let x = xs(r as f64);
                let _ = writeln!(
                    svg,
                    "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#444\"/>\
                     <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{r}</text>",
                    top + ph,
                    top + ph + 5.0,
                    top + ph + 18.0
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">round</text>\n\
                 <text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">test AUC</text>",
                x0 + pw / 2.0,
                top + ph + 34.0,
                x0 - 44.0,
                top + ph / 2.0
            );
            for (ki, pts) in curves[si].iter().enumerate() {
                if pts.is_empty() {
                    continue;
                }
                let path: Vec<String> =
                    pts.iter().map(|&(r, v)| format!("{:.1},{:.1}", xs(f64::from(r)), ys(v))).collect();
                let _ = writeln!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{} points=\"{}\"/>",
                    COLORS[ki % COLORS.len()],
                    dash_attr(ki),
                    path.join(" ")
                );
            }
        }
        for (ki, k) in self.kinds.iter().enumerate() {
            let x = left + (ki % 4) as f64 * 170.0;
            let y = top + ph + 56.0 + (ki / 4) as f64 * 22.0;
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"3\"{}/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}{}</text>",
                x + 28.0,
                COLORS[ki % COLORS.len()],
                dash_attr(ki),
                x + 34.0,
                y + 4.0,
                k.as_str(),
                if self.same_as_fedavg(*k) { " (= fedavg)" } else { "" }
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(strategy: &str, seed: u64, aucs: &[f64], sha: &str) -> RunResult {
        let pts: Vec<SitePoint> = aucs
            .iter()
            .enumerate()
            .map(|(i, &a)| SitePoint {
                round: i as u32 + 1,
                samples: 50,
                auc: Some(a),
                loss: Some(1.0 - a),
                c_index: (strategy == "median").then_some(0.5),
            })
            .collect();
        RunResult {
            strategy: strategy.into(),
            seed,
            wall_s: 2.0,
            rounds: aucs.len() as u32,
            bytes_per_round: 4000.0,
            final_sha256: sha.into(),
            train_samples: [("a".to_string(), 100)].into(),
            test: [("a".to_string(), pts)].into(),
        }
    }

    #[test]
    fn report_summarises_seeds_marks_identical_models_and_draws_every_strategy() {
        let args = StrategiesArgs {
            out: "x".into(),
            rounds: 2,
            seeds: vec![1, 2],
            strategies: vec![],
            config: None,
            data: None,
            site_state: None,
            patients: 100,
            prox_mu: 0.01,
        };
        let base: StudyConfig = toml::from_str(DEFAULT_STUDY).unwrap();
        let kinds = [StrategyKind::FedAvg, StrategyKind::FedBn, StrategyKind::Median];
        let runs = vec![
            run("fedavg", 1, &[0.6, 0.7], "s1"),
            run("fedavg", 2, &[0.6, 0.8], "s2"),
            run("fedbn", 1, &[0.6, 0.7], "s1"),
            run("fedbn", 2, &[0.6, 0.8], "s2"),
            run("median", 1, &[0.5, 0.6], "m1"),
            run("median", 2, &[0.5, 0.6], "s2"),
        ];
        let r = Report::new(&args, &kinds, &base, runs);
        assert!(r.same_as_fedavg(StrategyKind::FedBn));
        assert!(!r.same_as_fedavg(StrategyKind::Median), "identical for one seed only");
        assert_eq!(r.curve(StrategyKind::FedAvg, "a"), vec![(1, 0.6), (2, 0.75)]);
        let t = r.table();
        // Final AUC over seeds: 0.7 and 0.8 → 0.750 ± 0.071.
        // A C-index column appears when some run reports one ("n/a" for the others).
        assert!(t.contains("| fedavg | 0.750 ± 0.071 | 0.750 ± 0.071 | 0.250 ± 0.071 | n/a | 2.0 | 4.0 |"), "{t}");
        assert!(t.contains("| median | 0.600 ± 0.000 | 0.600 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 |"), "{t}");
        assert!(t.contains("| fedbn ¹ |"), "{t}");
        let svg = r.svg();
        assert_eq!(svg.matches("<polyline").count(), 3);
        // fedbn repeats fedavg's curve: dashed in the panel and in the legend.
        assert_eq!(svg.matches("stroke-dasharray").count(), 2, "{svg}");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(r.markdown().contains("bit-identical to FedAvg"));
        let j = r.json();
        assert_eq!(j["summary"][0]["sites"]["a"]["final_auc_mean"], 0.75);
    }

    #[test]
    fn study_for_sets_the_strategy_and_proximal_term() {
        let base: StudyConfig = toml::from_str(DEFAULT_STUDY).unwrap();
        let s = study_for(&base, StrategyKind::FedProx, 4, 9, 0.05).unwrap();
        assert_eq!((s.federation.rounds, s.federation.evaluate_every, s.training.seed), (4, 1, 9));
        assert_eq!(s.training.prox_mu, 0.05);
        let s = study_for(&base, StrategyKind::FedYogi, 4, 9, 0.05).unwrap();
        assert_eq!((s.federation.strategy.as_str(), s.training.prox_mu), ("fedyogi", 0.0));
    }
}
