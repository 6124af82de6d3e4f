//! Every statistic against reference implementations on real data (NCCTG lung and Rossi recidivism,
//! shipped with lifelines; ties and censoring included). `reference.json` is written by
//! `scripts/stats_reference.py` with scikit-learn, scikit-survival, lifelines, statsmodels, dcurves and
//! MLstatkit; see that script for which package gives which number.

use fedhcc_stats::binary::{self, delong_paired};
use fedhcc_stats::pooled::{ScoreHistogram, SurvivalCounts};
use fedhcc_stats::predictions::Predictions;
use fedhcc_stats::report::{StatsOptions, evaluate};
use fedhcc_stats::survival;
use serde_json::Value;

const TOL: f64 = 1e-6;

fn reference() -> Value {
    serde_json::from_str(include_str!("reference.json")).expect("reference.json parses")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

/// One dataset of the reference inputs.
struct Data {
    time: Vec<f64>,
    event: Vec<bool>,
    label: Vec<Option<bool>>,
    score_lin: Vec<f64>,
    score_prob: Vec<f64>,
    group: Vec<String>,
    site: Vec<String>,
}

impl Data {
    fn load(reference: &Value, name: &str) -> Data {
        let d = &reference["inputs"][name];
        let strings =
            |k: &str| d[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect::<Vec<_>>();
        Data {
            time: floats(&d["time"]),
            event: d["event"].as_array().unwrap().iter().map(|v| v.as_i64() == Some(1)).collect(),
            label: d["label"].as_array().unwrap().iter().map(|v| v.as_i64().map(|l| l == 1)).collect(),
            score_lin: floats(&d["score_lin"]),
            score_prob: floats(&d["score_prob"]),
            group: strings("group"),
            site: strings("site"),
        }
    }

    /// The rows for which `keep(row)` holds (one "site").
    fn subset(&self, keep: impl Fn(usize) -> bool) -> Data {
        let idx: Vec<usize> = (0..self.time.len()).filter(|&i| keep(i)).collect();
        let pick = |v: &[f64]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
        Data {
            time: pick(&self.time),
            event: idx.iter().map(|&i| self.event[i]).collect(),
            label: idx.iter().map(|&i| self.label[i]).collect(),
            score_lin: pick(&self.score_lin),
            score_prob: pick(&self.score_prob),
            group: idx.iter().map(|&i| self.group[i].clone()).collect(),
            site: idx.iter().map(|&i| self.site[i].clone()).collect(),
        }
    }

    fn score(&self, name: &str) -> &[f64] {
        match name {
            "score_lin" => &self.score_lin,
            "score_prob" => &self.score_prob,
            other => panic!("unknown score {other}"),
        }
    }

    fn labelled(&self, score: &[f64]) -> (Vec<bool>, Vec<f64>) {
        self.label.iter().zip(score).filter_map(|(l, s)| l.map(|l| (l, *s))).unzip()
    }
}

/// Compares every key of `expected` (recursively) with `actual`: numbers within 1e-6 (relative above
/// 1), nulls must be nulls, arrays must have the same length. Returns the mismatches.
fn compare(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>, worst: &mut f64) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => compare(&format!("{path}.{k}"), ev, av, out, worst),
                    None => out.push(format!("{path}.{k}: missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                out.push(format!("{path}: {} entries expected, {} found", e.len(), a.len()));
            } else {
                for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                    compare(&format!("{path}[{i}]"), ev, av, out, worst);
                }
            }
        }
        (Value::Number(e), Value::Number(a)) => {
            let (e, a) = (e.as_f64().unwrap(), a.as_f64().unwrap());
            *worst = worst.max((e - a).abs() / e.abs().max(1.0));
            if (e - a).abs() > TOL * e.abs().max(1.0) {
                out.push(format!("{path}: expected {e}, got {a} (diff {:e})", a - e));
            }
        }
        (e, a) if e == a => {}
        (e, a) => out.push(format!("{path}: expected {e}, got {a}")),
    }
}

