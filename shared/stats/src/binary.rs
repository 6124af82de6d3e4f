//! Statistics of a risk score against a binary outcome: discrimination (ROC AUC with DeLong standard
//! error, paired DeLong test, stratified bootstrap), a cut-off and what it gives (Youden, sensitivity,
//! specificity, PPV, NPV with Wilson intervals), calibration (Brier, intercept, slope) and clinical
//! usefulness (decision-curve net benefit).
//!
//! Conventions, shared with the reference implementations the tests compare against:
//! - higher score = more likely positive; a patient is test-positive when `score >= cutoff`;
//! - tied scores between a positive and a negative count one half (Mann–Whitney);
//! - the DeLong interval is plain (AUC ± z·SE) and clipped to [0, 1], as pROC and MLstatkit do;
//! - `labels[i]` is `true` for a positive (event) and belongs to `scores[i]`; rows are numbered from 1
//!   in errors.

use crate::numeric::{
    check_finite, check_len, check_not_constant, check_probabilities, logit, midranks, normal_two_sided_p,
    quantile_sorted, sample_cov, sigmoid, solve, z_critical,
};
use crate::{Result, StatsError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

/// ROC AUC with its DeLong standard error and confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Auc {
    /// Area under the ROC curve (probability that a random positive scores above a random negative,
    /// ties counting one half).
    pub estimate: f64,
    /// DeLong standard error.
    pub se: f64,
    /// Lower bound, `estimate − z·se` clipped at 0.
    pub ci_low: f64,
    /// Upper bound, `estimate + z·se` clipped at 1.
    pub ci_high: f64,
}

/// DeLong's structural components of one score (DeLong, DeLong & Clarke-Pearson 1988), computed with
/// mid-ranks in O(n log n) (Sun & Xu 2014).
struct Components {
    auc: f64,
    /// One per positive: share of negatives it outscores (ties ½).
    v10: Vec<f64>,
    /// One per negative: share of positives that outscore it (ties ½).
    v01: Vec<f64>,
}

fn split_classes(labels: &[bool], scores: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let pos = labels.iter().zip(scores).filter(|(l, _)| **l).map(|(_, s)| *s).collect();
    let neg = labels.iter().zip(scores).filter(|(l, _)| !**l).map(|(_, s)| *s).collect();
    (pos, neg)
}

fn check_binary(statistic: &'static str, labels: &[bool], scores: &[f64], min_per_class: usize) -> Result<()> {
    check_len("labels", labels.len(), scores.len())?;
    check_finite("score", scores)?;
    if labels.is_empty() {
        return Err(StatsError::undefined(statistic, "no labelled patients"));
    }
    let m = labels.iter().filter(|l| **l).count();
    let n = labels.len() - m;
    if m < min_per_class || n < min_per_class {
        let reason = if m == 0 || n == 0 {
            format!("all {} labelled patients are {}", labels.len(), if m == 0 { "negative" } else { "positive" })
        } else {
            format!("needs at least {min_per_class} positives and {min_per_class} negatives, got {m} and {n}")
        };
        return Err(StatsError::undefined(statistic, reason));
    }
    check_not_constant(statistic, scores)
}

fn components(pos: &[f64], neg: &[f64]) -> Components {
    let (m, n) = (pos.len() as f64, neg.len() as f64);
    let all: Vec<f64> = pos.iter().chain(neg).copied().collect();
    let tz = midranks(&all);
    let tx = midranks(pos);
    let ty = midranks(neg);
    let rank_sum: f64 = tz[..pos.len()].iter().sum();
    let auc = (rank_sum - m * (m + 1.0) / 2.0) / (m * n);
    let v10 = tz[..pos.len()].iter().zip(&tx).map(|(z, x)| (z - x) / n).collect();
    let v01 = tz[pos.len()..].iter().zip(&ty).map(|(z, y)| 1.0 - (z - y) / m).collect();
    Components { auc, v10, v01 }
}

