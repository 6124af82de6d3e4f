//! Site policy: what a hospital lets the study server ask of it. Lives in the site's own
//! configuration (`[policy]` table), never the server's; every task is checked against it before
//! anything is downloaded or computed, and a refusal names the rule (machine-readable) and says why in
//! words that carry no patient data. The client logs the refusal locally and sends it to the server.
//!
//! ```toml
//! [policy]
//! allowed_fingerprints = []          # layout fingerprints (64 hex digits); empty = any model
//! max_rounds = 50                    # highest round this site trains in; absent = no limit
//! require_secure_aggregation = true
//! require_dp = true
//! max_epsilon = 8.0                  # refuse a task that would take this site's ε above this
//! max_delta = 1e-5                   # with max_epsilon: refuse a task whose δ is above this
//! min_group_size = 10                # smallest group any reported statistic may describe
//! accepted_tasks = ["statistics", "train", "evaluate"]
//! ```

use crate::dp::RdpAccountant;
use serde::{Deserialize, Serialize};

/// The default largest δ of a DP task a site with a privacy budget accepts.
pub const DEFAULT_MAX_DELTA: f64 = 1e-5;

/// The default smallest group a reported statistic may describe.
pub const DEFAULT_MIN_GROUP_SIZE: u64 = 10;

/// A kind of task the server can send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Feature sums and counts for the pooled standardisation (before round 1); cells smaller than
    /// `min_group_size` are suppressed at the site.
    Statistics,
    /// Local training; an update leaves the site.
    Train,
    /// Scoring of the global model; aggregate metrics leave the site.
    Evaluate,
}

impl TaskKind {
    /// The name used in the policy file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Statistics => "statistics",
            Self::Train => "train",
            Self::Evaluate => "evaluate",
        }
    }
}

/// The site's policy, as written in its `[policy]` table. Absent fields take the defaults shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SitePolicy {
    /// Model layout fingerprints (64 hex digits) this site trains or evaluates; empty: any.
    pub allowed_fingerprints: Vec<String>,
    /// The highest round (1-based) this site takes part in; `None`: no limit.
    pub max_rounds: Option<u32>,
    /// Refuse train tasks without secure aggregation (default false).
    pub require_secure_aggregation: bool,
    /// Refuse train tasks without differential privacy (default false).
    pub require_dp: bool,
    /// Refuse a DP train task that would take this site's ε above this (computed here, from the
    /// task's noise multiplier, round count and δ, not taken from the server).
    pub max_epsilon: Option<f64>,
    /// With `max_epsilon`: the largest δ a task may name (default 1e-5). ε is computed for the
    /// task's δ, and a larger δ gives a smaller ε: without this bound a server could make any
    /// budget look unspent by naming a large δ.
    pub max_delta: f64,
    /// Smallest group any reported statistic may describe (default 10).
    pub min_group_size: u64,
    /// Task kinds accepted (default: statistics, train and evaluate).
    pub accepted_tasks: Vec<TaskKind>,
}

impl Default for SitePolicy {
    fn default() -> Self {
        Self {
            allowed_fingerprints: Vec::new(),
            max_rounds: None,
            require_secure_aggregation: false,
            require_dp: false,
            max_epsilon: None,
            max_delta: DEFAULT_MAX_DELTA,
            min_group_size: DEFAULT_MIN_GROUP_SIZE,
            accepted_tasks: vec![TaskKind::Statistics, TaskKind::Train, TaskKind::Evaluate],
        }
    }
}

/// The rule behind a refusal (machine-readable name via [`PolicyRule::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyRule {
    /// `accepted_tasks`.
    TaskKind,
    /// `allowed_fingerprints`.
    ModelFingerprint,
    /// `max_rounds`.
    MaxRounds,
    /// `require_secure_aggregation`.
    SecureAggregation,
    /// `require_dp`.
    DifferentialPrivacy,
    /// `max_epsilon`.
    PrivacyBudget,
    /// `min_group_size`.
    MinGroupSize,
}

