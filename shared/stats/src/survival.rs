//! Statistics of a risk score against a time-to-event outcome (right-censored): concordance (Harrell,
//! Uno), Kaplan–Meier curves, the log-rank test, univariable Cox regression and the cumulative/dynamic
//! time-dependent AUC.
//!
//! Conventions, shared with the reference implementations the tests compare against:
//! - `time[i]` ≥ 0 is the follow-up (event or censoring) time of patient `i`, `event[i]` whether it
//!   ended with the event; a higher `score` means a higher risk (an earlier event);
//! - a pair (i, j) is comparable when i had the event and `time[j] > time[i]`, or `time[j] == time[i]`
//!   and j was censored (a censored patient is taken to outlive an event at the same time), as lifelines
//!   and scikit-survival do;
//! - rows are numbered from 1 in errors.
//!
//! Size: concordance, Kaplan–Meier, log-rank, Cox and the time-dependent AUC share one risk-set
//! ordering and one tie rule; kept together so that every statistic breaks ties the same way.

use crate::numeric::{check_finite, check_len, check_not_constant, normal_two_sided_p, z_critical};
use crate::{Result, StatsError};
use serde::{Deserialize, Serialize};

/// Tolerance within which scikit-survival treats two scores as tied (Uno's C, time-dependent AUC).
pub const SKSURV_TIE_TOLERANCE: f64 = 1e-8;

/// Row indices in increasing time order.
pub(crate) fn by_time(time: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[a].total_cmp(&time[b]));
    order
}

/// Checks a survival outcome: equal lengths, finite non-negative times.
pub(crate) fn check_outcome(time: &[f64], event: &[bool]) -> Result<()> {
    check_len("event", event.len(), time.len())?;
    check_finite("time", time)?;
    if let Some(i) = time.iter().position(|t| *t < 0.0) {
        return Err(StatsError::BadValue {
            what: "time",
            row: i + 1,
            value: time[i].to_string(),
            expected: "a time of zero or more",
        });
    }
    Ok(())
}

fn check_scored_outcome(time: &[f64], event: &[bool], score: &[f64]) -> Result<()> {
    check_outcome(time, event)?;
    check_len("score", score.len(), time.len())?;
    check_finite("score", score)
}

/// As [`check_scored_outcome`], and the score must vary.
fn check_ranking(statistic: &'static str, time: &[f64], event: &[bool], score: &[f64]) -> Result<()> {
    check_scored_outcome(time, event, score)?;
    check_not_constant(statistic, score)
}

/// Event and censoring counts of one group at each distinct time: the sufficient statistics of the
/// Kaplan–Meier estimate and the log-rank test.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupCounts {
    /// Distinct times, increasing.
    pub time: Vec<f64>,
    /// Events at each time.
    pub events: Vec<u64>,
    /// Censored at each time.
    pub censored: Vec<u64>,
}

impl GroupCounts {
    /// Counts from individual rows.
    ///
    /// # Errors
    /// Lengths differ, or a time is not a finite number ≥ 0.
    pub fn from_rows(time: &[f64], event: &[bool]) -> Result<Self> {
        check_outcome(time, event)?;
        let mut counts = GroupCounts::default();
        for i in by_time(time) {
            counts.add(time[i], u64::from(event[i]), u64::from(!event[i]));
        }
        Ok(counts)
    }

    /// Adds another table's counts (a merge of two sorted lists).
    pub fn merge(&mut self, other: &GroupCounts) {
        let mut merged = GroupCounts::default();
        let (mut i, mut j) = (0, 0);
        while i < self.time.len() || j < other.time.len() {
            let take_mine = j == other.time.len() || (i < self.time.len() && self.time[i] <= other.time[j]);
            if take_mine {
                merged.add(self.time[i], self.events[i], self.censored[i]);
                i += 1;
            } else {
                merged.add(other.time[j], other.events[j], other.censored[j]);
                j += 1;
            }
        }
        *self = merged;
    }

