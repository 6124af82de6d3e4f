//! Site policy: every rule refuses what it should and accepts what it should; the policy file is
//! parsed strictly and validated.

use fedhcc_secure::policy::{DpFacts, PolicyRule, SitePolicy, TaskFacts, TaskKind};

const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FP_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn train(round: u32) -> TaskFacts {
    TaskFacts {
        kind: TaskKind::Train,
        model_fingerprint: FP_A.into(),
        round,
        secure_aggregation: true,
        dp: Some(DpFacts { noise_multiplier: 1.1, rounds: round, delta: 1e-5 }),
        smallest_group: None,
    }
}

fn refused_by(policy: &SitePolicy, task: &TaskFacts) -> Option<PolicyRule> {
    policy.check(task).err().map(|r| {
        assert!(!r.message.is_empty());
        assert!(r.to_string().contains(r.rule.as_str()), "{r}");
        r.rule
    })
}

#[test]
fn default_policy_accepts_train_and_evaluate_and_protects_groups_under_10() {
    let p = SitePolicy::default();
    p.validate().unwrap();
    assert_eq!(refused_by(&p, &train(1)), None);
    let no_protection = TaskFacts { secure_aggregation: false, dp: None, ..train(500) };
    assert_eq!(refused_by(&p, &no_protection), None);
    let eval = TaskFacts { kind: TaskKind::Evaluate, smallest_group: Some(10), ..train(3) };
    assert_eq!(refused_by(&p, &eval), None);
    let small = TaskFacts { smallest_group: Some(9), ..eval };
    assert_eq!(refused_by(&p, &small), Some(PolicyRule::MinGroupSize));
}

#[test]
fn accepted_tasks_rule() {
    let p = SitePolicy { accepted_tasks: vec![TaskKind::Evaluate], ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(1)), Some(PolicyRule::TaskKind));
    let eval = TaskFacts { kind: TaskKind::Evaluate, ..train(1) };
    assert_eq!(refused_by(&p, &eval), None);
    let p = SitePolicy { accepted_tasks: vec![TaskKind::Train], ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &eval), Some(PolicyRule::TaskKind));
    assert_eq!(refused_by(&p, &train(1)), None);
}

#[test]
fn statistics_tasks_are_accepted_by_default_and_can_be_refused() {
    let stats = TaskFacts { kind: TaskKind::Statistics, round: 0, secure_aggregation: false, dp: None, ..train(1) };
    assert_eq!(refused_by(&SitePolicy::default(), &stats), None);
    let p = SitePolicy { accepted_tasks: vec![TaskKind::Train, TaskKind::Evaluate], ..SitePolicy::default() };
    let r = p.check(&stats).unwrap_err();
    assert_eq!(r.rule, PolicyRule::TaskKind);
    assert!(r.message.contains("statistics tasks are not accepted"), "{}", r.message);
    let p = SitePolicy { require_secure_aggregation: true, require_dp: true, ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &stats), None, "no update leaves the site: nothing to mask or noise");
    let parsed: SitePolicy = toml::from_str("accepted_tasks = [\"statistics\"]\n").unwrap();
    assert_eq!(parsed.accepted_tasks, vec![TaskKind::Statistics]);
}

#[test]
fn allowed_fingerprints_rule() {
    let p = SitePolicy { allowed_fingerprints: vec![FP_B.to_uppercase()], ..SitePolicy::default() };
    p.validate().unwrap();
    let r = p.check(&train(1)).unwrap_err();
    assert_eq!(r.rule, PolicyRule::ModelFingerprint);
    assert!(r.message.contains("aaaaaaaaaaaa") && !r.message.contains(FP_A), "short form: {}", r.message);
    let ok = TaskFacts { model_fingerprint: FP_B.into(), ..train(1) };
    assert_eq!(refused_by(&p, &ok), None, "hex compares case-insensitively");
    let eval = TaskFacts { kind: TaskKind::Evaluate, ..train(1) };
    assert_eq!(refused_by(&p, &eval), Some(PolicyRule::ModelFingerprint), "evaluation too");
}

#[test]
fn max_rounds_rule() {
    let p = SitePolicy { max_rounds: Some(5), ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(5)), None);
    assert_eq!(refused_by(&p, &train(6)), Some(PolicyRule::MaxRounds));
}

#[test]
fn require_secure_aggregation_rule() {
    let p = SitePolicy { require_secure_aggregation: true, ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(1)), None);
    let plain = TaskFacts { secure_aggregation: false, ..train(1) };
    assert_eq!(refused_by(&p, &plain), Some(PolicyRule::SecureAggregation));
    let eval = TaskFacts { kind: TaskKind::Evaluate, secure_aggregation: false, dp: None, ..train(1) };
    assert_eq!(refused_by(&p, &eval), None, "evaluation sends aggregate metrics, no update to mask");
}

