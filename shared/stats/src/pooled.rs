//! Site summaries for federated evaluation: what a site may send so that the server can compute pooled
//! statistics without any patient-level value.
//!
//! - [`ScoreHistogram`]: counts of positives and negatives in fixed score bins on [0, 1]. Pooled AUC from
//!   merged histograms treats scores in the same bin as tied, so it is within about one bin width of the
//!   exact AUC (1000 bins: within 1e-3, tested on real data).
//! - [`SurvivalCounts`]: per risk group, events and censorings at each time (distinct times, or times
//!   rounded up to a grid). Kaplan–Meier and the log-rank test depend on the data only through these
//!   counts, so merged site counts give exactly the pooled statistics (tested). On a grid they are exact
//!   for the rounded times.
//! - From these alone (`figures`): the AUC with its DeLong interval, the ROC curve, net benefit and
//!   calibration groups of the binned scores, and the hazard ratio between two risk groups (exact).
//!
//! **Minimum cell rule** (`check_min_cell`): a summary is *refused as a whole* when any label class (for
//! a histogram) or risk group (for survival counts) holds fewer than `min_cell` patients, or fewer than
//! `min_cell` but more than zero events. Individual bins and time points are not suppressed: suppressing
//! them would silently bias the pooled estimate, and the time grid (`from_rows_on_grid`) is the control
//! for how fine the released times are.

mod figures;

use crate::numeric::{check_finite, check_len, check_probabilities};
use crate::survival::{GroupCounts, KaplanMeier, LogRank, by_time, check_outcome, kaplan_meier_counts, logrank_counts};
use crate::{Result, StatsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counts of negatives and positives in `bins` equal bins of [0, 1] (bin k holds [k/bins, (k+1)/bins),
/// the last bin also holds 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreHistogram {
    /// Negatives per bin.
    pub negative: Vec<u64>,
    /// Positives per bin.
    pub positive: Vec<u64>,
}

impl ScoreHistogram {
    /// An empty histogram of `bins` bins.
    ///
    /// # Errors
    /// `bins` is 0.
    pub fn new(bins: usize) -> Result<Self> {
        if bins == 0 {
            return Err(StatsError::undefined("score histogram", "needs at least one bin"));
        }
        Ok(ScoreHistogram { negative: vec![0; bins], positive: vec![0; bins] })
    }

    /// Histogram of probabilities with their labels.
    ///
    /// # Errors
    /// Lengths differ, or a score is not a probability in [0, 1].
    pub fn from_scores(labels: &[bool], scores: &[f64], bins: usize) -> Result<Self> {
        check_len("labels", labels.len(), scores.len())?;
        check_probabilities("score", scores)?;
        let mut h = Self::new(bins)?;
        for (&l, &s) in labels.iter().zip(scores) {
            let k = ((s * bins as f64) as usize).min(bins - 1);
            if l {
                h.positive[k] += 1;
            } else {
                h.negative[k] += 1;
            }
        }
        Ok(h)
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.positive.len()
    }

    /// Positives in all bins.
    pub fn n_positive(&self) -> u64 {
        self.positive.iter().sum()
    }

    /// Negatives in all bins.
    pub fn n_negative(&self) -> u64 {
        self.negative.iter().sum()
    }

    /// Adds another site's histogram.
    ///
    /// # Errors
    /// The bin counts differ.
    pub fn merge(&mut self, other: &ScoreHistogram) -> Result<()> {
        if other.bins() != self.bins() || other.negative.len() != other.positive.len() {
            return Err(StatsError::Incompatible {
                what: "score histograms",
                reason: format!("{} bins and {} bins", self.bins(), other.bins()),
            });
        }
        for k in 0..self.bins() {
            self.positive[k] += other.positive[k];
            self.negative[k] += other.negative[k];
        }
        Ok(())
    }

    /// AUC with scores in the same bin counted as tied (½).
    ///
    /// # Errors
    /// One class is empty.
    pub fn auc(&self) -> Result<f64> {
        let (m, n) = (self.n_positive(), self.n_negative());
        if m == 0 || n == 0 {
            return Err(StatsError::undefined(
                "pooled AUC",
                format!("{m} positives and {n} negatives: both classes are needed"),
            ));
        }
        let (mut below, mut sum) = (0.0, 0.0);
        for k in 0..self.bins() {
            sum += self.positive[k] as f64 * (below + 0.5 * self.negative[k] as f64);
            below += self.negative[k] as f64;
        }
        Ok(sum / (m as f64 * n as f64))
    }

    /// The minimum cell rule: refuses the histogram when either class has fewer than `min_cell`
    /// patients.
    ///
    /// # Errors
    /// [`StatsError::SmallCell`] naming the class.
    pub fn check_min_cell(&self, min_cell: u64) -> Result<()> {
        for (group, count) in [("positive", self.n_positive()), ("negative", self.n_negative())] {
            if count < min_cell {
                return Err(StatsError::SmallCell { what: "score histogram", group: group.into(), count, min_cell });
            }
        }
        Ok(())
    }
}

/// Events and censorings at each time, per risk group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SurvivalCounts {
    /// Counts per group name.
    pub groups: BTreeMap<String, GroupCounts>,
}

impl SurvivalCounts {
    /// Counts at each distinct time.
    ///
    /// # Errors
    /// Lengths differ or a time is not a finite number ≥ 0.
    pub fn from_rows<S: AsRef<str>>(time: &[f64], event: &[bool], group: &[S]) -> Result<Self> {
        Self::collect(time, event, group, |t| t)
    }

