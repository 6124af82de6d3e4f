//! The Cox proportional-hazards loss (negative partial log-likelihood, Breslow or Efron ties) on
//! burn tensors for training, the same in f64 for evaluation, and Harrell's concordance index.
//!
//! For the distinct event times `t` with tied events `D(t)` (`d = |D(t)|`) and risk set
//! `R(t) = {k : time_k ≥ t}`, with risk scores `r` and `S = Σ_{k∈D} e^{r_k}`:
//!
//! - Breslow: `−log L = Σ_t [ d · log Σ_{k∈R} e^{r_k} − Σ_{i∈D} r_i ]`
//! - Efron:   `−log L = Σ_t [ Σ_{l=0}^{d−1} log(Σ_{k∈R} e^{r_k} − (l/d)·S) − Σ_{i∈D} r_i ]`
//!
//! Both are written as one log-sum-exp per "term" (one per event): term `j` has a weight `c_jk ≥ 0`
//! per subject (`1` in the risk set, `1 − l/d` for a tied event in Efron's `l`-th term, `0`
//! outside), so `log Σ_k c_jk e^{r_k} = logsumexp_k(r_k + log c_jk)`, evaluated stably with the
//! row maximum. The loss is divided by the number of events; with no events it is 0.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::mm_config::CoxTies;

/// `log 0` in the term matrix: finite so that no `∞ − ∞` arises, and `exp` of it underflows to 0.
const LOG_ZERO: f32 = -1e30;

/// A subject's right-censored survival: follow-up time and whether the event was observed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Survival {
    /// Time to the event or to censoring (any unit, > 0).
    pub time: f64,
    /// `true` when the event (recurrence) was observed at `time`; `false` when censored.
    pub event: bool,
}

/// The log-weight matrix of one set of subjects: `terms × n`, row-major.
#[derive(Clone, Debug)]
pub(crate) struct CoxTerms {
    pub(crate) terms: usize,
    pub(crate) n: usize,
    /// `log c_jk`, [`LOG_ZERO`] where `c_jk = 0`.
    pub(crate) log_weights: Vec<f32>,
    /// 1 for a subject with an observed event, else 0.
    pub(crate) event: Vec<f32>,
    /// Number of events (= `terms`).
    pub(crate) events: usize,
}

/// `(c_jk)` rows for the subjects of `surv` (`None` = no survival data: in no risk set), or
/// `None` when no subject has an event.
pub(crate) fn cox_weights(surv: &[Option<Survival>], ties: CoxTies) -> Option<(Vec<Vec<f64>>, Vec<bool>)> {
    let event: Vec<bool> = surv.iter().map(|s| s.is_some_and(|s| s.event)).collect();
    let mut times: Vec<f64> = surv.iter().flatten().filter(|s| s.event).map(|s| s.time).collect();
    if times.is_empty() {
        return None;
    }
    times.sort_by(f64::total_cmp);
    times.dedup();
    let mut rows = Vec::new();
    for &t in &times {
        let at_risk: Vec<bool> = surv.iter().map(|s| s.is_some_and(|s| s.time >= t)).collect();
        let tied: Vec<bool> = surv.iter().map(|s| s.is_some_and(|s| s.event && s.time == t)).collect();
        let d = tied.iter().filter(|&&x| x).count();
        for l in 0..d {
            let frac = match ties {
                CoxTies::Breslow => 0.0,
                CoxTies::Efron => l as f64 / d as f64,
            };
            rows.push(
                (0..surv.len())
                    .map(|k| match (at_risk[k], tied[k]) {
                        (false, _) => 0.0,
                        (true, false) => 1.0,
                        (true, true) => 1.0 - frac,
                    })
                    .collect(),
            );
        }
    }
    Some((rows, event))
}

impl CoxTerms {
    /// The terms of `surv`, or `None` when no subject has an event (the loss is 0 then).
    pub(crate) fn new(surv: &[Option<Survival>], ties: CoxTies) -> Option<Self> {
        let (rows, event) = cox_weights(surv, ties)?;
        let terms = rows.len();
        let log_weights =
            rows.iter().flatten().map(|&c| if c > 0.0 { c.ln() as f32 } else { LOG_ZERO }).collect::<Vec<_>>();
        Some(Self {
            terms,
            n: surv.len(),
            log_weights,
            event: event.iter().map(|&e| if e { 1.0 } else { 0.0 }).collect(),
            events: terms,
        })
    }

    /// The Cox loss of `risk` (`[n]`), averaged per event.
    ///
    /// # Shapes
    /// `risk: [n]` → `[1]`.
    pub(crate) fn loss<B: Backend>(&self, risk: Tensor<B, 1>, device: &B::Device) -> Tensor<B, 1> {
        let logw = Tensor::<B, 2>::from_data(TensorData::new(self.log_weights.clone(), [self.terms, self.n]), device);
        let event = Tensor::<B, 1>::from_data(TensorData::new(self.event.clone(), [self.n]), device);
        let m = risk.clone().reshape([1, self.n]) + logw; // [terms, n]
        let row_max = m.clone().max_dim(1).detach(); // [terms, 1]
        let lse = (m - row_max.clone()).exp().sum_dim(1).log() + row_max; // [terms, 1]
        (lse.sum() - (risk * event).sum()).div_scalar(self.events as f64)
    }
}

