//! Figures computed from site summaries alone, for the pooled column of a study report: the AUC with its
//! DeLong interval, the ROC curve, the decision curve and calibration groups from a [`ScoreHistogram`],
//! and the hazard ratio between two risk groups from [`SurvivalCounts`].
//!
//! A histogram holds every score only as its bin, so each figure here is *exactly* the figure of the
//! binned scores (all scores in a bin tied): the tests compare each with the patient-level function of
//! [`crate::binary`] on bin-index scores. How close that is to the unbinned figure depends on the bin
//! width (1000 bins: AUC within about 1e-3). The hazard ratio needs nothing but the counts: it equals
//! the Cox fit on the patients' rows exactly.

use super::{ScoreHistogram, SurvivalCounts};
use crate::binary::{Auc, Confusion, NetBenefit, RocCurve, net_benefit_curve};
use crate::numeric::z_critical;
use crate::survival::{Cox, cox_univariable};
use crate::svg::CalibrationBin;
use crate::{Result, StatsError};

/// How far (in bins) a threshold may lie from a bin edge and still count as that edge.
const EDGE_TOLERANCE: f64 = 1e-6;

impl ScoreHistogram {
    /// The bin edge `k / bins` equal to `threshold`, as `k`.
    ///
    /// # Errors
    /// The threshold is not in [0, 1] or falls inside a bin (the histogram cannot tell which of that
    /// bin's patients score at or above it).
    fn edge(&self, what: &'static str, threshold: f64) -> Result<usize> {
        let bins = self.bins() as f64;
        let k = (threshold * bins).round();
        if !(0.0..=1.0).contains(&threshold) || (threshold * bins - k).abs() > EDGE_TOLERANCE {
            return Err(StatsError::undefined(
                what,
                format!(
                    "threshold {threshold} is not an edge of the {} score bins (multiples of 1/{}): the summaries \
                     cannot split a bin",
                    self.bins(),
                    self.bins()
                ),
            ));
        }
        Ok(k as usize)
    }

    /// Counts of `score >= cutoff`, for a cut-off on a bin edge.
    ///
    /// # Errors
    /// The cut-off falls inside a bin (see [`ScoreHistogram::net_benefit`]).
    pub fn confusion_at(&self, cutoff: f64) -> Result<Confusion> {
        let k = self.edge("confusion table", cutoff)?;
        let tp: u64 = self.positive[k..].iter().sum();
        let fp: u64 = self.negative[k..].iter().sum();
        Ok(Confusion { tp, fp, tn: self.n_negative() - fp, fn_: self.n_positive() - tp })
    }

    /// AUC with DeLong's standard error and interval at `level`, scores in one bin tied. Equals
    /// [`crate::binary::auc_delong`] on the bin indices.
    ///
    /// # Errors
    /// Fewer than two positives or negatives, every score in one bin, or a level outside (0, 1).
    pub fn auc_delong(&self, level: f64) -> Result<Auc> {
        let z = z_critical(level)?;
        let (m, n) = (self.n_positive(), self.n_negative());
        if m < 2 || n < 2 {
            return Err(StatsError::undefined(
                "pooled AUC",
                format!("needs at least 2 positives and 2 negatives, got {m} and {n}"),
            ));
        }
        let occupied = (0..self.bins()).filter(|&k| self.positive[k] + self.negative[k] > 0).count();
        if occupied < 2 {
            return Err(StatsError::undefined(
                "pooled AUC",
                "every score falls in one bin: the binned score does not rank the patients",
            ));
        }
        let (mf, nf) = (m as f64, n as f64);
        // Structural components per bin: a positive in bin k outscores the negatives below k and ties
        // those in k; a negative in bin k is outscored by the positives above k and ties those in k.
        let mut v10 = Vec::with_capacity(self.bins());
        let mut v01 = Vec::with_capacity(self.bins());
        let (mut neg_below, mut pos_above) = (0.0, mf);
        for k in 0..self.bins() {
            let (p, q) = (self.positive[k] as f64, self.negative[k] as f64);
            pos_above -= p;
            v10.push((neg_below + 0.5 * q) / nf);
            v01.push((pos_above + 0.5 * p) / mf);
            neg_below += q;
        }
        let auc = (0..self.bins()).map(|k| self.positive[k] as f64 * v10[k]).sum::<f64>() / mf;
        let s10 = (0..self.bins()).map(|k| self.positive[k] as f64 * (v10[k] - auc).powi(2)).sum::<f64>() / (mf - 1.0);
        let s01 = (0..self.bins()).map(|k| self.negative[k] as f64 * (v01[k] - auc).powi(2)).sum::<f64>() / (nf - 1.0);
        let se = (s10 / mf + s01 / nf).max(0.0).sqrt();
        Ok(Auc { estimate: auc, se, ci_low: (auc - z * se).max(0.0), ci_high: (auc + z * se).min(1.0) })
    }

