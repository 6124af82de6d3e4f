//! Federated evaluation on the server: the check of a site's evaluation summary before it is stored
//! ([`decode_summary`]), and the evaluation report written when an evaluate task closes
//! ([`write_report`]): `state_dir/evaluation/<task>.json` with each site's figures and the pooled
//! ones (AUC from the merged score histograms; Kaplan–Meier and log-rank, exact from the merged
//! counts), written atomically. No IO but that file; the caller runs it off the request path.
//!
//! A summary is held to the study's `[evaluation]` choices (histogram bins, time grid, fixed
//! cut-off) and to a minimum cell size of at least [`MIN_CELL_FLOOR`]; each site applies its own
//! minimum (its policy's `min_group_size`, at least the floor) and the server checks that every
//! figure respects the minimum the site declares.

use crate::store::EvaluationRecord;
use fedhcc_core::config::StudyConfig;
use fedhcc_stats::federated::{Outcome, PooledEvaluation, SiteEvaluation, SummaryError, SummaryRules};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The smallest minimum cell size a site may declare: the study-wide floor that the statistics task
/// uses too.
pub const MIN_CELL_FLOOR: u64 = fedhcc_core::standardisation::MIN_CELL;

/// Where evaluation reports go under the server's state folder.
pub const FOLDER: &str = "evaluation";

/// What the study holds every summary to.
pub fn rules(study: &StudyConfig) -> SummaryRules {
    let e = &study.evaluation;
    SummaryRules {
        histogram_bins: e.histogram_bins,
        time_grid_days: e.time_grid_days,
        study_cutoff: e.cutoff,
        min_cell_floor: MIN_CELL_FLOOR,
    }
}

/// A site's summary from an evaluation report: `None` when the report carries none (an executor
/// that makes none, or an older site), else the checked summary.
///
/// # Errors
/// The summary is too long, not this version's JSON, or fails a check (see
/// [`SiteEvaluation::check`]).
pub fn decode_summary(study: &StudyConfig, bytes: &[u8]) -> Result<Option<SiteEvaluation>, SummaryError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    SiteEvaluation::decode(bytes, &rules(study)).map(Some)
}

/// The evaluation report of one task as JSON: per site (samples, metrics, summary and the
/// Kaplan–Meier curves of its counts), the sites that did not report, and the pooled figures.
pub fn report_json(
    study: &StudyConfig,
    task_id: &str,
    round: u32,
    records: &[EvaluationRecord],
    missing: &BTreeSet<String>,
) -> serde_json::Value {
    let mut records: Vec<&EvaluationRecord> = records.iter().filter(|r| r.task_id == task_id).collect();
    records.sort_by(|a, b| a.site.cmp(&b.site));
    let summaries: Vec<(&str, &SiteEvaluation)> =
        records.iter().filter_map(|r| r.summary.as_ref().map(|s| (r.site.as_str(), s))).collect();
    let pooled = PooledEvaluation::pool(&summaries);
    let sites: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let metrics: serde_json::Map<String, serde_json::Value> =
                r.metrics.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({
                "site": r.site,
                "samples": r.samples,
                "metrics": metrics,
                "summary": r.summary,
                "km": r.summary.as_ref().map(|s| json!({
                    "rfs": s.kaplan_meier(Outcome::Rfs),
                    "os": s.kaplan_meier(Outcome::Os),
                })),
            })
        })
        .collect();
    json!({
        "study_id": study.study_id,
        "run_id": study.run_id,
        "task_id": task_id,
        "round": round,
        "evaluation": {
            "cutoff": study.evaluation.cutoff,
            "time_grid_days": study.evaluation.time_grid_days,
            "histogram_bins": study.evaluation.histogram_bins,
        },
        "sites": sites,
        "missing": missing,
        "pooled": pooled,
    })
}

/// Writes [`report_json`] to `state_dir/evaluation/<task_id>.json` (temporary file, fsync, rename)
/// and returns its path.
///
/// # Errors
/// The folder or file cannot be written.
pub fn write_report(
    state_dir: &Path,
    study: &StudyConfig,
    task_id: &str,
    round: u32,
    records: &[EvaluationRecord],
    missing: &BTreeSet<String>,
) -> Result<PathBuf, String> {
    let dir = state_dir.join(FOLDER);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{task_id}.json"));
    let mut text = serde_json::to_vec_pretty(&report_json(study, task_id, round, records, missing))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    text.push(b'\n');
    fedhcc_core::pki::write_atomic(&path, &text, false).map_err(|e| e.to_string())?;
    Ok(path)
}

