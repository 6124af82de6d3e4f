//! The executors' side of federated evaluation (`fedhcc_stats::federated`): which split an
//! evaluation scores, and the summary of one evaluation made from the patients' scores (the site's
//! minimum cell size comes from its policy: `fedhcc_client::site_policy::min_cell`). The scores
//! stay here; only the summary is returned.

use fedhcc_client::ExecutorError;
use fedhcc_stats::federated::{EvaluationSettings, SiteEvaluation, SitePredictions};

/// The splits an executor scores, in its order: train, val, test.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// The index of `split` in [`SPLITS`].
///
/// # Errors
/// Another name.
pub fn split_index(split: &str) -> Result<usize, ExecutorError> {
    SPLITS
        .iter()
        .position(|s| *s == split)
        .ok_or_else(|| ExecutorError(format!("unknown split '{split}' (train, val, test or all)")))
}

/// The patients of `split` (`train`, `val`, `test`, or `all` of them in that order), each split
/// scored by `score` (called with its index in [`SPLITS`]).
///
/// # Errors
/// An unknown split, or what `score` returns.
pub fn split_predictions(
    split: &str,
    mut score: impl FnMut(usize) -> Result<SitePredictions, ExecutorError>,
) -> Result<SitePredictions, ExecutorError> {
    if split == "all" {
        let mut all = SitePredictions::default();
        for k in 0..SPLITS.len() {
            all.extend(score(k)?);
        }
        return Ok(all);
    }
    score(split_index(split)?)
}

/// The summary of an evaluation of `test`, with the cut-off chosen on `train` when the study fixes
/// none. `None` (logged, without any value) when it cannot be made: the evaluation's metrics still go.
pub fn summarise(
    test: &SitePredictions,
    train: Option<&SitePredictions>,
    settings: &EvaluationSettings,
) -> Option<SiteEvaluation> {
    match SiteEvaluation::compute(test, train, settings) {
        Ok(s) => Some(s),
        Err(e) => {
            // The error names a row, not a value of a patient's record beyond the model's score.
            tracing::warn!(reason = %e, "no evaluation summary: the model's scores cannot be summarised");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_named_train_val_test() {
        assert_eq!(split_index("test").unwrap(), 2);
        assert!(split_index("holdout").unwrap_err().to_string().contains("holdout"));
    }

    #[test]
    fn all_is_every_split_in_order_and_a_split_is_itself() {
        let one = |k: usize| {
            let mut p = SitePredictions::synthetic(k + 1, k as u64);
            p.score = vec![k as f64; k + 1];
            Ok(p)
        };
        let all = split_predictions("all", one).unwrap();
        assert_eq!(all.score, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(all.label.len(), 6);
        assert_eq!(split_predictions("val", one).unwrap().score, vec![1.0, 1.0]);
        assert!(split_predictions("holdout", one).unwrap_err().to_string().contains("holdout"));
        let failing = |k: usize| if k == 1 { Err(ExecutorError("no model".into())) } else { one(k) };
        assert_eq!(split_predictions("all", failing).unwrap_err().to_string(), "no model");
    }
}