    /// ROC curve with one point per occupied bin: thresholds are the bins' lower edges, decreasing
    /// (the first is +∞: nobody test-positive).
    ///
    /// # Errors
    /// One class is empty.
    pub fn roc_curve(&self) -> Result<RocCurve> {
        let (m, n) = (self.n_positive() as f64, self.n_negative() as f64);
        if m == 0.0 || n == 0.0 {
            return Err(StatsError::undefined(
                "pooled ROC curve",
                format!("{m} positives and {n} negatives: both classes are needed"),
            ));
        }
        let mut curve = RocCurve { fpr: vec![0.0], tpr: vec![0.0], threshold: vec![f64::INFINITY] };
        let (mut tp, mut fp) = (0.0, 0.0);
        for k in (0..self.bins()).rev() {
            if self.positive[k] + self.negative[k] == 0 {
                continue;
            }
            tp += self.positive[k] as f64;
            fp += self.negative[k] as f64;
            curve.tpr.push(tp / m);
            curve.fpr.push(fp / n);
            curve.threshold.push(k as f64 / self.bins() as f64);
        }
        Ok(curve)
    }

    /// Decision-curve net benefit at each threshold; every threshold must be a bin edge in (0, 1)
    /// (with 1000 bins, any multiple of 0.001). Equals [`crate::binary::net_benefit`] on the patients'
    /// scores, since `score >= t` is decided bin by bin at an edge.
    ///
    /// # Errors
    /// No patients, a threshold outside (0, 1), or one inside a bin.
    pub fn net_benefit(&self, thresholds: &[f64]) -> Result<Vec<NetBenefit>> {
        let n = (self.n_positive() + self.n_negative()) as f64;
        if n == 0.0 {
            return Err(StatsError::undefined("net benefit", "no labelled patients"));
        }
        let prevalence = self.n_positive() as f64 / n;
        net_benefit_curve(thresholds, n, prevalence, |t| self.confusion_at(t))
    }

    /// Calibration groups: the occupied bins gathered, in score order, into about `groups` groups of
    /// similar size (a bin is never split); predicted risk is the mean of the bins' mid-points, observed
    /// risk the share of positives.
    pub fn calibration_bins(&self, groups: usize) -> Vec<CalibrationBin> {
        let total = self.n_positive() + self.n_negative();
        let groups = groups.max(1) as u64;
        let width = 1.0 / self.bins() as f64;
        let mut out = Vec::new();
        let (mut n, mut pos, mut predicted, mut seen) = (0u64, 0u64, 0.0, 0u64);
        for k in 0..self.bins() {
            let count = self.positive[k] + self.negative[k];
            if count == 0 {
                continue;
            }
            n += count;
            pos += self.positive[k];
            predicted += count as f64 * (k as f64 + 0.5) * width;
            seen += count;
            // Close the group once the running count reaches the next of `groups` equal shares.
            if seen * groups >= (out.len() as u64 + 1) * total {
                out.push(CalibrationBin {
                    predicted: predicted / n as f64,
                    observed: pos as f64 / n as f64,
                    n: n as usize,
                });
                (n, pos, predicted) = (0, 0, 0.0);
            }
        }
        if n > 0 {
            out.push(CalibrationBin {
                predicted: predicted / n as f64,
                observed: pos as f64 / n as f64,
                n: n as usize,
            });
        }
        out
    }
}

