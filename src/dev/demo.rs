//! `fedhcc demo`: a whole two-hospital study on this machine, with real processes, real
//! certificates and mutual TLS on loopback.

use anyhow::{Context, Result, bail};
use fedhcc_cohort::synth_images::Scale;
use fedhcc_core::aggregation::StrategyKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod dashboard;

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
    write_configs_with_training(dir, port, rounds, sites, model, extra_federation, "")
}

/// [`write_configs`], with `extra_training` lines added to the study's `[training]` table.
pub fn write_configs_with_training(
    dir: &Path,
    port: u16,
    rounds: u32,
    sites: &[String],
    model: &str,
    extra_federation: &str,
    extra_training: &str,
) -> Result<PathBuf> {
    let study = format!(
        "# The study protocol: the same file at the server and at every site.\n\
         study_id = \"hcc-demo\"\nrun_id = \"run-1\"\n\n[federation]\nrounds = {rounds}\nmin_sites = {}\nround_timeout_s = 300\n{extra_federation}\n\
         [training]\nlocal_epochs = 3\nbatch_size = 32\nlearning_rate = 0.01\nweight_decay = 0.0001\nseed = 7\n{extra_training}\n\
         [model]\n{model}\n\n[cohort]\npreset = \"hcc_preoperative\"\n\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\nhorizon_days = 730\n\
         death_before_horizon = \"exclude\"\n",
        sites.len()
    );
    write_loopback_configs(dir, "configs", port, sites, &study, "server-state")
}