/// ROC AUC (Mann–Whitney, ties ½) without a standard error; needs one patient of each class.
///
/// # Errors
/// Lengths differ, a score is not finite, or one class is absent.
pub fn auc(labels: &[bool], scores: &[f64]) -> Result<f64> {
    check_binary("AUC", labels, scores, 1)?;
    let (pos, neg) = split_classes(labels, scores);
    Ok(auc_of(&pos, &neg))
}

fn auc_of(pos: &[f64], neg: &[f64]) -> f64 {
    let (m, n) = (pos.len() as f64, neg.len() as f64);
    let all: Vec<f64> = pos.iter().chain(neg).copied().collect();
    let ranks = midranks(&all);
    (ranks[..pos.len()].iter().sum::<f64>() - m * (m + 1.0) / 2.0) / (m * n)
}

/// ROC AUC with DeLong standard error and a plain confidence interval at `level` (e.g. 0.95).
///
/// # Errors
/// Lengths differ, a score is not finite, or fewer than two patients in a class (the variance of the
/// structural components needs two).
pub fn auc_delong(labels: &[bool], scores: &[f64], level: f64) -> Result<Auc> {
    check_binary("AUC", labels, scores, 2)?;
    let z = z_critical(level)?;
    let (pos, neg) = split_classes(labels, scores);
    let c = components(&pos, &neg);
    let var = sample_cov(&c.v10, &c.v10) / pos.len() as f64 + sample_cov(&c.v01, &c.v01) / neg.len() as f64;
    let se = var.max(0.0).sqrt();
    Ok(Auc { estimate: c.auc, se, ci_low: (c.auc - z * se).max(0.0), ci_high: (c.auc + z * se).min(1.0) })
}

/// DeLong's test of two scores on the same patients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDelong {
    /// AUC of the first score.
    pub auc_a: f64,
    /// AUC of the second score.
    pub auc_b: f64,
    /// Standard error of `auc_a − auc_b`.
    pub se_diff: f64,
    /// `(auc_a − auc_b) / se_diff`.
    pub z: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// Paired DeLong test: are the AUCs of two scores on the same patients different?
///
/// # Errors
/// As [`auc_delong`]; also when the difference has no variance (identical rankings).
pub fn delong_paired(labels: &[bool], a: &[f64], b: &[f64]) -> Result<PairedDelong> {
    check_len("second score", b.len(), a.len())?;
    check_binary("paired DeLong test", labels, a, 2)?;
    check_binary("paired DeLong test", labels, b, 2)?;
    let (pa, na) = split_classes(labels, a);
    let (pb, nb) = split_classes(labels, b);
    let (ca, cb) = (components(&pa, &na), components(&pb, &nb));
    let (m, n) = (pa.len() as f64, na.len() as f64);
    let var = |x: &Components, y: &Components| sample_cov(&x.v10, &y.v10) / m + sample_cov(&x.v01, &y.v01) / n;
    let var_diff = var(&ca, &ca) + var(&cb, &cb) - 2.0 * var(&ca, &cb);
    if var_diff.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(StatsError::undefined("paired DeLong test", "the two scores rank the patients identically"));
    }
    let se_diff = var_diff.sqrt();
    let z = (ca.auc - cb.auc) / se_diff;
    Ok(PairedDelong { auc_a: ca.auc, auc_b: cb.auc, se_diff, z, p: normal_two_sided_p(z) })
}

/// Percentile bootstrap interval of the AUC.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapCi {
    /// Lower percentile (numpy's linear interpolation).
    pub ci_low: f64,
    /// Upper percentile.
    pub ci_high: f64,
    /// Standard deviation of the bootstrap AUCs (n − 1 denominator).
    pub sd: f64,
    /// Replicates drawn.
    pub n_boot: usize,
    /// Seed of the ChaCha20 generator: the same seed gives the same interval.
    pub seed: u64,
}

