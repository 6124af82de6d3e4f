//! Aggregation settings of a study (`[federation] strategy` and its tables) and the FedBN rule that
//! decides which parameters stay at their site.
//!
//! Both ends need these: the server builds its strategy from them, and under FedBN a site keeps
//! its normalisation layers and sends only the shared parameters, so the two must agree on which
//! names are local. The rule lives here, next to the parameter sets it splits.
//!
//! ```toml
//! [federation]
//! strategy = "fedadam"          # fedavg | fedprox | fedadam | fedyogi | fedbn | median | trimmed_mean
//! [federation.server_optimizer] # fedadam and fedyogi only; Reddi et al. (ICLR 2021)
//! lr = 0.01
//! beta1 = 0.9
//! beta2 = 0.99
//! tau = 0.001
//! ```

use crate::config::StudyConfig;
use crate::params::{Layout, ParameterSet, ParamsError, TensorSpec};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The aggregation rules a study can name in `[federation] strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// Federated averaging weighted by sample count (McMahan et al. 2017).
    FedAvg,
    /// FedAvg at the server; each site adds the proximal term `μ/2 · ‖w − w_global‖²` to its loss
    /// (Li et al. 2020). Needs `training.prox_mu > 0`.
    FedProx,
    /// Adam on the server over the sample-weighted mean delta (Reddi et al. 2021).
    FedAdam,
    /// Yogi on the server over the sample-weighted mean delta (Reddi et al. 2021).
    FedYogi,
    /// FedAvg of the shared parameters; normalisation layers stay at each site (Li et al. 2021).
    FedBn,
    /// Coordinate-wise median of the deltas (Yin et al. 2018), unweighted.
    Median,
    /// Coordinate-wise trimmed mean of the deltas (Yin et al. 2018), unweighted.
    TrimmedMean,
}

impl StrategyKind {
    /// Every strategy, in the order they are listed to users.
    pub const ALL: [StrategyKind; 7] = [
        StrategyKind::FedAvg,
        StrategyKind::FedProx,
        StrategyKind::FedAdam,
        StrategyKind::FedYogi,
        StrategyKind::FedBn,
        StrategyKind::Median,
        StrategyKind::TrimmedMean,
    ];

    /// The name used in study files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fedavg",
            StrategyKind::FedProx => "fedprox",
            StrategyKind::FedAdam => "fedadam",
            StrategyKind::FedYogi => "fedyogi",
            StrategyKind::FedBn => "fedbn",
            StrategyKind::Median => "median",
            StrategyKind::TrimmedMean => "trimmed_mean",
        }
    }

    /// Every name, comma-separated (for messages).
    pub fn names() -> String {
        Self::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Whether the strategy runs a server optimizer (`[federation.server_optimizer]`).
    pub fn uses_server_optimizer(self) -> bool {
        matches!(self, StrategyKind::FedAdam | StrategyKind::FedYogi)
    }

    /// Whether the strategy must see every site's update on its own (coordinate-wise order
    /// statistics), which secure aggregation by design forbids.
    pub fn needs_individual_updates(self) -> bool {
        matches!(self, StrategyKind::Median | StrategyKind::TrimmedMean)
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown strategy '{s}' (known: {})", Self::names()))
    }
}

/// `[federation.server_optimizer]`: FedAdam and FedYogi (Reddi et al., "Adaptive Federated
/// Optimization", ICLR 2021, Algorithm 2). The defaults are the paper's β₁ = 0.9, β₂ = 0.99 and
/// τ = 10⁻³; the paper tunes the server learning rate η per task, 10⁻² is a conservative start.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerOptimizerConfig {
    /// Server learning rate η.
    #[serde(default = "default_server_lr")]
    pub lr: f64,
    /// First-moment decay β₁, in [0, 1).
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay β₂, in [0, 1).
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adaptivity τ > 0: added to √v, and v starts at τ².
    #[serde(default = "default_tau")]
    pub tau: f64,
}

impl Default for ServerOptimizerConfig {
    fn default() -> Self {
        Self { lr: default_server_lr(), beta1: default_beta1(), beta2: default_beta2(), tau: default_tau() }
    }
}

fn default_server_lr() -> f64 {
    1e-2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

/// `[federation.trimmed_mean]`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrimmedMeanConfig {
    /// Fraction β of the sites dropped at each end of every coordinate: ⌊β·n⌋ lowest and
    /// ⌊β·n⌋ highest values; in [0, 0.5). With fewer than 1/β sites nothing is dropped.
    #[serde(default = "default_trim")]
    pub trim_fraction: f64,
}

impl Default for TrimmedMeanConfig {
    fn default() -> Self {
        Self { trim_fraction: default_trim() }
    }
}

fn default_trim() -> f64 {
    0.1
}

/// `[federation.fedbn]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FedBnConfig {
    /// Patterns of the parameter names that stay at each site; `*` matches any run of
    /// characters (e.g. `"encoder.norm*"`, `"*.bn.*"`). Empty: every parameter whose name has a
    /// normalisation segment (see [`LocalParameters::normalisation_layers`]).
    #[serde(default)]
    pub local_parameters: Vec<String>,
}

