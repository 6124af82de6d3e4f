//! The study's secure aggregation and differential privacy settings (`[federation]
//! secure_aggregation`, `[federation.secure_aggregation_params]`, `[federation.dp]`), checked at load
//! and turned into what the server and the sites compute with ([`fedhcc_secure`]).
//!
//! ```toml
//! [federation]
//! secure_aggregation = true            # the server learns only the sum of the sites' updates
//! [federation.secure_aggregation_params]
//! clip = 1.0            # largest |delta| per value; larger values are clamped (and counted)
//! max_weight = 1000000  # largest sample count of one site
//! max_sites = 64        # most sites in one sum
//! # scale = 2.0e10      # fixed-point steps per unit; default: the largest that cannot overflow
//! key_timeout_s = 60    # how long the key exchange of a round waits for the selected sites
//! [federation.dp]       # optional; needs secure_aggregation = true
//! noise_multiplier = 1.0
//! l2_clip = 1.0
//! delta = 1e-5
//! epsilon_budget = 8.0  # training stops before a round that would exceed it
//! ```
//!
//! # Weighting
//!
//! Without DP a site encodes `n_k · Δ_k` (its sample count in the clear, as plain FedAvg discloses
//! it) and the server decodes `Σ n_k Δ_k / Σ n_k`, the sample-weighted mean. Under DP every site has
//! weight 1: each clips its update to L2 norm C and the server decodes the unweighted mean of the
//! sites. With sample weights the sensitivity of the sum to one site would be `max_weight × C`, and
//! the noise would have to grow with the largest possible site; equal weights keep it at C, so
//! the configured σ is the noise multiplier of the released sum ([`fedhcc_secure::dp`]).

use crate::config::FederationConfig;
pub use fedhcc_secure::dp::DpConfig;
use fedhcc_secure::dp::RdpAccountant;
use fedhcc_secure::secagg::{FixedPoint, FixedPointConfig};
use serde::{Deserialize, Serialize};

/// Most rounds a study may have (`federation.rounds`); the DP round limit is searched up to it.
const MAX_ROUNDS: u32 = 100_000;
/// Standard deviations of one site's noise (with the smallest possible roster, two sites) that
/// the fixed-point `clip` must leave above the L2 clip under DP: a noisy value is clamped with
/// probability below 1e-23.
const NOISE_MARGIN_STD: f64 = 10.0;

/// `[federation.secure_aggregation_params]`: the fixed-point encoding of the masked updates and
/// the key exchange's timeout. Every field has a default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationParams {
    /// Largest |delta| per value (before weighting) the encoding holds; larger values are clamped
    /// to ±clip and counted. Default 1.0, or under DP `l2_clip × (1 + 10 σ)` (room for the noise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f64>,
    /// Largest sample count of one site (its FedAvg weight).
    #[serde(default = "default_max_weight")]
    pub max_weight: u64,
    /// Most sites in one sum.
    #[serde(default = "default_max_sites")]
    pub max_sites: u32,
    /// Fixed-point steps per unit of `weight × delta`. Default: the largest power of two with which
    /// no sum can overflow (`fedhcc_secure::secagg::FixedPoint::largest_scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Seconds the key exchange of a round waits for every selected site's public key (at most half
    /// of `round_timeout_s`); then the roster is fixed with the sites that sent one (if they meet the
    /// quorum).
    #[serde(default = "default_key_timeout")]
    pub key_timeout_s: u64,
}

impl Default for SecureAggregationParams {
    fn default() -> Self {
        Self {
            clip: None,
            max_weight: default_max_weight(),
            max_sites: default_max_sites(),
            scale: None,
            key_timeout_s: default_key_timeout(),
        }
    }
}

fn default_max_weight() -> u64 {
    1_000_000
}
fn default_max_sites() -> u32 {
    64
}
fn default_key_timeout() -> u64 {
    60
}

/// The smallest fixed-point clip that leaves room for DP noise: `l2_clip × (1 + 10 σ/√2)`.
fn min_clip_under_dp(dp: &DpConfig) -> f64 {
    dp.l2_clip * (1.0 + NOISE_MARGIN_STD * dp.noise_multiplier / std::f64::consts::SQRT_2)
}

/// The secure aggregation settings in force (defaults filled in), `None` when it is off.
pub fn secure_aggregation_params(f: &FederationConfig) -> Option<SecureAggregationParams> {
    f.secure_aggregation.then(|| f.secure_aggregation_params.clone().unwrap_or_default())
}

