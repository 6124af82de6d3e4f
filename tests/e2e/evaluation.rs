//! Federated evaluation and `fedhcc validate` on the real binary, as separate processes over mutual
//! TLS: a synthetic cohort of three centers; two of them train the clinical model federated; the
//! server's `evaluation/<task>.json` is checked against `fedhcc validate` of the exported final
//! model on each site's own test split (per-site figures exactly) and against `fedhcc stats` on the
//! two sites' predictions together (pooled Kaplan–Meier and log-rank exactly, pooled AUC within
//! 1e-3). Then a locally trained model is validated at the third center, which never trained, and
//! models of another layout, another study or altered bytes are refused with nothing written. And a
//! site's bad evaluation summary is refused by the server with nothing stored.

use crate::harness::{
    FEDHCC_BIN, STUDY, assert_stats_json_keys, chunks, fedhcc, header_for, json, make_certs, model, next_train,
    open_tasks, raw_upload, site_config_text, start_server, synth_clinical,
};
use fedhcc_proto as pb;
use fedhcc_stats::federated::{EvaluationSettings, SiteEvaluation, SitePredictions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SITES: [&str; 2] = ["center_a", "center_b"];

/// The study file: the clinical model (logistic regression), 3 rounds, `[evaluation]` on a 30-day grid.
fn study(study_id: &str, hidden: &str) -> String {
    format!(
        "study_id = \"{study_id}\"\nrun_id = \"run-1\"\n[federation]\nrounds = 3\nmin_sites = 2\nround_timeout_s = 120\n\
         [training]\nlocal_epochs = 3\nbatch_size = 32\nlearning_rate = 0.01\nseed = 7\n\
         [model]\nkind = \"clinical\"\nhidden = {hidden}\n\
         [cohort]\npreset = \"hcc_preoperative\"\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\nhorizon_days = 730\n\
         death_before_horizon = \"exclude\"\n[evaluation]\ntime_grid_days = 30\nhistogram_bins = 1000\n"
    )
}

/// Writes the server's and each center's configuration into `dir`; returns the server's.
fn write_configs(dir: &Path, port: u16) -> PathBuf {
    std::fs::write(dir.join("study.toml"), study(STUDY, "[]")).unwrap();
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "study = \"study.toml\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\nallowed_sites = [\"center_a\", \"center_b\"]\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key.pem\"\ncrl = \"certs/crl.pem\"\n"
        ),
    )
    .unwrap();
    for site in ["center_a", "center_b", "center_c"] {
        std::fs::write(dir.join(format!("site-{site}.toml")), site_config_text(site, port)).unwrap();
    }
    dir.join("server.toml")
}

fn spawn(args: &[&str], log: &Path) -> Child {
    Command::new(FEDHCC_BIN)
        .args(args)
        .env("FEDHCC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Kills what is still running when the test ends early.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn close(a: &Value, b: &Value, tol: f64, what: &str) {
    let (x, y) =
        (a.as_f64().unwrap_or_else(|| panic!("{what}: {a}")), b.as_f64().unwrap_or_else(|| panic!("{what}: {b}")));
    assert!((x - y).abs() <= tol, "{what}: {x} vs {y}");
}

/// Every number of `a` and `b` (same structure) within `tol`.
fn same(a: &Value, b: &Value, tol: f64, path: &str) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                same(v, y.get(k).unwrap_or_else(|| panic!("{path}.{k} missing")), tol, &format!("{path}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: lengths");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                same(v, w, tol, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(_), Value::Number(_)) => close(a, b, tol, path),
        _ => assert_eq!(a, b, "{path}"),
    }
}