    /// Adds `events` and `censored` at time `t`, keeping the times sorted (cheap when `t` is not before
    /// the last time, as when rows are added in time order).
    pub(crate) fn add(&mut self, t: f64, events: u64, censored: u64) {
        if let Some(&last) = self.time.last() {
            if last == t {
                let k = self.time.len() - 1;
                self.events[k] += events;
                self.censored[k] += censored;
                return;
            }
            if last < t {
                self.time.push(t);
                self.events.push(events);
                self.censored.push(censored);
                return;
            }
        }
        match self.time.binary_search_by(|x| x.total_cmp(&t)) {
            Ok(k) => {
                self.events[k] += events;
                self.censored[k] += censored;
            }
            Err(k) => {
                self.time.insert(k, t);
                self.events.insert(k, events);
                self.censored.insert(k, censored);
            }
        }
    }

    /// Patients in the group.
    pub fn n(&self) -> u64 {
        self.events.iter().sum::<u64>() + self.censored.iter().sum::<u64>()
    }

    /// Events in the group.
    pub fn n_events(&self) -> u64 {
        self.events.iter().sum()
    }

    /// Patients still at risk just before `t` (follow-up time ≥ t).
    pub fn at_risk(&self, t: f64) -> u64 {
        self.time
            .iter()
            .zip(self.events.iter().zip(&self.censored))
            .filter(|(s, _)| **s >= t)
            .map(|(_, (d, c))| d + c)
            .sum()
    }
}

/// Kaplan–Meier estimate with pointwise confidence intervals, on lifelines' timeline (0 and every
/// distinct time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KaplanMeier {
    /// Times: 0, then each distinct follow-up time.
    pub time: Vec<f64>,
    /// Survival just after each time.
    pub survival: Vec<f64>,
    /// Lower bound (log(−log) transform of Greenwood's variance; 1 where survival is 1).
    pub ci_low: Vec<f64>,
    /// Upper bound.
    pub ci_high: Vec<f64>,
    /// Patients at risk at each time (follow-up ≥ time).
    pub at_risk: Vec<u64>,
    /// Events at each time.
    pub events: Vec<u64>,
    /// Censored at each time.
    pub censored: Vec<u64>,
}

impl KaplanMeier {
    /// Survival at time `t` (right-continuous step function; 1 before the first time).
    pub fn survival_at(&self, t: f64) -> f64 {
        match self.time.iter().rposition(|s| *s <= t) {
            Some(k) => self.survival[k],
            None => 1.0,
        }
    }
}

/// Kaplan–Meier estimate from individual rows (see [`kaplan_meier_counts`]).
///
/// # Errors
/// Lengths differ, a time is not a finite number ≥ 0, no patients, or a level outside (0, 1).
pub fn kaplan_meier(time: &[f64], event: &[bool], level: f64) -> Result<KaplanMeier> {
    kaplan_meier_counts(&GroupCounts::from_rows(time, event)?, level)
}