/// Stratified bootstrap of the AUC: each replicate draws the positives and the negatives separately
/// with replacement (so every replicate keeps the class sizes), from a ChaCha20 generator seeded with
/// `seed`.
///
/// # Errors
/// As [`auc`]; `n_boot` under 2.
pub fn bootstrap_auc(labels: &[bool], scores: &[f64], n_boot: usize, seed: u64, level: f64) -> Result<BootstrapCi> {
    check_binary("bootstrap AUC interval", labels, scores, 1)?;
    z_critical(level)?;
    if n_boot < 2 {
        return Err(StatsError::undefined("bootstrap AUC interval", format!("{n_boot} replicates; needs at least 2")));
    }
    let (pos, neg) = split_classes(labels, scores);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut bp = vec![0.0; pos.len()];
    let mut bn = vec![0.0; neg.len()];
    let mut aucs = Vec::with_capacity(n_boot);
    for _ in 0..n_boot {
        for v in bp.iter_mut() {
            *v = pos[rng.random_range(0..pos.len())];
        }
        for v in bn.iter_mut() {
            *v = neg[rng.random_range(0..neg.len())];
        }
        aucs.push(auc_of(&bp, &bn));
    }
    let sd = sample_cov(&aucs, &aucs).sqrt();
    aucs.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Ok(BootstrapCi {
        ci_low: quantile_sorted(&aucs, tail),
        ci_high: quantile_sorted(&aucs, 1.0 - tail),
        sd,
        n_boot,
        seed,
    })
}

/// ROC curve points, one per distinct score (as scikit-learn's `roc_curve(drop_intermediate=False)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    /// False-positive rate at each threshold (starts at 0).
    pub fpr: Vec<f64>,
    /// True-positive rate at each threshold (starts at 0).
    pub tpr: Vec<f64>,
    /// Thresholds, decreasing; the first is +∞ (nobody test-positive), written as `null` in JSON.
    pub threshold: Vec<f64>,
}

/// ROC curve: for each distinct score `t` (decreasing), the rates of `score >= t`.
///
/// # Errors
/// As [`auc`].
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Result<RocCurve> {
    check_binary("ROC curve", labels, scores, 1)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tps, mut fps) = (vec![0.0], vec![0.0]);
    let mut threshold = vec![f64::INFINITY];
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_value = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_value {
            tps.push(tp);
            fps.push(fp);
            threshold.push(scores[i]);
        }
    }
    Ok(RocCurve { fpr: fps.iter().map(|f| f / fp).collect(), tpr: tps.iter().map(|t| t / tp).collect(), threshold })
}

/// Youden's cut-off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Youden {
    /// The score at which `sensitivity + specificity − 1` is largest (test-positive: `score >= cutoff`);
    /// among equal maxima, the highest such score.
    pub cutoff: f64,
    /// Youden's J there.
    pub j: f64,
}

/// Youden's cut-off: maximises `sensitivity + specificity − 1` over the observed scores. Choose it on
/// training data and freeze it; on the evaluation data it is optimistic.
///
/// # Errors
/// As [`auc`].
pub fn youden(labels: &[bool], scores: &[f64]) -> Result<Youden> {
    let roc = roc_curve(labels, scores)?;
    let mut best = Youden { cutoff: roc.threshold[1], j: roc.tpr[1] - roc.fpr[1] };
    for k in 2..roc.threshold.len() {
        let j = roc.tpr[k] - roc.fpr[k];
        if j > best.j {
            best = Youden { cutoff: roc.threshold[k], j };
        }
    }
    Ok(best)
}

/// A proportion with its Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    /// `count / total`.
    pub estimate: f64,
    /// Wilson lower bound.
    pub ci_low: f64,
    /// Wilson upper bound.
    pub ci_high: f64,
    /// Numerator.
    pub count: u64,
    /// Denominator.
    pub total: u64,
}