impl PolicyRule {
    /// The policy field the rule comes from, e.g. `max_rounds`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskKind => "accepted_tasks",
            Self::ModelFingerprint => "allowed_fingerprints",
            Self::MaxRounds => "max_rounds",
            Self::SecureAggregation => "require_secure_aggregation",
            Self::DifferentialPrivacy => "require_dp",
            Self::PrivacyBudget => "max_epsilon",
            Self::MinGroupSize => "min_group_size",
        }
    }
}

/// A task refused by the site's policy: the rule and a message for the site operator and the study
/// lead (no patient data).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("refused by site policy ({}): {message}", rule.as_str())]
pub struct PolicyRefusal {
    /// The rule that refused.
    pub rule: PolicyRule,
    /// What was asked and what the policy allows.
    pub message: String,
}

impl PolicyRefusal {
    fn new(rule: PolicyRule, message: String) -> Self {
        Self { rule, message }
    }
}

/// A policy file that cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("site policy: {0}")]
pub struct PolicyError(pub String);

/// Differential privacy of a train task, as announced by the server.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpFacts {
    /// Noise multiplier σ of the sum.
    pub noise_multiplier: f64,
    /// Rounds in which this site's data is released under DP, including this task's.
    pub rounds: u32,
    /// δ of the study's (ε, δ).
    pub delta: f64,
}

/// What the site knows about a task when it decides whether to run it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskFacts {
    /// Task kind.
    pub kind: TaskKind,
    /// Layout fingerprint of the model (hex).
    pub model_fingerprint: String,
    /// Round (1-based).
    pub round: u32,
    /// Whether the update will be masked (secure aggregation).
    pub secure_aggregation: bool,
    /// DP settings, if the task uses differential privacy.
    pub dp: Option<DpFacts>,
    /// Size of the smallest group a result of this task would describe, when known (e.g. the
    /// smallest split or subgroup an evaluation reports on).
    pub smallest_group: Option<u64>,
}