/// Kaplan–Meier estimate from counts, with the "exponential Greenwood" interval
/// `S^exp(±z·√V / log S)`, `V = Σ d/(n(n−d))`, as lifelines' `KaplanMeierFitter` (its default).
///
/// # Errors
/// No patients, or a level outside (0, 1).
pub fn kaplan_meier_counts(counts: &GroupCounts, level: f64) -> Result<KaplanMeier> {
    let z = z_critical(level)?;
    let n = counts.n();
    if n == 0 {
        return Err(StatsError::undefined("Kaplan–Meier estimate", "no patients"));
    }
    let mut rows: Vec<(f64, u64, u64)> =
        counts.time.iter().zip(counts.events.iter().zip(&counts.censored)).map(|(&t, (&d, &c))| (t, d, c)).collect();
    if rows.first().is_none_or(|r| r.0 > 0.0) {
        rows.insert(0, (0.0, 0, 0));
    }
    let mut km = KaplanMeier {
        time: Vec::with_capacity(rows.len()),
        survival: Vec::with_capacity(rows.len()),
        ci_low: Vec::with_capacity(rows.len()),
        ci_high: Vec::with_capacity(rows.len()),
        at_risk: Vec::with_capacity(rows.len()),
        events: Vec::with_capacity(rows.len()),
        censored: Vec::with_capacity(rows.len()),
    };
    let (mut at_risk, mut log_s, mut greenwood) = (n, 0.0_f64, 0.0_f64);
    for (t, d, c) in rows {
        let (nr, df) = (at_risk as f64, d as f64);
        // Sum of logs, as lifelines does, so that survival and its log agree to the last digit.
        log_s += (nr - df).ln() - nr.ln();
        if d < at_risk {
            greenwood += df / (nr * (nr - df));
        }
        let s = log_s.exp();
        let (lo, hi) = if s == 0.0 {
            (0.0, 0.0)
        } else if log_s == 0.0 {
            (1.0, 1.0)
        } else {
            let shift = z * greenwood.sqrt() / log_s;
            ((-((-log_s).ln() - shift).exp()).exp(), (-((-log_s).ln() + shift).exp()).exp())
        };
        km.time.push(t);
        km.survival.push(s);
        km.ci_low.push(lo);
        km.ci_high.push(hi);
        km.at_risk.push(at_risk);
        km.events.push(d);
        km.censored.push(c);
        at_risk -= d + c;
    }
    Ok(km)
}

/// Log-rank test result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRank {
    /// Chi-squared statistic.
    pub chi2: f64,
    /// Degrees of freedom (groups − 1).
    pub df: usize,
    /// p-value.
    pub p: f64,
    /// Groups, in the order of `observed` and `expected` (sorted).
    pub groups: Vec<String>,
    /// Observed events per group.
    pub observed: Vec<f64>,
    /// Expected events per group under equal hazards.
    pub expected: Vec<f64>,
}

/// Log-rank test for two or more groups of individual rows (see [`logrank_counts`]).
///
/// # Errors
/// As [`logrank_counts`]; lengths differ or a bad time.
pub fn logrank<S: AsRef<str>>(time: &[f64], event: &[bool], group: &[S]) -> Result<LogRank> {
    check_outcome(time, event)?;
    check_len("group", group.len(), time.len())?;
    let mut groups: std::collections::BTreeMap<String, GroupCounts> = Default::default();
    for i in by_time(time) {
        groups.entry(group[i].as_ref().to_owned()).or_default().add(time[i], u64::from(event[i]), u64::from(!event[i]));
    }
    logrank_counts(&groups)
}