/// The Cox negative partial log-likelihood of `risk`, averaged per event, in f64.
///
/// Subjects whose `surv` is `None` take no part. Returns `None` when no subject has an event or
/// the lengths differ; a non-finite risk gives a non-finite result.
pub fn cox_partial_nll(risk: &[f32], surv: &[Option<Survival>], ties: CoxTies) -> Option<f64> {
    if risk.len() != surv.len() {
        return None;
    }
    let (rows, event) = cox_weights(surv, ties)?;
    let mut total = 0.0;
    for row in &rows {
        let max = row.iter().zip(risk).filter(|(c, _)| **c > 0.0).map(|(_, &r)| f64::from(r)).fold(f64::MIN, f64::max);
        let sum: f64 = row.iter().zip(risk).map(|(&c, &r)| c * (f64::from(r) - max).exp()).sum();
        total += sum.ln() + max;
    }
    total -= risk.iter().zip(&event).filter(|(_, e)| **e).map(|(&r, _)| f64::from(r)).sum::<f64>();
    Some(total / rows.len() as f64)
}

/// Harrell's concordance index of risk scores (higher risk = earlier event).
///
/// A pair is comparable when the subject with the shorter time had an event; it is concordant
/// when that subject has the higher risk, and ties in risk count one half. Subjects with `None`
/// take no part. Returns `None` when the lengths differ, a risk is NaN, or no pair is comparable.
pub fn concordance_index(risk: &[f32], surv: &[Option<Survival>]) -> Option<f64> {
    if risk.len() != surv.len() || risk.iter().any(|r| r.is_nan()) {
        return None;
    }
    let (mut concordant, mut comparable) = (0.0, 0u64);
    for (i, si) in surv.iter().enumerate() {
        let Some(si) = si.filter(|s| s.event) else { continue };
        for (j, sj) in surv.iter().enumerate() {
            let Some(sj) = sj else { continue };
            if sj.time > si.time || (sj.time == si.time && !sj.event && i != j) {
                comparable += 1;
                concordant += match risk[i].partial_cmp(&risk[j]) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                };
            }
        }
    }
    (comparable > 0).then(|| concordant / comparable as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Device, Dispatch, autodiff, flex, read_f32, read_scalar};

    fn surv(times: &[f64], events: &[bool]) -> Vec<Option<Survival>> {
        times.iter().zip(events).map(|(&time, &event)| Some(Survival { time, event })).collect()
    }

    fn tensor_loss(risk: &[f32], s: &[Option<Survival>], ties: CoxTies, device: &Device) -> Option<f32> {
        let terms = CoxTerms::new(s, ties)?;
        let r = Tensor::<Dispatch, 1>::from_data(TensorData::new(risk.to_vec(), [risk.len()]), device);
        Some(read_scalar(terms.loss(r, device)).unwrap())
    }

    /// Hand computation. Subjects (time, event, e^r): (1, yes, 1), (2, yes, 1), (2, yes, 2), (3, no, 3).
    /// - t = 1: risk set {all}, Σ e^r = 7; the event has r = 0 → term log 7.
    /// - t = 2: risk set {2nd, 3rd, 4th}, Σ e^r = 6; tied events e^r = 1 and 2 (S = 3, d = 2),
    ///   Σ r = ln 2.
    ///   - Breslow: 2·log 6 − ln 2.
    ///   - Efron:   log 6 + log(6 − ½·3) − ln 2 = log 6 + log 4.5 − ln 2.
    /// - 3 events: Breslow = (ln 7 + 2 ln 6 − ln 2) / 3 = 1.6120939…,
    ///   Efron = (ln 7 + ln 6 + ln 4.5 − ln 2) / 3 = 1.5161999…
    #[test]
    fn hand_computed_example_with_ties() {
        let s = surv(&[1.0, 2.0, 2.0, 3.0], &[true, true, true, false]);
        let risk = [0.0, 0.0, 2f32.ln(), 3f32.ln()];
        let breslow = (7f64.ln() + 2.0 * 6f64.ln() - 2f64.ln()) / 3.0;
        let efron = (7f64.ln() + 6f64.ln() + 4.5f64.ln() - 2f64.ln()) / 3.0;
        assert!((breslow - 1.612_093_969_0).abs() < 1e-9 && (efron - 1.516_199_944_8).abs() < 1e-9);
        let device = flex();
        for (ties, want) in [(CoxTies::Breslow, breslow), (CoxTies::Efron, efron)] {
            let cpu = cox_partial_nll(&risk, &s, ties).unwrap();
            assert!((cpu - want).abs() < 1e-6, "{ties:?}: f64 {cpu} vs {want}");
            let t = tensor_loss(&risk, &s, ties, &device).unwrap();
            assert!((f64::from(t) - want).abs() < 1e-5, "{ties:?}: tensor {t} vs {want}");
        }
    }

    /// Against statsmodels `PHReg(...).loglike` and lifelines `CoxPHFitter` at a fixed β: see
    /// `tests/reference/cox_reference.py`, which printed these numbers.
    #[test]
    fn matches_statsmodels_and_lifelines_reference() {
        let times = [5.0, 3.0, 3.0, 8.0, 1.0, 5.0, 5.0, 9.0, 3.0, 12.0, 7.0, 5.0];
        let events = [true, true, false, true, true, true, false, false, true, true, false, true];
        let risk = [0.3f32, -0.4, 1.1, 0.0, 0.8, -1.2, 0.5, 0.25, -0.7, 0.9, -0.1, 0.6];
        let s = surv(&times, &events);
        // −loglike / events (8 events), from the reference script.
        let breslow = 2.192_307_367_7;
        let efron = 2.142_857_119_9;
        let device = flex();
        for (ties, want) in [(CoxTies::Breslow, breslow), (CoxTies::Efron, efron)] {
            let cpu = cox_partial_nll(&risk, &s, ties).unwrap();
            assert!((cpu - want).abs() < 1e-6, "{ties:?}: f64 {cpu} vs {want}");
            let t = tensor_loss(&risk, &s, ties, &device).unwrap();
            assert!((f64::from(t) - want).abs() < 2e-5, "{ties:?}: tensor {t} vs {want}");
        }
    }

    #[test]
    fn gradient_matches_central_finite_differences() {
        let times = [4.0, 2.0, 2.0, 6.0, 2.0, 7.0, 1.0];
        let events = [true, true, true, false, false, true, true];
        let s = surv(&times, &events);
        let risk = [0.2f32, -0.5, 0.9, 0.1, -0.3, 0.4, 1.3];
        let device = autodiff(flex());
        for ties in [CoxTies::Breslow, CoxTies::Efron] {
            let terms = CoxTerms::new(&s, ties).unwrap();
            let r =
                Tensor::<Dispatch, 1>::from_data(TensorData::new(risk.to_vec(), [risk.len()]), &device).require_grad();
            let grads = terms.loss(r.clone(), &device).backward();
            let grad: Vec<f32> = read_f32(r.grad(&grads).unwrap()).unwrap();
            let h = 1e-3;
            for k in 0..risk.len() {
                let at = |delta: f32| {
                    let mut v = risk;
                    v[k] += delta;
                    cox_partial_nll(&v, &s, ties).unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
                assert!((f64::from(grad[k]) - fd).abs() < 1e-4, "{ties:?} d/dr[{k}]: autodiff {} vs fd {fd}", grad[k]);
            }
            // The loss is invariant to a common shift of the risks: the gradient sums to 0.
            assert!(grad.iter().map(|&g| f64::from(g)).sum::<f64>().abs() < 1e-5);
        }
    }

    #[test]
    fn no_events_gives_no_loss_and_extreme_risks_stay_finite() {
        let s = surv(&[1.0, 2.0, 3.0], &[false, false, false]);
        assert!(CoxTerms::new(&s, CoxTies::Efron).is_none());
        assert_eq!(cox_partial_nll(&[0.0, 1.0, 2.0], &s, CoxTies::Breslow), None);
        let mut partial = surv(&[1.0, 2.0, 3.0], &[true, false, true]);
        partial[1] = None;
        let device = flex();
        let extreme = [200.0f32, -300.0, 150.0];
        let t = tensor_loss(&extreme, &partial, CoxTies::Efron, &device).unwrap();
        let cpu = cox_partial_nll(&extreme, &partial, CoxTies::Efron).unwrap();
        // Event 1 (r = 200) against {200, 150}: log(e^200 + e^150) − 200 ≈ 0; event 3 alone: 0.
        assert!(t.is_finite() && t.abs() < 1e-4 && cpu.abs() < 1e-12, "{t} {cpu}");
    }

    #[test]
    fn concordance_counts_comparable_pairs() {
        // Pairs (shorter time with an event first): (1,2) (1,3) (1,4) (3,4) are comparable; (2, ·) is censored.
        let s = surv(&[1.0, 2.0, 3.0, 4.0], &[true, false, true, true]);
        assert_eq!(concordance_index(&[4.0, 3.0, 2.0, 1.0], &s), Some(1.0));
        assert_eq!(concordance_index(&[1.0, 2.0, 3.0, 4.0], &s), Some(0.0));
        // Risk ties count one half: (1,2) 0.5, (1,3) 1, (1,4) 1, (3,4) 0.5 → 3 of 4.
        assert_eq!(concordance_index(&[2.0, 2.0, 1.0, 1.0], &s), Some(0.75));
        assert_eq!(concordance_index(&[1.0, 2.0], &surv(&[1.0, 2.0], &[false, false])), None);
    }
}
