//! `fedhcc`: the one binary. Thin: parses the command line, sets up logging, dispatches to the
//! libraries (`fedhcc-server`, `fedhcc-client`, `fedhcc-core`, …) through the modules below.

mod commands;
mod dev;
mod lead;
mod outdir;
mod site;

use dev::{bench, demo};
use lead::{admin_cmd, audit_cmd, cross_center, export, report, stats_cmd, validate};
use site::train;

// The site's library code, under the names the command modules use.
use fedhcc_site::{executor, imaging_check, mm_executor, preprocess, progress, study};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The command ran to the end but found what stops training (`fedhcc data check`: an `error` finding).
/// The exit codes of every command are in docs/site-operator.md, "Exit codes".
pub const EXIT_DATA_ERRORS: u8 = 3;
/// The command line, or the environment it reads (`FEDHCC_LOG`, `RUST_LOG`), is not valid; clap uses it too.
pub const EXIT_USAGE: u8 = 2;

/// Federated learning for multi-center clinical prediction studies.
///
/// Every hospital runs `fedhcc client` next to its own data; the study lead runs `fedhcc server`.
/// Only model weight updates and aggregate statistics leave a hospital, over mutual TLS.
#[derive(Parser)]
#[command(name = "fedhcc", version, propagate_version = true)]
struct Cli {
    /// Log detail: error, warn, info, debug, trace or off, or a tracing filter such as
    /// `warn,fedhcc_server=debug`. Read from this flag, else FEDHCC_LOG, else RUST_LOG; default: info,
    /// and warn for `bench`, `study` and `demo` (whose in-process servers and clients would drown their
    /// own output). A filter that does not parse is refused (exit code 2).
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
    /// Create a study CA, a server certificate, and optionally site and admin certificates. The
    /// site certificates made here come with their private keys, made on this machine: that suits
    /// a demo or a test. For a real hospital, let the site make its own key (`fedhcc certs request`
    /// at the site, `fedhcc certs sign` here), so that whoever runs the server cannot act as a site.
    Init {
        /// Folder to write the CA, the certificates, their private keys (owner-only) and the
        /// revocation list into; created if missing. Keep it on the study lead's machine: the CA key
        /// in it signs every certificate of the study.
        #[arg(long)]
        dir: PathBuf,
        /// Study id (goes into every certificate).
        #[arg(long)]
        study: String,
        /// DNS name the server is reached at (also valid: localhost, 127.0.0.1, ::1).
        #[arg(long)]
        server_name: String,
        /// Site ids, comma-separated (e.g. `tongji,center_b`), whose keys and certificates are made
        /// here (demos and tests). Leave out for real sites: they request theirs.
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// Study lead's name for the admin certificate.
        #[arg(long)]
        admin: Option<String>,
        /// How many days the server, site and admin certificates are valid (the CA gets this plus a
        /// year). A program whose certificate expires within 14 days warns at start.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// At the site: make this site's private key (owner-only, it never leaves this folder) and a
    /// certificate signing request, `DIR/ID.csr.pem`, to send to the study lead.
    Request {
        #[command(flatten)]
        who: Who,
        /// Folder for the key (`ID.key.pem`) and the request (`ID.csr.pem`); created if missing.
        #[arg(long)]
        out: PathBuf,
    },
    /// At the study lead: sign a site's (or admin's) certificate signing request with the study CA.
    /// The name and role come from the request and follow the same rules as `certs issue`.
    Sign {
        /// The study's certificate folder made by `fedhcc certs init` (its CA signs the request).
        #[arg(long)]
        dir: PathBuf,
        /// The request the site sent (`ID.csr.pem`).
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the signed certificate, to send back to the site with `ca.pem`.
        #[arg(long)]
        out: PathBuf,
        /// How many days the certificate is valid.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Issue a certificate for one more site (or admin) without touching the others. Its private
    /// key is made here, on the study lead's machine; for a real site prefer `certs request` and
    /// `certs sign`.
    Issue {
        /// The study's certificate folder made by `fedhcc certs init` (its CA signs the new
        /// certificate).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        who: Who,
        /// How many days the new certificate is valid.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Revoke a site's (or admin's) certificate; the server refuses it from its next connection.
    Revoke {
        /// The study's certificate folder made by `fedhcc certs init` (its revocation list,
        /// `crl.pem`, is rewritten; copy it to the server).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        who: Who,
    },
}

impl From<Who> for commands::Who {
    fn from(w: Who) -> Self {
        Self { site: w.site, admin: w.admin, server: w.server }
    }
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
    /// The server's name (`certs revoke` and `certs issue` only: a new server certificate after a
    /// server key was exposed).
    #[arg(long)]
    server: Option<String>,
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

/// Where the log filter came from, for an error message that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogSource {
    Flag,
    FedhccLog,
    RustLog,
    Default,
}

impl LogSource {
    fn name(self) -> &'static str {
        match self {
            LogSource::Flag => "--log",
            LogSource::FedhccLog => "FEDHCC_LOG",
            LogSource::RustLog => "RUST_LOG",
            LogSource::Default => "the default log filter",
        }
    }
}

/// The log filter to use: `--log`, else `FEDHCC_LOG` (both as clap read them: `log`, `source`), else
/// `RUST_LOG`, else `default`. Empty values count as unset.
fn log_filter_text(
    log: Option<&str>,
    source: Option<clap::parser::ValueSource>,
    rust_log: Option<&str>,
    default: &str,
) -> (String, LogSource) {
    let set = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    if let Some(v) = set(log) {
        let from =
            if source == Some(clap::parser::ValueSource::EnvVariable) { LogSource::FedhccLog } else { LogSource::Flag };
        return (v, from);
    }
    match set(rust_log) {
        Some(v) => (v, LogSource::RustLog),
        None => (default.to_owned(), LogSource::Default),
    }
}

/// Parses a log filter. Stricter than `EnvFilter` alone: a bare word must be a level, because
/// `EnvFilter` reads `--log verbose` (or `warning`) as "everything of a target named verbose", which
/// silently logs nothing; a target is written `target=level`.
fn parse_log_filter(text: &str, from: LogSource) -> Result<tracing_subscriber::EnvFilter, String> {
    let levels = "error, warn, info, debug, trace, off";
    let is_level = |l: &str| l.parse::<tracing_subscriber::filter::LevelFilter>().is_ok();
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            // `target[span{field=value}]` (no level of its own) is left to the parser.
            Some((_, level)) if level.contains(['}', ']']) => continue,
            Some((_, level)) => level,
            None => directive,
        };
        if !is_level(level) {
            return Err(format!(
                "{} = '{text}': '{level}' is not a log level ({levels}); to set a target's level write \
                 target=level, e.g. fedhcc_server=debug",
                from.name()
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| format!("{} = '{text}' is not a log filter: {e} (levels: {levels}; or target=level)", from.name()))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let log_source = matches.value_source("log");
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let default_log = match cli.command {
        Command::Bench(_) | Command::Study(_) | Command::Demo { .. } => "warn",
        _ => "info",
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    let (text, from) = log_filter_text(cli.log.as_deref(), log_source, rust_log.as_deref(), default_log);
    let filter = match parse_log_filter(&text, from) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
            CertsCommand::Issue { dir, who, days } => commands::certs_issue(&dir, who.into(), days),
            CertsCommand::Request { who, out } => commands::certs_request(&out, who.into()),
            CertsCommand::Sign { dir, csr, out, days } => commands::certs_sign(&dir, &csr, &out, days),
            CertsCommand::Revoke { dir, who } => commands::certs_revoke(&dir, who.into()),
        },
        Command::Server { config } => commands::server(&config),
        Command::Client { command: Some(ClientCommand::Status { config, json }), .. } => {
            commands::client_status(&config, json)
        }
        Command::Client { config: Some(config), command: None } => commands::client(&config),
        Command::Client { config: None, command: None } => Err(anyhow::anyhow!("fedhcc client needs --config")),
        Command::Status { config, json } => lead::status::status(&config, json),
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<commands::DataErrorsFound>() {
            Some(found) => {
                eprintln!("{found}");
                ExitCode::from(EXIT_DATA_ERRORS)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::parser::ValueSource;

    #[test]
    fn the_log_filter_comes_from_the_flag_then_fedhcc_log_then_rust_log() {
        let cmd = Some(ValueSource::CommandLine);
        let env = Some(ValueSource::EnvVariable);
        assert_eq!(log_filter_text(Some("debug"), cmd, Some("trace"), "info"), ("debug".into(), LogSource::Flag));
        assert_eq!(log_filter_text(Some("warn"), env, Some("trace"), "info"), ("warn".into(), LogSource::FedhccLog));
        assert_eq!(log_filter_text(None, None, Some("trace"), "info"), ("trace".into(), LogSource::RustLog));
        assert_eq!(log_filter_text(Some(" "), env, Some(""), "warn"), ("warn".into(), LogSource::Default));
    }

    #[test]
    fn a_bad_log_filter_is_refused_naming_its_source_and_value() {
        for good in ["info", "WARN", "off", "warn,fedhcc_server=debug", "fedhcc_client=trace"] {
            assert!(parse_log_filter(good, LogSource::Flag).is_ok(), "{good}");
        }
        for (bad, from) in
            [("verbose", LogSource::Flag), ("warning", LogSource::RustLog), ("x=loud", LogSource::FedhccLog)]
        {
            let e = parse_log_filter(bad, from).unwrap_err();
            assert!(e.contains(from.name()) && e.contains(bad), "{e}");
        }
    }
}