/// Log-rank test (Mantel–Haenszel) for two or more groups given as counts: the statistic
/// `Zᵀ V⁻¹ Z` over the first k − 1 groups, with the hypergeometric variance (the factor
/// `(n − d)/(n − 1)` taken as 1 when n = 1), as lifelines' `multivariate_logrank_test`.
///
/// # Errors
/// Fewer than two groups, no events, or a singular variance (a group with nobody at risk at any event).
pub fn logrank_counts(groups: &std::collections::BTreeMap<String, GroupCounts>) -> Result<LogRank> {
    let k = groups.len();
    if k < 2 {
        return Err(StatsError::undefined("log-rank test", format!("needs two or more groups, got {k}")));
    }
    let names: Vec<String> = groups.keys().cloned().collect();
    let tables: Vec<&GroupCounts> = groups.values().collect();
    let mut times: Vec<f64> = tables.iter().flat_map(|g| g.time.iter().copied()).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    let mut at_risk: Vec<u64> = tables.iter().map(|g| g.n()).collect();
    let mut cursor = vec![0usize; k];
    let mut observed = vec![0.0; k];
    let mut expected = vec![0.0; k];
    let mut v = vec![vec![0.0; k]; k];
    let mut any_event = false;
    for &t in &times {
        let mut d_j = vec![0u64; k];
        let mut removed = vec![0u64; k];
        for (j, g) in tables.iter().enumerate() {
            if g.time.get(cursor[j]) == Some(&t) {
                d_j[j] = g.events[cursor[j]];
                removed[j] = g.events[cursor[j]] + g.censored[cursor[j]];
                cursor[j] += 1;
            }
        }
        let d: u64 = d_j.iter().sum();
        let n: u64 = at_risk.iter().sum();
        if d > 0 {
            any_event = true;
            let (nf, df) = (n as f64, d as f64);
            let ratio = if n > 1 { (nf - df) / (nf - 1.0) } else { 1.0 };
            let factor = ratio * df / (nf * nf);
            for a in 0..k {
                let na = at_risk[a] as f64;
                observed[a] += d_j[a] as f64;
                expected[a] += na * df / nf;
                for (b, vb) in v[a].iter_mut().enumerate() {
                    let nb = at_risk[b] as f64;
                    *vb += factor * (if a == b { na * nf } else { 0.0 } - na * nb);
                }
            }
        }
        for j in 0..k {
            at_risk[j] -= removed[j];
        }
    }
    if !any_event {
        return Err(StatsError::undefined("log-rank test", "no events in any group"));
    }
    let zv: Vec<f64> = (0..k - 1).map(|j| observed[j] - expected[j]).collect();
    let vm: Vec<Vec<f64>> = v[..k - 1].iter().map(|row| row[..k - 1].to_vec()).collect();
    let u = crate::numeric::solve(vm, zv.clone()).ok_or_else(|| {
        StatsError::undefined(
            "log-rank test",
            "the variance matrix is singular (a group has no one at risk at any event)",
        )
    })?;
    let chi2: f64 = zv.iter().zip(&u).map(|(a, b)| a * b).sum();
    let df = k - 1;
    Ok(LogRank { chi2, df, p: crate::numeric::chi2_sf(chi2, df)?, groups: names, observed, expected })
}

/// Binary indexed tree over the sorted distinct scores: counts of scores inserted so far.
struct Fenwick {
    values: Vec<f64>,
    tree: Vec<f64>,
}

impl Fenwick {
    fn new(scores: &[f64]) -> Self {
        let mut values = scores.to_vec();
        values.sort_by(f64::total_cmp);
        values.dedup();
        let len = values.len();
        Fenwick { values, tree: vec![0.0; len + 1] }
    }

    fn insert(&mut self, score: f64) {
        let mut i = self.values.partition_point(|v| *v < score) + 1;
        while i < self.tree.len() {
            self.tree[i] += 1.0;
            i += i & i.wrapping_neg();
        }
    }

    /// Inserted scores `< x`.
    fn below(&self, x: f64) -> f64 {
        self.prefix(self.values.partition_point(|v| *v < x))
    }

    /// Inserted scores `<= x`.
    fn at_most(&self, x: f64) -> f64 {
        self.prefix(self.values.partition_point(|v| *v <= x))
    }

    fn prefix(&self, mut i: usize) -> f64 {
        let mut s = 0.0;
        while i > 0 {
            s += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        s
    }
}

/// Weighted concordance over comparable pairs, O(n log n): Σ wᵢ (concordant + ½ tied) / Σ wᵢ comparable,
/// where a pair is tied when the scores differ by at most `tol`.
fn concordance(time: &[f64], event: &[bool], score: &[f64], weight: impl Fn(usize) -> f64, tol: f64) -> Option<f64> {
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[b].total_cmp(&time[a]));
    let mut pool = Fenwick::new(score);
    let (mut inserted, mut numerator, mut denominator) = (0.0, 0.0, 0.0);
    let mut start = 0;
    while start < order.len() {
        let t = time[order[start]];
        let end = start + order[start..].iter().take_while(|&&i| time[i] == t).count();
        let batch = &order[start..end];
        // Censored at t outlive events at t: they join the comparison pool first.
        for &j in batch.iter().filter(|&&j| !event[j]) {
            pool.insert(score[j]);
            inserted += 1.0;
        }
        for &i in batch.iter().filter(|&&i| event[i]) {
            let w = weight(i);
            if w == 0.0 || inserted == 0.0 {
                continue;
            }
            let below = pool.below(score[i] - tol);
            let tied = pool.at_most(score[i] + tol) - below;
            numerator += w * (below + 0.5 * tied);
            denominator += w * inserted;
        }
        for &i in batch.iter().filter(|&&i| event[i]) {
            pool.insert(score[i]);
            inserted += 1.0;
        }
        start = end;
    }
    (denominator > 0.0).then(|| numerator / denominator)
}