impl SurvivalCounts {
    /// Univariable Cox hazard ratio of group `high` against group `low` (Efron ties), from the counts:
    /// the partial likelihood depends on the data only through them, so this equals the fit on the
    /// patients' rows.
    ///
    /// # Errors
    /// A group is missing, no events, or no convergence (all events in one group).
    pub fn hazard_ratio(&self, high: &str, low: &str, level: f64) -> Result<Cox> {
        let (mut time, mut event, mut x) = (Vec::new(), Vec::new(), Vec::new());
        for (name, value) in [(high, 1.0), (low, 0.0)] {
            let counts = self.groups.get(name).ok_or_else(|| {
                StatsError::undefined("hazard ratio", format!("no risk group '{name}' in the survival counts"))
            })?;
            for k in 0..counts.time.len() {
                for (ended, times) in [(true, counts.events[k]), (false, counts.censored[k])] {
                    for _ in 0..times {
                        time.push(counts.time[k]);
                        event.push(ended);
                        x.push(value);
                    }
                }
            }
        }
        cox_univariable(&time, &event, &x, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary;

    /// A deterministic, tied, imbalanced sample: scores in [0, 1], labels loosely following them.
    fn sample() -> (Vec<bool>, Vec<f64>) {
        let mut state = 12_345_u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..300)
            .map(|_| {
                let s = (next() * 1000.0).round() / 1000.0;
                (next() < 0.1 + 0.6 * s, s)
            })
            .unzip()
    }

    fn bin_index(h: &ScoreHistogram, s: f64) -> f64 {
        ((s * h.bins() as f64) as usize).min(h.bins() - 1) as f64
    }

    #[test]
    fn histogram_delong_equals_delong_on_bin_indices() {
        let (labels, scores) = sample();
        for bins in [10, 37, 1000] {
            let h = ScoreHistogram::from_scores(&labels, &scores, bins).unwrap();
            let binned: Vec<f64> = scores.iter().map(|&s| bin_index(&h, s)).collect();
            let want = binary::auc_delong(&labels, &binned, 0.95).unwrap();
            let got = h.auc_delong(0.95).unwrap();
            for (g, w) in [(got.estimate, want.estimate), (got.se, want.se), (got.ci_low, want.ci_low)] {
                assert!((g - w).abs() < 1e-12, "{bins} bins: {g} vs {w}");
            }
            assert!((got.estimate - h.auc().unwrap()).abs() < 1e-12);
        }
    }

    #[test]
    fn histogram_roc_and_net_benefit_equal_patient_level_on_bin_edges() {
        let (labels, scores) = sample();
        let h = ScoreHistogram::from_scores(&labels, &scores, 20).unwrap();
        let binned: Vec<f64> = scores.iter().map(|&s| bin_index(&h, s) / 20.0).collect();
        let want = binary::roc_curve(&labels, &binned).unwrap();
        let got = h.roc_curve().unwrap();
        assert_eq!(got.tpr, want.tpr);
        assert_eq!(got.fpr, want.fpr);
        let thresholds = [0.05, 0.1, 0.25, 0.5, 0.95];
        let want = binary::net_benefit(&labels, &scores, &thresholds).unwrap();
        let got = h.net_benefit(&thresholds).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g.model - w.model).abs() < 1e-12 && (g.treat_all - w.treat_all).abs() < 1e-12, "{g:?} {w:?}");
        }
        let c = h.confusion_at(0.5).unwrap();
        assert_eq!(c, Confusion::at(&labels, &scores, 0.5).unwrap());
    }

    #[test]
    fn thresholds_inside_a_bin_are_refused_with_the_reason() {
        let h = ScoreHistogram::from_scores(&[true, false], &[0.7, 0.2], 10).unwrap();
        let e = h.net_benefit(&[0.15]).unwrap_err().to_string();
        assert!(e.contains("0.15") && e.contains("bin"), "{e}");
        assert!(h.net_benefit(&[1.0]).is_err());
        assert!(h.auc_delong(0.95).unwrap_err().to_string().contains("at least 2 positives"));
        let one_bin = ScoreHistogram::from_scores(&[true, true, false, false], &[0.51, 0.52, 0.53, 0.54], 10).unwrap();
        assert!(one_bin.auc_delong(0.95).unwrap_err().to_string().contains("one bin"));
        assert!(ScoreHistogram::new(10).unwrap().roc_curve().is_err());
    }

    #[test]
    fn calibration_groups_cover_every_patient_in_score_order() {
        let (labels, scores) = sample();
        let h = ScoreHistogram::from_scores(&labels, &scores, 1000).unwrap();
        let groups = h.calibration_bins(10);
        assert!((9..=11).contains(&groups.len()), "{}", groups.len());
        assert_eq!(groups.iter().map(|g| g.n).sum::<usize>(), labels.len());
        assert!(groups.windows(2).all(|w| w[0].predicted < w[1].predicted));
        let positives: f64 = groups.iter().map(|g| g.observed * g.n as f64).sum();
        assert!((positives - labels.iter().filter(|l| **l).count() as f64).abs() < 1e-9);
        assert!(ScoreHistogram::new(5).unwrap().calibration_bins(10).is_empty());
    }

    #[test]
    fn hazard_ratio_from_counts_equals_cox_on_rows() {
        let time = [5.0, 8.0, 8.0, 12.0, 3.0, 9.0, 15.0, 15.0, 20.0, 4.0, 6.0, 11.0];
        let event = [true, true, false, true, true, false, true, true, false, true, false, true];
        let group = ["high", "high", "high", "high", "low", "low", "low", "low", "low", "high", "low", "low"];
        let counts = SurvivalCounts::from_rows(&time, &event, &group).unwrap();
        let x: Vec<f64> = group.iter().map(|g| if *g == "high" { 1.0 } else { 0.0 }).collect();
        let want = cox_univariable(&time, &event, &x, 0.95).unwrap();
        let got = counts.hazard_ratio("high", "low", 0.95).unwrap();
        assert!((got.hr - want.hr).abs() < 1e-10 && (got.se - want.se).abs() < 1e-10, "{got:?} {want:?}");
        assert!(counts.hazard_ratio("high", "medium", 0.95).unwrap_err().to_string().contains("medium"));
    }
}