#[test]
fn every_statistic_matches_the_reference_packages() {
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let data = Data::load(&reference, case["dataset"].as_str().unwrap());
        let score = data.score(case["score"].as_str().unwrap()).to_vec();
        let predictions = Predictions {
            score,
            label: data.label.clone(),
            time: data.time.clone(),
            event: data.event.clone(),
            group: case["group"].as_str().map(|_| data.group.clone()),
        };
        let options = StatsOptions {
            cutoff: case["cutoff"].as_f64(),
            times: floats(&case["times"]),
            bootstrap_replicates: 0,
            ..StatsOptions::default()
        };
        let report = serde_json::to_value(evaluate(&predictions, &options)).unwrap();
        let before = failures.len();
        let mut worst = 0.0;
        compare(name, &case["expected"], &report, &mut failures, &mut worst);
        // The comparison must have looked at real numbers, not nulls on both sides.
        for key in ["auc", "c_index_harrell", "c_index_uno", "logrank", "cox", "km", "td_auc", "sensitivity"] {
            assert!(!report[key].is_null(), "{name}: {key} is null: {}", report["notes"]);
        }
        if failures.len() == before {
            eprintln!("{name}: all values within {TOL} (largest difference {worst:.1e})");
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// MLstatkit's `Delong_test` (DeLong et al. 1988, the same test as pROC's `roc.test(method = "delong")`).
#[test]
fn paired_delong_matches_mlstatkit() {
    let reference = reference();
    for case in reference["paired_delong"].as_array().unwrap() {
        let data = Data::load(&reference, case["dataset"].as_str().unwrap());
        let (labels, a) = data.labelled(&data.score_lin);
        let (_, b) = data.labelled(&data.score_prob);
        let r = delong_paired(&labels, &a, &b).unwrap();
        for (key, got) in [("auc_a", r.auc_a), ("auc_b", r.auc_b), ("z", r.z), ("p", r.p)] {
            let want = case[key].as_f64().unwrap();
            assert!((got - want).abs() < TOL, "{} {key}: expected {want}, got {got}", case["dataset"]);
        }
    }
}

/// Bootstrap: the same seed gives the same interval; the spread agrees with a numpy stratified
/// bootstrap (4000 replicates) and with the DeLong standard error.
#[test]
fn bootstrap_spread_agrees_with_python_bootstrap() {
    let reference = reference();
    for case in reference["bootstrap"].as_array().unwrap() {
        let data = Data::load(&reference, case["dataset"].as_str().unwrap());
        let (labels, s) = data.labelled(&data.score_prob);
        let a = binary::bootstrap_auc(&labels, &s, 2000, 11, 0.95).unwrap();
        assert_eq!(a, binary::bootstrap_auc(&labels, &s, 2000, 11, 0.95).unwrap());
        let sd = case["sd"].as_f64().unwrap();
        // Monte Carlo error of a bootstrap SD from ~2000-4000 replicates is about 2%.
        assert!((a.sd / sd - 1.0).abs() < 0.1, "{}: sd {} vs python {sd}", case["dataset"], a.sd);
        for key in ["ci_low", "ci_high"] {
            let want = case[key].as_f64().unwrap();
            let got = if key == "ci_low" { a.ci_low } else { a.ci_high };
            assert!((got - want).abs() < 0.25 * sd, "{} {key}: {got} vs python {want}", case["dataset"]);
        }
        let delong = binary::auc_delong(&labels, &s, 0.95).unwrap();
        assert!((a.sd / delong.se - 1.0).abs() < 0.15, "bootstrap sd {} vs DeLong se {}", a.sd, delong.se);
    }
}

/// Pooling: site summaries merged at the server give exactly the Kaplan–Meier and log-rank of the pooled
/// rows (which in turn match lifelines above), and histogram AUC is within 1e-3 of the exact AUC.
#[test]
fn merged_site_summaries_equal_pooled_statistics() {
    let reference = reference();
    for dataset in ["lung", "rossi"] {
        let data = Data::load(&reference, dataset);
        let a = data.subset(|i| data.site[i] == "odd");
        let b = data.subset(|i| data.site[i] == "even");
        assert!(!a.time.is_empty() && !b.time.is_empty());

        let mut merged = SurvivalCounts::from_rows(&a.time, &a.event, &a.group).unwrap();
        merged.merge(&SurvivalCounts::from_rows(&b.time, &b.event, &b.group).unwrap());
        let pooled = survival::logrank(&data.time, &data.event, &data.group).unwrap();
        let from_counts = merged.logrank().unwrap();
        assert_eq!(pooled.df, from_counts.df);
        assert!((pooled.chi2 - from_counts.chi2).abs() < 1e-9 * pooled.chi2.max(1.0), "{dataset} log-rank");
        assert!((pooled.p - from_counts.p).abs() < 1e-12);
        for group in merged.groups.keys() {
            let idx: Vec<usize> = (0..data.time.len()).filter(|&i| &data.group[i] == group).collect();
            let t: Vec<f64> = idx.iter().map(|&i| data.time[i]).collect();
            let e: Vec<bool> = idx.iter().map(|&i| data.event[i]).collect();
            let rows = survival::kaplan_meier(&t, &e, 0.95).unwrap();
            let counts = merged.kaplan_meier(group, 0.95).unwrap();
            assert_eq!(rows, counts, "{dataset} group {group}: KM from merged counts differs");
        }

        let (la, sa) = a.labelled(&a.score_prob);
        let (lb, sb) = b.labelled(&b.score_prob);
        let mut h = ScoreHistogram::from_scores(&la, &sa, 1000).unwrap();
        h.merge(&ScoreHistogram::from_scores(&lb, &sb, 1000).unwrap()).unwrap();
        let (labels, scores) = data.labelled(&data.score_prob);
        let exact = binary::auc(&labels, &scores).unwrap();
        let approx = h.auc().unwrap();
        assert!((exact - approx).abs() < 1e-3, "{dataset}: histogram AUC {approx} vs exact {exact}");
        assert_eq!(h.n_positive() as usize, labels.iter().filter(|l| **l).count());
    }
}

/// Grid counts equal exact counts on rounded times.
#[test]
fn grid_counts_are_exact_for_rounded_times() {
    let reference = reference();
    let data = Data::load(&reference, "lung");
    let grid = SurvivalCounts::from_rows_on_grid(&data.time, &data.event, &data.group, 30.0).unwrap();
    let rounded: Vec<f64> = data.time.iter().map(|t| (t / 30.0).ceil() * 30.0).collect();
    let exact = survival::logrank(&rounded, &data.event, &data.group).unwrap();
    assert!((grid.logrank().unwrap().chi2 - exact.chi2).abs() < 1e-9);
}