/// `fedhcc validate …`; returns the output folder's stats.json and validation.json, and the cut-off
/// as printed (exact: Rust prints the shortest text that reads back as the same number).
fn validate(model: &Path, site_config: &Path, out: &Path, extra: &[&str]) -> (Value, Value, Option<f64>) {
    let mut args = vec![
        "validate",
        "--model",
        model.to_str().unwrap(),
        "--site-config",
        site_config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let (ok, stdout, stderr) = fedhcc(&args);
    assert!(ok, "fedhcc validate failed: {stderr}");
    assert!(stdout.contains("stays at this site"), "{stdout}");
    let cutoff = stdout.lines().find_map(|l| l.strip_prefix("cut-off ")?.split(' ').next()?.parse().ok());
    (read_json(&out.join("stats.json")), read_json(&out.join("validation.json")), cutoff)
}

fn export(checkpoint: &Path, study: &Path, out: &Path) {
    let (ok, _, stderr) = fedhcc(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--study",
        study.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "fedhcc export failed: {stderr}");
}

#[test]
fn federated_evaluation_matches_site_predictions_and_validate_works_at_an_external_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth_clinical(&dir.join("cohort"), 3, 1500, 5);
    make_certs(dir, &SITES);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server_cfg = write_configs(dir, port);

    // The federated run: server and two clients, each its own process.
    let mut procs =
        Processes(vec![spawn(&["server", "--config", server_cfg.to_str().unwrap()], &dir.join("server.log"))]);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in SITES {
        let cfg = dir.join(format!("site-{s}.toml"));
        procs.0.push(spawn(&["client", "--config", cfg.to_str().unwrap()], &dir.join(format!("client-{s}.log"))));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for (k, c) in procs.0.iter_mut().enumerate() {
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                let log = ["server.log", "client-center_a.log", "client-center_b.log"][k];
                assert!(st.success(), "{log}: {}", std::fs::read_to_string(dir.join(log)).unwrap_or_default());
                break;
            }
            assert!(Instant::now() < deadline, "the run did not finish in time");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The server's evaluation report of the final model.
    let reports: Vec<PathBuf> =
        std::fs::read_dir(dir.join("state/evaluation")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(reports.len(), 1, "one evaluation (after the last round), no temporary file: {reports:?}");
    let report = read_json(&reports[0]);
    let task = report["task_id"].as_str().unwrap();
    assert!(task.starts_with("e3a") && reports[0].ends_with(format!("{task}.json")), "{task}");
    assert_eq!(report["round"], 3);
    assert_eq!(report["missing"], serde_json::json!([]));
    let sites = report["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 2);
    let final_checkpoint = dir.join("state/checkpoints/run-1-round-00003.fhcp");
    let model = dir.join("federated.safetensors");
    export(&final_checkpoint, &dir.join("study.toml"), &model);

    // Per site: the figures the site sent equal `fedhcc validate` on its own test split.
    let mut rows = String::from("score,label,time,event,group\n");
    let mut weighted = (0.0, 0.0);
    for (entry, s) in sites.iter().zip(SITES) {
        assert_eq!(entry["site"], s);
        let summary = &entry["summary"];
        assert_eq!(summary["cutoff_source"], "site_training_youden", "{summary}");
        for key in ["auc", "brier", "calibration", "sensitivity", "specificity", "ppv", "npv", "histogram"] {
            assert!(!summary[key].is_null(), "{s}: {key} is null: {}", summary["notes"]);
        }
        assert!(!summary["rfs"]["counts"].is_null(), "{s}: {}", summary["notes"]);
        let out = dir.join(format!("validate-{s}"));
        let cfg = dir.join(format!("site-{s}.toml"));
        let (stats, validation, cutoff) = validate(&model, &cfg, &out, &["--split", "test", "--bootstrap", "0"]);
        let cutoff = cutoff.expect("validate prints its cut-off");
        assert_eq!(validation["split"], "test");
        assert_eq!(validation["external"], false);
        assert_eq!(stats["cutoff_source"], "site_training_youden");
        close(&stats["cutoff"], &summary["cutoff"], 1e-12, "the same frozen cut-off");
        for key in ["n", "n_labelled", "n_positive"] {
            assert_eq!(stats[key], summary[key], "{s}: {key}");
        }
        same(&summary["auc"], &stats["auc"], 1e-12, &format!("{s}.auc"));
        close(&summary["brier"], &stats["brier"], 1e-12, "brier");
        same(&summary["calibration"], &stats["calibration"], 1e-9, &format!("{s}.calibration"));
        for key in ["sensitivity", "specificity", "ppv", "npv"] {
            same(&summary[key], &stats[key], 1e-12, &format!("{s}.{key}"));
        }
        close(&summary["rfs"]["c_index_harrell"], &stats["c_index_harrell"], 1e-12, "Harrell's C");
        // The AUC the site reported among its metrics, computed by the model crate, agrees too.
        close(&entry["metrics"]["auc"], &stats["auc"]["estimate"], 1e-9, "metrics.auc");
        let n_train = summary["n_train_labelled"].as_f64().unwrap();
        weighted = (weighted.0 + cutoff * n_train, weighted.1 + n_train);
        // The site's rows for the pooled check: times rounded up to the grid, its own risk groups.
        let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let (score, time): (f64, f64) = (f[0].parse().unwrap(), f[2].parse().unwrap());
            let group = if score >= cutoff { "high" } else { "low" };
            rows += &format!("{},{},{},{},{group}\n", f[0], f[1], (time / 30.0).ceil() * 30.0, f[3]);
        }
    }

    // Pooled: Kaplan–Meier and log-rank of the merged counts are those of the pooled rows; the AUC of
    // the merged histograms is within 1e-3 of the pooled rows' AUC.
    let pooled = &report["pooled"];
    assert_eq!(pooled["sites"], serde_json::json!(SITES));
    std::fs::write(dir.join("pooled.csv"), rows).unwrap();
    let pooled_stats = dir.join("pooled-stats");
    let (ok, _, stderr) = fedhcc(&[
        "stats",
        "--predictions",
        dir.join("pooled.csv").to_str().unwrap(),
        "--bootstrap",
        "0",
        "--out",
        pooled_stats.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let rows_stats = read_json(&pooled_stats.join("stats.json"));
    assert_eq!(rows_stats["logrank_by"], "group");
    same(&pooled["rfs"]["km"], &rows_stats["km"], 1e-12, "pooled.rfs.km");
    for key in ["chi2", "df", "p"] {
        close(&pooled["rfs"]["logrank"][key], &rows_stats["logrank"][key], 1e-9, key);
    }
    let auc = pooled["auc"].as_f64().unwrap();
    let exact = rows_stats["auc"]["estimate"].as_f64().unwrap();
    assert!((auc - exact).abs() < 1e-3, "pooled AUC {auc} vs {exact} on the pooled rows");
    assert_eq!(pooled["study_cutoff_source"], "weighted_mean_of_site_training_youden");
    close(&pooled["study_cutoff"], &serde_json::json!(weighted.0 / weighted.1), 1e-12, "study cut-off");

    // External validation at a center that never trained, of a model trained at center_a alone.
    let local = dir.join("local.fhcp");
    let trained = json(&[
        "train",
        "--mode",
        "local",
        "--site-config",
        dir.join("site-center_a.toml").to_str().unwrap(),
        "--out",
        local.to_str().unwrap(),
        "--json",
    ]);
    assert!(trained["test"]["n"].as_u64().unwrap() > 0, "{trained}");
    let local_st = dir.join("local.safetensors");
    export(&local, &dir.join("study.toml"), &local_st);
    let external_cfg = dir.join("site-center_c.toml");
    let out = dir.join("validate-center_c");
    let (stats, validation, _) = validate(&local_st, &external_cfg, &out, &["--bootstrap", "200"]);
    assert_stats_json_keys(&stats);
    assert!(stats["auc"]["estimate"].as_f64().is_some(), "{}", stats["notes"]);
    assert_eq!(validation["external"], true);
    assert_eq!(validation["split"], "all");
    assert_eq!(validation["site_id"], "center_c");
    assert_eq!(validation["standardisation"], "the pooled statistics the model carries");
    let synth_rows = std::fs::read_to_string(dir.join("cohort/center_c/clinical.csv")).unwrap().lines().count() - 1;
    let scored = validation["patients_scored"].as_u64().unwrap() as usize;
    assert!(scored > synth_rows / 2 && scored <= synth_rows, "{scored} of {synth_rows} patients scored");
    assert!(stats["notes"]["validation"].as_str().unwrap().contains("no training split"), "{}", stats["notes"]);
    assert_eq!(stats["cutoff_source"], "youden", "no cut-off given: Youden's on these patients, flagged");
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert!(csv.starts_with("score,label,time,event,os_time,os_event\n"));
    assert_eq!(csv.lines().count() - 1, stats["n"].as_u64().unwrap() as usize);
    for plot in ["roc.svg", "km.svg", "calibration.svg", "decision_curve.svg"] {
        assert!(std::fs::read_to_string(out.join(plot)).unwrap().trim_end().ends_with("</svg>"), "{plot}");
    }

    // Refused, with nothing written: another layout, another study, altered bytes.
    std::fs::write(dir.join("wide.toml"), study(STUDY, "[4]")).unwrap();
    std::fs::write(
        dir.join("site-wide.toml"),
        std::fs::read_to_string(dir.join("site-center_a.toml")).unwrap().replace("study.toml", "wide.toml"),
    )
    .unwrap();
    let wide = dir.join("wide.fhcp");
    let (ok, _, stderr) = fedhcc(&[
        "train",
        "--site-config",
        dir.join("site-wide.toml").to_str().unwrap(),
        "--rounds",
        "1",
        "--out",
        wide.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let wide_st = dir.join("wide.safetensors");
    export(&wide, &dir.join("wide.toml"), &wide_st);
    std::fs::write(dir.join("other.toml"), study("other-study", "[]")).unwrap();
    let other_st = dir.join("other.safetensors");
    export(&local, &dir.join("other.toml"), &other_st);
    let altered = dir.join("altered.safetensors");
    let mut bytes = std::fs::read(&local_st).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let fp = validation["fingerprint"].as_str().unwrap();
    let flipped = format!("{}{}", if fp.starts_with('0') { "1" } else { "0" }, &fp[1..]);
    bytes.splice(8..8 + header_len, header.replace(fp, &flipped).into_bytes());
    std::fs::write(&altered, bytes).unwrap();
    for (file, needles) in [
        (&wide_st, &["wide.safetensors", "does not fit this study file", "layout"][..]),
        (&other_st, &["other.safetensors", "study 'other-study'", STUDY][..]),
        (&altered, &["altered.safetensors", "altered"][..]),
    ] {
        let refused = dir.join("refused");
        let (ok, _, stderr) = fedhcc(&[
            "validate",
            "--model",
            file.to_str().unwrap(),
            "--site-config",
            external_cfg.to_str().unwrap(),
            "--out",
            refused.to_str().unwrap(),
        ]);
        assert!(!ok, "{} accepted", file.display());
        for needle in needles {
            assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
        }
        assert!(!refused.exists(), "output written for a refused model");
    }
}

/// A site's predictions: `n` patients, scores that rank the labels and events imperfectly.
fn predictions(n: usize, offset: usize) -> SitePredictions {
    let mut p = SitePredictions::default();
    for i in 0..n {
        let k = (i * 61 + offset) % 97;
        let score = (k as f64 + 0.5) / 97.0;
        p.score.push(score);
        p.label.push(Some((k + i % 7 * 9) % 97 > 55));
        p.rfs.push(Some((30.0 + ((i * 37) % 60) as f64 * 25.0, (k + i % 5 * 11) % 97 > 40)));
        p.os.push(None);
    }
    p
}

#[tokio::test]
async fn a_bad_evaluation_summary_is_refused_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    let mut server = start_server(tmp.path(), &["a"], crate::harness::study(1, 1, 120), model(10)).await;
    let mut a = server.client_as("a").await;
    let mut tasks = open_tasks(&mut a).await;
    let train = next_train(&mut tasks).await;
    let mut d = model(10);
    d.values_mut().iter_mut().for_each(|v| *v = 0.5);
    let delta = d.encode();
    let mut header = header_for(train.task.as_ref().unwrap(), &delta, &train.model_fingerprint, 1 << 20);
    header.num_samples = 10;
    raw_upload(&mut a, header, chunks(&delta)).await.unwrap();
    let evaluate = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), tasks.message()).await.unwrap().unwrap().unwrap();
        if let Some(pb::task_event::Event::Evaluate(t)) = ev.event {
            break t;
        }
    };
    let tref = evaluate.task.clone().unwrap();
    let good =
        SiteEvaluation::compute(&predictions(150, 3), Some(&predictions(300, 11)), &EvaluationSettings::default())
            .unwrap();
    assert!(good.auc.is_some() && good.histogram.is_some() && good.rfs.as_ref().unwrap().counts.is_some());
    let report = |summary: Vec<u8>| pb::EvaluationReport {
        task: Some(tref.clone()),
        num_samples: 150,
        metrics: vec![pb::Metric { name: "auc".into(), value: 0.7 }],
        summary: summary.into(),
    };
    let mut below_floor = good.clone();
    below_floor.min_cell = 2;
    let mut other_bins = good.clone();
    other_bins.histogram = Some(fedhcc_stats::pooled::ScoreHistogram::new(10).unwrap());
    let mut off_grid = good.clone();
    off_grid.rfs.as_mut().unwrap().counts.as_mut().unwrap().groups.values_mut().next().unwrap().time[0] += 1.0;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("floor", serde_json::to_vec(&below_floor).unwrap(), "below the study's floor"),
        ("bins", serde_json::to_vec(&other_bins).unwrap(), "the study's has 1000"),
        ("grid", serde_json::to_vec(&off_grid).unwrap(), "not on the 30-day grid"),
        ("json", b"{\"version\": 1, \"n\": \"many\"}".to_vec(), "not a site evaluation summary"),
        ("size", vec![b' '; fedhcc_stats::federated::MAX_SUMMARY_BYTES + 1], "at most"),
    ];
    let state = server.state();
    let store = || fedhcc_server::store::Store::open(&state, "run-1").unwrap();
    for (name, bytes, words) in cases {
        let err = a.report_evaluation(report(bytes)).await.expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {}", err.message());
        assert!(err.message().contains(words), "{name}: '{}' should mention '{words}'", err.message());
        assert!(store().evaluations().unwrap().is_empty(), "{name}: an evaluation was recorded");
        assert_eq!(server.status().await.phase, "evaluating", "{name}: the evaluation moved on");
    }
    assert!(!state.join("evaluation").exists());
    a.report_evaluation(report(good.encode().unwrap())).await.unwrap();
    drop((tasks, a));
    assert!(server.join().await.finished);
    let records = store().evaluations().unwrap();
    assert_eq!(records.len(), 1);
    let stored = records[0].summary.as_ref().expect("the summary is stored with the record");
    assert_eq!(
        (stored.n, stored.histogram.as_ref(), stored.rfs.as_ref()),
        (good.n, good.histogram.as_ref(), good.rfs.as_ref())
    );
    let file = state.join("evaluation").join(format!("{}.json", tref.task_id));
    let written = read_json(&file);
    assert_eq!(written["pooled"]["n"], 150);
    assert_eq!(written["sites"][0]["site"], "a");
}

/// Trains by adding 0.5; evaluates with a summary made with the default settings.
struct SummaryExecutor;

impl fedhcc_client::Executor for SummaryExecutor {
    fn fingerprint(&self) -> Option<fedhcc_core::params::Fingerprint> {
        None
    }
    fn num_samples(&self) -> u64 {
        150
    }
    fn train(
        &mut self,
        global: &fedhcc_core::params::ParameterSet,
        _: &fedhcc_client::TrainSpec,
        _: &fedhcc_client::TaskControl,
    ) -> Result<fedhcc_client::TrainResult, fedhcc_client::ExecutorError> {
        let mut p = global.clone();
        p.values_mut().iter_mut().for_each(|v| *v += 0.5);
        Ok(fedhcc_client::TrainResult { params: p, num_samples: 150, metrics: vec![] })
    }
    fn evaluate(
        &mut self,
        _: &fedhcc_core::params::ParameterSet,
        _: &str,
        _: &fedhcc_client::TaskControl,
    ) -> Result<fedhcc_client::EvalResult, fedhcc_client::ExecutorError> {
        let summary =
            SiteEvaluation::compute(&predictions(150, 3), Some(&predictions(300, 11)), &EvaluationSettings::default())
                .unwrap();
        Ok(fedhcc_client::EvalResult { num_samples: 150, metrics: vec![("auc".into(), 0.7)], summary: Some(summary) })
    }
}

#[tokio::test]
async fn a_summary_the_server_refuses_still_delivers_the_site_s_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    // The server's study wants 500 histogram bins; the site summarises with 1000.
    let mut study = crate::harness::study(1, 1, 120);
    study.evaluation.histogram_bins = 500;
    let mut server = start_server(tmp.path(), &["a"], study, model(10)).await;
    let client = tokio::spawn(fedhcc_client::run(
        crate::harness::client_options(&server, "a"),
        SummaryExecutor,
        tokio_util::sync::CancellationToken::new(),
    ));
    assert!(server.join().await.finished);
    let out = client.await.unwrap().unwrap();
    assert_eq!(out.evaluations, 1, "the metrics were delivered");
    let records = fedhcc_server::store::Store::open(&server.state(), "run-1").unwrap().evaluations().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].metrics, vec![("auc".to_string(), 0.7)]);
    assert!(records[0].summary.is_none(), "the refused summary was not stored");
}