/// The weight a site encodes its update with: its sample count, or 1 under DP (see the module
/// docs).
pub fn encoding_weight(dp: bool, samples: u64) -> u64 {
    if dp { 1 } else { samples }
}

/// The fixed-point encoding every site and the server use, `None` without secure aggregation.
/// Under DP the weights are 1 and the default clip leaves room for the noise.
///
/// # Errors
/// Settings out of range, or a combination whose sum could overflow (with the largest scale that
/// would fit).
pub fn fixed_point(f: &FederationConfig) -> Result<Option<FixedPoint>, String> {
    let Some(p) = secure_aggregation_params(f) else { return Ok(None) };
    let (clip, max_weight) = match &f.dp {
        Some(dp) => (p.clip.unwrap_or(dp.l2_clip * (1.0 + NOISE_MARGIN_STD * dp.noise_multiplier)), 1),
        None => (p.clip.unwrap_or(1.0), p.max_weight),
    };
    let cfg = FixedPointConfig { clip, max_weight, max_sites: p.max_sites, scale: p.scale };
    FixedPoint::from_config(&cfg).map(Some).map_err(|e| format!("federation.secure_aggregation_params: {e}"))
}

/// ε after `rounds` rounds under `dp` (Rényi DP of the Gaussian mechanism, Balle et al. 2020
/// conversion).
///
/// # Errors
/// Settings out of range.
pub fn epsilon_after(dp: &DpConfig, rounds: u32) -> Result<f64, String> {
    let acc = RdpAccountant::new(dp.noise_multiplier).map_err(|e| format!("federation.dp: {e}"))?;
    let eps = acc
        .epsilon_after(u64::from(rounds), dp.delta, fedhcc_secure::dp::Conversion::default())
        .map_err(|e| format!("federation.dp: {e}"))?;
    Ok(eps.epsilon)
}