/// The pooled AUC of each evaluation task among `records` (task id, round, AUC or `null`, sites
/// pooled), oldest first: what the dashboard shows next to the per-site figures.
pub fn pooled_aucs(records: &[EvaluationRecord]) -> Vec<serde_json::Value> {
    let tasks: BTreeSet<(u32, &str)> = records.iter().map(|r| (r.round, r.task_id.as_str())).collect();
    tasks
        .into_iter()
        .map(|(round, task)| {
            let summaries: Vec<(&str, &SiteEvaluation)> = records
                .iter()
                .filter(|r| r.task_id == task)
                .filter_map(|r| r.summary.as_ref().map(|s| (r.site.as_str(), s)))
                .collect();
            let pooled = PooledEvaluation::pool(&summaries);
            json!({ "round": round, "task_id": task, "auc": pooled.auc, "sites": pooled.histogram_sites })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedhcc_stats::federated::{EvaluationSettings, SitePredictions};

    fn study() -> StudyConfig {
        toml::from_str("study_id = \"s\"\n[federation]\nrounds = 1\n").unwrap()
    }

    fn site(n: usize, shift: f64) -> SiteEvaluation {
        let mut p = SitePredictions::default();
        for i in 0..n {
            let s = ((i * 37) % 100) as f64 / 100.0;
            p.score.push((s + shift).min(1.0));
            p.label.push(Some((i * 37) % 100 >= 40));
            p.rfs.push(Some((30.0 + (i % 50) as f64 * 20.0, i % 3 == 0)));
            p.os.push(None);
        }
        let fixed = EvaluationSettings { cutoff: Some(0.5), ..EvaluationSettings::default() };
        SiteEvaluation::compute(&p, None, &fixed).unwrap()
    }

    #[test]
    fn a_summary_is_checked_against_the_study_and_an_empty_one_is_none() {
        let mut s = study();
        assert_eq!(decode_summary(&s, b"").unwrap(), None);
        let bytes = site(120, 0.0).encode().unwrap();
        let e = decode_summary(&s, &bytes).unwrap_err().to_string();
        assert!(e.contains("not the study's [evaluation] cutoff"), "{e}");
        s.evaluation.cutoff = Some(0.5);
        let decoded = decode_summary(&s, &bytes).unwrap().unwrap();
        assert_eq!((decoded.n, decoded.auc.is_some(), decoded.histogram), (120, true, site(120, 0.0).histogram));
        s.evaluation.histogram_bins = 200;
        assert!(decode_summary(&s, &bytes).unwrap_err().to_string().contains("200"));
    }

    #[test]
    fn the_report_pools_the_sites_of_its_task_only_and_is_written_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = study();
        s.evaluation.cutoff = Some(0.5);
        let rec = |task: &str, site_id: &str, summary: Option<SiteEvaluation>| EvaluationRecord {
            round: 1,
            task_id: task.into(),
            site: site_id.into(),
            samples: 120,
            metrics: vec![("auc".into(), 0.7)],
            summary,
        };
        let records = vec![
            rec("e1a1", "b", Some(site(100, 0.05))),
            rec("e1a1", "a", Some(site(120, 0.0))),
            rec("e1a2", "c", Some(site(110, 0.0))),
            rec("e1a1", "old", None),
        ];
        let missing = BTreeSet::from(["d".to_string()]);
        let path = write_report(tmp.path(), &s, "e1a1", 1, &records, &missing).unwrap();
        assert_eq!(path, tmp.path().join("evaluation/e1a1.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let sites: Vec<&str> = v["sites"].as_array().unwrap().iter().map(|x| x["site"].as_str().unwrap()).collect();
        assert_eq!(sites, ["a", "b", "old"]);
        assert_eq!(v["pooled"]["sites"], json!(["a", "b"]));
        assert_eq!(v["pooled"]["n"], 220);
        assert_eq!(v["missing"], json!(["d"]));
        assert!(v["sites"][2]["summary"].is_null());
        assert!(v["pooled"]["auc"].as_f64().is_some());
        assert_eq!(v["pooled"]["rfs"]["km"].as_array().unwrap().len(), 2);
        assert_eq!(v["sites"][0]["km"]["rfs"].as_array().unwrap().len(), 2);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("evaluation")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the report, no temporary file");
        // Records stored before summaries existed still read.
        let old: EvaluationRecord =
            serde_json::from_str(r#"{"round":1,"task_id":"e1a1","site":"a","samples":3,"metrics":[["auc",0.5]]}"#)
                .unwrap();
        assert_eq!(old.summary, None);
        let aucs = pooled_aucs(&records);
        assert_eq!(aucs.len(), 2);
        assert_eq!(aucs[0]["task_id"], "e1a1");
        assert!((aucs[0]["auc"].as_f64().unwrap() - v["pooled"]["auc"].as_f64().unwrap()).abs() < 1e-15);
    }
}
