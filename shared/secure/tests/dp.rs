//! Differential privacy: clipping bound, noise scale, and the accountant against Google's
//! `dp-accounting` (reference values made by `scripts/dp_reference.py`, committed next to this test).

use fedhcc_secure::dp::{
    Conversion, DpConfig, DpError, GaussianNoise, RdpAccountant, clip_factor, clip_l2, default_orders, l2_norm,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[test]
fn clipping_bounds_the_l2_norm_and_returns_the_norm_before() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    for (len, spread) in [(1usize, 10.0f32), (10, 1.0), (1000, 0.01), (100_000, 3.0), (7, 1e30)] {
        for clip in [1e-3, 0.5, 1.0, 10.0] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.random_range(-spread..spread)).collect();
            let before = l2_norm(&v);
            let original = v.clone();
            let reported = clip_l2(&mut v, clip).unwrap();
            assert_eq!(reported, before);
            let after = l2_norm(&v);
            assert!(after <= clip, "len {len} clip {clip}: norm {after} after clipping");
            if before > clip {
                // Clipped to the bound (within f32 rounding), direction kept.
                assert!(after > clip * (1.0 - 1e-5), "len {len} clip {clip}: clipped too far ({after})");
                let f = clip / before;
                for (a, o) in v.iter().zip(&original) {
                    assert!((f64::from(*a) - f64::from(*o) * f).abs() <= 1e-5 * f64::from(o.abs()) * f + 1e-30);
                }
            } else {
                assert_eq!(v, original, "an update inside the bound is unchanged");
            }
        }
    }
    assert_eq!(clip_factor(0.0, 1.0), 1.0);
    assert_eq!(clip_factor(4.0, 1.0), 0.25);
}

#[test]
fn clipping_refuses_non_finite_values_and_bad_bounds() {
    let mut v = vec![1.0f32, f32::NAN, 2.0];
    assert_eq!(clip_l2(&mut v, 1.0), Err(DpError::NotFinite { index: 1 }));
    assert_eq!(v[0], 1.0, "unchanged on error");
    let mut v = vec![f32::INFINITY];
    assert_eq!(clip_l2(&mut v, 1.0), Err(DpError::NotFinite { index: 0 }));
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(clip_l2(&mut [1.0], bad), Err(DpError::Config(_))), "{bad}");
    }
}

#[test]
fn noise_per_site_has_the_configured_std_and_the_sum_carries_sigma_times_c() {
    let (sigma, clip, sites) = (1.3, 0.7, 4u32);
    let noise = GaussianNoise::new(sigma, clip, sites).unwrap();
    assert!((noise.per_site_std() - sigma * clip / 2.0).abs() < 1e-15);
    assert!((noise.sum_std() - sigma * clip).abs() < 1e-15);
    let n = 200_000usize;
    let mut sum = vec![0f32; n];
    let mut first_site = Vec::new();
    for site in 0..sites {
        let mut rng = ChaCha20Rng::seed_from_u64(100 + u64::from(site));
        let mut v = vec![0f32; n];
        noise.add_noise(&mut v, &mut rng);
        if site == 0 {
            first_site = v.clone();
        }
        for (s, x) in sum.iter_mut().zip(&v) {
            *s += x;
        }
    }
    // The sample std of n normal draws has relative standard error 1/sqrt(2n) = 0.16 %; allow 5 of those.
    let tol = 5.0 / (2.0 * n as f64).sqrt();
    for (what, v, want) in [("one site", &first_site, noise.per_site_std()), ("sum", &sum, noise.sum_std())] {
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (f64::from(*x) - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        let std = var.sqrt();
        assert!((std / want - 1.0).abs() < tol, "{what}: std {std}, configured {want}");
        assert!(mean.abs() < 5.0 * want / (n as f64).sqrt(), "{what}: mean {mean}");
    }
    // Deterministic given the seed.
    let mut a = vec![0f32; 16];
    let mut b = vec![0f32; 16];
    noise.add_noise(&mut a, &mut ChaCha20Rng::seed_from_u64(9));
    noise.add_noise(&mut b, &mut ChaCha20Rng::seed_from_u64(9));
    assert_eq!(a, b);
    assert!(GaussianNoise::new(0.0, 1.0, 2).is_err());
    assert!(GaussianNoise::new(1.0, 1.0, 0).is_err());
}

#[derive(serde::Deserialize)]
struct Reference {
    orders: Vec<f64>,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    noise_multiplier: f64,
    rounds: u64,
    delta: f64,
    epsilon: f64,
    order: f64,
    epsilon_mironov2017: f64,
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("dp_reference.json")).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b { 0.0 } else { (a - b).abs() / b.abs().max(1e-300) }
}