/// At most this many `local_parameters` patterns.
pub const MAX_LOCAL_PATTERNS: usize = 256;

/// Checks the study's aggregation settings and returns the strategy they name.
///
/// # Errors
/// A message naming the setting and what to write instead: an unknown strategy, a parameter table
/// for another strategy, a value out of range, FedProx without `training.prox_mu`, secure
/// aggregation with a strategy that needs each update in the clear, or unusable secure aggregation
/// or DP settings ([`crate::privacy::check_privacy`]).
pub fn check_strategy(study: &StudyConfig) -> Result<StrategyKind, String> {
    let f = &study.federation;
    let kind: StrategyKind = f.strategy.parse().map_err(|e| format!("federation.strategy: {e}"))?;
    if f.secure_aggregation && kind.needs_individual_updates() {
        return Err(format!(
            "federation.strategy = '{kind}' needs each site's update in the clear (coordinate-wise order \
             statistics), which secure aggregation hides by design: use fedavg, fedprox, fedadam, fedyogi or fedbn \
             with secure aggregation, or set secure_aggregation = false"
        ));
    }
    crate::privacy::check_privacy(f)?;
    if kind == StrategyKind::FedProx && !(study.training.prox_mu > 0.0 && study.training.prox_mu.is_finite()) {
        return Err(format!(
            "federation.strategy = 'fedprox' needs training.prox_mu > 0 (the proximal coefficient μ each site \
             adds to its loss, e.g. prox_mu = 0.01); it is {}",
            study.training.prox_mu
        ));
    }
    let only_for = |table: &str, users: &str| {
        format!("[federation.{table}] is only used by {users}, but federation.strategy = '{kind}'; remove the table")
    };
    match &f.server_optimizer {
        Some(_) if !kind.uses_server_optimizer() => return Err(only_for("server_optimizer", "fedadam and fedyogi")),
        Some(o) => {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if !positive(o.lr) {
                return Err(format!("federation.server_optimizer.lr = {}: must be a positive number", o.lr));
            }
            for (name, b) in [("beta1", o.beta1), ("beta2", o.beta2)] {
                if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                    return Err(format!("federation.server_optimizer.{name} = {b}: must be in [0, 1)"));
                }
            }
            if !positive(o.tau) {
                return Err(format!("federation.server_optimizer.tau = {}: must be a positive number", o.tau));
            }
        }
        None => {}
    }
    match &f.trimmed_mean {
        Some(_) if kind != StrategyKind::TrimmedMean => return Err(only_for("trimmed_mean", "trimmed_mean")),
        Some(t) if !(t.trim_fraction.is_finite() && (0.0..0.5).contains(&t.trim_fraction)) => {
            return Err(format!(
                "federation.trimmed_mean.trim_fraction = {}: must be in [0, 0.5) (the fraction of sites dropped at \
                 each end)",
                t.trim_fraction
            ));
        }
        _ => {}
    }
    match &f.fedbn {
        Some(_) if kind != StrategyKind::FedBn => return Err(only_for("fedbn", "fedbn")),
        Some(b) => {
            LocalParameters::from_config(b).map_err(|e| format!("federation.fedbn.local_parameters: {e}"))?;
        }
        None => {}
    }
    Ok(kind)
}

/// Which parameters stay at the site under FedBN, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalParameters {
    /// Glob patterns (`*` only); empty means the built-in normalisation markers.
    patterns: Vec<String>,
}

