//! `fedhcc study` (the cross-center study) on the real binary, with a synthetic three-center clinical
//! cohort, so that a leave-one-center-out federation (two centers) differs from a local-only model.
//! Every cell is checked against an independent path to the same number: the local-only model at its
//! own center against `fedhcc train --mode local`, the centralised model's pooled cell against
//! `fedhcc train --mode central`, the federated model at each center against the server's own
//! federated evaluation of the same run; `fedhcc report --cross-center` shows every matrix; a bad
//! study file or an output folder that is not a study's is refused with nothing written.

use crate::harness::{fedhcc, site_config_text, synth_clinical};
use serde_json::Value;
use std::path::Path;

const SITES: [&str; 3] = ["center_a", "center_b", "center_c"];

fn write_inputs(dir: &Path) {
    synth_clinical(&dir.join("cohort"), 3, 600, 3);
    std::fs::write(
        dir.join("study.toml"),
        "study_id = \"cc-test\"\nrun_id = \"run-1\"\n[federation]\nrounds = 2\nmin_sites = 3\nround_timeout_s = 120\n\
         evaluate_every = 1\nsecure_aggregation = true\n\
         [training]\nlocal_epochs = 2\nbatch_size = 32\nlearning_rate = 0.01\nseed = 5\n\
         [model]\nkind = \"clinical\"\nhidden = []\n\
         [cohort]\npreset = \"hcc_preoperative\"\n[cohort.outcomes]\ncutoff = \"2024-07-30\"\nhorizon_days = 730\n\
         death_before_horizon = \"exclude\"\n",
    )
    .unwrap();
    for site in SITES {
        std::fs::write(dir.join(format!("site-{site}.toml")), site_config_text(site, 1)).unwrap();
    }
    std::fs::write(
        dir.join("cross-center.toml"),
        "out = \"cc\"\n[[model]]\nname = \"clinical\"\n\
         site_configs = [\"site-center_a.toml\", \"site-center_b.toml\", \"site-center_c.toml\"]\n",
    )
    .unwrap();
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The cell of `row` at `at` in one matrix of cross-center.json.
fn cell(m: &Value, row: &str, at: &str) -> f64 {
    let r = m["rows"].as_array().unwrap().iter().find(|r| r["trained_on"] == row).unwrap_or_else(|| panic!("{row}"));
    r["evaluated_at"][at].as_f64().unwrap_or_else(|| panic!("{row} at {at}: {}", r["evaluated_at"]))
}

/// `fedhcc train … --json`'s test AUC.
fn train_auc(dir: &Path, mode: &str, sites: &[&str]) -> f64 {
    let out = dir.join(format!("{mode}-{}.fhcp", sites.join("-")));
    let mut args = vec!["train", "--mode", mode, "--out", out.to_str().unwrap(), "--json"];
    let configs: Vec<String> =
        sites.iter().map(|s| dir.join(format!("site-{s}.toml")).to_str().unwrap().to_string()).collect();
    for c in &configs {
        args.extend(["--site-config", c.as_str()]);
    }
    let (ok, stdout, stderr) = fedhcc(&args);
    assert!(ok, "train --mode {mode}: {stderr}");
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    v["test"]["metrics"]["auc"].as_f64().unwrap()
}

#[test]
fn the_cross_center_study_fills_every_cell_and_each_agrees_with_an_independent_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_inputs(dir);
    let (ok, stdout, stderr) = fedhcc(&["study", "--config", dir.join("cross-center.toml").to_str().unwrap()]);
    assert!(ok, "fedhcc study failed: {stderr}\n{stdout}");
    assert!(stdout.contains("[8/8] central: pooled data"), "progress: {stdout}");
    let out = dir.join("cc");
    let m = read_json(&out.join("clinical/cross-center.json"));

    // Rows: federated, three leave-one-center-out federations, three local-only models, central.
    let rows: Vec<&str> = m["rows"].as_array().unwrap().iter().map(|r| r["trained_on"].as_str().unwrap()).collect();
    assert_eq!(
        rows,
        [
            "federated: all centers",
            "federated without center_a",
            "federated without center_b",
            "federated without center_c",
            "center_a only",
            "center_b only",
            "center_c only",
            "central: pooled data"
        ]
    );
    for (metric, matrix) in std::iter::once(("auc", &m))
        .chain(m["secondary"].as_array().unwrap().iter().map(|s| (s["metric"].as_str().unwrap(), s)))
    {
        for r in matrix["rows"].as_array().unwrap() {
            let cells = r["evaluated_at"].as_object().unwrap();
            assert_eq!(cells.keys().collect::<Vec<_>>(), ["center_a", "center_b", "center_c", "pooled"], "{metric}");
            for (at, v) in cells {
                let v = v.as_f64().unwrap_or_else(|| panic!("{metric}: {} at {at} is empty", r["trained_on"]));
                assert!((0.0..=1.0).contains(&v), "{metric} {v}");
            }
        }
    }
    let secondary: Vec<&str> =
        m["secondary"].as_array().unwrap().iter().map(|s| s["metric"].as_str().unwrap()).collect();
    assert_eq!(secondary, ["c_index_rfs", "c_index_os"]);

    // Local-only at its own center = `fedhcc train --mode local` on that site's test split, exactly.
    for s in SITES {
        assert_eq!(cell(&m, &format!("{s} only"), s), train_auc(dir, "local", &[s]), "{s} only");
    }
    // The centralised model over every test patient = `fedhcc train --mode central`, exactly.
    assert_eq!(cell(&m, "central: pooled data", "pooled"), train_auc(dir, "central", &SITES));
    // A leave-one-center-out federation is not a local model (two centers trained it).
    assert_ne!(cell(&m, "federated without center_c", "center_c"), cell(&m, "center_a only", "center_c"));

    // The federated model at each center = the server's federated evaluation of its final round.
    let c_rfs = m["secondary"][0].clone();
    let state = out.join("clinical/runs/federated-all-centers/server-state");
    let (ok, stdout, stderr) = fedhcc(&[
        "report",
        "--server-state",
        state.to_str().unwrap(),
        "--out",
        dir.join("report").to_str().unwrap(),
        "--cross-center",
        out.join("clinical/cross-center.json").to_str().unwrap(),
    ]);
    assert!(ok, "report: {stderr}\n{stdout}");
    let report = read_json(&dir.join("report/report.json"));
    let per_site = &report["evaluation"]["sites"];
    for s in SITES {
        let fed = per_site.as_array().unwrap().iter().find(|x| x["name"] == s).unwrap_or_else(|| panic!("{per_site}"));
        // The sites suppress an AUC under their minimum cell size (10 positives); Harrell's C always goes.
        let server_c = fed["c_index"].as_f64().unwrap_or_else(|| panic!("{fed}"));
        assert!((server_c - cell(&c_rfs, "federated: all centers", s)).abs() < 1e-12, "{s}: {server_c}");
        if let Some(server_auc) = fed["auc"]["estimate"].as_f64() {
            assert!((server_auc - cell(&m, "federated: all centers", s)).abs() < 1e-12, "{s}: {server_auc}");
        }
    }
    let html = std::fs::read_to_string(dir.join("report/report.html")).unwrap();
    for metric in ["(auc)", "(c_index_rfs)", "(c_index_os)"] {
        assert!(html.contains(metric), "report.html lacks the {metric} matrix");
    }
    let csv = std::fs::read_to_string(dir.join("report/cross_center.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 8, "{csv}");
    assert!(csv.starts_with("metric,trained_on,center_a,center_b,center_c,pooled"), "{csv}");

    // The long table and the summary; nothing patient-level.
    let cells = std::fs::read_to_string(out.join("clinical/cross-center.csv")).unwrap();
    assert_eq!(cells.lines().count(), 1 + 8 * 4);
    let study = read_json(&out.join("study.json"));
    assert_eq!(study["models"][0]["trained"].as_array().unwrap().len(), 8);
    assert!(std::fs::read_to_string(out.join("study.md")).unwrap().contains("| center_a only |"));

    // Running again replaces the study whole; a folder that is not a study's is refused.
    let (ok, _, stderr) = fedhcc(&[
        "study",
        "--config",
        dir.join("cross-center.toml").to_str().unwrap(),
        "--rounds",
        "1",
        "--out",
        dir.join("cohort").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("is not a previous cross-center study"), "{stderr}");
    assert!(dir.join("cohort/center_a/clinical.csv").exists());
}

#[test]
fn a_bad_study_file_is_refused_before_anything_trains_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_inputs(dir);
    // A site of another study.
    let other = std::fs::read_to_string(dir.join("study.toml")).unwrap().replace("cc-test", "other-study");
    std::fs::write(dir.join("other.toml"), other).unwrap();
    let site_c = std::fs::read_to_string(dir.join("site-center_c.toml")).unwrap().replace("study.toml", "other.toml");
    std::fs::write(dir.join("site-center_c.toml"), site_c).unwrap();
    let (ok, _, stderr) = fedhcc(&["study", "--config", dir.join("cross-center.toml").to_str().unwrap()]);
    assert!(!ok && stderr.contains("site-center_c.toml") && stderr.contains("other-study"), "{stderr}");
    // An unknown setting.
    std::fs::write(dir.join("bad.toml"), "settings = [\"federated\", \"bootstrap\"]\n").unwrap();
    let (ok, _, stderr) = fedhcc(&["study", "--config", dir.join("bad.toml").to_str().unwrap()]);
    assert!(!ok && stderr.contains("bad.toml") && stderr.contains("bootstrap"), "{stderr}");
    assert!(!dir.join("cc").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}
