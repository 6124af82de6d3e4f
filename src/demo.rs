//! `fedhcc demo`: a whole two-hospital study on this machine, with real processes, real
//! certificates and mutual TLS on loopback.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SITES: [&str; 2] = ["center_a", "center_b"];
const MARKER: &str = ".fedhcc-demo";

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, child: &mut Child, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(t0.elapsed());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the server exited during start-up ({status}); see its log");
        }
        if t0.elapsed() > limit {
            bail!("the server did not start listening within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes the configuration files of a loopback study into `dir/configs`.
pub fn write_configs(
    dir: &Path,
    port: u16,
    rounds: u32,
    sites: &[String],
    model: &str,
    extra_federation: &str,
) -> Result<PathBuf> {
    let cfg = dir.join("configs");
    std::fs::create_dir_all(&cfg)?;
    let study = format!(
        "# The study protocol: the same file at the server and at every site.\n\
         study_id = \"hcc-demo\"\nrun_id = \"run-1\"\n\n[federation]\nrounds = {rounds}\nmin_sites = {}\nround_timeout_s = 300\n{extra_federation}\n\
         [training]\nlocal_epochs = 3\nbatch_size = 32\nlearning_rate = 0.01\nweight_decay = 0.0001\nseed = 7\n\n\
         [model]\n{model}\n\n[cohort]\npreset = \"hcc_preoperative\"\n\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\nhorizon_days = 730\n\
         death_before_horizon = \"exclude\"\n",
        sites.len()
    );
    std::fs::write(cfg.join("study.toml"), study)?;
    let allowed = sites.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        cfg.join("server.toml"),
        format!(
            "study = \"study.toml\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"../server-state\"\nallowed_sites = [{allowed}]\n\n\
             [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/server.pem\"\nkey = \"../certs/server.key.pem\"\ncrl = \"../certs/crl.pem\"\n"
        ),
    )?;
    for s in sites {
        std::fs::write(
            cfg.join(format!("site-{s}.toml")),
            format!(
                "site_id = \"{s}\"\nserver = \"https://127.0.0.1:{port}\"\nserver_name = \"localhost\"\nstudy = \"study.toml\"\n\
                 data_dir = \"../data/{s}\"\nstate_dir = \"../site-state/{s}\"\n\n\
                 [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/site-{s}.pem\"\nkey = \"../certs/site-{s}.key.pem\"\n"
            ),
        )?;
    }
    std::fs::write(
        cfg.join("admin.toml"),
        format!(
            "server = \"https://127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\n\
             [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/admin-lead.pem\"\nkey = \"../certs/admin-lead.key.pem\"\n"
        ),
    )?;
    Ok(cfg)
}

fn spawn(args: &[&str], log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the fedhcc binary")?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(exe)
        .args(args)
        .env("FEDHCC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting fedhcc {}", args.join(" ")))
}

/// Kills the demo's processes if it ends early.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn run(out: &Path, rounds: u32, patients: usize, seed: u64) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        if !out.join(MARKER).exists() {
            bail!("{} exists and is not a previous demo folder; choose another --out", out.display());
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing the previous demo in {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("logs"))?;
    std::fs::write(out.join(MARKER), "made by fedhcc demo; removed and remade by the next demo\n")?;
    let t0 = Instant::now();
    let sites: Vec<String> = SITES.iter().map(|s| s.to_string()).collect();

    println!("[1/5] Certificates: study CA, server, {} sites, study lead", sites.len());
    fedhcc_core::pki::init(&out.join("certs"), "hcc-demo", "localhost", &sites, Some("lead"), 30)?;

    println!("[2/5] Synthetic cohort: {patients} patients over {} centers", sites.len());
    let written = crate::commands::write_synthetic_cohort(&out.join("data"), sites.len(), patients, seed)?;
    for (id, n) in &written {
        println!("      {id}: {n} patients");
    }

    let port = free_port()?;
    let cfg = write_configs(out, port, rounds, &sites, "kind = \"clinical\"\nhidden = []\ndropout = 0.0", "")?;
    println!("[3/5] Server on 127.0.0.1:{port} (mutual TLS 1.3)");
    let mut procs = Processes(vec![]);
    let server_cfg = cfg.join("server.toml");
    let mut server = spawn(&["server", "--config", &server_cfg.to_string_lossy()], &out.join("logs/server.log"))?;
    wait_for_port(port, &mut server, Duration::from_secs(60))?;
    procs.0.push(("server".into(), server));

    println!("[4/5] Clients: {}", sites.join(", "));
    for s in &sites {
        let c = cfg.join(format!("site-{s}.toml"));
        let child = spawn(&["client", "--config", &c.to_string_lossy()], &out.join(format!("logs/client-{s}.log")))?;
        procs.0.push((s.clone(), child));
    }

    // Progress from the server's database (read-only use of a WAL database is safe alongside it).
    let state = out.join("server-state");
    let mut shown = 0usize;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Ok(store) = fedhcc_server::store::Store::open(&state, "run-1")
            && let Ok(rs) = store.rounds()
        {
            for r in rs.iter().skip(shown) {
                let losses: Vec<String> = r
                    .participants
                    .iter()
                    .zip(&r.losses)
                    .map(|(p, l)| format!("{p} {}", l.map(|l| format!("{l:.3}")).unwrap_or_else(|| "-".into())))
                    .collect();
                println!(
                    "      round {}/{rounds} committed in {:.2} s; training loss: {}",
                    r.round,
                    r.duration_s,
                    losses.join(", ")
                );
            }
            shown = rs.len();
        }
        let all_done = procs.0.iter_mut().all(|(_, c)| c.try_wait().ok().flatten().is_some());
        if all_done {
            break;
        }
        if let Some((name, st)) = procs
            .0
            .iter_mut()
            .find_map(|(n, c)| c.try_wait().ok().flatten().filter(|s| !s.success()).map(|s| (n.clone(), s)))
        {
            bail!("{name} stopped with {st}; see {}", out.join("logs").display());
        }
        if Instant::now() > deadline {
            bail!("the demo did not finish within 30 minutes; see {}", out.join("logs").display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (name, c) in &mut procs.0 {
        let st = c.wait()?;
        if !st.success() {
            bail!("{name} ended with {st}; see {}", out.join("logs").display());
        }
    }

    println!("[5/5] Summary ({:.1} s)", t0.elapsed().as_secs_f64());
    let store = fedhcc_server::store::Store::open(&state, "run-1")?;
    let rs = store.rounds()?;
    let evals = store.evaluations()?;
    println!("      rounds committed: {}", rs.len());
    if let Some(last) = rs.last() {
        println!("      final model: {}\n      SHA-256 {}", last.checkpoint, last.checkpoint_sha256);
    }
    println!("      held-out evaluation of the final model (aggregate statistics reported by each site):");
    for e in &evals {
        let get = |k: &str| e.metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        println!(
            "        {:<10} n = {:>3}, positives = {:>3}, AUC = {}, log-loss = {}",
            e.site,
            e.samples,
            get("n_positive").map(|v| v as u64).unwrap_or(0),
            get("auc").map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into()),
            get("loss").map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
        );
    }
    println!("\nOutputs in {}:", out.display());
    println!("  certs/          study CA and certificates (private keys are owner-only)");
    println!("  data/           synthetic site data (clinical.csv per center) and truth.csv");
    println!("  configs/        study, server, site and admin configurations");
    println!("  server-state/   server.db (round records), checkpoints/, effective-config.toml");
    println!("  site-state/     each client's status.json");
    println!("  logs/           server and client logs");
    Ok(())
}