#[test]
fn accountant_matches_dp_accounting_to_1e6_relative() {
    let r = reference();
    assert_eq!(default_orders(), r.orders, "the orders of dp-accounting's DEFAULT_RDP_ORDERS");
    assert!(r.cases.len() >= 100);
    for c in &r.cases {
        let mut acc = RdpAccountant::new(c.noise_multiplier).unwrap();
        acc.compose(c.rounds);
        let e = acc.epsilon(c.delta).unwrap();
        let what = format!("sigma {} rounds {} delta {}", c.noise_multiplier, c.rounds, c.delta);
        assert!(rel(e.epsilon, c.epsilon) < 1e-6, "{what}: epsilon {} vs dp-accounting {}", e.epsilon, c.epsilon);
        assert_eq!(e.order, c.order, "{what}: optimal order");
        let m = acc.epsilon_after(c.rounds, c.delta, Conversion::Mironov2017).unwrap();
        assert!(
            rel(m.epsilon, c.epsilon_mironov2017) < 1e-6,
            "{what}: Mironov {} vs {}",
            m.epsilon,
            c.epsilon_mironov2017
        );
        assert!(e.epsilon <= m.epsilon, "{what}: the improved conversion is never worse");
    }
}

#[test]
fn accountant_composes_round_by_round_and_checks_the_budget() {
    let mut acc = RdpAccountant::new(1.1).unwrap();
    assert_eq!(acc.epsilon(1e-5).unwrap().epsilon, 0.0, "no round, no privacy loss");
    let mut last = 0.0;
    for _ in 0..10 {
        acc.step();
        let e = acc.epsilon(1e-5).unwrap().epsilon;
        assert!(e > last, "ε grows with every round");
        last = e;
    }
    assert_eq!(acc.rounds(), 10);
    let r = reference();
    let c = r.cases.iter().find(|c| c.noise_multiplier == 1.1 && c.rounds == 10 && c.delta == 1e-5).unwrap();
    assert!(rel(last, c.epsilon) < 1e-6);
    // Budget: after 10 rounds ε ≈ c.epsilon; one more round exceeds a budget of exactly that, not a
    // budget set at the 11-round value.
    let eleven = acc.epsilon_after(11, 1e-5, Conversion::default()).unwrap().epsilon;
    assert!(acc.would_exceed(last, 1e-5).unwrap());
    assert!(!acc.would_exceed(eleven, 1e-5).unwrap());
    assert!(acc.would_exceed(eleven * 0.999, 1e-5).unwrap());
    assert!(acc.would_exceed(-1.0, 1e-5).is_err());
    assert!(acc.epsilon(0.0).is_err() && acc.epsilon(1.0).is_err());
    assert!(RdpAccountant::new(0.0).is_err() && RdpAccountant::with_orders(1.0, vec![1.0]).is_err());
}

#[test]
fn dp_config_is_validated() {
    let ok = DpConfig { noise_multiplier: 1.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: Some(8.0) };
    assert!(ok.validate().is_ok());
    let parsed: DpConfig =
        toml::from_str("noise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\nepsilon_budget = 8.0").unwrap();
    assert_eq!(parsed, ok);
    assert!(toml::from_str::<DpConfig>("noise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\nsigma = 2").is_err());
    for bad in [
        DpConfig { noise_multiplier: 0.0, ..ok.clone() },
        DpConfig { l2_clip: -1.0, ..ok.clone() },
        DpConfig { delta: 0.0, ..ok.clone() },
        DpConfig { delta: 1.0, ..ok.clone() },
        DpConfig { epsilon_budget: Some(0.0), ..ok.clone() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}