/// Name tokens that mark a normalisation layer (after trailing digits are removed).
const NORM_MARKERS: [&str; 9] =
    ["norm", "bn", "gn", "ln", "batchnorm", "groupnorm", "layernorm", "instancenorm", "rmsnorm"];

impl LocalParameters {
    /// The default rule: a parameter is local when a token of its name is a normalisation marker.
    /// The name is cut into tokens at `.`, `_` and `-`, trailing digits are dropped, and the token
    /// compared with `norm`, `bn`, `gn`, `ln`, `batchnorm`, `groupnorm`, `layernorm`,
    /// `instancenorm`, `rmsnorm` (case-insensitive). So `encoder.bn1.gamma`, `block.norm.beta` and
    /// `layer_norm.weight` are local; `abnormality_head.weight` is not.
    pub fn normalisation_layers() -> Self {
        Self { patterns: Vec::new() }
    }

    /// A rule from explicit patterns (`*` matches any run of characters, everything else itself).
    ///
    /// # Errors
    /// An empty or over-long pattern, or too many of them.
    pub fn from_patterns(patterns: Vec<String>) -> Result<Self, String> {
        if patterns.len() > MAX_LOCAL_PATTERNS {
            return Err(format!("{} patterns (at most {MAX_LOCAL_PATTERNS})", patterns.len()));
        }
        for p in &patterns {
            if p.is_empty() || p.len() > crate::params::MAX_NAME_LEN {
                return Err(format!(
                    "pattern '{p}' is {} bytes long (1 to {} allowed)",
                    p.len(),
                    crate::params::MAX_NAME_LEN
                ));
            }
        }
        Ok(Self { patterns })
    }

    /// The rule a `[federation.fedbn]` table describes.
    ///
    /// # Errors
    /// As [`LocalParameters::from_patterns`].
    pub fn from_config(cfg: &FedBnConfig) -> Result<Self, String> {
        Self::from_patterns(cfg.local_parameters.clone())
    }

    /// The rule a study uses, if its strategy is FedBN.
    ///
    /// # Errors
    /// Invalid aggregation settings (see [`check_strategy`]).
    pub fn for_study(study: &StudyConfig) -> Result<Option<Self>, String> {
        if check_strategy(study)? != StrategyKind::FedBn {
            return Ok(None);
        }
        Self::from_config(&study.federation.fedbn.clone().unwrap_or_default()).map(Some)
    }

    /// For messages and the server's record of the run's strategy.
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() { "normalisation layers".into() } else { format!("[{}]", self.patterns.join(", ")) }
    }

    /// Whether the parameter `name` stays at the site.
    pub fn is_local(&self, name: &str) -> bool {
        if self.patterns.is_empty() {
            name.split(['.', '_', '-']).any(|token| {
                let t = token.trim_end_matches(|c: char| c.is_ascii_digit()).to_ascii_lowercase();
                NORM_MARKERS.contains(&t.as_str())
            })
        } else {
            self.patterns.iter().any(|p| glob_match(p.as_bytes(), name.as_bytes()))
        }
    }

    /// Splits a full model into `(shared, local)`, each keeping the full model's order.
    ///
    /// # Errors
    /// Only if a part exceeds the parameter-set limits, which a valid full model cannot.
    pub fn split(&self, full: &ParameterSet) -> Result<(ParameterSet, ParameterSet), ParamsError> {
        let mut shared = Vec::new();
        let mut local = Vec::new();
        for (spec, values) in full.tensors() {
            let t = (spec.name.clone(), spec.shape.clone(), values.to_vec());
            if self.is_local(&spec.name) { local.push(t) } else { shared.push(t) }
        }
        Ok((ParameterSet::from_tensors(shared)?, ParameterSet::from_tensors(local)?))
    }

    /// The shared part of a layout (what the server holds and the wire carries).
    ///
    /// # Errors
    /// Only if the part exceeds the parameter-set limits.
    pub fn shared_layout(&self, full: &Layout) -> Result<Layout, ParamsError> {
        Layout::new(full.specs().iter().filter(|s| !self.is_local(&s.name)).cloned().collect())
    }
}