/// `count / total` with a Wilson score interval (Wilson 1927; statsmodels' `proportion_confint(method=
/// "wilson")`); `None` when `total` is 0.
///
/// # Errors
/// `count > total` or a level outside (0, 1).
pub fn wilson(count: u64, total: u64, level: f64) -> Result<Option<Proportion>> {
    if count > total {
        return Err(StatsError::undefined("proportion", format!("{count} of {total}")));
    }
    let z = z_critical(level)?;
    if total == 0 {
        return Ok(None);
    }
    let (k, n) = (count as f64, total as f64);
    let p = k / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Ok(Some(Proportion { estimate: p, ci_low: centre - half, ci_high: centre + half, count, total }))
}

/// Counts at a cut-off (test-positive: `score >= cutoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Positives called positive.
    pub tp: u64,
    /// Negatives called positive.
    pub fp: u64,
    /// Negatives called negative.
    pub tn: u64,
    /// Positives called negative.
    pub fn_: u64,
}

impl Confusion {
    /// Counts of `score >= cutoff` against the labels.
    ///
    /// # Errors
    /// Lengths differ, or a score or the cut-off is not finite.
    pub fn at(labels: &[bool], scores: &[f64], cutoff: f64) -> Result<Self> {
        check_len("labels", labels.len(), scores.len())?;
        check_finite("score", scores)?;
        if !cutoff.is_finite() {
            return Err(StatsError::undefined("confusion table", format!("cut-off {cutoff} is not a number")));
        }
        let mut c = Confusion { tp: 0, fp: 0, tn: 0, fn_: 0 };
        for (&l, &s) in labels.iter().zip(scores) {
            match (l, s >= cutoff) {
                (true, true) => c.tp += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
                (true, false) => c.fn_ += 1,
            }
        }
        Ok(c)
    }

    /// Sensitivity `tp / (tp + fn)` with its Wilson interval (`None` without positives).
    pub fn sensitivity(&self, level: f64) -> Result<Option<Proportion>> {
        wilson(self.tp, self.tp + self.fn_, level)
    }

    /// Specificity `tn / (tn + fp)`.
    pub fn specificity(&self, level: f64) -> Result<Option<Proportion>> {
        wilson(self.tn, self.tn + self.fp, level)
    }

    /// Positive predictive value `tp / (tp + fp)` (`None` when nobody tests positive).
    pub fn ppv(&self, level: f64) -> Result<Option<Proportion>> {
        wilson(self.tp, self.tp + self.fp, level)
    }

    /// Negative predictive value `tn / (tn + fn)`.
    pub fn npv(&self, level: f64) -> Result<Option<Proportion>> {
        wilson(self.tn, self.tn + self.fn_, level)
    }
}

/// Brier score: mean squared difference between the predicted probability and the outcome.
///
/// # Errors
/// Lengths differ, no patients, or a prediction is not a probability in [0, 1].
pub fn brier(labels: &[bool], probabilities: &[f64]) -> Result<f64> {
    check_len("labels", labels.len(), probabilities.len())?;
    check_probabilities("predicted probability", probabilities)?;
    if labels.is_empty() {
        return Err(StatsError::undefined("Brier score", "no labelled patients"));
    }
    let sum: f64 = labels.iter().zip(probabilities).map(|(&l, &p)| (p - if l { 1.0 } else { 0.0 }).powi(2)).sum();
    Ok(sum / labels.len() as f64)
}

/// Calibration of predicted probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Calibration-in-the-large: intercept `a` of `logit P(y) = a + logit(p)` (offset logit(p));
    /// 0 when the average risk is right, > 0 when risks are too low.
    pub intercept: f64,
    /// Calibration slope: `b` of `logit P(y) = a + b·logit(p)`; 1 is ideal, < 1 means too extreme
    /// predictions (overfitting).
    pub slope: f64,
}

const NEWTON_MAX_ITER: usize = 100;

