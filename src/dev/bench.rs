//! `fedhcc bench rounds`: the framework's own cost per round. The server runs as a separate
//! process (so its memory is measured alone); N site clients run in this process and answer each
//! train task with the global model plus small noise, without training.

pub mod drills;
pub mod strategies;
pub mod train;

use crate::dev::demo::{free_port, wait_for_port, write_configs};
use crate::executor::NoiseExecutor;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct RoundsArgs {
    /// Model size in parameters (f32), e.g. 1e6 or 1000000.
    #[arg(long, value_parser = parse_count)]
    pub params: usize,
    /// Number of sites.
    #[arg(long, default_value_t = 2)]
    pub sites: usize,
    /// Rounds to run (the median is reported; use at least 5).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also run the same rounds under secure aggregation (masked fixed-point updates) and report
    /// the per-round overhead against plain FedAvg.
    #[arg(long)]
    pub secagg: bool,
    /// With `--secagg`: differential privacy on top (σ = 1, L2 clip 1, δ = 1e-5).
    #[arg(long, requires = "secagg")]
    pub dp: bool,
}

pub(crate) fn parse_count(s: &str) -> Result<usize, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(1.0..=1e9).contains(&v) || v.fract() != 0.0 {
        return Err(format!("'{s}' must be a whole number between 1 and 1e9"));
    }
    Ok(v as usize)
}

pub(crate) fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