/// Rebuilds a full model of `layout` from its shared and local parts (in the layout's order).
///
/// # Errors
/// A tensor of `layout` missing from both parts, present in both, or of another shape; or a part
/// holding a tensor the layout does not have.
pub fn merge_parts(layout: &Layout, shared: &ParameterSet, local: &ParameterSet) -> Result<ParameterSet, ParamsError> {
    let index = |p: &ParameterSet| -> HashMap<String, (Vec<usize>, std::ops::Range<usize>)> {
        let mut off = 0;
        p.layout()
            .specs()
            .iter()
            .map(|s| {
                let n = s.numel();
                off += n;
                (s.name.clone(), (s.shape.clone(), off - n..off))
            })
            .collect()
    };
    let (si, li) = (index(shared), index(local));
    if shared.layout().specs().len() + local.layout().specs().len() != layout.specs().len() {
        return Err(ParamsError::BadPayload(format!(
            "{} shared and {} local tensors do not make up the model's {}",
            shared.layout().specs().len(),
            local.layout().specs().len(),
            layout.specs().len()
        )));
    }
    let mut data = Vec::with_capacity(layout.numel());
    for TensorSpec { name, shape } in layout.specs() {
        let (part, (got_shape, range)) = match (si.get(name), li.get(name)) {
            (Some(s), None) => (shared, s),
            (None, Some(l)) => (local, l),
            (Some(_), Some(_)) => {
                return Err(ParamsError::BadPayload(format!("tensor '{name}' is both shared and local")));
            }
            (None, None) => return Err(ParamsError::BadPayload(format!("tensor '{name}' is in neither part"))),
        };
        if got_shape != shape {
            return Err(ParamsError::ShapeMismatch {
                name: name.clone(),
                shape: shape.clone(),
                expected: shape.iter().product(),
                actual: range.len(),
            });
        }
        data.extend_from_slice(&part.values()[range.clone()]);
    }
    ParameterSet::new(layout.clone(), data)
}

