//! `fedhcc report` end to end: the report `fedhcc demo` writes after a real federated run (processes,
//! mutual TLS), its HTML self-contained and its tables readable; the pooled figures a report computes
//! from an evaluation file of site summaries; and a bad state folder refused with nothing written.

use crate::harness::fedhcc;
use fedhcc_server::store::{EvaluationRecord, RoundRecord, Store};
use fedhcc_stats::federated::{EvaluationSettings, SiteEvaluation, SitePredictions};
use serde_json::{Value, json};
use std::path::Path;

/// The sections every report has (their `id`s in report.html).
const SECTIONS: [&str; 9] =
    ["summary", "study", "flow", "performance", "survival", "training", "cross-center", "provenance", "notes"];

/// Checks that `html` is one self-contained page: every section, inline SVG, and no tag that loads or
/// links anything outside the page (no script, stylesheet link, image, or URL in any tag).
fn assert_self_contained(html: &str) {
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for id in SECTIONS {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "section {id} missing");
    }
    assert!(html.contains("<svg"), "no inline SVG");
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    for tag in html.split('<').skip(1).map(|t| t.split('>').next().unwrap_or("")) {
        let lower = tag.to_ascii_lowercase();
        assert!(!lower.contains("http:") && !lower.contains("https:"), "a URL in a tag: <{tag}>");
        for loads in ["script", "link ", "img ", "iframe", "object ", "embed "] {
            assert!(!lower.starts_with(loads), "<{tag}> loads something");
        }
        assert!(!lower.contains("src=") && !lower.contains("url("), "<{tag}>");
    }
    assert!(!html.contains("@import"));
}

