//! `fedhcc bench drills`: load and fault drills with real processes on loopback, each checked and
//! measured:
//!
//! - `sites`: 50 simulated sites (in-process clients over mutual TLS, answering with the global
//!   model plus noise) and a small model against a `fedhcc server` process: every round completes
//!   with every site; round time and the server's peak memory (RSS).
//! - `server-kill`: the server process is killed with SIGKILL while a site's upload is half
//!   received (the site is driven by hand here, so the moment is exact), then started again: it
//!   resumes after the last committed round, the committed rounds are unchanged, and the run
//!   finishes.
//! - `client-kill`: a `fedhcc client` process is killed with SIGKILL while the server is receiving
//!   its update (seen as the update's `.part` spool file): with the quorum met the round commits
//!   without it; without the quorum (`--no-quorum` variant) the round times out and is retried
//!   once the site is back. The site is started again and takes part in the next rounds.
//! - `stall`: a site connects, takes a train task, starts its download and stops reading: every
//!   round waits for it until the round deadline, then commits with the other sites.
//!
//! Each drill works in its own folder (`--dir` keeps them: certificates, configurations, server
//! state, logs); a failed check fails the command and says which.

use crate::dev::bench::{parse_count, tempfile_dir, vm_hwm_kb};
use crate::dev::demo::{free_port, wait_for_port, write_loopback_configs};
use crate::executor::NoiseExecutor;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedhcc_client::task::{TaskEvent, TrainTask};
use fedhcc_client::transport::{Connection, TaskStream};
use fedhcc_server::store::{RoundRecord, Store};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const STUDY: &str = "hcc-demo";
const RUN: &str = "run-1";

/// `fedhcc bench drills`.
#[derive(Args)]
pub struct DrillsArgs {
    /// Which drill to run (default: all of them).
    #[arg(long, value_enum, default_value_t = Drill::All)]
    pub drill: Drill,
    /// Sites in the `sites` drill.
    #[arg(long, default_value_t = 50)]
    pub sites: usize,
    /// Model size (f32 values) in the `sites` drill.
    #[arg(long, default_value = "100000", value_parser = parse_count)]
    pub params: usize,
    /// Rounds in the `sites` drill.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Keep each drill's folder (certificates, configurations, server state, logs) under this
    /// folder instead of a temporary one; it must be empty or new.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A drill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Drill {
    /// Every drill below, one after the other.
    All,
    /// 50 sites (`--sites`) and a small model against a server process: round time, peak RSS.
    Sites,
    /// SIGKILL the server while an update is half received, then restart it.
    ServerKill,
    /// SIGKILL a `fedhcc client` while its update is being received (the quorum allows the rest).
    ClientKill,
    /// `client-kill` without the quorum: the round times out and is retried.
    ClientKillNoQuorum,
    /// A site starts its download and stops reading.
    Stall,
}

impl Drill {
    fn name(self) -> &'static str {
        match self {
            Drill::All => "all",
            Drill::Sites => "sites",
            Drill::ServerKill => "server-kill",
            Drill::ClientKill => "client-kill",
            Drill::ClientKillNoQuorum => "client-kill-no-quorum",
            Drill::Stall => "stall",
        }
    }
}

pub fn drills(args: &DrillsArgs) -> Result<()> {
    if args.sites == 0 || args.sites > 64 {
        bail!("--sites must be between 1 and 64");
    }
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            if std::fs::read_dir(d)?.next().is_some() {
                bail!("{} is not empty; give a new or empty folder to --dir", d.display());
            }
            d.clone()
        }
        None => {
            tmp = tempfile_dir()?;
            tmp.path().to_path_buf()
        }
    };
    let selected = match args.drill {
        Drill::All => {
            vec![Drill::Sites, Drill::ServerKill, Drill::ClientKill, Drill::ClientKillNoQuorum, Drill::Stall]
        }
        d => vec![d],
    };
    let mut results = serde_json::Map::new();
    let mut failed = Vec::new();
    for d in selected {
        let dir = root.join(d.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t0 = Instant::now();
        let r = match d {
            Drill::Sites => sites(&dir, args),
            Drill::ServerKill => server_kill(&dir),
            Drill::ClientKill => client_kill(&dir, true),
            Drill::ClientKillNoQuorum => client_kill(&dir, false),
            Drill::Stall => stall(&dir),
            Drill::All => unreachable!("expanded above"),
        };
        let mut v = match r {
            Ok(v) => v,
            Err(e) => {
                failed.push(d.name());
                json!({ "passed": false, "error": format!("{e:#}") })
            }
        };
        v["wall_s"] = json!(round3(t0.elapsed().as_secs_f64()));
        if !args.json {
            print_drill(d.name(), &v);
        }
        results.insert(d.name().to_string(), v);
    }
    if args.json {
        println!("{}", Value::Object(results));
    }
    if !failed.is_empty() {
        bail!("drills failed: {} (folders under {})", failed.join(", "), root.display());
    }
    Ok(())
}