/// `*`-only glob match (iterative, linear backtracking on the last star).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(strategy: &str) -> StudyConfig {
        toml::from_str(&format!("study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"{strategy}\"\n")).unwrap()
    }

    #[test]
    fn every_strategy_name_round_trips_and_unknown_names_list_the_known_ones() {
        for k in StrategyKind::ALL {
            assert_eq!(k.as_str().parse::<StrategyKind>().unwrap(), k);
        }
        let e = "fedsgd".parse::<StrategyKind>().unwrap_err();
        assert!(e.contains("fedsgd") && e.contains("trimmed_mean") && e.contains("fedyogi"), "{e}");
    }

    #[test]
    fn check_strategy_explains_each_misconfiguration() {
        let mut s = study("fedprox");
        let e = check_strategy(&s).unwrap_err();
        assert!(e.contains("prox_mu") && e.contains("fedprox"), "{e}");
        s.training.prox_mu = 0.01;
        assert_eq!(check_strategy(&s).unwrap(), StrategyKind::FedProx);

        let mut s = study("fedavg");
        s.federation.server_optimizer = Some(ServerOptimizerConfig::default());
        let e = check_strategy(&s).unwrap_err();
        assert!(e.contains("[federation.server_optimizer]") && e.contains("fedadam"), "{e}");
        s.federation.strategy = "fedyogi".into();
        assert_eq!(check_strategy(&s).unwrap(), StrategyKind::FedYogi);
        s.federation.server_optimizer = Some(ServerOptimizerConfig { beta2: 1.0, ..Default::default() });
        assert!(check_strategy(&s).unwrap_err().contains("beta2 = 1"));
        s.federation.server_optimizer = Some(ServerOptimizerConfig { tau: 0.0, ..Default::default() });
        assert!(check_strategy(&s).unwrap_err().contains("tau = 0"));
        s.federation.server_optimizer = Some(ServerOptimizerConfig { lr: f64::NAN, ..Default::default() });
        assert!(check_strategy(&s).unwrap_err().contains("lr = NaN"));

        let mut s = study("trimmed_mean");
        s.federation.trimmed_mean = Some(TrimmedMeanConfig { trim_fraction: 0.5 });
        assert!(check_strategy(&s).unwrap_err().contains("trim_fraction = 0.5"));
        s.federation.trimmed_mean = Some(TrimmedMeanConfig { trim_fraction: 0.25 });
        assert_eq!(check_strategy(&s).unwrap(), StrategyKind::TrimmedMean);
        s.federation.secure_aggregation = true;
        let e = check_strategy(&s).unwrap_err();
        assert!(e.contains("trimmed_mean") && e.contains("secure aggregation"), "{e}");
        let mut s = study("median");
        s.federation.secure_aggregation = true;
        assert!(check_strategy(&s).unwrap_err().contains("in the clear"));
        for name in ["fedavg", "fedadam", "fedyogi", "fedbn"] {
            let mut s = study(name);
            s.federation.secure_aggregation = true;
            assert_eq!(check_strategy(&s).unwrap().as_str(), name, "secure aggregation works with {name}");
        }
        let mut s = study("fedavg");
        s.federation.secure_aggregation = true;
        s.federation.min_sites = 1;
        assert!(check_strategy(&s).unwrap_err().contains("at least two sites"));

        let mut s = study("fedbn");
        s.federation.fedbn = Some(FedBnConfig { local_parameters: vec![String::new()] });
        assert!(check_strategy(&s).unwrap_err().contains("local_parameters"));
        s.federation.strategy = "median".into();
        assert!(check_strategy(&s).unwrap_err().contains("[federation.fedbn]"));
        assert!(check_strategy(&study("fedmedian")).unwrap_err().contains("unknown strategy 'fedmedian'"));
    }

    #[test]
    fn default_rule_keeps_normalisation_layers_local() {
        let r = LocalParameters::normalisation_layers();
        for local in [
            "encoder.bn1.gamma",
            "encoder.bn1.beta",
            "block.norm.weight",
            "layer_norm.bias",
            "stem.gn.gamma",
            "blocks.3.ln_f.weight",
            "mri.BatchNorm2.beta",
            "enc.norm12.running_mean",
        ] {
            assert!(r.is_local(local), "{local}");
        }
        for shared in ["layers.0.weight", "abnormality_head.weight", "conv.bias", "binary.weight", "lnk.w"] {
            assert!(!r.is_local(shared), "{shared}");
        }
    }

    #[test]
    fn patterns_match_with_stars_only() {
        let r = LocalParameters::from_patterns(vec!["*.bn.*".into(), "head.bias".into()]).unwrap();
        assert!(r.is_local("enc.bn.gamma"));
        assert!(r.is_local("head.bias"));
        assert!(!r.is_local("head.bias2"));
        assert!(!r.is_local("bn.gamma"), "the pattern needs a segment before bn");
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXXbYYbc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYYb"));
        assert!(LocalParameters::from_patterns(vec!["x".repeat(600)]).is_err());
    }

    #[test]
    fn split_and_merge_round_trip_in_the_full_order() {
        let full = ParameterSet::from_tensors(vec![
            ("conv.weight".into(), vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("bn.gamma".into(), vec![2], vec![5.0, 6.0]),
            ("head.weight".into(), vec![2], vec![7.0, 8.0]),
            ("bn.beta".into(), vec![2], vec![9.0, 10.0]),
        ])
        .unwrap();
        let r = LocalParameters::normalisation_layers();
        let (shared, local) = r.split(&full).unwrap();
        assert_eq!(
            shared.layout().specs().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["conv.weight", "head.weight"]
        );
        assert_eq!(local.values(), &[5.0, 6.0, 9.0, 10.0]);
        assert_eq!(r.shared_layout(full.layout()).unwrap(), *shared.layout());
        assert_eq!(merge_parts(full.layout(), &shared, &local).unwrap(), full);
        // A part from another model is refused, naming the tensor.
        let wrong = ParameterSet::from_tensors(vec![
            ("bn.gamma".into(), vec![3], vec![0.0; 3]),
            ("bn.beta".into(), vec![2], vec![0.0; 2]),
        ])
        .unwrap();
        let e = merge_parts(full.layout(), &shared, &wrong).unwrap_err().to_string();
        assert!(e.contains("bn.gamma"), "{e}");
        assert!(merge_parts(full.layout(), &shared, &shared).is_err());
    }

    #[test]
    fn strategy_tables_survive_the_effective_config_round_trip() {
        let mut s = study("fedyogi");
        s.federation.server_optimizer = Some(ServerOptimizerConfig { lr: 0.05, ..Default::default() });
        let text = toml::to_string_pretty(&s).unwrap();
        let back: StudyConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, s, "{text}");
        assert!(!text.contains("trimmed_mean"), "absent tables stay absent: {text}");
    }
}