/// The most rounds whose ε stays within `dp.epsilon_budget` (`None` without a budget). ε grows
/// with the rounds, so this is where training stops.
///
/// # Errors
/// Settings out of range.
pub fn dp_rounds_allowed(dp: &DpConfig) -> Result<Option<u32>, String> {
    let Some(budget) = dp.epsilon_budget else { return Ok(None) };
    // Largest k in [0, MAX_ROUNDS] with ε(k) ≤ budget (ε(0) = 0).
    let (mut lo, mut hi) = (0u32, MAX_ROUNDS);
    if epsilon_after(dp, hi)? <= budget {
        return Ok(Some(hi));
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if epsilon_after(dp, mid)? <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Checks `[federation] secure_aggregation`, its parameter table and `[federation.dp]` (the
/// strategy's compatibility is checked by [`crate::aggregation::check_strategy`]).
///
/// # Errors
/// A message naming the setting and what to write instead.
pub fn check_privacy(f: &FederationConfig) -> Result<(), String> {
    if !f.secure_aggregation {
        if f.secure_aggregation_params.is_some() {
            return Err("[federation.secure_aggregation_params] is set but secure_aggregation = false; set \
                        secure_aggregation = true or remove the table"
                .into());
        }
        if f.dp.is_some() {
            return Err("[federation.dp] needs secure_aggregation = true: each site adds only its share of the \
                        noise (σ·C/√n), so the server must see nothing but the sum of the sites' updates"
                .into());
        }
        return Ok(());
    }
    if f.min_sites < 2 {
        return Err(format!(
            "federation.min_sites = {}: secure aggregation needs at least two sites in every sum (one site's \
             \"sum\" is its own update); set min_sites = 2 or more",
            f.min_sites
        ));
    }
    let p = secure_aggregation_params(f).unwrap_or_default();
    if p.key_timeout_s == 0 {
        return Err("federation.secure_aggregation_params.key_timeout_s must be at least 1".into());
    }
    if (p.max_sites as usize) < f.min_sites {
        return Err(format!(
            "federation.secure_aggregation_params.max_sites = {} is below federation.min_sites = {}",
            p.max_sites, f.min_sites
        ));
    }
    if let Some(dp) = &f.dp {
        dp.validate().map_err(|e| format!("federation.dp: {e}"))?;
        if let Some(clip) = p.clip {
            let need = min_clip_under_dp(dp);
            if clip < need {
                return Err(format!(
                    "federation.secure_aggregation_params.clip = {clip} leaves no room for the DP noise: with \
                     l2_clip = {} and noise_multiplier = {} it must be at least {need:.4} (leave clip out for a \
                     default that fits)",
                    dp.l2_clip, dp.noise_multiplier
                ));
            }
        }
        if dp_rounds_allowed(dp)? == Some(0) {
            return Err(format!(
                "federation.dp.epsilon_budget = {} allows no round: one round alone costs ε = {:.3} (δ = {}); \
                 raise the budget or the noise_multiplier",
                dp.epsilon_budget.unwrap_or_default(),
                epsilon_after(dp, 1)?,
                dp.delta
            ));
        }
    }
    fixed_point(f)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StudyConfig;

    fn fed(extra: &str) -> FederationConfig {
        let s: StudyConfig =
            toml::from_str(&format!("study_id = \"s\"\n[federation]\nrounds = 3\n{extra}")).expect("study");
        s.federation
    }

    #[test]
    fn secure_aggregation_defaults_fit_and_dp_widens_the_clip_and_sets_unit_weights() {
        let f = fed("secure_aggregation = true\n");
        check_privacy(&f).unwrap();
        let fp = fixed_point(&f).unwrap().unwrap();
        assert_eq!((fp.clip(), fp.max_weight(), fp.max_sites()), (1.0, 1_000_000, 64));
        // 64 sites × 1e6 × 1.0 × scale < 2^63: scale is the power of two just below 1.44e11.
        assert_eq!(fp.scale(), 2f64.powi(37));
        assert_eq!(encoding_weight(false, 290), 290);

        let f =
            fed("secure_aggregation = true\n[federation.dp]\nnoise_multiplier = 0.5\nl2_clip = 2.0\ndelta = 1e-5\n");
        check_privacy(&f).unwrap();
        let fp = fixed_point(&f).unwrap().unwrap();
        assert_eq!((fp.clip(), fp.max_weight()), (2.0 * 6.0, 1));
        assert_eq!(encoding_weight(true, 290), 1);
        assert_eq!(fixed_point(&fed("")).unwrap(), None);
    }

    #[test]
    fn bad_privacy_settings_are_refused_naming_the_setting() {
        for (extra, needle) in [
            ("[federation.secure_aggregation_params]\n", "secure_aggregation = false"),
            ("[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\n", "needs secure_aggregation"),
            ("secure_aggregation = true\nmin_sites = 1\n", "min_sites = 1"),
            ("secure_aggregation = true\n[federation.secure_aggregation_params]\nkey_timeout_s = 0\n", "key_timeout_s"),
            ("secure_aggregation = true\n[federation.secure_aggregation_params]\nmax_sites = 1\n", "max_sites = 1"),
            ("secure_aggregation = true\n[federation.secure_aggregation_params]\nscale = 1e20\n", "could overflow"),
            ("secure_aggregation = true\n[federation.secure_aggregation_params]\nclip = -1.0\n", "clip must be"),
            (
                "secure_aggregation = true\n[federation.secure_aggregation_params]\nclip = 1.0\n\
                 [federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\n",
                "no room for the DP noise",
            ),
            (
                "secure_aggregation = true\n[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 2.0\n",
                "delta must be in (0, 1)",
            ),
            (
                "secure_aggregation = true\n[federation.dp]\nnoise_multiplier = 0.5\nl2_clip = 1.0\ndelta = 1e-5\n\
                 epsilon_budget = 1.0\n",
                "allows no round",
            ),
        ] {
            let e = check_privacy(&fed(extra)).expect_err(extra);
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn the_dp_round_limit_is_the_last_round_within_the_budget() {
        let dp = DpConfig { noise_multiplier: 1.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: Some(6.0) };
        let k = dp_rounds_allowed(&dp).unwrap().unwrap();
        assert!(k >= 1);
        assert!(epsilon_after(&dp, k).unwrap() <= 6.0);
        assert!(epsilon_after(&dp, k + 1).unwrap() > 6.0);
        let acc = RdpAccountant::new(1.0).unwrap();
        let would = |done: u32| {
            let mut a = acc.clone();
            a.compose(u64::from(done));
            a.would_exceed(6.0, 1e-5).unwrap()
        };
        assert!(!would(k - 1) && would(k), "agrees with the accountant's own stopping rule");
        assert_eq!(dp_rounds_allowed(&DpConfig { epsilon_budget: None, ..dp.clone() }).unwrap(), None);
        let huge = DpConfig { noise_multiplier: 1e3, epsilon_budget: Some(1e9), ..dp };
        assert_eq!(dp_rounds_allowed(&huge).unwrap(), Some(MAX_ROUNDS));
    }
}