fn print_drill(name: &str, v: &Value) {
    let passed = v["passed"].as_bool().unwrap_or(false);
    println!("{name}: {}", if passed { "passed" } else { "FAILED" });
    if let Some(obj) = v.as_object() {
        for (k, x) in obj {
            if k != "passed" && k != "committed_before_kill" {
                println!("  {k}: {x}");
            }
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// (a) Many sites, small model.
fn sites(dir: &Path, args: &DrillsArgs) -> Result<Value> {
    let m = crate::dev::bench::measure_rounds(dir, args.params, args.sites, args.rounds)?;
    if m.records.len() != args.rounds as usize {
        bail!("{} of {} rounds committed", m.records.len(), args.rounds);
    }
    if let Some(r) = m.records.iter().find(|r| r.participants.len() != args.sites) {
        bail!("round {} committed with {} of {} sites", r.round, r.participants.len(), args.sites);
    }
    let mut v = m.summary;
    v["passed"] = json!(true);
    v["every_round_had_every_site"] = json!(true);
    Ok(v)
}

/// The study file of a drill: `model` is the `[model]` table's lines.
fn study_text(rounds: u32, min_sites: usize, timeout_s: u64, model: &str) -> String {
    format!(
        "study_id = \"{STUDY}\"\nrun_id = \"{RUN}\"\n\n[federation]\nrounds = {rounds}\nmin_sites = {min_sites}\n\
         round_timeout_s = {timeout_s}\n\n[training]\nlocal_epochs = 1\nbatch_size = 32\nlearning_rate = 0.01\nseed = 7\n\n\
         [model]\n{model}\n\n[cohort]\npreset = \"hcc_preoperative\"\n\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\n\
         horizon_days = 730\ndeath_before_horizon = \"exclude\"\n"
    )
}

/// Certificates and configurations of a loopback study in `dir`; returns the port and the
/// configuration folder.
fn setup(dir: &Path, sites: &[String], study: &str) -> Result<(u16, PathBuf)> {
    fedhcc_core::pki::init(&dir.join("certs"), STUDY, "localhost", sites, Some("lead"), 30)?;
    let port = free_port()?;
    let cfg = write_loopback_configs(dir, "configs", port, sites, study, "server-state")?;
    Ok((port, cfg))
}

/// Processes of a drill, killed if the drill ends early.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn add(&mut self, c: Child) -> usize {
        self.0.push(c);
        self.0.len() - 1
    }
    fn get(&mut self, i: usize) -> &mut Child {
        &mut self.0[i]
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn spawn_fedhcc(args: &[&str], log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the fedhcc binary")?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(exe)
        .args(args)
        .env("FEDHCC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting fedhcc {}", args.join(" ")))
}

fn spawn_server(dir: &Path, cfg: &Path, port: u16, log: &str) -> Result<(Child, Duration)> {
    let mut child =
        spawn_fedhcc(&["server", "--config", &cfg.join("server.toml").display().to_string()], &dir.join(log))?;
    match wait_for_port(port, &mut child, Duration::from_secs(120)) {
        Ok(d) => Ok((child, d)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.context(format!("see {}", dir.join(log).display())))
        }
    }
}

fn target(dir: &Path, port: u16, site: &str) -> fedhcc_client::ServerTarget {
    fedhcc_client::ServerTarget {
        url: format!("https://127.0.0.1:{port}"),
        server_name: "localhost".into(),
        tls: fedhcc_core::pki::ClientTlsFiles {
            ca: dir.join("certs/ca.pem"),
            cert: dir.join(format!("certs/site-{site}.pem")),
            key: dir.join(format!("certs/site-{site}.key.pem")),
            crl: None,
        },
    }
}

fn client_options(dir: &Path, port: u16, site: &str) -> fedhcc_client::ClientOptions {
    fedhcc_client::ClientOptions {
        site_id: site.into(),
        study_id: STUDY.into(),
        run_id: RUN.into(),
        target: target(dir, port, site),
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        give_up_after: Some(Duration::from_secs(120)),
        state_dir: None,
        policy: Default::default(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// The server's committed rounds (the database is read beside the running server).
fn committed(dir: &Path) -> Result<Vec<RoundRecord>> {
    Ok(Store::open(&dir.join("server-state"), RUN)?.rounds()?)
}

/// Waits for a process to exit, up to `limit`.
fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if t0.elapsed() > limit {
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks what every drill ends with: rounds 1..=`rounds` committed, and the newest checkpoint
/// present with the SHA-256 its record holds.
fn check_all_committed(dir: &Path, rounds: u32) -> Result<Vec<RoundRecord>> {
    let recs = committed(dir)?;
    let got: Vec<u32> = recs.iter().map(|r| r.round).collect();
    if got != (1..=rounds).collect::<Vec<_>>() {
        bail!("committed rounds are {got:?}, expected 1 to {rounds}");
    }
    let last = recs.last().context("no round committed")?;
    let bytes = std::fs::read(&last.checkpoint).with_context(|| format!("reading {}", last.checkpoint))?;
    if fedhcc_core::params::sha256_hex(&bytes) != last.checkpoint_sha256 {
        bail!("checkpoint {} does not match the SHA-256 recorded with round {}", last.checkpoint, last.round);
    }
    Ok(recs)
}

/// The next train task on a task stream.
async fn next_train(events: &mut TaskStream) -> Result<TrainTask> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .context("no train task within 120 s")??
            .context("the server closed the task stream")?;
        if let TaskEvent::Train(t) = ev.event? {
            return Ok(t);
        }
    }
}

/// A hand-driven site: joined, with its task stream open.
async fn manual_site(dir: &Path, port: u16, site: &str) -> Result<(Connection, TaskStream)> {
    let mut c = Connection::open(&target(dir, port, site)).await?;
    c.join(fedhcc_client::transport::join_request(STUDY, None, 100)).await.context("join")?;
    let events = c.tasks(STUDY, RUN).await.context("wait for tasks")?;
    Ok((c, events))
}

/// A `.part` spool file of `site` (an update being received) with at least `min_bytes`, if any.
fn part_file(spool: &Path, site: &str, min_bytes: u64) -> Option<(PathBuf, String, u64)> {
    for task in std::fs::read_dir(spool).ok()?.flatten() {
        let task_id = task.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(task.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{site}.")) && name.ends_with(".part") {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len >= min_bytes {
                    return Some((f.path(), task_id, len));
                }
            }
        }
    }
    None
}

/// (b) SIGKILL the server while an update is half received; restart it.
fn server_kill(dir: &Path) -> Result<Value> {
    const ROUNDS: u32 = 4;
    const PARAMS: usize = 2_000_000;
    let sites = ["a".to_string(), "b".to_string()];
    let (port, cfg) =
        setup(dir, &sites, &study_text(ROUNDS, 2, 120, &format!("kind = \"synthetic\"\nparams = {PARAMS}")))?;
    let mut procs = Procs::default();
    let (server, _) = spawn_server(dir, &cfg, port, "server-1.log")?;
    let server = procs.add(server);
    let rt = runtime()?;
    let token = CancellationToken::new();
    let client_a =
        rt.spawn(fedhcc_client::run(client_options(dir, port, "a"), NoiseExecutor::new(100, 1), token.clone()));

    // Site b by hand: a whole update in round 1, then half an update in round 2.
    let (kill_task, received, upload) = rt.block_on(async {
        let (mut c, mut events) = manual_site(dir, port, "b").await?;
        let t = next_train(&mut events).await?;
        let (mut delta, _, _) = c.download(&t.task, &t.model_sha256).await?;
        delta.values_mut().iter_mut().for_each(|v| *v = 0.001);
        c.upload(&t.task, &delta, 100, vec![]).await?;

        let t = next_train(&mut events).await?;
        let tref = t.task;
        let upload = c.upload_stalled(&tref, &delta, 100, 2).await?;
        let t0 = Instant::now();
        let spool = dir.join("server-state/spool");
        let found = loop {
            if let Some(p) = part_file(&spool, "b", 2 * fedhcc_client::transport::MAX_CHUNK_BYTES as u64) {
                break p;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the server did not start receiving site b's update within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // The task stream stays open until the kill: b is a connected site mid-upload.
        Ok::<_, anyhow::Error>((tref.task_id, found, (upload, events)))
    })?;
    let before = committed(dir)?;
    procs.get(server).kill().context("killing the server")?;
    procs.get(server).wait()?;
    let (upload, events) = upload;
    upload.abort();
    drop(events);
    let (part_path, part_task, part_bytes) = received;
    if before.iter().map(|r| r.round).collect::<Vec<_>>() != [1] {
        bail!("expected round 1 committed at the kill, found {:?}", before.iter().map(|r| r.round).collect::<Vec<_>>());
    }
    if !part_path.exists() {
        bail!("the half-received update {} is gone after the kill", part_path.display());
    }

    // Restart: the server resumes after round 1; site b comes back as a normal client.
    let restarted = Instant::now();
    let (server2, listening) = spawn_server(dir, &cfg, port, "server-2.log")?;
    let server2 = procs.add(server2);
    let client_b =
        rt.spawn(fedhcc_client::run(client_options(dir, port, "b"), NoiseExecutor::new(100, 2), token.clone()));
    let status = wait_exit(procs.get(server2), Duration::from_secs(180), "the restarted server")?;
    let finished_s = restarted.elapsed().as_secs_f64();
    let (a, b) = rt.block_on(async { (client_a.await, client_b.await) });
    token.cancel();
    if !status.success() {
        bail!("the restarted server ended with {status}; see {}", dir.join("server-2.log").display());
    }
    for (site, r) in [("a", a), ("b", b)] {
        let out = r.context("client task")?.with_context(|| format!("site {site}"))?;
        if !out.finished {
            bail!("site {site} did not see the end of the run");
        }
    }
    let after = check_all_committed(dir, ROUNDS)?;
    if after[0] != before[0] {
        bail!("round 1's record changed across the restart");
    }
    if part_file(&dir.join("server-state/spool"), "b", 0).is_some() {
        bail!("a half-received update was left in the spool after the restart");
    }
    let r2 = &after[1];
    Ok(json!({
        "passed": true,
        "killed_during_task": kill_task,
        "spooled_task": part_task,
        "bytes_received_at_kill": part_bytes,
        "committed_at_kill": before.len(),
        "committed_before_kill": before,
        "restart_to_listening_s": round3(listening.as_secs_f64()),
        "round_2_after_restart": { "task": r2.task_id, "participants": r2.participants, "duration_s": round3(r2.duration_s) },
        "restart_to_run_finished_s": round3(finished_s),
        "rounds_committed": after.len(),
    }))
}

/// (c) SIGKILL a client process while its update is being received; restart it.
fn client_kill(dir: &Path, quorum: bool) -> Result<Value> {
    const ROUNDS: u32 = 5;
    let timeout_s = 10;
    let data = crate::commands::write_synthetic_cohort(&dir.join("data"), 2, 240, 11)?;
    let sites: Vec<String> = data.into_iter().map(|(s, _)| s).collect();
    let (victim, other) = (sites[1].clone(), sites[0].clone());
    // A wide MLP, so that its update (about 17 MB) takes long enough on the wire to be caught.
    let model = "kind = \"clinical\"\nhidden = [2048, 2048]";
    let study = study_text(ROUNDS, if quorum { 1 } else { 2 }, timeout_s, model);
    let (port, cfg) = setup(dir, &sites, &study)?;
    let mut procs = Procs::default();
    let (server, _) = spawn_server(dir, &cfg, port, "server.log")?;
    let server = procs.add(server);
    let client = |site: &str, log: &str| {
        spawn_fedhcc(
            &["client", "--config", &cfg.join(format!("site-{site}.toml")).display().to_string()],
            &dir.join(log),
        )
    };
    let other_i = procs.add(client(&other, &format!("{other}.log"))?);
    let victim_i = procs.add(client(&victim, &format!("{victim}-1.log"))?);

    // Catch the victim's update in flight (its `.part` file in the server's spool) and kill the
    // client. A kill that lands after the server already had the whole update is no drill: the
    // round then commits with the victim, and the next round is tried.
    let spool = dir.join("server-state/spool");
    let t0 = Instant::now();
    let mut tried: Vec<String> = Vec::new();
    let mut starts = 1;
    let mut restart_victim = |procs: &mut Procs| -> Result<()> {
        if procs.get(victim_i).try_wait()?.is_some() {
            starts += 1;
            procs.0[victim_i] = client(&victim, &format!("{victim}-{starts}.log"))?;
        }
        Ok(())
    };
    let (task, bytes, rec, round, attempt, commit_s) = loop {
        let (_, task, bytes) = loop {
            if let Some(p) = part_file(&spool, &victim, 1).filter(|(_, t, _)| !tried.contains(t)) {
                break p;
            }
            if procs.get(server).try_wait()?.is_some() || t0.elapsed() > Duration::from_secs(300) {
                if tried.is_empty() {
                    bail!(
                        "no update of {victim} was caught in flight (the model may be too small for this machine); \
                         see {}",
                        dir.join("server.log").display()
                    );
                }
                bail!("every kill ({}) came after the server had the whole update", tried.join(", "));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        procs.get(victim_i).kill().context("killing the client")?;
        let killed = Instant::now();
        procs.get(victim_i).wait()?;
        tried.push(task.clone());
        let (_, round, attempt) =
            fedhcc_server::coordinator::parse_task_id(&task).with_context(|| format!("spool folder {task}"))?;
        // Quorum met: the round commits without the victim. Without it: the round times out, and
        // is retried once the victim is back.
        let rec = loop {
            if let Some(r) = committed(dir)?.into_iter().find(|r| r.round == round) {
                break r;
            }
            if !quorum && killed.elapsed() > Duration::from_secs(timeout_s + 2) {
                restart_victim(&mut procs)?;
            }
            if killed.elapsed() > Duration::from_secs(timeout_s * 4 + 60) {
                bail!("round {round} was not committed within {:?} of the kill", killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let commit_s = killed.elapsed().as_secs_f64();
        restart_victim(&mut procs)?;
        if !(rec.attempt == attempt && rec.participants.contains(&victim)) {
            break (task, bytes, rec, round, attempt, commit_s);
        }
    };
    if quorum {
        if rec.participants != [other.clone()] {
            bail!("round {round} committed with {:?}, expected only {other}", rec.participants);
        }
        // The attempt the victim died in records it as disconnected. On a loaded machine that attempt
        // can also miss its deadline and be retried; the victim, still down, is then not selected, and
        // the retry that commits has nothing to record of it.
        if rec.attempt == attempt && !rec.failures.iter().any(|(s, why)| s == &victim && why == "disconnected") {
            bail!("round {round} does not record {victim} as disconnected: {:?}", rec.failures);
        }
    } else if rec.attempt <= attempt || rec.participants.len() != 2 {
        bail!(
            "round {round} was expected to be retried with both sites; it committed attempt {} with {:?}",
            rec.attempt,
            rec.participants
        );
    }
    let status = wait_exit(procs.get(server), Duration::from_secs(300), "the server")?;
    if !status.success() {
        bail!("the server ended with {status}; see {}", dir.join("server.log").display());
    }
    for (i, site) in [(other_i, &other), (victim_i, &victim)] {
        let s = wait_exit(procs.get(i), Duration::from_secs(60), &format!("client {site}"))?;
        if !s.success() {
            bail!("client {site} ended with {s}; see its log in {}", dir.display());
        }
    }
    let recs = check_all_committed(dir, ROUNDS)?;
    let back_in = recs.iter().filter(|r| r.round > round && r.participants.contains(&victim)).count();
    if round < ROUNDS && back_in == 0 {
        bail!("{victim} took part in no round after it was restarted");
    }
    Ok(json!({
        "passed": true,
        "quorum": quorum,
        "killed_in_task": task,
        "kills": tried,
        "bytes_received_at_kill": bytes,
        "kill_to_commit_s": round3(commit_s),
        "round": { "round": rec.round, "attempt": rec.attempt, "participants": rec.participants,
                   "failures": rec.failures, "duration_s": round3(rec.duration_s) },
        "rounds_after_restart_with_victim": back_in,
        "rounds_committed": recs.len(),
    }))
}

/// (d) A site that starts its download and stops reading.
fn stall(dir: &Path) -> Result<Value> {
    const ROUNDS: u32 = 3;
    const PARAMS: usize = 4_000_000;
    let timeout_s = 3;
    let sites = ["a".to_string(), "b".to_string(), "c".to_string()];
    let (port, cfg) =
        setup(dir, &sites, &study_text(ROUNDS, 2, timeout_s, &format!("kind = \"synthetic\"\nparams = {PARAMS}")))?;
    let mut procs = Procs::default();
    let (server, _) = spawn_server(dir, &cfg, port, "server.log")?;
    let pid = server.id();
    let server = procs.add(server);
    let rt = runtime()?;
    let token = CancellationToken::new();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (peak, token) = (peak.clone(), token.clone());
        rt.spawn(async move {
            while !token.is_cancelled() {
                if let Some(kb) = vm_hwm_kb(pid) {
                    peak.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // c first, so that it is selected from round 1 on.
    let stalled = rt.block_on(async {
        let (mut c, mut events) = manual_site(dir, port, "c").await?;
        let clients: Vec<_> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                tokio::spawn(fedhcc_client::run(
                    client_options(dir, port, s),
                    NoiseExecutor::new(100, i as u64),
                    token.clone(),
                ))
            })
            .collect();
        let t = next_train(&mut events).await?;
        // The header, then nothing more is read from either stream.
        let download = c.download_stalled(&t.task).await?;
        Ok::<_, anyhow::Error>((c, events, download, clients))
    })?;
    let t0 = Instant::now();
    let recs = loop {
        let recs = committed(dir)?;
        if recs.len() == ROUNDS as usize {
            break recs;
        }
        if procs.get(server).try_wait()?.is_some() || t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "{} of {ROUNDS} rounds committed with a stalled site; see {}",
                recs.len(),
                dir.join("server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The stalled site goes away; the run ends.
    let (c, events, download, clients) = stalled;
    drop((download, events, c));
    let status = wait_exit(procs.get(server), Duration::from_secs(60), "the server")?;
    token.cancel();
    let outcomes = rt.block_on(async {
        let _ = watcher.await;
        let mut v = Vec::new();
        for c in clients {
            v.push(c.await);
        }
        v
    });
    if !status.success() {
        bail!("the server ended with {status}; see {}", dir.join("server.log").display());
    }
    for (site, r) in ["a", "b"].iter().zip(outcomes) {
        if !r.context("client task")?.with_context(|| format!("site {site}"))?.finished {
            bail!("site {site} did not see the end of the run");
        }
    }
    let recs = check_all_committed(dir, ROUNDS).map(|_| recs)?;
    for r in &recs {
        if r.participants != ["a", "b"] {
            bail!("round {} committed with {:?}, expected a and b", r.round, r.participants);
        }
        if !r.failures.iter().any(|(s, why)| s == "c" && why.contains("deadline")) {
            bail!("round {} does not record c as timed out: {:?}", r.round, r.failures);
        }
        if r.duration_s < timeout_s as f64 - 0.5 {
            bail!(
                "round {} took {:.2} s, less than its {timeout_s} s deadline, with c selected",
                r.round,
                r.duration_s
            );
        }
    }
    Ok(json!({
        "passed": true,
        "round_timeout_s": timeout_s,
        "round_s": recs.iter().map(|r| round3(r.duration_s)).collect::<Vec<_>>(),
        "failures_round_1": recs[0].failures,
        "model_mb": PARAMS as f64 * 4.0 / 1e6,
        "server_peak_rss_mb": round3(peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0),
        "rounds_committed": recs.len(),
    }))
}