/// Writes `dir/<configs>/study.toml` (= `study`) and the server, site and admin configurations of a
/// loopback study: certificates in `dir/certs`, site data in `dir/data/<site>`, site state in
/// `dir/site-state/<site>`, server state in `dir/<server_state>`.
pub fn write_loopback_configs(
    dir: &Path,
    configs: &str,
    port: u16,
    sites: &[String],
    study: &str,
    server_state: &str,
) -> Result<PathBuf> {
    let cfg = dir.join(configs);
    std::fs::create_dir_all(&cfg)?;
    std::fs::write(cfg.join("study.toml"), study)?;
    let allowed = sites.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        cfg.join("server.toml"),
        format!(
            "study = \"study.toml\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"../{server_state}\"\nallowed_sites = [{allowed}]\n\n\
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

/// The `[federation]` and `[training]` lines that select `strategy` in the demo's study (FedProx
/// gets μ = 0.01; the other strategies use their defaults).
pub fn strategy_lines(strategy: StrategyKind) -> (String, String) {
    let federation = format!("strategy = \"{}\"\n", strategy.as_str());
    let training = if strategy == StrategyKind::FedProx { "prox_mu = 0.01\n".to_string() } else { String::new() };
    (federation, training)
}

/// The demo's protection of the updates (on by default: secure aggregation).
#[derive(Clone, Copy, Debug)]
pub struct DemoPrivacy {
    /// The server sees only the sum of the sites' masked updates.
    pub secure_aggregation: bool,
    /// Differential privacy (needs secure aggregation).
    pub dp: bool,
}

/// The `[federation]` lines (and tables) that turn on secure aggregation and, if asked, DP with the
/// demo's settings; nothing for the strategies that need each update in the clear (said on stdout).
pub fn privacy_lines(privacy: DemoPrivacy, strategy: StrategyKind) -> String {
    if !privacy.secure_aggregation {
        return String::new();
    }
    if strategy.needs_individual_updates() {
        println!("      note: {strategy} needs each site's update in the clear; secure aggregation is off for it");
        return String::new();
    }
    let mut lines = "secure_aggregation = true\n".to_string();
    if privacy.dp {
        lines.push_str("\n[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 0.05\ndelta = 1e-5\n");
    }
    lines
}

/// Which models the demo trains.
fn demo_models(model: &str) -> Result<Vec<&'static str>> {
    Ok(match model {
        "clinical" => vec!["clinical"],
        "preop" => vec!["preop"],
        "postop" => vec!["postop"],
        "both" => vec!["preop", "postop"],
        other => bail!("--model {other}: use clinical, preop, postop or both"),
    })
}

/// The `[model]`, `[training]` and `[imaging]` tables of the demo's multimodal study at `scale`:
/// the crop grid and the CNN shrink with the images so that the demo stays a demo on a laptop
/// (`full` uses the model's default sizes).
fn multimodal_study_tables(kind: &str, scale: Scale) -> (String, String) {
    let (grid, channels, embed) = match scale {
        Scale::Tiny => ("[8, 16, 16]", "[4, 8]", 16),
        Scale::Small => ("[16, 32, 32]", "[8, 16, 32]", 32),
        Scale::Full => ("[32, 64, 64]", "[8, 16, 32, 64]", 64),
    };
    let model = format!(
        "kind = \"{kind}\"\n\n[model.mri]\nchannels = {channels}\nembed = {embed}\n\n[model.wsi]\nmax_train_patches = 32\n\n\
         [model.training]\npatience = 0\n\n[imaging.mri]\ngrid = {grid}\n\n[imaging.wsi]\nmax_patches = 200\n"
    );
    let training =
        "[training]\nlocal_epochs = 2\nbatch_size = 16\nlearning_rate = 0.001\nweight_decay = 0.0001\nseed = 7\n"
            .into();
    (model, training)
}

/// `fedhcc demo`: certificates, the synthetic cohort (with images for the multimodal models),
/// preprocessing at each site, then one federated run per model.
#[allow(clippy::too_many_arguments)]
pub fn run_model(
    out: &Path,
    rounds: u32,
    patients: usize,
    seed: u64,
    strategy: StrategyKind,
    model: &str,
    scale: Scale,
    privacy: DemoPrivacy,
    cross_center: bool,
) -> Result<()> {
    let models = demo_models(model)?;
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
    let multimodal = models != ["clinical"];
    let per_model = if multimodal { 5 } else { 4 } + usize::from(cross_center);
    let steps = 2 + per_model * models.len();
    let mut step = 0;
    let mut next = || {
        step += 1;
        format!("[{step}/{steps}]")
    };

    println!("{} Certificates: study CA, server, {} sites, study lead", next(), sites.len());
    fedhcc_core::pki::init(&out.join("certs"), "hcc-demo", "localhost", &sites, Some("lead"), 30)?;

    let (federation, training) = strategy_lines(strategy);
    // The privacy lines go last: `[federation.dp]` opens a table of its own.
    // Every round is evaluated at every site, so the dashboard's AUC and C-index panels fill as it runs.
    let federation = format!("evaluate_every = 1\n{federation}{}", privacy_lines(privacy, strategy));
    if !multimodal {
        println!("{} Synthetic cohort: {patients} patients over {} centers", next(), sites.len());
        let written = crate::commands::write_synthetic_cohort(&out.join("data"), sites.len(), patients, seed)?;
        for (id, n) in &written {
            println!("      {id}: {n} patients");
        }
        let port = free_port()?;
        let cfg = write_configs_with_training(
            out,
            port,
            rounds,
            &sites,
            "kind = \"clinical\"\nhidden = []\ndropout = 0.0",
            &federation,
            &training,
        )?;
        dashboard::enable(&cfg, port)?;
        let last = federate(out, &cfg, "server-state", "run-1", port, rounds, &sites, strategy, &mut next)?;
        validation(out, &cfg, &last, "clinical", &sites, &mut next)?;
        if cross_center {
            cross_center_study(out, &cfg, "server-state", "clinical", &sites, &mut next)?;
        }
        write_report(out, &cfg, "server-state", "run-1", "clinical", &sites, &mut Default::default())?;
        print_outputs(out, t0);
        return Ok(());
    }

    println!("{} Synthetic cohort with images ({scale}): {patients} patients over {} centers", next(), sites.len());
    let written =
        crate::commands::write_synthetic_site_data(&out.join("data"), sites.len(), patients, seed, Some(scale), None)?;
    for w in &written {
        println!(
            "      {}: {} patients, {} image files ({:.1} MB)",
            w.center_id,
            w.patients,
            w.images.files,
            w.images.bytes as f64 / 1e6
        );
    }
    // The image check of a site is made once and reused for the second model's report.
    let mut checks_made = crate::commands::ImagingChecks::default();
    for kind in &models {
        let (model_tables, training_table) = multimodal_study_tables(kind, scale);
        let preset = if *kind == "preop" { "hcc_preoperative" } else { "hcc_postoperative" };
        let study = format!(
            "# The study protocol: the same file at the server and at every site.\n\
             study_id = \"hcc-demo\"\nrun_id = \"run-{kind}\"\n\n[federation]\nrounds = {rounds}\nmin_sites = {}\nround_timeout_s = 1800\n{federation}\n\
             {training_table}{training}\n[model]\n{model_tables}\n[cohort]\npreset = \"{preset}\"\n\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\nhorizon_days = 730\n\
             death_before_horizon = \"exclude\"\n",
            sites.len()
        );
        let port = free_port()?;
        let cfg = write_loopback_configs(
            out,
            &format!("configs-{kind}"),
            port,
            &sites,
            &study,
            &format!("server-state-{kind}"),
        )?;
        dashboard::enable(&cfg, port)?;
        println!(
            "{} Preprocessing at each site for the {kind} model (MRI crops{})",
            next(),
            if *kind == "postop" { ", slide features" } else { "" }
        );
        for s in &sites {
            let (site, study) = fedhcc_core::config::load_site(&cfg.join(format!("site-{s}.toml")))?;
            let m = crate::study::StudyModel::from_study(&study)?;
            let report = fedhcc_cohort::Cohort::load(&site.data_dir.join("clinical.csv"), &m.spec, &m.cohort.outcomes)?;
            let ids: Vec<String> = report.cohort.patients.iter().map(|p| p.id.clone()).collect();
            let which = crate::preprocess::Modalities { mri: true, wsi: *kind == "postop" };
            let threads = crate::commands::default_threads();
            let sum = crate::preprocess::run(&site.data_dir, &site.state_dir, &ids, &m.imaging, which, threads)?;
            println!(
                "      {s}: {} MRI crops ({} reused), {} slides ({} reused), {} failed, {:.1} s",
                sum.mri_done + sum.mri_reused,
                sum.mri_reused,
                sum.slides_done + sum.slides_reused,
                sum.slides_reused,
                sum.mri_failed.len() + sum.slides_failed.len(),
                sum.seconds
            );
        }
        let last = federate(
            out,
            &cfg,
            &format!("server-state-{kind}"),
            &format!("run-{kind}"),
            port,
            rounds,
            &sites,
            strategy,
            &mut next,
        )?;
        let (state, run) = (format!("server-state-{kind}"), format!("run-{kind}"));
        validation(out, &cfg, &last, kind, &sites, &mut next)?;
        if cross_center {
            cross_center_study(out, &cfg, &state, kind, &sites, &mut next)?;
        }
        write_report(out, &cfg, &state, &run, kind, &sites, &mut checks_made)?;
    }
    print_outputs(out, t0);
    Ok(())
}

/// What a validating center does offline with the final model: `fedhcc export` to safetensors,
/// `fedhcc validate` on the last site's held-out test split (`out/validation-<model>/`), and `fedhcc
/// stats` on its predictions at the frozen cut-off (`out/validation-<model>/stats/`).
fn validation(
    out: &Path,
    cfg: &Path,
    checkpoint: &Path,
    model: &str,
    sites: &[String],
    next: &mut impl FnMut() -> String,
) -> Result<()> {
    let site = sites.last().context("no site")?;
    println!(
        "{} Validation of the final {model} model at {site}: export, validate (held-out test split), stats",
        next()
    );
    let dir = out.join(format!("validation-{model}"));
    let safetensors = out.join(format!("final-{model}.safetensors"));
    crate::lead::export::export(&crate::lead::export::ExportArgs {
        checkpoint: checkpoint.to_path_buf(),
        study: cfg.join("study.toml"),
        out: safetensors.clone(),
        layout: crate::lead::model_file::FileLayout::Torch,
    })?;
    crate::lead::validate::validate(&crate::lead::validate::ValidateArgs {
        model: safetensors,
        site_config: cfg.join(format!("site-{site}.toml")),
        out: dir.clone(),
        split: "test".into(),
        cutoff: None,
        times: vec![365.0, 730.0, 1095.0],
        bootstrap: 2000,
        seed: 20_240_605,
        backend: None,
        write_inputs: false,
    })?;
    let validation: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("validation.json"))?)?;
    crate::lead::stats_cmd::stats(&crate::lead::stats_cmd::StatsArgs {
        predictions: dir.join("predictions.csv"),
        cutoff: validation["cutoff"].as_f64(),
        times: vec![365.0, 730.0, 1095.0],
        out: dir.join("stats"),
        bootstrap: 2000,
        seed: 20_240_605,
    })?;
    Ok(())
}