/// Harrell's C: share of comparable pairs in which the patient with the earlier event has the higher
/// score, tied scores counting ½ (lifelines' `concordance_index` with the negated score).
///
/// # Errors
/// Bad input, or no comparable pair (no events, or every event after every other follow-up).
pub fn harrell_c(time: &[f64], event: &[bool], score: &[f64]) -> Result<f64> {
    check_ranking("Harrell's C", time, event, score)?;
    concordance(time, event, score, |_| 1.0, 0.0)
        .ok_or_else(|| StatsError::undefined("Harrell's C", "no comparable pairs (no events before other follow-up)"))
}

/// The censoring distribution G(t) = P(censoring time > t), by a reverse Kaplan–Meier estimate on
/// every distinct time (events removed from the risk set before censorings at the same time), as
/// scikit-survival's `CensoringDistributionEstimator`.
#[derive(Debug, Clone, PartialEq)]
pub struct CensoringSurvival {
    time: Vec<f64>,
    prob: Vec<f64>,
}

impl CensoringSurvival {
    /// Fits G from the rows.
    ///
    /// # Errors
    /// Bad input or no patients.
    pub fn fit(time: &[f64], event: &[bool]) -> Result<Self> {
        let counts = GroupCounts::from_rows(time, event)?;
        let mut at_risk = counts.n();
        if at_risk == 0 {
            return Err(StatsError::undefined("censoring distribution", "no patients"));
        }
        let mut prob = Vec::with_capacity(counts.time.len());
        let mut g = 1.0;
        for (&d, &c) in counts.events.iter().zip(&counts.censored) {
            if c > 0 {
                g *= 1.0 - c as f64 / (at_risk - d) as f64;
            }
            prob.push(g);
            at_risk -= d + c;
        }
        Ok(CensoringSurvival { time: counts.time, prob })
    }

    /// G(t): the value at the last distinct time ≤ t (1 before the first).
    pub fn at(&self, t: f64) -> f64 {
        match self.time.partition_point(|s| *s <= t) {
            0 => 1.0,
            k => self.prob[k - 1],
        }
    }

    /// Inverse probability of censoring weight 1/G(t) of an event at `t`.
    fn ipcw(&self, statistic: &'static str, t: f64) -> Result<f64> {
        let g = self.at(t);
        if g == 0.0 {
            return Err(StatsError::undefined(
                statistic,
                format!("everyone still followed at time {t} is censored there, so an event at {t} cannot be weighted"),
            ));
        }
        Ok(1.0 / g)
    }
}

/// Uno's C with truncation τ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UnoC {
    /// Truncation time: only events before τ count.
    pub tau: f64,
    /// The estimate.
    pub estimate: f64,
}

/// Uno's C (Uno et al. 2011): concordance over comparable pairs whose first event is before `tau`,
/// each weighted by 1/G(tᵢ)², G from the same rows; scores within 1e-8 count as tied. Matches
/// scikit-survival's `concordance_index_ipcw(y, y, score, tau)`.
///
/// # Errors
/// Bad input, `tau` not a positive number, no comparable pair before τ, or G = 0 at an event before τ.
pub fn uno_c(time: &[f64], event: &[bool], score: &[f64], tau: f64) -> Result<UnoC> {
    check_ranking("Uno's C", time, event, score)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(StatsError::undefined("Uno's C", format!("truncation time {tau} is not a positive number")));
    }
    let g = CensoringSurvival::fit(time, event)?;
    let mut weights = vec![0.0; time.len()];
    for i in 0..time.len() {
        if event[i] && time[i] < tau {
            weights[i] = g.ipcw("Uno's C", time[i])?.powi(2);
        }
    }
    let estimate = concordance(time, event, score, |i| weights[i], SKSURV_TIE_TOLERANCE)
        .ok_or_else(|| StatsError::undefined("Uno's C", format!("no comparable pairs with an event before {tau}")))?;
    Ok(UnoC { tau, estimate })
}

