//! The site's policy ([`fedhcc_secure::policy::SitePolicy`], the `[policy]` table of the site's
//! configuration) applied by the task loop: the facts of each task it checks before anything is
//! downloaded or computed, the smallest cell of what leaves the site, and the words the server is
//! told when a task is declined.
//!
//! Minimum group size: [`fedhcc_core::standardisation::MIN_CELL`] is the floor, the policy's
//! `min_group_size` raises it ([`min_cell`]). A statistics answer has every feature observed for
//! fewer training patients suppressed ([`suppress_small_cells`]); an evaluation of a split smaller
//! than the minimum, or whose summary was computed with a smaller cell, is declined
//! ([`check_evaluation`]).

use crate::EvalResult;
use fedhcc_core::standardisation::{GroupSums, MIN_CELL};
use fedhcc_secure::policy::{DpFacts, PolicyRefusal, PolicyRule, SitePolicy, TaskFacts, TaskKind};

/// The smallest group any statistic this site reports may describe: the policy's
/// `min_group_size`, and never below [`MIN_CELL`].
pub fn min_cell(policy: &SitePolicy) -> u64 {
    policy.min_group_size.max(MIN_CELL)
}

/// Suppresses every column observed for fewer than [`min_cell`] patients (reported as not
/// observed); returns how many were suppressed. `fedhcc train --mode central` applies the same,
/// so central and federated standardisation agree.
pub fn suppress_small_cells(groups: &mut [GroupSums], policy: &SitePolicy) -> usize {
    let min = min_cell(policy);
    groups.iter_mut().map(|g| g.suppress_below(min)).sum()
}

/// The facts of a train task the policy decides on. `dp_noise_multiplier` 0 means no differential
/// privacy; with DP the site's privacy loss is counted as if it took part in every round up to this
/// one (the most it can have spent).
pub fn train_facts(
    fingerprint: &str,
    round: u32,
    secure_aggregation: bool,
    dp_noise_multiplier: f64,
    dp_delta: f64,
) -> TaskFacts {
    TaskFacts {
        kind: TaskKind::Train,
        model_fingerprint: fingerprint.to_string(),
        round,
        secure_aggregation,
        dp: (dp_noise_multiplier != 0.0).then_some(DpFacts {
            noise_multiplier: dp_noise_multiplier,
            rounds: round,
            delta: dp_delta,
        }),
        smallest_group: None,
    }
}

/// The facts of a statistics or evaluate task (no update leaves the site).
pub fn task_facts(kind: TaskKind, fingerprint: &str, round: u32) -> TaskFacts {
    TaskFacts {
        kind,
        model_fingerprint: fingerprint.to_string(),
        round,
        secure_aggregation: false,
        dp: None,
        smallest_group: None,
    }
}

/// Checks an evaluation before it is reported: the scored split must hold at least [`min_cell`]
/// patients, and a summary must have been computed with at least that cell size (its figures on
/// smaller groups are already left out).
///
/// # Errors
/// A [`PolicyRefusal`] with [`PolicyRule::MinGroupSize`].
pub fn check_evaluation(policy: &SitePolicy, result: &EvalResult) -> Result<(), PolicyRefusal> {
    let min = min_cell(policy);
    let floor = SitePolicy { min_group_size: min, ..policy.clone() };
    floor.check_group_size(result.num_samples)?;
    if let Some(s) = &result.summary
        && s.min_cell < min
    {
        return Err(PolicyRefusal {
            rule: PolicyRule::MinGroupSize,
            message: format!(
                "the evaluation summary was computed with a minimum cell of {}, below this site's minimum of {min}",
                s.min_cell
            ),
        });
    }
    Ok(())
}

/// What the server is told about a refusal. A group-size refusal does not carry the group's size
/// (a small count is what the rule protects); the site's own log has it.
pub fn message_for_server(policy: &SitePolicy, refusal: &PolicyRefusal) -> String {
    match refusal.rule {
        PolicyRule::MinGroupSize => format!(
            "a reported statistic would describe a group smaller than this site's minimum of {} patients",
            min_cell(policy)
        ),
        _ => refusal.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(n: u64) -> EvalResult {
        EvalResult { num_samples: n, metrics: vec![], summary: None }
    }

    #[test]
    fn the_minimum_cell_is_the_policy_s_never_below_the_floor() {
        let p = SitePolicy { min_group_size: 3, ..SitePolicy::default() };
        assert_eq!(min_cell(&p), MIN_CELL);
        assert_eq!(min_cell(&SitePolicy::default()), 10);
        let mut g = GroupSums::new("clinical", vec!["a".into(), "b".into(), "c".into()]);
        for (k, n) in [(0, 4), (1, 9), (2, 10)] {
            for _ in 0..n {
                g.add(k, 1.0);
            }
        }
        let mut groups = vec![g];
        assert_eq!(suppress_small_cells(&mut groups, &SitePolicy::default()), 2);
        assert_eq!(groups[0].count, vec![0, 0, 10]);
    }

    #[test]
    fn evaluations_of_small_splits_are_declined_and_the_server_is_not_told_the_size() {
        let p = SitePolicy::default();
        assert!(check_evaluation(&p, &eval(10)).is_ok());
        let r = check_evaluation(&p, &eval(9)).unwrap_err();
        assert_eq!(r.rule, PolicyRule::MinGroupSize);
        assert!(r.message.contains(" 9 "), "the site's log has the size: {}", r.message);
        let told = message_for_server(&p, &r);
        assert!(!told.contains('9') && told.contains("minimum of 10"), "{told}");
        let strict = SitePolicy { min_group_size: 50, ..SitePolicy::default() };
        assert!(check_evaluation(&strict, &eval(49)).is_err());
    }

    #[test]
    fn train_facts_carry_dp_only_when_the_server_applies_it() {
        let f = train_facts("ab", 3, true, 0.0, 0.0);
        assert_eq!((f.kind, f.round, f.secure_aggregation, f.dp), (TaskKind::Train, 3, true, None));
        let f = train_facts("ab", 3, true, 1.1, 1e-5);
        assert_eq!(f.dp, Some(DpFacts { noise_multiplier: 1.1, rounds: 3, delta: 1e-5 }));
        let p = SitePolicy { require_dp: true, ..SitePolicy::default() };
        assert_eq!(p.check(&train_facts("ab", 1, true, 0.0, 0.0)).unwrap_err().rule, PolicyRule::DifferentialPrivacy);
        assert!(p.check(&task_facts(TaskKind::Evaluate, "ab", 1)).is_ok());
    }
}
