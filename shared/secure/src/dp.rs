//! Differential privacy for federated rounds: per-site L2 clipping of the update, Gaussian noise
//! distributed across the sites, and a Rényi-DP accountant for the Gaussian mechanism.
//!
//! # The mechanism
//!
//! Each site clips its update to L2 norm ≤ C ([`clip_l2`]) and adds N(0, σ²C²/n) to every value
//! ([`GaussianNoise`]), n being the number of sites in the round. The sum of the n updates then carries
//! N(0, σ²C²): a Gaussian mechanism with noise multiplier σ on a sum whose L2 sensitivity to one site
//! (add or remove that site's clipped update) is C. Unit of privacy: a whole site (all its patients),
//! every round counted (no subsampling).
//!
//! Caveats the integration must keep: (1) the guarantee needs the server to see only the **sum**
//! (secure aggregation), since each site's own share of the noise is n times too small; (2) if a
//! round restarts with fewer sites, each site's noise is recomputed for the new n; (3) with weighted
//! FedAvg the sensitivity is `max_weight × C` on the weighted sum: clip `weight × delta`, or use equal
//! weights; (4) the noise is drawn in floating point (rand_distr's ziggurat sampler), which is not
//! hardened against floating-point side channels (Mironov, CCS 2012); (5) with secure aggregation,
//! the fixed-point `clip` must leave room for the noise (values clamped there are counted by
//! [`crate::secagg::EncodeStats`]) — a clamped noisy value breaks the analysis of the sum.
//!
//! # The accountant
//!
//! RDP of the Gaussian mechanism with noise multiplier σ at order α: α / (2σ²) per round (Mironov,
//! CSF 2017), composed additively over rounds. Converted to (ε, δ) by default with the bound of
//! Balle et al. (AISTATS 2020, Thm 21; = Canonne, Kamath & Steinke 2020, Prop. 12), which Google's
//! `dp-accounting` and Opacus use: ε = min over α of `rdp(α) + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`;
//! or with Mironov's original `rdp(α) + ln(1/δ)/(α − 1)` ([`Conversion::Mironov2017`]). Orders are
//! those of `dp-accounting`'s `DEFAULT_RDP_ORDERS`. Checked against `dp-accounting` 0.6 by
//! `scripts/dp_reference.py` (tests/dp_reference.json).

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Errors of the DP settings and inputs (no update values are ever included).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DpError {
    /// A setting is out of range.
    #[error("differential privacy setting: {0}")]
    Config(String),
    /// A value of the update is NaN or infinite.
    #[error("value {index} of the update is not a finite number (NaN or infinite); it cannot be clipped")]
    NotFinite {
        /// Index of the first such value.
        index: usize,
    },
}

/// The study's DP settings, as written in the study configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// σ: noise standard deviation of the sum over the L2 clip C.
    pub noise_multiplier: f64,
    /// C: largest L2 norm of one site's update.
    pub l2_clip: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Training stops before a round that would take ε above this (none: report only).
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
}

impl DpConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for σ or C not positive and finite, δ not in (0, 1), or a budget not
    /// positive.
    pub fn validate(&self) -> Result<(), DpError> {
        positive("noise_multiplier", self.noise_multiplier)?;
        positive("l2_clip", self.l2_clip)?;
        check_delta(self.delta)?;
        if let Some(b) = self.epsilon_budget {
            positive("epsilon_budget", b)?;
        }
        Ok(())
    }
}

fn positive(name: &str, v: f64) -> Result<(), DpError> {
    if v.is_finite() && v > 0.0 { Ok(()) } else { Err(DpError::Config(format!("{name} must be positive, not {v}"))) }
}

fn check_delta(delta: f64) -> Result<(), DpError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(DpError::Config(format!("delta must be in (0, 1), not {delta}")))
    }
}

/// L2 norm of `values`, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt()
}

/// The factor that brings an update of L2 norm `norm` within `clip`: `min(1, clip / norm)`. For
/// models handled in blocks: sum the squares of every block, then scale every block by this.
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip && norm > 0.0 { clip / norm } else { 1.0 }
}

/// Scales `values` so that their L2 norm is at most `clip`; returns the norm before clipping.
///
/// # Errors
///
/// [`DpError::Config`] if `clip` is not positive and finite, [`DpError::NotFinite`] for a NaN or ±∞
/// value (the update is left unchanged).
pub fn clip_l2(values: &mut [f32], clip: f64) -> Result<f64, DpError> {
    positive("l2_clip", clip)?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(DpError::NotFinite { index });
    }
    let norm = l2_norm(values);
    let factor = clip_factor(norm, clip);
    if factor < 1.0 {
        // f32 rounding can leave the norm a hair above the clip: shrink by one more f32 epsilon.
        let f = factor * (1.0 - 4.0 * f64::from(f32::EPSILON));
        for v in values.iter_mut() {
            *v = (f64::from(*v) * f) as f32;
        }
    }
    Ok(norm)
}

/// Gaussian noise one site adds so that the sum of `sites` sites carries N(0, σ²C²).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaussianNoise {
    noise_multiplier: f64,
    clip: f64,
    sites: u32,
}

impl GaussianNoise {
    /// σ = `noise_multiplier`, C = `clip`, n = `sites` in this round.
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for σ or C not positive and finite, or 0 sites.
    pub fn new(noise_multiplier: f64, clip: f64, sites: u32) -> Result<Self, DpError> {
        positive("noise_multiplier", noise_multiplier)?;
        positive("l2_clip", clip)?;
        if sites == 0 {
            return Err(DpError::Config("the number of sites must be at least 1".into()));
        }
        Ok(Self { noise_multiplier, clip, sites })
    }