#[test]
fn require_dp_rule() {
    let p = SitePolicy { require_dp: true, ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(1)), None);
    let no_dp = TaskFacts { dp: None, ..train(1) };
    assert_eq!(refused_by(&p, &no_dp), Some(PolicyRule::DifferentialPrivacy));
    // Unusable DP settings from the server are refused when the site must compute ε.
    let p = SitePolicy { require_dp: true, max_epsilon: Some(10.0), ..SitePolicy::default() };
    let broken = TaskFacts { dp: Some(DpFacts { noise_multiplier: 0.0, rounds: 1, delta: 1e-5 }), ..train(1) };
    assert_eq!(refused_by(&p, &broken), Some(PolicyRule::DifferentialPrivacy));
    let broken = TaskFacts { dp: Some(DpFacts { noise_multiplier: 1.0, rounds: 1, delta: 0.0 }), ..train(1) };
    assert_eq!(refused_by(&p, &broken), Some(PolicyRule::DifferentialPrivacy));
}

#[test]
fn max_epsilon_rule_uses_the_sites_own_accountant() {
    // σ = 1.1, δ = 1e-5: ε ≈ 4.24 after 1 round, ≈ 16.86 after 10 (dp-accounting; see tests/dp.rs).
    let p = SitePolicy { require_dp: true, max_epsilon: Some(8.0), ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(1)), None);
    let r = p.check(&train(10)).unwrap_err();
    assert_eq!(r.rule, PolicyRule::PrivacyBudget);
    assert!(r.message.contains("ε = 16.857") && r.message.contains("limit ε = 8"), "{}", r.message);
    // The limit also holds when DP is not required but used.
    let p = SitePolicy { max_epsilon: Some(8.0), ..SitePolicy::default() };
    assert_eq!(refused_by(&p, &train(10)), Some(PolicyRule::PrivacyBudget));
    // A server cannot make the budget look unspent by naming a large δ: at δ = 0.5 the same ten
    // rounds would compute to an ε under the limit.
    let large_delta = TaskFacts { dp: Some(DpFacts { noise_multiplier: 1.1, rounds: 10, delta: 0.5 }), ..train(10) };
    let r = p.check(&large_delta).unwrap_err();
    assert_eq!(r.rule, PolicyRule::PrivacyBudget);
    assert!(r.message.contains("above this site's limit δ"), "{}", r.message);
    let lenient = SitePolicy { max_delta: 0.6, ..p.clone() };
    assert_eq!(refused_by(&lenient, &large_delta), None, "the δ bound is what refused it");
    assert!(SitePolicy { max_delta: 0.0, ..SitePolicy::default() }.validate().is_err());
}

#[test]
fn min_group_size_rule() {
    let p = SitePolicy { min_group_size: 25, ..SitePolicy::default() };
    assert!(p.check_group_size(25).is_ok());
    let r = p.check_group_size(24).unwrap_err();
    assert_eq!(r.rule, PolicyRule::MinGroupSize);
    assert!(r.message.contains("24") && r.message.contains("25"));
}

#[test]
fn policy_table_parses_strictly_and_validates() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SiteFile {
        #[allow(dead_code)]
        site_id: String,
        policy: SitePolicy,
    }
    let text = format!(
        "site_id = \"center_a\"\n[policy]\nallowed_fingerprints = [\"{FP_B}\"]\nmax_rounds = 50\n\
         require_secure_aggregation = true\nrequire_dp = true\nmax_epsilon = 8.0\nmin_group_size = 20\n\
         accepted_tasks = [\"train\"]\n"
    );
    let f: SiteFile = toml::from_str(&text).unwrap();
    f.policy.validate().unwrap();
    assert_eq!(f.policy.max_rounds, Some(50));
    assert_eq!(f.policy.accepted_tasks, vec![TaskKind::Train]);
    let minimal: SiteFile = toml::from_str("site_id = \"a\"\n[policy]\n").unwrap();
    assert_eq!(minimal.policy, SitePolicy::default());
    assert!(toml::from_str::<SiteFile>("site_id = \"a\"\n[policy]\nmax_round = 3\n").is_err(), "typo refused");
    assert!(toml::from_str::<SiteFile>("site_id = \"a\"\n[policy]\naccepted_tasks = [\"export\"]\n").is_err());
    for bad in [
        SitePolicy { allowed_fingerprints: vec!["abc".into()], ..SitePolicy::default() },
        SitePolicy { allowed_fingerprints: vec!["g".repeat(64)], ..SitePolicy::default() },
        SitePolicy { max_epsilon: Some(0.0), ..SitePolicy::default() },
        SitePolicy { max_epsilon: Some(f64::NAN), ..SitePolicy::default() },
        SitePolicy { max_rounds: Some(0), ..SitePolicy::default() },
        SitePolicy { min_group_size: 0, ..SitePolicy::default() },
        SitePolicy { accepted_tasks: vec![], ..SitePolicy::default() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}