/// Time-dependent AUC at one time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimeAuc {
    /// The time t.
    pub time: f64,
    /// Cumulative/dynamic AUC: cases had the event by t, controls are event-free after t.
    pub auc: f64,
}

/// Cumulative/dynamic time-dependent AUC (Uno et al. 2007; Hung & Chiang 2010): at each t, cases
/// (event at or before t, weighted 1/G(tᵢ)) against controls (follow-up beyond t); scores within 1e-8
/// (chained) count as tied. Matches scikit-survival's `cumulative_dynamic_auc(y, y, score, times)`, which
/// requires each t within [shortest, longest follow-up).
///
/// # Errors
/// Bad input; a time outside the follow-up range; no case or no control at a time; G = 0 at a case.
pub fn time_dependent_auc(time: &[f64], event: &[bool], score: &[f64], times: &[f64]) -> Result<Vec<TimeAuc>> {
    check_ranking("time-dependent AUC", time, event, score)?;
    if time.is_empty() {
        return Err(StatsError::undefined("time-dependent AUC", "no patients"));
    }
    let g = CensoringSurvival::fit(time, event)?;
    let (t_min, t_max) = time.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &t| (a.min(t), b.max(t)));
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    times
        .iter()
        .map(|&t| {
            if !(t >= t_min && t < t_max) {
                return Err(StatsError::undefined(
                    "time-dependent AUC",
                    format!("time {t} is outside the follow-up of these data [{t_min}, {t_max})"),
                ));
            }
            let mut case_w = vec![0.0; score.len()];
            for i in 0..score.len() {
                if event[i] && time[i] <= t {
                    case_w[i] = g.ipcw("time-dependent AUC", time[i])?;
                }
            }
            let is_control = |i: usize| time[i] > t;
            let total_w: f64 = case_w.iter().sum();
            let total_c = (0..score.len()).filter(|&i| is_control(i)).count() as f64;
            if total_w == 0.0 || total_c == 0.0 {
                return Err(StatsError::undefined(
                    "time-dependent AUC",
                    format!(
                        "at time {t} there are {} cases and {total_c} controls",
                        case_w.iter().filter(|w| **w > 0.0).count()
                    ),
                ));
            }
            // Walk groups of tied scores from the highest down; each control earns the case weight above
            // it plus half of the case weight tied with it.
            let (mut above_w, mut area) = (0.0, 0.0);
            let mut k = 0;
            while k < order.len() {
                let mut end = k + 1;
                while end < order.len() && (score[order[end - 1]] - score[order[end]]).abs() <= SKSURV_TIE_TOLERANCE {
                    end += 1;
                }
                let group = &order[k..end];
                let w: f64 = group.iter().map(|&i| case_w[i]).sum();
                let c = group.iter().filter(|&&i| is_control(i)).count() as f64;
                area += c * (above_w + 0.5 * w);
                above_w += w;
                k = end;
            }
            Ok(TimeAuc { time: t, auc: area / (total_w * total_c) })
        })
        .collect()
}

/// Univariable Cox proportional-hazards fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cox {
    /// Log hazard ratio per unit of the covariate.
    pub coef: f64,
    /// Its standard error (inverse observed information).
    pub se: f64,
    /// Hazard ratio `exp(coef)`.
    pub hr: f64,
    /// Lower bound `exp(coef − z·se)`.
    pub ci_low: f64,
    /// Upper bound `exp(coef + z·se)`.
    pub ci_high: f64,
    /// Wald z = coef/se.
    pub z: f64,
    /// Two-sided Wald p-value.
    pub p: f64,
}