    /// Counts with each time rounded up to the next multiple of `grid` (e.g. 30 days): coarser times
    /// reveal less about single patients; KM and log-rank are exact for the rounded times.
    ///
    /// # Errors
    /// As [`SurvivalCounts::from_rows`]; `grid` not a positive number.
    pub fn from_rows_on_grid<S: AsRef<str>>(time: &[f64], event: &[bool], group: &[S], grid: f64) -> Result<Self> {
        if !(grid.is_finite() && grid > 0.0) {
            return Err(StatsError::undefined("survival counts", format!("time grid {grid} is not a positive number")));
        }
        Self::collect(time, event, group, |t| (t / grid).ceil() * grid)
    }

    fn collect<S: AsRef<str>>(time: &[f64], event: &[bool], group: &[S], round: impl Fn(f64) -> f64) -> Result<Self> {
        check_outcome(time, event)?;
        check_len("group", group.len(), time.len())?;
        check_finite("time", time)?;
        let mut out = SurvivalCounts::default();
        for i in by_time(time) {
            let counts = out.groups.entry(group[i].as_ref().to_owned()).or_default();
            counts.add(round(time[i]), u64::from(event[i]), u64::from(!event[i]));
        }
        Ok(out)
    }

    /// Adds another site's counts (groups of the same name are pooled).
    pub fn merge(&mut self, other: &SurvivalCounts) {
        for (name, counts) in &other.groups {
            self.groups.entry(name.clone()).or_default().merge(counts);
        }
    }

    /// Kaplan–Meier estimate of one group.
    ///
    /// # Errors
    /// Unknown group, or as [`kaplan_meier_counts`].
    pub fn kaplan_meier(&self, group: &str, level: f64) -> Result<KaplanMeier> {
        let counts = self
            .groups
            .get(group)
            .ok_or_else(|| StatsError::undefined("Kaplan–Meier estimate", format!("no group '{group}'")))?;
        kaplan_meier_counts(counts, level)
    }

    /// Log-rank test across the groups.
    ///
    /// # Errors
    /// As [`logrank_counts`].
    pub fn logrank(&self) -> Result<LogRank> {
        logrank_counts(&self.groups)
    }

    /// The minimum cell rule: refuses the counts when a group has fewer than `min_cell` patients, or
    /// some but fewer than `min_cell` events.
    ///
    /// # Errors
    /// [`StatsError::SmallCell`] naming the group.
    pub fn check_min_cell(&self, min_cell: u64) -> Result<()> {
        for (name, counts) in &self.groups {
            let n = counts.n();
            if n < min_cell {
                return Err(StatsError::SmallCell {
                    what: "survival counts (patients)",
                    group: name.clone(),
                    count: n,
                    min_cell,
                });
            }
            let d = counts.n_events();
            if d > 0 && d < min_cell {
                return Err(StatsError::SmallCell {
                    what: "survival counts (events)",
                    group: name.clone(),
                    count: d,
                    min_cell,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_auc_counts_same_bin_as_tie() {
        let h = ScoreHistogram::from_scores(&[true, false, true, false], &[0.95, 0.91, 0.2, 0.1], 10).unwrap();
        // 0.95 and 0.91 share bin 9: tied; 0.95 > 0.1; 0.2 > 0.1; 0.2 < 0.91.
        assert_eq!(h.auc().unwrap(), (0.5 + 1.0 + 1.0) / 4.0);
        assert_eq!(h.positive[9] + h.negative[9], 2);
    }

    #[test]
    fn histogram_places_one_in_last_bin_and_refuses_out_of_range() {
        let h = ScoreHistogram::from_scores(&[true], &[1.0], 4).unwrap();
        assert_eq!(h.positive, vec![0, 0, 0, 1]);
        let err = ScoreHistogram::from_scores(&[true, false], &[0.5, 1.5], 4).unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }

    #[test]
    fn merging_histograms_of_different_bins_is_refused() {
        let mut a = ScoreHistogram::new(10).unwrap();
        assert!(a.merge(&ScoreHistogram::new(20).unwrap()).is_err());
    }

    #[test]
    fn min_cell_refuses_small_groups() {
        let h = ScoreHistogram::from_scores(&[true, false, false, false], &[0.5, 0.1, 0.2, 0.3], 10).unwrap();
        let err = h.check_min_cell(3).unwrap_err();
        assert!(matches!(err, StatsError::SmallCell { count: 1, .. }), "{err}");
        assert!(h.check_min_cell(1).is_ok());
        let c = SurvivalCounts::from_rows(&[1.0, 2.0, 3.0, 4.0], &[true, false, false, false], &["a"; 4]).unwrap();
        let err = c.check_min_cell(2).unwrap_err();
        assert!(err.to_string().contains("events"), "{err}");
        assert!(c.check_min_cell(1).is_ok());
    }

    #[test]
    fn grid_rounds_times_up() {
        let c = SurvivalCounts::from_rows_on_grid(&[1.0, 29.0, 30.0, 31.0], &[true; 4], &["a"; 4], 30.0).unwrap();
        assert_eq!(c.groups["a"].time, vec![30.0, 60.0]);
        assert_eq!(c.groups["a"].events, vec![3, 1]);
    }
}