/// The cross-center study of one model (`fedhcc study`, in this process) on the demo's sites, into
/// `out/cross-center-<model>/`; its matrix is copied into the run's server state folder, where the
/// report (and a dashboard) find it.
fn cross_center_study(
    out: &Path,
    cfg: &Path,
    server_state: &str,
    model: &str,
    sites: &[String],
    next: &mut impl FnMut() -> String,
) -> Result<()> {
    println!(
        "{} Cross-center study of the {model} model: the federated model, each center left out, each center alone, \
         all data pooled; each scored at every center",
        next()
    );
    // The file lies in `out`; every path in it is relative to the file itself (as `fedhcc study`
    // reads it), never to the working directory, so the demo folder can be run from anywhere and moved.
    let cfg_folder = cfg.file_name().context("the demo's configs folder has no name")?.to_string_lossy();
    let configs: Vec<String> = sites.iter().map(|s| format!("\"{cfg_folder}/site-{s}.toml\"")).collect();
    let file = out.join(format!("cross-center-{model}.toml"));
    std::fs::write(
        &file,
        format!(
            "# The demo's cross-center study of the {model} model (`fedhcc study --config {}`, from this\n\
             # folder). Paths are relative to this file.\n\
             out = \"cross-center-{model}\"\n\n[[model]]\nname = \"{model}\"\nsite_configs = [{}]\n",
            file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            configs.join(", ")
        ),
    )
    .with_context(|| format!("writing {}", file.display()))?;
    let args = crate::lead::cross_center::StudyArgs { config: file, out: None, rounds: None };
    let done = crate::lead::cross_center::run(&args)?;
    let (dir, matrix) = (done.out, done.first);
    for row in &matrix.rows {
        let cells: Vec<String> = row
            .evaluated_at
            .iter()
            .map(|(at, v)| format!("{at} {}", v.map_or_else(|| "–".into(), |v| format!("{v:.3}"))))
            .collect();
        println!("      {:<28} AUC {}", row.trained_on, cells.join(", "));
    }
    let json = dir.join(model).join("cross-center.json");
    let into = out.join(server_state).join("cross-center.json");
    std::fs::copy(&json, &into).with_context(|| format!("copying {} to {}", json.display(), into.display()))?;
    println!("      cross-center study: {} (study.md: every matrix with its intervals)", dir.display());
    Ok(())
}