/// Efron partial log-likelihood of a centred covariate, with its first two derivatives.
fn efron(order: &[usize], time: &[f64], event: &[bool], x: &[f64], beta: f64) -> (f64, f64, f64) {
    let (mut ll, mut grad, mut hess) = (0.0, 0.0, 0.0);
    let (mut s0, mut s1, mut s2) = (0.0, 0.0, 0.0);
    let mut k = 0;
    while k < order.len() {
        let t = time[order[k]];
        let (mut d, mut d0, mut d1, mut d2, mut dx) = (0usize, 0.0, 0.0, 0.0, 0.0);
        while k < order.len() && time[order[k]] == t {
            let i = order[k];
            let r = (beta * x[i]).exp();
            s0 += r;
            s1 += r * x[i];
            s2 += r * x[i] * x[i];
            if event[i] {
                d += 1;
                d0 += r;
                d1 += r * x[i];
                d2 += r * x[i] * x[i];
                dx += x[i];
            }
            k += 1;
        }
        if d == 0 {
            continue;
        }
        ll += beta * dx;
        grad += dx;
        for l in 0..d {
            let frac = l as f64 / d as f64;
            let a0 = s0 - frac * d0;
            let a1 = s1 - frac * d1;
            let a2 = s2 - frac * d2;
            ll -= a0.ln();
            grad -= a1 / a0;
            hess -= a2 / a0 - (a1 / a0).powi(2);
        }
    }
    (ll, grad, hess)
}