/// Logistic recalibration by maximum likelihood (Newton–Raphson, as statsmodels' GLM Binomial).
///
/// # Errors
/// Lengths differ, one class only, a probability of exactly 0 or 1 (its logit is infinite), or the
/// fit does not converge (the outcome is perfectly separated by the score).
pub fn calibration(labels: &[bool], probabilities: &[f64]) -> Result<Calibration> {
    check_binary("calibration", labels, probabilities, 1)?;
    check_probabilities("predicted probability", probabilities)?;
    if let Some(i) = probabilities.iter().position(|&p| p == 0.0 || p == 1.0) {
        return Err(StatsError::undefined(
            "calibration",
            format!(
                "the predicted probability in row {} is exactly {}: its logit is infinite",
                i + 1,
                probabilities[i]
            ),
        ));
    }
    if probabilities.iter().all(|&p| p == probabilities[0]) {
        return Err(StatsError::undefined("calibration", "all predicted probabilities are equal"));
    }
    let lp: Vec<f64> = probabilities.iter().map(|&p| logit(p)).collect();
    let y: Vec<f64> = labels.iter().map(|&l| if l { 1.0 } else { 0.0 }).collect();
    // Intercept with offset: one-parameter Newton.
    let mut a = 0.0;
    let mut converged = false;
    for _ in 0..NEWTON_MAX_ITER {
        let (mut g, mut h) = (0.0, 0.0);
        for (yi, li) in y.iter().zip(&lp) {
            let mu = sigmoid(a + li);
            g += yi - mu;
            h += mu * (1.0 - mu);
        }
        let step = g / h;
        a += step;
        if step.abs() < 1e-12 * (1.0 + a.abs()) {
            converged = true;
            break;
        }
    }
    if !converged || !a.is_finite() {
        return Err(StatsError::undefined("calibration intercept", "the logistic fit did not converge"));
    }
    // Intercept and slope: two-parameter Newton.
    let (mut b0, mut b1) = (0.0, 1.0);
    converged = false;
    for _ in 0..NEWTON_MAX_ITER {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (yi, li) in y.iter().zip(&lp) {
            let mu = sigmoid(b0 + b1 * li);
            let w = mu * (1.0 - mu);
            g0 += yi - mu;
            g1 += (yi - mu) * li;
            h00 += w;
            h01 += w * li;
            h11 += w * li * li;
        }
        // A singular information matrix here means the fit is running off to infinity (separation).
        let Some(step) = solve(vec![vec![h00, h01], vec![h01, h11]], vec![g0, g1]) else {
            break;
        };
        b0 += step[0];
        b1 += step[1];
        if step[0].abs().max(step[1].abs()) < 1e-12 * (1.0 + b0.abs().max(b1.abs())) {
            converged = true;
            break;
        }
    }
    if !converged || !b1.is_finite() {
        return Err(StatsError::undefined(
            "calibration slope",
            "the logistic fit did not converge (the outcome is perfectly separated by the score)",
        ));
    }
    Ok(Calibration { intercept: a, slope: b1 })
}

/// Net benefit of a model and of treating everyone, at one threshold probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NetBenefit {
    /// Threshold probability `pₜ` (treat when `p >= pₜ`).
    pub threshold: f64,
    /// `TP/n − FP/n · pₜ/(1 − pₜ)` for the model.
    pub model: f64,
    /// The same for treating everyone (treating nobody is 0).
    pub treat_all: f64,
}

/// Decision-curve net benefit (Vickers & Elkin 2006) at each threshold in (0, 1).
///
/// # Errors
/// Lengths differ, no patients, a prediction outside [0, 1], or a threshold outside (0, 1).
pub fn net_benefit(labels: &[bool], probabilities: &[f64], thresholds: &[f64]) -> Result<Vec<NetBenefit>> {
    check_len("labels", labels.len(), probabilities.len())?;
    check_probabilities("predicted probability", probabilities)?;
    if labels.is_empty() {
        return Err(StatsError::undefined("net benefit", "no labelled patients"));
    }
    let n = labels.len() as f64;
    let prevalence = labels.iter().filter(|l| **l).count() as f64 / n;
    net_benefit_curve(thresholds, n, prevalence, |t| Confusion::at(labels, probabilities, t))
}

