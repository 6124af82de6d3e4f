//! `fedhcc stats` end to end: the real binary on predictions made from the NCCTG lung fixture, its
//! stats.json checked against the reference packages' numbers (`shared/stats/tests/reference.json`,
//! from `scripts/stats_reference.py`), and bad input refused with nothing written.

use crate::harness::{assert_stats_json_keys, fedhcc};
use serde_json::Value;
use std::path::Path;

fn reference() -> Value {
    serde_json::from_str(include_str!("../../shared/stats/tests/reference.json")).expect("reference.json parses")
}

/// Writes a predictions CSV (with an id column the command must ignore) for one reference case.
fn write_predictions(reference: &Value, case: &Value, path: &Path) {
    let d = &reference["inputs"][case["dataset"].as_str().unwrap()];
    let score = d[case["score"].as_str().unwrap()].as_array().unwrap();
    let with_group = case["group"].is_string();
    let mut csv =
        String::from(if with_group { "id,score,label,time,event,group\n" } else { "id,score,label,time,event\n" });
    for i in 0..score.len() {
        let label = d["label"][i].as_i64().map_or(String::new(), |l| l.to_string());
        csv += &format!(
            "p{i},{},{label},{},{}",
            score[i].as_f64().unwrap(),
            d["time"][i].as_f64().unwrap(),
            d["event"][i]
        );
        if with_group {
            csv += &format!(",{}", d["group"][i].as_str().unwrap());
        }
        csv.push('\n');
    }
    std::fs::write(path, csv).unwrap();
}

fn compare(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => compare(&format!("{path}.{k}"), ev, av, out),
                    None => out.push(format!("{path}.{k}: missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                compare(&format!("{path}[{i}]"), ev, av, out);
            }
        }
        (Value::Number(e), Value::Number(a)) => {
            let (e, a) = (e.as_f64().unwrap(), a.as_f64().unwrap());
            if (e - a).abs() > 1e-6 * e.abs().max(1.0) {
                out.push(format!("{path}: expected {e}, got {a}"));
            }
        }
        (e, a) if e == a => {}
        (e, a) => out.push(format!("{path}: expected {}, got {}", short(e), short(a))),
    }
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(80).collect()
}

fn run_case(name: &str) -> (Value, Value) {
    let reference = reference();
    let case = reference["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("predictions.csv");
    write_predictions(&reference, &case, &csv);
    let out = dir.path().join("out");
    let times: Vec<String> = case["times"].as_array().unwrap().iter().map(|t| t.to_string()).collect();
    let times = times.join(",");
    let mut args = vec!["stats", "--predictions", csv.to_str().unwrap(), "--times", &times];
    let cutoff = case["cutoff"].as_f64().map(|c| c.to_string());
    if let Some(c) = &cutoff {
        args.extend(["--cutoff", c]);
    }
    args.extend(["--bootstrap", "300", "--out", out.to_str().unwrap()]);
    let (ok, stdout, stderr) = fedhcc(&args);
    assert!(ok, "fedhcc stats failed: {stderr}");
    assert!(stdout.contains("AUC"), "{stdout}");
    for plot in ["roc.svg", "km.svg", "calibration.svg", "decision_curve.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{plot}");
        assert!(!svg.contains("<script") && !svg.contains("@font-face"), "{plot}");
    }
    let stats: Value = serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap();
    // Nothing but the outputs: no temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    (stats, case["expected"].clone())
}

#[test]
fn stats_with_probability_score_and_cutoff_matches_reference_packages() {
    let (stats, expected) = run_case("lung_prob_cutoff");
    assert_stats_json_keys(&stats);
    for key in ["estimate", "se", "ci_low", "ci_high"] {
        assert!(stats["auc"][key].is_number(), "auc.{key}");
    }
    assert_eq!(stats["cutoff_source"], "given");
    assert_eq!(stats["logrank_by"], "cutoff");
    assert!(stats["brier"].is_number() && stats["calibration"]["slope"].is_number());
    let mut failures = Vec::new();
    compare("stats", &expected, &stats, &mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (lo, hi) =
        (stats["auc_bootstrap"]["ci_low"].as_f64().unwrap(), stats["auc_bootstrap"]["ci_high"].as_f64().unwrap());
    let auc = stats["auc"]["estimate"].as_f64().unwrap();
    assert!(lo < auc && auc < hi, "bootstrap interval {lo}–{hi} around {auc}");
}

#[test]
fn stats_by_group_with_youden_cutoff_and_non_probability_score() {
    let (stats, expected) = run_case("lung_lin_group_youden");
    assert_eq!(stats["cutoff_source"], "youden");
    assert!(stats["notes"]["cutoff"].as_str().unwrap().contains("Youden"), "{}", stats["notes"]);
    assert_eq!(stats["logrank_by"], "group");
    assert_eq!(stats["logrank"]["df"], 3);
    for key in ["brier", "calibration", "net_benefit"] {
        assert!(stats[key].is_null(), "{key} must be null for a score outside [0, 1]");
        assert!(stats["notes"][key].as_str().unwrap().contains("not a probability"), "{}", stats["notes"]);
    }
    let mut failures = Vec::new();
    compare("stats", &expected, &stats, &mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn stats_refuses_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 5] = [
        ("missing.csv", "score,label,event\n0.1,1,1\n", &["missing.csv", "missing column 'time'"]),
        (
            "text.csv",
            "score,label,time,event\n0.1,1,30,1\n0.4,0,abc,0\n",
            &["text.csv", "line 3", "column 'time'", "'abc'"],
        ),
        ("label.csv", "score,label,time,event\n0.1,2,30,1\n", &["label.csv", "line 2", "column 'label'", "not 0 or 1"]),
        ("nan.csv", "score,label,time,event\n0.2,1,30,1\nNaN,0,40,0\n", &["nan.csv", "line 3", "column 'score'"]),
        ("empty.csv", "", &["empty.csv"]),
    ];
    for (file, text, needles) in cases {
        let csv = dir.path().join(file);
        std::fs::write(&csv, text).unwrap();
        let out = dir.path().join(format!("out-{file}"));
        let (ok, _, stderr) =
            fedhcc(&["stats", "--predictions", csv.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!ok, "{file}: accepted");
        for needle in needles {
            assert!(stderr.contains(needle), "{file}: '{needle}' not in: {stderr}");
        }
        assert!(!out.exists(), "{file}: output written despite the error");
    }
    let entries = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(entries, cases.len(), "only the input files remain");
}