/// The study report of one model's run, as the study lead would make it: each site's data check
/// (counts only; in a real study each hospital runs it and sends the JSON) into
/// `out/data-check-<model>/<site>.json`, then `fedhcc report` into `out/report-<model>/`.
fn write_report(
    out: &Path,
    cfg: &Path,
    server_state: &str,
    run_id: &str,
    model: &str,
    sites: &[String],
    checks_made: &mut crate::commands::ImagingChecks,
) -> Result<()> {
    let checks = out.join(format!("data-check-{model}"));
    std::fs::create_dir_all(&checks).with_context(|| format!("creating {}", checks.display()))?;
    let mut data_check = Vec::new();
    for s in sites {
        let check = crate::commands::run_data_check_cached(&cfg.join(format!("site-{s}.toml")), checks_made)?;
        let path = checks.join(format!("{s}.json"));
        std::fs::write(&path, check.to_json()?).with_context(|| format!("writing {}", path.display()))?;
        data_check.push(format!("{s}={}", path.display()));
    }
    let args = crate::lead::report::ReportArgs {
        server_state: out.join(server_state),
        run: Some(run_id.to_owned()),
        study: Some(cfg.join("study.toml")),
        data_check,
        cross_center: None,
        out: out.join(format!("report-{model}")),
    };
    let report = crate::lead::report::write_report(&args)?;
    let pooled = report.evaluation.as_ref().and_then(|e| e.pooled.as_ref()).and_then(|p| p.auc);
    if let Some(a) = pooled {
        let ci = a.ci_low.zip(a.ci_high).map(|(l, h)| format!(" (95% CI {l:.3}–{h:.3})")).unwrap_or_default();
        println!("      pooled AUC {:.3}{ci}", a.estimate);
    }
    println!("      study report: {}", args.out.join("report.html").display());
    Ok(())
}