/// Net benefit at each threshold for `n` patients (more than none) of this `prevalence`, with
/// `confusion_at(t)` the counts of the model's calls at `t`.
///
/// # Errors
/// A threshold outside (0, 1), or what `confusion_at` returns.
pub(crate) fn net_benefit_curve(
    thresholds: &[f64],
    n: f64,
    prevalence: f64,
    mut confusion_at: impl FnMut(f64) -> Result<Confusion>,
) -> Result<Vec<NetBenefit>> {
    thresholds
        .iter()
        .map(|&t| {
            if !(t > 0.0 && t < 1.0) {
                return Err(StatsError::undefined("net benefit", format!("threshold {t} is not in (0, 1)")));
            }
            let c = confusion_at(t)?;
            let odds = t / (1.0 - t);
            Ok(NetBenefit {
                threshold: t,
                model: c.tp as f64 / n - odds * (c.fp as f64 / n),
                treat_all: prevalence - odds * (1.0 - prevalence),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_as_half() {
        let labels = [true, true, false, false];
        assert_eq!(auc(&labels, &[0.9, 0.5, 0.5, 0.1]).unwrap(), 0.875);
    }

    #[test]
    fn one_class_gives_a_reason_not_a_number() {
        let err = auc_delong(&[true, true, true], &[0.1, 0.2, 0.3], 0.95).unwrap_err();
        assert!(err.to_string().contains("all 3 labelled patients are positive"), "{err}");
        let err = auc(&[false], &[0.1]).unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
    }

    #[test]
    fn nan_score_names_its_row() {
        let err = auc(&[true, false, true], &[0.1, f64::NAN, 0.3]).unwrap_err();
        assert_eq!(err.to_string(), "score in row 2 is NaN: a finite number");
    }

    #[test]
    fn all_equal_scores_and_no_labels_give_reasons() {
        let err = auc_delong(&[true, false, true, false], &[0.3; 4], 0.95).unwrap_err();
        assert!(err.to_string().contains("all 4 scores are equal"), "{err}");
        let err = auc(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("no labelled patients"), "{err}");
    }

    #[test]
    fn identical_scores_are_refused_by_paired_test() {
        let labels = [true, false, true, false, true];
        let s = [0.9, 0.2, 0.7, 0.4, 0.3];
        assert!(delong_paired(&labels, &s, &s).is_err());
    }

    #[test]
    fn wilson_matches_statsmodels() {
        // statsmodels proportion_confint(81, 120, method="wilson")
        let p = wilson(81, 120, 0.95).unwrap().unwrap();
        assert!((p.ci_low - 0.5869018408594733).abs() < 1e-12 && (p.ci_high - 0.7522414508939805).abs() < 1e-12);
        assert!(wilson(0, 0, 0.95).unwrap().is_none());
        assert!(wilson(3, 2, 0.95).is_err());
    }

    #[test]
    fn bootstrap_is_reproducible_from_its_seed() {
        let labels: Vec<bool> = (0..60).map(|i| i % 3 == 0).collect();
        let scores: Vec<f64> =
            (0..60).map(|i| ((i * 37) % 60) as f64 / 60.0 + if i % 3 == 0 { 0.2 } else { 0.0 }).collect();
        let a = bootstrap_auc(&labels, &scores, 300, 7, 0.95).unwrap();
        let b = bootstrap_auc(&labels, &scores, 300, 7, 0.95).unwrap();
        let c = bootstrap_auc(&labels, &scores, 300, 8, 0.95).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.ci_low, c.ci_low);
        assert!(a.ci_low < a.ci_high);
    }

    #[test]
    fn calibration_refuses_certain_predictions() {
        let err = calibration(&[true, false, true], &[1.0, 0.2, 0.6]).unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
    }

    #[test]
    fn separated_outcome_does_not_converge() {
        let err = calibration(&[true, true, false, false], &[0.9, 0.8, 0.2, 0.1]).unwrap_err();
        assert!(err.to_string().contains("separated"), "{err}");
    }
}