/// Every CSV table parses, with the same number of fields on every row; returns the rows of each.
fn read_csvs(dir: &Path) -> std::collections::BTreeMap<String, Vec<csv::StringRecord>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "csv") {
            let mut r = csv::Reader::from_path(&path).unwrap();
            let width = r.headers().unwrap().len();
            let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
            assert!(rows.iter().all(|row| row.len() == width), "{}", path.display());
            out.insert(path.file_name().unwrap().to_string_lossy().into_owned(), rows);
        }
    }
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn the_demo_ends_with_a_self_contained_report_and_a_bad_state_folder_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let d = demo.to_str().unwrap();
    let (ok, stdout, stderr) =
        fedhcc(&["demo", "--model", "clinical", "--rounds", "2", "--patients", "200", "--out", d]);
    assert!(ok, "{stdout}\n{stderr}");
    let report = demo.join("report-clinical");
    assert!(stdout.contains(&format!("study report: {}", report.join("report.html").display())), "{stdout}");

    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert_self_contained(&html);
    assert!(html.contains("Training loss per round") && html.contains("center_a") && html.contains("center_b"));

    let j = read_json(&report.join("report.json"));
    for key in
        ["fedhcc_version", "generated_utc", "study", "participant_flow", "training", "evaluation", "fingerprints"]
    {
        assert!(!j[key].is_null(), "report.json has no {key}");
    }
    // The demo validates the exported final model at a site (`fedhcc validate`, then `fedhcc stats` on
    // its predictions at the frozen cut-off): both give the same AUC.
    let v = read_json(&demo.join("validation-clinical/stats.json"));
    let s = read_json(&demo.join("validation-clinical/stats/stats.json"));
    assert!(v["auc"]["estimate"].is_number() && v["auc"]["estimate"] == s["auc"]["estimate"], "{v} {s}");
    assert_eq!(v["cutoff"], s["cutoff"]);
    assert!(demo.join("final-clinical.safetensors").is_file());
    // The demo's cross-center study: federated, each center left out, each alone, pooled data.
    let rows = j["cross_center"]["rows"].as_array().expect("the demo's cross-center matrix");
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(html.contains("(c_index_rfs)") && html.contains("(c_index_os)"));
    assert!(j["notes"].is_array());
    assert_eq!(j["study"]["run_id"], "run-1");
    assert_eq!(j["study"]["study_id"], "hcc-demo");
    assert_eq!(j["study"]["model_kind"], "clinical");
    assert!(j["study"]["secure_aggregation"].is_boolean());
    assert_eq!(j["training"]["rounds"].as_array().unwrap().len(), 2);
    let f = &j["fingerprints"];
    assert_eq!(f["final_checkpoint"]["verified"], true, "{f}");
    assert_eq!(f["final_checkpoint"]["round"], 2);
    assert!(f["model_layout"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(f["inputs"].as_array().unwrap().iter().any(|i| i["what"] == "data check of center_b"));
    let flow = j["participant_flow"]["sites"].as_array().unwrap();
    assert_eq!(flow.iter().map(|s| s["patients_read"].as_u64().unwrap()).sum::<u64>(), 200);
    let e = &j["evaluation"];
    assert_eq!(e["sites"].as_array().unwrap().len(), 2);
    for (site, row) in flow.iter().zip(e["sites"].as_array().unwrap()) {
        assert_eq!(site["evaluated"], row["n"], "the flow ends with the evaluated split");
        assert!(row["n"].as_u64().unwrap() > 0);
    }
    // Pooled figures need every site's summaries; 200 patients leave small held-out splits, so the
    // report either pools or says why not — never both, never neither.
    assert_ne!(e["pooled"].is_null(), e["pooled_unavailable"].is_null());
    if e["pooled"].is_null() {
        assert!(html.contains("Pooled figures are unavailable"), "the page says why there is no pooled row");
    }

    let csvs = read_csvs(&report);
    for name in ["participant_flow.csv", "performance.csv", "training_rounds.csv", "evaluations.csv", "survival_km.csv"]
    {
        assert!(csvs.contains_key(name), "{name} missing");
    }
    assert_eq!(csvs["training_rounds.csv"].len(), 4, "2 rounds × 2 sites");
    assert!(csvs["performance.csv"].len() >= 2);
    let read: u64 = csvs["participant_flow.csv"]
        .iter()
        .filter(|r| &r[1] == "patients_read")
        .map(|r| r[3].parse::<u64>().unwrap())
        .sum();
    assert_eq!(read, 200);

    // Without data checks the flow is missing and the report says so; a second report replaces the first.
    let state = demo.join("server-state");
    let (ok, stdout, stderr) =
        fedhcc(&["report", "--server-state", state.to_str().unwrap(), "--out", report.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("participant flow is missing"), "{stdout}");
    assert!(read_json(&report.join("report.json"))["participant_flow"].is_null());

    // A folder that is not a server's state: a clear error, and no output folder, not even a partial one.
    for bad in [demo.join("data"), tmp.path().join("nowhere")] {
        let out = tmp.path().join("bad-report");
        let (ok, _, stderr) =
            fedhcc(&["report", "--server-state", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!ok);
        assert!(stderr.contains(bad.to_str().unwrap()) && stderr.contains("state"), "{stderr}");
        assert!(!out.exists());
        let partial = std::fs::read_dir(tmp.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains("partial"));
        assert!(!partial, "a temporary folder was left behind");
    }
    // An unknown run names the runs there are.
    let (ok, _, stderr) = fedhcc(&[
        "report",
        "--server-state",
        state.to_str().unwrap(),
        "--run",
        "run-9",
        "--out",
        tmp.path().join("r9").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("run-9") && stderr.contains("run-1"), "{stderr}");
}

/// A server state folder as a finished run leaves it: one committed round with its checkpoint, the
/// evaluation records, the pooled evaluation file and the effective configuration.
fn state_with_evaluation(state: &Path) -> Vec<(String, SitePredictions)> {
    let mut store = Store::open(state, "run-x").unwrap();
    store.check_identity("study-x", "fingerprint-x").unwrap();
    let model = crate::harness::model(10);
    let (path, sha, _) = store.write_checkpoint(1, &model).unwrap();
    let sites = vec![
        ("center_a".to_string(), SitePredictions::synthetic(160, 1)),
        ("center_b".to_string(), SitePredictions::synthetic(120, 2)),
    ];
    store
        .commit_round(&RoundRecord {
            round: 1,
            attempt: 1,
            task_id: "r1a1".into(),
            participants: sites.iter().map(|s| s.0.clone()).collect(),
            samples: vec![500, 400],
            losses: vec![Some(0.62), Some(0.58)],
            failures: vec![],
            duration_s: 1.5,
            aggregate_s: 0.01,
            bytes_in: 1000,
            bytes_out: 1000,
            checkpoint: path.display().to_string(),
            checkpoint_sha256: sha,
            committed_unix: 0,
            strategy_state: None,
            strategy_state_sha256: None,
            secure_aggregation: true,
            epsilon: Some(0.42),
        })
        .unwrap();
    let settings = EvaluationSettings { cutoff: Some(0.5), ..EvaluationSettings::default() };
    let mut entries = Vec::new();
    for (site, p) in &sites {
        let summary = SiteEvaluation::compute(p, None, &settings).unwrap();
        let auc = summary.auc.unwrap().estimate;
        store
            .record_evaluation(&EvaluationRecord {
                round: 1,
                task_id: "e1a1".into(),
                site: site.clone(),
                samples: p.len() as u64,
                metrics: vec![("auc".into(), auc)],
                summary: Some(summary.clone()),
            })
            .unwrap();
        entries.push(json!({"site": site, "samples": p.len(), "metrics": {"auc": auc}, "summary": summary}));
    }
    drop(store);
    std::fs::create_dir_all(state.join("evaluation")).unwrap();
    let file = json!({"task_id": "e1a1", "run_id": "run-x", "round": 1, "sites": entries, "missing": []});
    std::fs::write(state.join("evaluation/e1a1.json"), serde_json::to_vec(&file).unwrap()).unwrap();
    std::fs::write(
        state.join("effective-config.toml"),
        "[study]\nstudy_id = \"study-x\"\nrun_id = \"run-x\"\n\n[study.federation]\nrounds = 1\nsecure_aggregation = true\n\n\
         [study.federation.dp]\nnoise_multiplier = 1.1\nl2_clip = 1.0\ndelta = 1e-5\n\n[study.model]\nkind = \"clinical\"\n",
    )
    .unwrap();
    sites
}

#[test]
fn the_report_pools_site_summaries_and_shows_privacy_settings_and_the_cross_center_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let sites = state_with_evaluation(&state);
    std::fs::write(
        state.join("cross-center.json"),
        r#"{"metric": "auc", "rows": [{"trained_on": "center_a", "evaluated_at": {"center_a": 0.71, "center_b": 0.64}},
            {"trained_on": "federated", "evaluated_at": {"center_a": 0.73, "center_b": null}}]}"#,
    )
    .unwrap();
    let out = tmp.path().join("report");
    let (ok, stdout, stderr) =
        fedhcc(&["report", "--server-state", state.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("pooled AUC"), "{stdout}");

    let j = read_json(&out.join("report.json"));
    assert_eq!(j["study"]["secure_aggregation"], true);
    assert_eq!(j["study"]["differential_privacy"]["noise_multiplier"], 1.1);
    assert_eq!(
        (j["study"]["epsilon_spent"].as_f64(), j["study"]["rounds_securely_aggregated"].as_u64()),
        (Some(0.42), Some(1))
    );
    let e = &j["evaluation"];
    assert!(e["source"].as_str().unwrap().contains("e1a1.json"));
    let pooled = &e["pooled"];
    assert_eq!(pooled["n"], 280);
    // The pooled AUC is that of the pooled patients' binned scores (1000 bins), within the bin width
    // of the patient-level AUC; its interval is DeLong's.
    let mut all = SitePredictions::default();
    for (_, p) in sites {
        all.extend(p);
    }
    let (labels, scores) = all.labelled();
    let exact = fedhcc_stats::binary::auc_delong(&labels, &scores, 0.95).unwrap();
    let got = pooled["auc"]["estimate"].as_f64().unwrap();
    assert!((got - exact.estimate).abs() < 1e-3, "{got} vs {}", exact.estimate);
    assert!((pooled["auc"]["ci_low"].as_f64().unwrap() - exact.ci_low).abs() < 2e-3);
    // Pooled sensitivity counts and the Kaplan–Meier curves cover every patient.
    let c = fedhcc_stats::binary::Confusion::at(&labels, &scores, 0.5).unwrap();
    assert_eq!(pooled["sensitivity"]["count"], c.tp);
    let rfs = e["survival"].as_array().unwrap().iter().find(|o| o["outcome"] == "rfs").unwrap();
    let at_start: u64 = rfs["km"].as_array().unwrap().iter().map(|g| g["curve"]["at_risk"][0].as_u64().unwrap()).sum();
    assert_eq!(at_start, 280);
    assert!(pooled["hazard_ratio"]["hr"].as_f64().unwrap() > 1.0, "high risk fares worse");

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_self_contained(&html);
    for shown in
        ["ROC curves", "Calibration", "Decision curve", "Number at risk", "noise_multiplier", "ε spent", "0.640"]
    {
        assert!(html.contains(shown), "{shown} not in the page");
    }
    let csvs = read_csvs(&out);
    assert_eq!(csvs["cross_center.csv"].len(), 2);
    assert!(csvs["survival_km.csv"].len() > 10);
    assert_eq!(csvs["performance.csv"].iter().filter(|r| &r[0] == "pooled").count(), 1);

    // An altered checkpoint is reported, not trusted; without the evaluation file the same pooled
    // figures come from the summaries in server.db.
    let ckpt = std::fs::read_dir(state.join("checkpoints")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&ckpt, b"altered").unwrap();
    std::fs::remove_file(state.join("evaluation/e1a1.json")).unwrap();
    let (ok, _, stderr) =
        fedhcc(&["report", "--server-state", state.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let j = read_json(&out.join("report.json"));
    assert_eq!(j["fingerprints"]["final_checkpoint"]["verified"], false);
    assert!(j["evaluation"]["source"].as_str().unwrap().contains("server.db"));
    assert_eq!(j["evaluation"]["pooled"]["auc"]["estimate"].as_f64(), Some(got));
    assert!(j["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("altered")));
}