impl SitePolicy {
    /// Checks the policy itself (call when the site configuration is loaded).
    ///
    /// # Errors
    ///
    /// [`PolicyError`] for a fingerprint that is not 64 hex digits, `max_epsilon` not positive,
    /// `max_rounds` 0, `min_group_size` 0, or no accepted task.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for f in &self.allowed_fingerprints {
            if f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PolicyError(format!(
                    "allowed_fingerprints: {f:?} is not a model fingerprint (64 hex digits, as `fedhcc status` shows)"
                )));
            }
        }
        if let Some(e) = self.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(PolicyError(format!("max_epsilon must be a positive number, not {e}")));
        }
        if !(self.max_delta > 0.0 && self.max_delta < 1.0) {
            return Err(PolicyError(format!("max_delta must be between 0 and 1, not {}", self.max_delta)));
        }
        if self.max_rounds == Some(0) {
            return Err(PolicyError("max_rounds must be at least 1 (remove it for no limit)".into()));
        }
        if self.min_group_size == 0 {
            return Err(PolicyError("min_group_size must be at least 1".into()));
        }
        if self.accepted_tasks.is_empty() {
            return Err(PolicyError("accepted_tasks is empty: the site would refuse every task".into()));
        }
        Ok(())
    }

    /// Decides whether the site runs the task. Rules are checked in this order: task kind, model
    /// fingerprint, round limit, secure aggregation, DP required, privacy budget, group size.
    ///
    /// # Errors
    ///
    /// The first rule the task breaks, as a [`PolicyRefusal`].
    pub fn check(&self, task: &TaskFacts) -> Result<(), PolicyRefusal> {
        if !self.accepted_tasks.contains(&task.kind) {
            let accepted: Vec<&str> = self.accepted_tasks.iter().map(|k| k.as_str()).collect();
            return Err(PolicyRefusal::new(
                PolicyRule::TaskKind,
                format!("{} tasks are not accepted (accepted: {})", task.kind.as_str(), accepted.join(", ")),
            ));
        }
        if !self.allowed_fingerprints.is_empty()
            && !self.allowed_fingerprints.iter().any(|f| f.eq_ignore_ascii_case(&task.model_fingerprint))
        {
            return Err(PolicyRefusal::new(
                PolicyRule::ModelFingerprint,
                format!(
                    "model {} is not one of the {} model fingerprint(s) this site allows",
                    short(&task.model_fingerprint),
                    self.allowed_fingerprints.len()
                ),
            ));
        }
        if let Some(max) = self.max_rounds
            && task.round > max
        {
            return Err(PolicyRefusal::new(
                PolicyRule::MaxRounds,
                format!("round {} is past this site's limit of {max} rounds", task.round),
            ));
        }
        if task.kind == TaskKind::Train {
            self.check_train(task)?;
        }
        if let Some(n) = task.smallest_group {
            self.check_group_size(n)?;
        }
        Ok(())
    }

    fn check_train(&self, task: &TaskFacts) -> Result<(), PolicyRefusal> {
        if self.require_secure_aggregation && !task.secure_aggregation {
            return Err(PolicyRefusal::new(
                PolicyRule::SecureAggregation,
                "this site requires secure aggregation and the task does not use it".into(),
            ));
        }
        match (&task.dp, self.require_dp) {
            (None, true) => {
                return Err(PolicyRefusal::new(
                    PolicyRule::DifferentialPrivacy,
                    "this site requires differential privacy and the task does not use it".into(),
                ));
            }
            (None, false) => {}
            (Some(dp), _) => {
                if let Some(max) = self.max_epsilon {
                    if dp.delta.is_nan() || dp.delta > self.max_delta {
                        return Err(PolicyRefusal::new(
                            PolicyRule::PrivacyBudget,
                            format!(
                                "the task's δ = {:e} is above this site's limit δ = {:e}; its privacy loss cannot \
                                 be held to ε = {max} under a larger δ",
                                dp.delta, self.max_delta
                            ),
                        ));
                    }
                    let eps = epsilon_of(dp)?;
                    if eps > max {
                        return Err(PolicyRefusal::new(
                            PolicyRule::PrivacyBudget,
                            format!(
                                "after this round this site's privacy loss would be ε = {eps:.3} (δ = {:e}, noise \
                                 multiplier {}, {} rounds), above its limit ε = {max}",
                                dp.delta, dp.noise_multiplier, dp.rounds
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses to report a statistic on a group smaller than `min_group_size` (call for every group
    /// a result describes).
    ///
    /// # Errors
    ///
    /// A [`PolicyRefusal`] with [`PolicyRule::MinGroupSize`].
    pub fn check_group_size(&self, group_size: u64) -> Result<(), PolicyRefusal> {
        if group_size < self.min_group_size {
            return Err(PolicyRefusal::new(
                PolicyRule::MinGroupSize,
                format!(
                    "a reported statistic would describe a group of {group_size} patients, below this site's minimum \
                     of {}",
                    self.min_group_size
                ),
            ));
        }
        Ok(())
    }
}

/// ε of the task's DP settings, computed at the site.
fn epsilon_of(dp: &DpFacts) -> Result<f64, PolicyRefusal> {
    let refuse = |why: String| PolicyRefusal::new(PolicyRule::DifferentialPrivacy, why);
    let mut acc = RdpAccountant::new(dp.noise_multiplier)
        .map_err(|e| refuse(format!("the task's differential privacy settings are not usable: {e}")))?;
    acc.compose(u64::from(dp.rounds));
    acc.epsilon(dp.delta)
        .map(|e| e.epsilon)
        .map_err(|e| refuse(format!("the task's differential privacy settings are not usable: {e}")))
}

fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(12).collect()
}
