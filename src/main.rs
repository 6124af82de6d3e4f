//! `fedhcc`: the one binary. Thin: parses the command line, sets up logging, dispatches to the
//! libraries (`fedhcc-server`, `fedhcc-client`, `fedhcc-core`, …) through the modules below.

mod admin_cmd;
mod audit_cmd;
mod bench;
mod commands;
mod cross_center;
mod demo;
mod executor;
mod export;
mod imaging_check;
mod mm_executor;
mod model_file;
mod outdir;
mod preprocess;
mod progress;
mod report;
mod simulation;
mod site_evaluation;
mod standardise;
mod stats_cmd;
mod study;
mod train;
mod validate;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Federated learning for multi-center clinical prediction studies.
///
/// Every hospital runs `fedhcc client` next to its own data; the study lead runs `fedhcc server`.
/// Only model weight updates and aggregate statistics leave a hospital, over mutual TLS.
#[derive(Parser)]
#[command(name = "fedhcc", version, propagate_version = true)]
struct Cli {
    /// Log detail: error, warn, info, debug (or a tracing filter such as `fedhcc_server=debug`).
    /// Default: info, and warn for `bench`, `study` and `demo` (whose in-process servers and clients
    /// would drown their own output).
    #[arg(long, global = true, env = "FEDHCC_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and manage the study's certificates (CA, server, sites, study lead).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the aggregation server (study lead).
    Server {
        /// Server configuration file (see configs/server.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a site's client (hospital IT): connects out to the server and trains on local data.
    /// `fedhcc client status --config F` shows what a running client is doing.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Client {
        /// Site configuration file (see configs/site-center_a.toml).
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<ClientCommand>,
    },
    /// Show the server's state: sites, round, per-round results (needs the admin certificate).
    Status {
        /// Admin configuration file (see configs/admin.toml).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The study lead's commands to a running server (needs the admin certificate): start, pause,
    /// resume or abort the run, add or remove a site, export the current model.
    Admin(admin_cmd::AdminArgs),
    /// Run a complete two-hospital study on this machine: certificates, synthetic cohort, server
    /// and two clients as separate processes over mutual TLS, then a summary.
    Demo {
        /// Where to put everything the demo makes.
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
        /// Training rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Patients across both centers.
        #[arg(long, default_value_t = 579)]
        patients: usize,
        /// Random seed for the cohort and the model.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Aggregation strategy: fedavg, fedprox (μ = 0.01), fedadam, fedyogi, fedbn, median,
        /// trimmed_mean.
        #[arg(long, default_value = "fedavg", value_parser = parse_strategy)]
        strategy: fedhcc_core::aggregation::StrategyKind,
        /// Model: `both` (the study's preoperative model, MRI + clinical, then its postoperative
        /// model, MRI + slides + clinical, one federated run each), `preop`, `postop`, or
        /// `clinical` (logistic regression on the clinical table only; seconds). The image models
        /// also write MRI volumes and slides and preprocess them at each site: with the default
        /// `--scale small` and 579 patients expect about 6 minutes on 2 cores (most of it writing
        /// 2.6 GB of synthetic images); `--scale tiny` takes about a minute.
        #[arg(long, default_value = "both", value_parser = ["clinical", "preop", "postop", "both"])]
        model: String,
        /// Image sizes for the multimodal models: tiny, small, full.
        #[arg(long, default_value = "small")]
        scale: fedhcc_cohort::synth_images::Scale,
        /// Send the updates in the clear (over mutual TLS) instead of securely aggregated: by default
        /// the server sees only the sum of the sites' masked updates (median and trimmed_mean
        /// always run without).
        #[arg(long)]
        no_secagg: bool,
        /// Differential privacy on top of secure aggregation (demo settings: σ = 1, L2 clip 0.05,
        /// δ = 1e-5; a study sets them in `[federation.dp]`); the summary reports ε.
        #[arg(long, conflicts_with = "no_secagg")]
        dp: bool,
        /// Skip the cross-center study after each federated run (the federated model, each center
        /// left out, each center alone, all data pooled, each scored at every center).
        #[arg(long)]
        no_cross_center: bool,
    },
    /// Train the study's model without federation, with the same code a site runs: one site alone
    /// (`--mode local`) or several sites' data pooled (`--mode central`, a simulation for the
    /// centralised upper bound). Writes the model as a checkpoint and prints test AUC / C-index.
    Train(train::TrainArgs),
    /// Convert a checkpoint into a safetensors file, to use the model outside fedhcc.
    Export(export::ExportArgs),
    /// Generate a synthetic multi-center cohort in the site data layout: clinical.csv, MRI volumes
    /// with tumour masks (NIfTI) and H&E whole-slide images (JPEG-tiled pyramidal TIFF).
    Synth(commands::SynthArgs),
    /// Prepare a site's images for training: MRI tumour crops and slide patch features, for every
    /// patient, in parallel; a rerun redoes only what changed.
    Preprocess(commands::PreprocessArgs),
    /// Statistics of a set of predictions (AUC with DeLong CI, calibration, cut-off metrics, C-indices,
    /// Kaplan–Meier, log-rank, Cox, time-dependent AUC, net benefit): stats.json and SVG plots.
    Stats(stats_cmd::StatsArgs),
    /// External validation of an exported model at a site, offline: scores the site's patients
    /// (all of them, or one of its splits), writes predictions.csv (stays at the site), stats.json,
    /// validation.json and the plots.
    Validate(validate::ValidateArgs),
    /// The cross-center study (a simulation with every site's data on this machine): the federated
    /// model, leave-one-center-out federations, local-only models and the centralised model, each
    /// scored at every center's held-out patients; writes the cross-center matrices (AUC, C-index for
    /// RFS and OS) that `fedhcc report --cross-center` and the dashboard show.
    Study(cross_center::StudyArgs),
    /// The study report from a server's state folder: report.html (self-contained), report.json and CSV
    /// tables (participant flow, per-site and pooled performance with CIs, training rounds, survival).
    Report(report::ReportArgs),
    /// Check an audit log (every message a site or the server sent and received): `audit verify FILE`.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Check a site's data before anything trains.
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Show what this site's client is doing, from its status.json: joined, waiting, downloading,
    /// training (with progress), uploading, evaluating, and the last error.
    Status {
        /// Site configuration file (the one the client runs with).
        #[arg(long)]
        config: PathBuf,
        /// Print the status file's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a study CA, a server certificate, one certificate per site and an admin certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Study id (goes into every certificate).
        #[arg(long)]
        study: String,
        /// DNS name the server is reached at (also valid: localhost, 127.0.0.1, ::1).
        #[arg(long)]
        server_name: String,
        /// Site ids, comma-separated (e.g. `tongji,center_b`).
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        /// Study lead's name for the admin certificate.
        #[arg(long)]
        admin: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Issue a certificate for one more site (or admin) without touching the others.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        who: Who,
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Revoke a site's (or admin's) certificate; the server refuses it from its next connection.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        who: Who,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// A site id.
    #[arg(long)]
    site: Option<String>,
    /// A study lead's name.
    #[arg(long)]
    admin: Option<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Report patients, label flow, events, missing and out-of-range values, MRI phases and masks,
    /// slide readability, and what will be excluded and why. Prints no patient value, only ids.
    Check {
        /// Site configuration file (see configs/site-tongji.toml).
        #[arg(long)]
        site_config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Framework overhead per round: server and N sites on loopback with mutual TLS, sites
    /// return the global model plus small noise without training.
    Rounds(bench::RoundsArgs),
    /// Every aggregation strategy on the same cohort, rounds and seeds (server and clients over
    /// mutual TLS on loopback, in this process): comparison table and convergence plot.
    Strategies(bench::strategies::StrategiesArgs),
    /// One site's local training epoch of the preop/postop model at default sizes (290 synthetic
    /// patients): samples/s, epoch seconds, peak memory, achieved vs ceiling conv GFLOP/s.
    Train(bench::train::TrainArgs),
    /// Load and fault drills with real processes on loopback: 50 sites; SIGKILL of the server
    /// mid-upload and restart; SIGKILL of a client mid-upload; a client that stops reading. Each is
    /// checked (the command fails if one fails) and measured.
    Drills(bench::drills::DrillsArgs),
}

fn parse_strategy(s: &str) -> Result<fedhcc_core::aggregation::StrategyKind, String> {
    s.parse()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(match cli.command {
        Command::Bench(_) | Command::Study(_) | Command::Demo { .. } => "warn",
        _ => "info",
    }))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Certs(c) => match c {
            CertsCommand::Init { dir, study, server_name, sites, admin, days } => {
                commands::certs_init(&dir, &study, &server_name, &sites, admin.as_deref(), days)
            }
            CertsCommand::Issue { dir, who, days } => commands::certs_issue(&dir, who.site, who.admin, days),
            CertsCommand::Revoke { dir, who } => commands::certs_revoke(&dir, who.site, who.admin),
        },
        Command::Server { config } => commands::server(&config),
        Command::Client { command: Some(ClientCommand::Status { config, json }), .. } => {
            commands::client_status(&config, json)
        }
        Command::Client { config: Some(config), command: None } => commands::client(&config),
        Command::Client { config: None, command: None } => Err(anyhow::anyhow!("fedhcc client needs --config")),
        Command::Status { config, json } => commands::status(&config, json),
        Command::Admin(args) => admin_cmd::run(&args),
        Command::Demo { out, rounds, patients, seed, strategy, model, scale, no_secagg, dp, no_cross_center } => {
            let privacy = demo::DemoPrivacy { secure_aggregation: !no_secagg, dp };
            demo::run_model(&out, rounds, patients, seed, strategy, &model, scale, privacy, !no_cross_center)
        }
        Command::Train(args) => train::train(&args),
        Command::Export(args) => export::export(&args),
        Command::Synth(args) => commands::synth(&args),
        Command::Preprocess(args) => commands::preprocess(&args),
        Command::Stats(args) => stats_cmd::stats(&args),
        Command::Validate(args) => validate::validate(&args),
        Command::Study(args) => cross_center::study(&args),
        Command::Report(args) => report::report(&args),
        Command::Audit(c) => audit_cmd::run(&c),
        Command::Data(DataCommand::Check { site_config, json }) => commands::data_check(&site_config, json),
        Command::Bench(BenchCommand::Rounds(args)) => bench::rounds(&args),
        Command::Bench(BenchCommand::Strategies(args)) => bench::strategies::strategies(&args),
        Command::Bench(BenchCommand::Train(args)) => bench::train::train(&args),
        Command::Bench(BenchCommand::Drills(args)) => bench::drills::drills(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