/// Univariable Cox regression with Efron's handling of tied event times, by Newton–Raphson with step
/// halving; matches lifelines' `CoxPHFitter` (no penalizer) with one covariate.
///
/// # Errors
/// Bad input, no events, a constant covariate, or no convergence (the covariate separates the events,
/// so the hazard ratio is infinite).
pub fn cox_univariable(time: &[f64], event: &[bool], x: &[f64], level: f64) -> Result<Cox> {
    check_scored_outcome(time, event, x)?;
    let z = z_critical(level)?;
    if !event.iter().any(|e| *e) {
        return Err(StatsError::undefined("Cox regression", "no events"));
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let xc: Vec<f64> = x.iter().map(|v| v - mean).collect();
    let spread = xc.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
    if spread == 0.0 {
        return Err(StatsError::undefined("Cox regression", "the score is the same for every patient"));
    }
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[b].total_cmp(&time[a]));
    let mut beta = 0.0;
    let (mut ll, mut grad, mut hess) = efron(&order, time, event, &xc, beta);
    let mut converged = false;
    for _ in 0..200 {
        if hess >= 0.0 || !hess.is_finite() {
            break;
        }
        let mut step = -grad / hess;
        let mut next = efron(&order, time, event, &xc, beta + step);
        let mut halvings = 0;
        // Halve while the likelihood drops (or is NaN: overflow far from the optimum).
        while next.0.partial_cmp(&(ll - 1e-12 * ll.abs())).is_none_or(|o| o == std::cmp::Ordering::Less)
            && halvings < 30
        {
            step /= 2.0;
            next = efron(&order, time, event, &xc, beta + step);
            halvings += 1;
        }
        beta += step;
        (ll, grad, hess) = next;
        if step.abs() < 1e-12 * (1.0 + beta.abs()) || (step.abs() < 1e-14 && grad.abs() < 1e-9) {
            converged = true;
            break;
        }
        if (beta * spread).abs() > 700.0 {
            break;
        }
    }
    if !converged || hess.partial_cmp(&0.0) != Some(std::cmp::Ordering::Less) {
        return Err(StatsError::undefined(
            "Cox regression",
            "the fit did not converge (the score separates the events: the hazard ratio is infinite)",
        ));
    }
    let se = (-1.0 / hess).sqrt();
    let zstat = beta / se;
    Ok(Cox {
        coef: beta,
        se,
        hr: beta.exp(),
        ci_low: (beta - z * se).exp(),
        ci_high: (beta + z * se).exp(),
        z: zstat,
        p: normal_two_sided_p(zstat),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_time_names_its_row() {
        let err = kaplan_meier(&[3.0, -1.0], &[true, false], 0.95).unwrap_err();
        assert_eq!(err.to_string(), "time in row 2 is -1: a time of zero or more");
    }

    #[test]
    fn no_events_gives_reasons() {
        let time = [1.0, 2.0, 3.0];
        let event = [false; 3];
        assert!(harrell_c(&time, &event, &[0.1, 0.2, 0.3]).unwrap_err().to_string().contains("no comparable"));
        assert!(cox_univariable(&time, &event, &[0.1, 0.2, 0.3], 0.95).unwrap_err().to_string().contains("no events"));
        let err = logrank(&time, &event, &["a", "b", "a"]).unwrap_err();
        assert!(err.to_string().contains("no events"), "{err}");
        let km = kaplan_meier(&time, &event, 0.95).unwrap();
        assert!(km.survival.iter().all(|s| *s == 1.0));
    }

    #[test]
    fn all_equal_scores_give_reasons() {
        let time = [1.0, 2.0, 3.0, 4.0];
        let event = [true, false, true, false];
        let s = [0.5; 4];
        assert!(harrell_c(&time, &event, &s).unwrap_err().to_string().contains("scores are equal"));
        assert!(uno_c(&time, &event, &s, 3.5).unwrap_err().to_string().contains("scores are equal"));
        assert!(time_dependent_auc(&time, &event, &s, &[2.0]).is_err());
        assert!(cox_univariable(&time, &event, &s, 0.95).unwrap_err().to_string().contains("same for every"));
    }

    #[test]
    fn large_cohort_is_fast() {
        // 50 000 patients with many tied times: every statistic is O(n log n) (a quadratic one would take
        // minutes here).
        let n = 50_000;
        let mut state = 12_345_u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let score: Vec<f64> = (0..n).map(|_| next()).collect();
        let time: Vec<f64> = score.iter().map(|s| (1000.0 * next() * (1.5 - s)).round()).collect();
        let event: Vec<bool> = (0..n).map(|_| next() < 0.7).collect();
        let group: Vec<&str> = score.iter().map(|&s| if s > 0.5 { "high" } else { "low" }).collect();
        let started = std::time::Instant::now();
        let c = harrell_c(&time, &event, &score).unwrap();
        assert!(c > 0.55, "{c}");
        uno_c(&time, &event, &score, 800.0).unwrap();
        time_dependent_auc(&time, &event, &score, &[200.0, 400.0]).unwrap();
        assert!(logrank(&time, &event, &group).unwrap().p < 1e-6);
        kaplan_meier(&time, &event, 0.95).unwrap();
        assert!(cox_univariable(&time, &event, &score, 0.95).unwrap().hr > 1.0);
        assert!(started.elapsed().as_secs_f64() < 5.0, "{:?}", started.elapsed());
    }

    #[test]
    fn single_patient() {
        let km = kaplan_meier(&[5.0], &[true], 0.95).unwrap();
        assert_eq!(km.time, vec![0.0, 5.0]);
        assert_eq!(km.survival, vec![1.0, 0.0]);
        assert_eq!(km.at_risk, vec![1, 1]);
        assert!(harrell_c(&[5.0], &[true], &[1.0]).is_err());
        assert!(logrank(&[5.0], &[true], &["a"]).unwrap_err().to_string().contains("two or more groups"));
    }

    #[test]
    fn separating_score_gives_no_cox_estimate() {
        let time = [1.0, 2.0, 3.0, 4.0];
        let event = [true, true, true, true];
        let err = cox_univariable(&time, &event, &[4.0, 3.0, 2.0, 1.0], 0.95).unwrap_err();
        assert!(err.to_string().contains("did not converge"), "{err}");
    }

    #[test]
    fn harrell_counts_censored_tie_as_comparable() {
        // Event at 2 (score 1) vs censored at 2 (score 0): comparable and concordant.
        assert_eq!(harrell_c(&[2.0, 2.0], &[true, false], &[1.0, 0.0]).unwrap(), 1.0);
        // Two events at the same time are not comparable.
        assert!(harrell_c(&[2.0, 2.0], &[true, true], &[1.0, 0.0]).is_err());
    }
}