/// Starts the server and one client per site as processes, follows the rounds, and prints the
/// held-out evaluation.
#[allow(clippy::too_many_arguments)]
fn federate(
    out: &Path,
    cfg: &Path,
    server_state: &str,
    run_id: &str,
    port: u16,
    rounds: u32,
    sites: &[String],
    strategy: StrategyKind,
    next: &mut dyn FnMut() -> String,
) -> Result<PathBuf> {
    let tag = cfg.file_name().map(|n| n.to_string_lossy().replace("configs", "")).unwrap_or_default();
    println!("{} Server on 127.0.0.1:{port} (mutual TLS 1.3), aggregation strategy {strategy}", next());
    let mut procs = Processes(vec![]);
    let server_cfg = cfg.join("server.toml");
    let mut server =
        spawn(&["server", "--config", &server_cfg.to_string_lossy()], &out.join(format!("logs/server{tag}.log")))?;
    wait_for_port(port, &mut server, Duration::from_secs(60))?;
    procs.0.push(("server".into(), server));
    dashboard::announce(&server_cfg, &mut procs.0[0].1)?;

    println!("{} Clients: {}", next(), sites.join(", "));
    for s in sites {
        let c = cfg.join(format!("site-{s}.toml"));
        let child =
            spawn(&["client", "--config", &c.to_string_lossy()], &out.join(format!("logs/client-{s}{tag}.log")))?;
        procs.0.push((s.clone(), child));
    }

    // Progress from the server's database (read-only use of a WAL database is safe alongside it).
    let state = out.join(server_state);
    let mut shown = 0usize;
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if let Ok(store) = fedhcc_server::store::Store::open(&state, run_id)
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
            bail!("the federated run did not finish within an hour; see {}", out.join("logs").display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (name, c) in &mut procs.0 {
        let st = c.wait()?;
        if !st.success() {
            bail!("{name} ended with {st}; see {}", out.join("logs").display());
        }
    }

    println!("{} Summary ({:.1} s)", next(), t0.elapsed().as_secs_f64());
    let store = fedhcc_server::store::Store::open(&state, run_id)?;
    let rs = store.rounds()?;
    let evals = store.evaluations()?;
    println!("      rounds committed: {}", rs.len());
    let study = fedhcc_core::config::load_study(&cfg.join("study.toml"))?;
    println!("      {}", privacy_summary(&study, &rs));
    if let Some(last) = rs.last() {
        println!("      final model: {}\n      SHA-256 {}", last.checkpoint, last.checkpoint_sha256);
    }
    println!("      held-out evaluation of the final model (aggregate statistics reported by each site):");
    let last_round = evals.iter().map(|e| e.round).max();
    for e in evals.iter().filter(|e| Some(e.round) == last_round) {
        let get = |k: &str| e.metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let fmt = |k: &str| get(k).map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
        let c_index = get("c_index").map(|v| format!(", Cox-head C-index = {v:.3}")).unwrap_or_default();
        println!(
            "        {:<10} n = {:>3}, positives = {:>3}, AUC = {}{c_index}, loss = {}",
            e.site,
            e.samples,
            get("n_positive").map(|v| v as u64).unwrap_or(0),
            fmt("auc"),
            fmt("loss")
        );
    }
    let last = rs.last().context("the run committed no round")?;
    Ok(PathBuf::from(&last.checkpoint))
}

/// One line on how the updates were protected: secure aggregation on or off, and ε under DP.
pub fn privacy_summary(
    study: &fedhcc_core::config::StudyConfig,
    rounds: &[fedhcc_server::store::RoundRecord],
) -> String {
    let f = &study.federation;
    let mut line = if f.secure_aggregation {
        let secure = rounds.iter().filter(|r| r.secure_aggregation).count();
        format!(
            "secure aggregation: on ({secure} of {} rounds; the server saw only the sum of the sites' masked updates)",
            rounds.len()
        )
    } else {
        "secure aggregation: off (updates sent in the clear over mutual TLS)".to_string()
    };
    if let Some(dp) = &f.dp {
        let eps = rounds.last().and_then(|r| r.epsilon).map(|e| format!("{e:.2}")).unwrap_or_else(|| "0".into());
        line.push_str(&format!(
            "\n      differential privacy: ε = {eps} (δ = {}) after {} rounds; noise multiplier {}, L2 clip {}",
            dp.delta,
            rounds.len(),
            dp.noise_multiplier,
            dp.l2_clip
        ));
    }
    line
}

fn print_outputs(out: &Path, t0: Instant) {
    println!("\nDone in {:.1} s. Outputs in {}:", t0.elapsed().as_secs_f64(), out.display());
    println!("  certs/          study CA and certificates (private keys are owner-only)");
    println!("  data/           synthetic site data (clinical.csv, mri/, wsi/ per center) and truth.csv");
    println!(
        "  configs*/       study, server, site and admin configurations and the dashboard token (one folder per model)"
    );
    println!("  server-state*/  server.db (round records), checkpoints/ (`fedhcc export` converts them)");
    println!("  site-state/     each client's status.json and preprocessed images");
    println!("  data-check-*/   each site's data check (counts only), for the report's participant flow");
    println!(
        "  report-*/       the study report per model: report.html (open it in a browser), report.json, CSV tables"
    );
    println!(
        "  final-*.safetensors, validation-*/  the exported final model per model; `fedhcc validate` and `fedhcc stats` of it at one site"
    );
    println!("  cross-center-*/ the cross-center study per model: study.md (every matrix), cross-center.json and .csv");
    println!("  logs/           server and client logs");
}