    /// Standard deviation of one site's noise: σ·C/√n.
    pub fn per_site_std(&self) -> f64 {
        self.noise_multiplier * self.clip / f64::from(self.sites).sqrt()
    }

    /// Standard deviation of the noise in the sum of all sites: σ·C.
    pub fn sum_std(&self) -> f64 {
        self.noise_multiplier * self.clip
    }

    /// Adds independent N(0, σ²C²/n) to every value. Use a cryptographically secure generator in
    /// production (`rand::rng()`); a seeded one only in tests.
    pub fn add_noise<R: Rng + ?Sized>(&self, values: &mut [f32], rng: &mut R) {
        // per_site_std is positive and finite (checked in `new`), so `Normal::new` cannot fail;
        // fall back to no change rather than panic if it ever did.
        let Ok(normal) = Normal::new(0.0f64, self.per_site_std()) else { return };
        for v in values.iter_mut() {
            *v = (f64::from(*v) + normal.sample(rng)) as f32;
        }
    }
}

/// How RDP is converted to (ε, δ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Conversion {
    /// Balle et al. 2020 (Thm 21) / Canonne, Kamath & Steinke 2020 (Prop. 12), as in `dp-accounting`
    /// and Opacus: `rdp + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)` (orders ≤ 1.01 skipped; ε = 0 when
    /// δ² > 1 − e^(−rdp)).
    #[default]
    Balle2020,
    /// Mironov 2017 (Prop. 3): `rdp + ln(1/δ)/(α − 1)`.
    Mironov2017,
}

/// (ε, δ) and the RDP order that gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epsilon {
    /// ε (≥ 0; +∞ if no order gives a finite bound).
    pub epsilon: f64,
    /// The optimal order α.
    pub order: f64,
}

/// The RDP orders of Google's `dp-accounting` (`DEFAULT_RDP_ORDERS`): 1.1, 1.2, …, 10.9, 11, …, 63,
/// 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    v.extend((11..64).map(f64::from));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// Rényi-DP accountant of the (not subsampled) Gaussian mechanism over rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct RdpAccountant {
    noise_multiplier: f64,
    orders: Vec<f64>,
    rounds: u64,
}

impl RdpAccountant {
    /// An accountant with no rounds yet, over [`default_orders`].
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for σ not positive and finite.
    pub fn new(noise_multiplier: f64) -> Result<Self, DpError> {
        Self::with_orders(noise_multiplier, default_orders())
    }

    /// An accountant over the given orders (each > 1).
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for σ not positive and finite, no orders, or an order ≤ 1 or not finite.
    pub fn with_orders(noise_multiplier: f64, orders: Vec<f64>) -> Result<Self, DpError> {
        positive("noise_multiplier", noise_multiplier)?;
        if orders.is_empty() || orders.iter().any(|a| !(a.is_finite() && *a > 1.0)) {
            return Err(DpError::Config("RDP orders must be finite numbers above 1".into()));
        }
        Ok(Self { noise_multiplier, orders, rounds: 0 })
    }

    /// The noise multiplier σ.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// Rounds composed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Records one more round.
    pub fn step(&mut self) {
        self.compose(1);
    }

    /// Records `rounds` more rounds.
    pub fn compose(&mut self, rounds: u64) {
        self.rounds = self.rounds.saturating_add(rounds);
    }

    /// (order, RDP) after `rounds` rounds: `rounds × α/(2σ²)`.
    pub fn rdp_after(&self, rounds: u64) -> Vec<(f64, f64)> {
        let per = 1.0 / (2.0 * self.noise_multiplier * self.noise_multiplier);
        self.orders.iter().map(|a| (*a, rounds as f64 * (a * per))).collect()
    }

    /// ε for `delta` after the rounds composed so far, with the default conversion.
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for δ not in (0, 1).
    pub fn epsilon(&self, delta: f64) -> Result<Epsilon, DpError> {
        self.epsilon_after(self.rounds, delta, Conversion::default())
    }

    /// ε for `delta` after `rounds` rounds with the given conversion.
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for δ not in (0, 1).
    pub fn epsilon_after(&self, rounds: u64, delta: f64, conversion: Conversion) -> Result<Epsilon, DpError> {
        check_delta(delta)?;
        let mut best = Epsilon { epsilon: f64::INFINITY, order: self.orders[0] };
        for (a, r) in self.rdp_after(rounds) {
            let eps = match conversion {
                Conversion::Mironov2017 => r - delta.ln() / (a - 1.0),
                Conversion::Balle2020 => {
                    if delta * delta + (-r).exp_m1() > 0.0 {
                        0.0
                    } else if a > 1.01 {
                        r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
                    } else {
                        f64::INFINITY
                    }
                }
            };
            if eps < best.epsilon {
                best = Epsilon { epsilon: eps, order: a };
            }
        }
        best.epsilon = best.epsilon.max(0.0);
        Ok(best)
    }

    /// True if one more round would take ε (for `delta`) above `epsilon_budget`: check before
    /// announcing a round, and stop training instead.
    ///
    /// # Errors
    ///
    /// [`DpError::Config`] for δ not in (0, 1) or a budget not positive.
    pub fn would_exceed(&self, epsilon_budget: f64, delta: f64) -> Result<bool, DpError> {
        positive("epsilon_budget", epsilon_budget)?;
        let next = self.epsilon_after(self.rounds.saturating_add(1), delta, Conversion::default())?;
        Ok(next.epsilon > epsilon_budget)
    }
}