pub fn rounds(args: &RoundsArgs) -> Result<()> {
    if args.sites == 0 || args.sites > 64 {
        bail!("--sites must be between 1 and 64");
    }
    let tmp = tempfile_dir()?;
    if args.secagg {
        return secagg_overhead(args, tmp.path());
    }
    let m = measure_rounds(tmp.path(), args.params, args.sites, args.rounds)?;
    if args.json {
        println!("{}", m.summary);
    } else {
        println!("{}", serde_json::to_string_pretty(&m.summary)?);
        println!(
            "aggregation + checkpoint per round (s): {:?}; whole benchmark {:.1} s",
            m.records.iter().map(|r| (r.aggregate_s * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            m.total_s
        );
    }
    Ok(())
}

/// What [`measure_rounds`] measured.
pub struct RoundsMeasure {
    /// Round times (median, min, max), server peak RSS, bytes per round, start-up time.
    pub summary: serde_json::Value,
    /// The server's round records.
    pub records: Vec<fedhcc_server::store::RoundRecord>,
    /// Seconds from the server's start to its end.
    pub total_s: f64,
}

/// Runs a loopback study in `dir`: a `fedhcc server` process and `sites` in-process clients that
/// answer with the global model plus noise, `rounds` rounds of a synthetic model of `params`
/// values, every site needed in every round. Measures the server process alone (peak RSS).
///
/// # Errors
/// The server or a client fails, or no round is committed.
pub fn measure_rounds(dir: &std::path::Path, params: usize, sites: usize, rounds: u32) -> Result<RoundsMeasure> {
    measure_rounds_with(dir, params, sites, rounds, "")
}

/// `fedhcc bench rounds --secagg [--dp]`: the same rounds in the clear and under secure aggregation
/// (each in a folder of its own, one after the other), and the ratio of their median round times.
fn secagg_overhead(args: &RoundsArgs, dir: &std::path::Path) -> Result<()> {
    if args.sites < 2 {
        bail!("--secagg needs at least 2 sites (one site's sum is its own update)");
    }
    let plain = measure_rounds(&dir.join("plain"), args.params, args.sites, args.rounds)?;
    let mut lines = "secure_aggregation = true\n".to_string();
    if args.dp {
        lines.push_str("\n[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\n");
    }
    let secure = measure_rounds_with(&dir.join("secagg"), args.params, args.sites, args.rounds, &lines)?;
    let median = |m: &RoundsMeasure| m.summary["round_s_median"].as_f64().unwrap_or(f64::NAN);
    let ratio = median(&secure) / median(&plain);
    let v = serde_json::json!({
        "params": args.params, "sites": args.sites, "rounds": args.rounds, "dp": args.dp,
        "plain": plain.summary, "secagg": secure.summary, "overhead_ratio": ratio,
        "epsilon": secure.records.last().and_then(|r| r.epsilon),
    });
    if args.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
        println!(
            "median round: {:.3} s plain FedAvg, {:.3} s secure aggregation{}: {ratio:.2}× (target ≤ 2×)",
            median(&plain),
            median(&secure),
            if args.dp { " + DP" } else { "" }
        );
    }
    Ok(())
}

/// [`measure_rounds`] with `extra_federation` lines in the study's `[federation]` table.
///
/// # Errors
/// As [`measure_rounds`].
pub fn measure_rounds_with(
    dir: &std::path::Path,
    params: usize,
    sites: usize,
    rounds: u32,
    extra_federation: &str,
) -> Result<RoundsMeasure> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sites: Vec<String> = (0..sites).map(|i| format!("site{i:02}")).collect();
    fedhcc_core::pki::init(&dir.join("certs"), "hcc-demo", "localhost", &sites, Some("lead"), 30)?;
    let port = free_port()?;
    let model = format!("kind = \"synthetic\"\nparams = {params}");
    let cfg = write_configs(dir, port, rounds, &sites, &model, extra_federation)?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let t0 = Instant::now();
    let mut server = Command::new(exe)
        .args(["server", "--config"])
        .arg(cfg.join("server.toml"))
        .env("FEDHCC_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the server")?;
    let pid = server.id();
    let startup = wait_for_port(port, &mut server, Duration::from_secs(120));
    let startup = match startup {
        Ok(d) => d,
        Err(e) => {
            let _ = server.kill();
            return Err(e);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let outcome = rt.block_on(async {
        let token = CancellationToken::new();
        let watcher = {
            let peak = peak.clone();
            let token = token.clone();
            tokio::spawn(async move {
                while !token.is_cancelled() {
                    if let Some(kb) = vm_hwm_kb(pid) {
                        peak.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let mut clients = Vec::new();
        for (i, s) in sites.iter().enumerate() {
            let opts = fedhcc_client::ClientOptions {
                site_id: s.clone(),
                study_id: "hcc-demo".into(),
                run_id: "run-1".into(),
                target: fedhcc_client::ServerTarget {
                    url: format!("https://127.0.0.1:{port}"),
                    server_name: "localhost".into(),
                    tls: fedhcc_core::pki::ClientTlsFiles {
                        ca: dir.join("certs/ca.pem"),
                        cert: dir.join(format!("certs/site-{s}.pem")),
                        key: dir.join(format!("certs/site-{s}.key.pem")),
                        crl: None,
                    },
                },
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                give_up_after: Some(Duration::from_secs(60)),
                state_dir: None,
                policy: Default::default(),
            };
            clients.push(tokio::spawn(fedhcc_client::run(opts, NoiseExecutor::new(100, i as u64), token.clone())));
        }
        let mut results = Vec::new();
        for c in clients {
            results.push(c.await.context("client task")?);
        }
        token.cancel();
        let _ = watcher.await;
        Ok::<_, anyhow::Error>(results)
    });
    let status = server.wait()?;
    let outcome = outcome?;
    for r in outcome {
        r.context("a benchmark client failed")?;
    }
    if !status.success() {
        bail!("the server ended with {status}; see {}", dir.join("server.log").display());
    }
    let total_s = t0.elapsed().as_secs_f64();
    let store = fedhcc_server::store::Store::open(&dir.join("server-state"), "run-1")?;
    let recs = store.rounds()?;
    if recs.is_empty() {
        bail!("no round was committed");
    }
    let mut durations: Vec<f64> = recs.iter().map(|r| r.duration_s).collect();
    durations.sort_by(f64::total_cmp);
    let median = durations[durations.len() / 2];
    let bytes = recs.iter().map(|r| r.bytes_in + r.bytes_out).sum::<u64>() / recs.len() as u64;
    let v = serde_json::json!({
        "params": params,
        "sites": sites.len(),
        "rounds": recs.len(),
        "round_s_median": median,
        "round_s_min": durations[0],
        "round_s_max": durations[durations.len() - 1],
        "server_peak_rss_mb": peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
        "bytes_per_round": bytes,
        "startup_s": startup.as_secs_f64(),
    });
    Ok(RoundsMeasure { summary: v, records: recs, total_s })
}

/// A temporary folder removed on drop.
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!(
        "fedhcc-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(TempDir(base))
}
