//! `fedhcc`: the one binary. Thin: parses the command line, sets up logging, dispatches to the
//! libraries (`fedhcc-server`, `fedhcc-client`, `fedhcc-core`, …) through the modules below.

mod bench;
mod commands;
mod demo;
mod executor;
mod study;

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
    #[arg(long, global = true, default_value = "info", env = "FEDHCC_LOG")]
    log: String,
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
    Client {
        /// Site configuration file (see configs/site-center_a.toml).
        #[arg(long)]
        config: PathBuf,
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
    },
    /// Generate a synthetic multi-center cohort (clinical tables) in the site data layout.
    Synth(commands::SynthArgs),
    /// Check a site's data before anything trains.
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
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
    /// Report patients, label flow, events, missing and out-of-range values, and exclusions.
    Check {
        #[arg(long)]
        site_config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Framework overhead per round: server and N sites on loopback with mutual TLS, sites
    /// return the global model plus small noise without training.
    Rounds(bench::RoundsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Certs(c) => match c {
            CertsCommand::Init { dir, study, server_name, sites, admin, days } => {
                commands::certs_init(&dir, &study, &server_name, &sites, admin.as_deref(), days)
            }
            CertsCommand::Issue { dir, who, days } => commands::certs_issue(&dir, who.site, who.admin, days),
            CertsCommand::Revoke { dir, who } => commands::certs_revoke(&dir, who.site, who.admin),
        },
        Command::Server { config } => commands::server(&config),
        Command::Client { config } => commands::client(&config),
        Command::Status { config, json } => commands::status(&config, json),
        Command::Demo { out, rounds, patients, seed } => demo::run(&out, rounds, patients, seed),
        Command::Synth(args) => commands::synth(&args),
        Command::Data(DataCommand::Check { site_config, json }) => commands::data_check(&site_config, json),
        Command::Bench(BenchCommand::Rounds(args)) => bench::rounds(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
