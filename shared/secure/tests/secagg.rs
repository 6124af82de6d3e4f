//! Secure aggregation: the decoded sum is weighted FedAvg within the fixed-point error, one site's
//! upload looks uniform, masks cancel exactly, an incomplete sum is refused, overflow is refused, and
//! everything is deterministic given the seeds.

use fedhcc_secure::secagg::{
    FixedPoint, FixedPointConfig, Masker, Roster, RoundKeys, SecAggContext, SecAggError, SumAccumulator, bench_mask,
    mask_update, pair_seed, words_from_le_bytes, words_to_le_bytes,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn ctx(task: &str) -> SecAggContext {
    SecAggContext { study_id: "hcc".into(), run_id: "run-1".into(), round: 3, task_id: task.into() }
}

fn site_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("center_{}", (b'a' + i as u8) as char)).collect()
}

/// Fresh keys for `ids` from one seeded generator, and the roster they make.
fn keys_and_roster(ids: &[String], seed: u64, task: &str) -> (Vec<RoundKeys>, Roster) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let keys: Vec<RoundKeys> = ids.iter().map(|_| RoundKeys::generate(&mut rng)).collect();
    let roster = Roster::new(ctx(task), ids.iter().cloned().zip(keys.iter().map(RoundKeys::public_bytes))).unwrap();
    (keys, roster)
}

fn fixed(sites: u32) -> FixedPoint {
    FixedPoint::from_config(&FixedPointConfig { clip: 1.0, max_weight: 100_000, max_sites: sites, scale: None })
        .unwrap()
}

struct Update {
    weight: u64,
    delta: Vec<f32>,
}

fn updates(n_sites: usize, len: usize, seed: u64) -> Vec<Update> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n_sites)
        .map(|_| Update {
            weight: rng.random_range(20..400),
            delta: (0..len).map(|_| rng.random_range(-0.2f32..0.2)).collect(),
        })
        .collect()
}

/// Each site encodes and masks its update; returns the masked vectors and roster digests.
fn mask_all(ids: &[String], keys: Vec<RoundKeys>, roster: &Roster, fp: &FixedPoint, ups: &[Update]) -> Vec<Vec<u64>> {
    ids.iter()
        .zip(keys)
        .zip(ups)
        .map(|((id, k), u)| {
            let mut words = vec![0u64; u.delta.len()];
            fp.encode(u.weight, &u.delta, &mut words).unwrap();
            assert_eq!(mask_update(id, k, roster, &mut words).unwrap(), roster.digest());
            words
        })
        .collect()
}

fn accumulate(ids: &[String], roster: &Roster, fp: FixedPoint, masked: &[Vec<u64>]) -> SumAccumulator {
    let len = masked[0].len() as u64;
    let mut acc = SumAccumulator::new(roster, fp, len).unwrap();
    for (id, m) in ids.iter().zip(masked) {
        acc.begin_site(id, &roster.digest()).unwrap();
        // Streamed in uneven blocks, as chunks arrive.
        let mut at = 0usize;
        for size in [1usize, 1000, 7777].iter().cycle() {
            if at == m.len() {
                break;
            }
            let end = (at + size).min(m.len());
            acc.add_block(id, at as u64, &m[at..end]).unwrap();
            at = end;
        }
    }
    acc
}

fn plain_fedavg(ups: &[Update]) -> Vec<f64> {
    let total: u64 = ups.iter().map(|u| u.weight).sum();
    let mut out = vec![0f64; ups[0].delta.len()];
    for u in ups {
        for (o, d) in out.iter_mut().zip(&u.delta) {
            *o += u.weight as f64 * f64::from(*d);
        }
    }
    out.iter_mut().for_each(|o| *o /= total as f64);
    out
}

#[test]
fn decoded_sum_equals_weighted_fedavg_within_the_fixed_point_error() {
    for n in [2usize, 8] {
        let len = 100_000;
        let ids = site_ids(n);
        let (keys, roster) = keys_and_roster(&ids, 40 + n as u64, "t1");
        let fp = fixed(n as u32);
        let ups = updates(n, len, 7 + n as u64);
        let masked = mask_all(&ids, keys, &roster, &fp, &ups);
        let acc = accumulate(&ids, &roster, fp, &masked);
        assert!(acc.is_complete());
        assert_eq!(acc.sites_in_sum(), ids);
        let total: u64 = ups.iter().map(|u| u.weight).sum();
        let mean = acc.decode(total).unwrap();
        let exact = plain_fedavg(&ups);
        let max_err = mean.iter().zip(&exact).map(|(m, e)| (f64::from(*m) - e).abs()).fold(0.0, f64::max);
        // Fixed-point rounding plus the final f32 rounding (half an ulp of values below 0.2).
        let bound = fp.max_rounding_error(n, total) + 0.2 * f64::from(f32::EPSILON) / 2.0;
        eprintln!(
            "{n} sites, {len} values, scale 2^{}: max |decoded − FedAvg| = {max_err:.3e} (fixed-point bound {:.3e}, \
             f32 half-ulp at 0.2 = {:.3e})",
            fp.scale().log2(),
            fp.max_rounding_error(n, total),
            0.2 * f64::from(f32::EPSILON) / 2.0
        );
        assert!(max_err <= bound, "{n} sites: max error {max_err} above {bound}");
        // Against the f32 FedAvg a server would compute in the clear, the error is f32-level.
        let decoded_blockwise = {
            let mut out = vec![0f32; len];
            for (i, chunk) in out.chunks_mut(4096).enumerate() {
                acc.decode_block(total, (i * 4096) as u64, chunk).unwrap();
            }
            out
        };
        assert_eq!(decoded_blockwise, mean, "block-wise decoding gives the same values");
    }
}

/// Upper regularised incomplete gamma Q(a, x) (Numerical Recipes: series below a + 1, Lentz's
/// continued fraction above).
fn gamma_q(a: f64, x: f64) -> f64 {
    fn ln_gamma(z: f64) -> f64 {
        // Lanczos, g = 7, n = 9.
        const C: [f64; 9] = [
            0.999_999_999_999_809_9,
            676.520_368_121_885_1,
            -1_259.139_216_722_402_8,
            771.323_428_777_653_1,
            -176.615_029_162_140_6,
            12.507_343_278_686_905,
            -0.138_571_095_265_720_12,
            9.984_369_578_019_572e-6,
            1.505_632_735_149_311_6e-7,
        ];
        let z = z - 1.0;
        let mut s = C[0];
        for (i, c) in C.iter().enumerate().skip(1) {
            s += c / (z + i as f64);
        }
        let t = z + 7.5;
        0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + s.ln()
    }
    let lg = ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - lg).exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - lg).exp() * h
    }
}

/// p-values of chi-squared tests for uniform bytes (255 df) and fair bits per position (64 df).
fn uniformity_p_values(words: &[u64]) -> (f64, f64) {
    let mut bytes = [0u64; 256];
    let mut bits = [0u64; 64];
    for w in words {
        for b in w.to_le_bytes() {
            bytes[b as usize] += 1;
        }
        for (i, c) in bits.iter_mut().enumerate() {
            *c += (w >> i) & 1;
        }
    }
    let nb = (words.len() * 8) as f64 / 256.0;
    let chi_bytes: f64 = bytes.iter().map(|c| (*c as f64 - nb).powi(2) / nb).sum();
    let half = words.len() as f64 / 2.0;
    let chi_bits: f64 = bits.iter().map(|c| (*c as f64 - half).powi(2) / (half / 2.0)).sum();
    (gamma_q(255.0 / 2.0, chi_bytes / 2.0), gamma_q(64.0 / 2.0, chi_bits / 2.0))
}

#[test]
fn chi_squared_p_values_are_correct() {
    // scipy.stats.chi2.sf(2, 2) = e^-1, chi2.sf(255, 255) = 0.48822252177, chi2.sf(100, 64) = 0.00268628289.
    assert!((gamma_q(1.0, 1.0) - (-1.0f64).exp()).abs() < 1e-12);
    assert!((gamma_q(127.5, 127.5) - 0.488_222_521_77).abs() < 1e-9, "{}", gamma_q(127.5, 127.5));
    assert!((gamma_q(32.0, 50.0) - 0.002_686_282_89).abs() < 1e-10, "{}", gamma_q(32.0, 50.0));
}

#[test]
fn one_masked_upload_is_indistinguishable_from_uniform() {
    let len = 100_000;
    for (n, seed) in [(2usize, 1u64), (3, 2), (8, 3)] {
        let ids = site_ids(n);
        let (keys, roster) = keys_and_roster(&ids, seed, "t-uniform");
        let fp = fixed(n as u32);
        // A constant update: the least random input there is.
        let ups: Vec<Update> = (0..n).map(|_| Update { weight: 100, delta: vec![0.125; len] }).collect();
        let mut encoded = vec![0u64; len];
        fp.encode(100, &ups[0].delta, &mut encoded).unwrap();
        let (pb, pbit) = uniformity_p_values(&encoded);
        assert!(pb < 1e-100 && pbit < 1e-100, "the test detects an unmasked vector (p = {pb:e}, {pbit:e})");
        let masked = mask_all(&ids, keys, &roster, &fp, &ups);
        for (id, m) in ids.iter().zip(&masked) {
            let (pb, pbit) = uniformity_p_values(m);
            eprintln!("{n} sites, {id}: chi-squared p = {pb:.4} (bytes), {pbit:.4} (bits)");
            assert!(pb > 1e-3 && pbit > 1e-3, "{n} sites, {id}: not uniform (p = {pb}, {pbit})");
        }
    }
}

#[test]
fn masks_cancel_exactly_for_2_to_8_sites() {
    for n in 2..=8usize {
        let ids = site_ids(n);
        let (keys, roster) = keys_and_roster(&ids, 100 + n as u64, "t-cancel");
        let fp = fixed(n as u32);
        let ups = updates(n, 5000, n as u64);
        let mut encoded_sum = vec![0u64; 5000];
        for u in &ups {
            let mut w = vec![0u64; 5000];
            fp.encode(u.weight, &u.delta, &mut w).unwrap();
            encoded_sum.iter_mut().zip(&w).for_each(|(s, x)| *s = s.wrapping_add(*x));
        }
        let masked = mask_all(&ids, keys, &roster, &fp, &ups);
        let mut masked_sum = vec![0u64; 5000];
        for m in &masked {
            assert_ne!(m[..64], encoded_sum[..64]);
            masked_sum.iter_mut().zip(m).for_each(|(s, x)| *s = s.wrapping_add(*x));
        }
        assert_eq!(masked_sum, encoded_sum, "{n} sites: the masks cancel bit for bit");
    }
}

#[test]
fn a_missing_site_is_named_and_the_sum_is_not_decoded_then_the_restart_succeeds() {
    let ids = site_ids(3);
    let (keys, roster) = keys_and_roster(&ids, 5, "r3-attempt1");
    let fp = fixed(3);
    let ups = updates(3, 2000, 5);
    let masked = mask_all(&ids, keys, &roster, &fp, &ups);
    // center_c drops after masking: only a and b arrive.
    let acc = accumulate(&ids[..2], &roster, fp, &masked[..2]);
    assert_eq!(acc.sites_in_sum(), vec!["center_a", "center_b"]);
    assert_eq!(acc.missing_sites(), vec!["center_c"]);
    assert!(!acc.is_complete());
    let w: u64 = ups[..2].iter().map(|u| u.weight).sum();
    match acc.decode(w) {
        Err(SecAggError::IncompleteSum { missing }) => assert_eq!(missing, vec!["center_c"]),
        other => panic!("expected IncompleteSum, got {other:?}"),
    }
    // A half-received upload counts as missing too.
    let mut acc2 = accumulate(&ids[..2], &roster, fp, &masked[..2]);
    acc2.begin_site("center_c", &roster.digest()).unwrap();
    acc2.add_block("center_c", 0, &masked[2][..100]).unwrap();
    assert_eq!(acc2.missing_sites(), vec!["center_c"]);
    assert!(matches!(acc2.decode(w), Err(SecAggError::IncompleteSum { .. })));

    // Were the server to ignore the roster, the two-site sum would be garbage: decoding it under a
    // roster whose third member sends its unmasked encoding is detected as masks that did not cancel.
    let mut c_plain = vec![0u64; 2000];
    fp.encode(ups[2].weight, &ups[2].delta, &mut c_plain).unwrap();
    let acc3 = accumulate(&ids, &roster, fp, &[masked[0].clone(), masked[1].clone(), c_plain]);
    let total: u64 = ups.iter().map(|u| u.weight).sum();
    assert!(matches!(acc3.decode(total), Err(SecAggError::MasksDidNotCancel { .. })));

    // Restart: the two remaining sites, fresh keys, a new task id.
    let (keys2, roster2) = keys_and_roster(&ids[..2], 6, "r3-attempt2");
    assert_ne!(roster2.digest(), roster.digest());
    let masked2 = mask_all(&ids[..2], keys2, &roster2, &fp, &ups[..2]);
    // An upload masked for the old roster is refused by the new sum.
    let mut acc4 = SumAccumulator::new(&roster2, fp, 2000).unwrap();
    assert!(matches!(acc4.begin_site("center_a", &roster.digest()), Err(SecAggError::RosterMismatch { .. })));
    assert!(matches!(acc4.begin_site("center_c", &roster2.digest()), Err(SecAggError::NotInRoster { .. })));
    let acc4 = accumulate(&ids[..2], &roster2, fp, &masked2);
    let mean = acc4.decode(w).unwrap();
    let exact = plain_fedavg(&ups[..2]);
    let max_err = mean.iter().zip(&exact).map(|(m, e)| (f64::from(*m) - e).abs()).fold(0.0, f64::max);
    assert!(max_err < 1e-7, "{max_err}");
}

#[test]
fn overflow_is_refused_not_wrapped() {
    // 8 sites × 1e5 × 1.0 × scale must stay below 2^63.
    let largest = FixedPoint::largest_scale(1.0, 100_000, 8).unwrap();
    assert!(FixedPoint::new(largest, 1.0, 100_000, 8).is_ok());
    assert!(matches!(FixedPoint::new(largest * 2.0, 1.0, 100_000, 8), Err(SecAggError::Overflow { .. })));
    let err = FixedPoint::new(1e15, 1.0, 100_000, 8).unwrap_err();
    assert!(err.to_string().contains("2^63"), "{err}");
    for (scale, clip, w, s) in
        [(0.0, 1.0, 1, 2), (1.0, 0.0, 1, 2), (1.0, f64::NAN, 1, 2), (1.0, 1.0, 0, 2), (1.0, 1.0, 1, 1)]
    {
        assert!(matches!(FixedPoint::new(scale, clip, w, s), Err(SecAggError::Config(_))));
    }
    // The worst case the configuration allows decodes exactly: every site at max weight, every value
    // at +clip (and beyond: clamped), or at −clip.
    let fp = FixedPoint::new(largest, 1.0, 100_000, 8).unwrap();
    let ids = site_ids(8);
    for sign in [1.0f32, -1.0] {
        let (keys, roster) = keys_and_roster(&ids, 77, "t-worst");
        let ups: Vec<Update> = (0..8).map(|_| Update { weight: 100_000, delta: vec![sign * 5.0; 64] }).collect();
        let mut probe = vec![0u64; 64];
        assert_eq!(fp.encode(100_000, &ups[0].delta, &mut probe).unwrap().clipped, 64);
        let masked = mask_all(&ids, keys, &roster, &fp, &ups);
        let acc = accumulate(&ids, &roster, fp, &masked);
        let mean = acc.decode(800_000).unwrap();
        assert!(mean.iter().all(|m| *m == sign), "{:?}", &mean[..4]);
    }
    // A weight above max_weight, NaN or infinity is refused.
    let mut out = vec![0u64; 2];
    assert!(matches!(fp.encode(100_001, &[0.0, 0.0], &mut out), Err(SecAggError::WeightTooLarge { .. })));
    assert!(matches!(fp.encode(1, &[0.0, f32::NAN], &mut out), Err(SecAggError::NotFinite { index: 1 })));
    assert!(matches!(fp.encode(1, &[f32::NEG_INFINITY, 0.0], &mut out), Err(SecAggError::NotFinite { index: 0 })));
    assert!(matches!(fp.encode(1, &[0.0], &mut out), Err(SecAggError::Length { .. })));
    // The decoder refuses a total weight no set of sites could have.
    let (keys, roster) = keys_and_roster(&ids[..2], 1, "t");
    let ups = updates(2, 10, 1);
    let masked = mask_all(&ids[..2], keys, &roster, &fp, &ups);
    let acc = accumulate(&ids[..2], &roster, fp, &masked);
    assert!(matches!(acc.decode(0), Err(SecAggError::TotalWeight { .. })));
    assert!(matches!(acc.decode(200_001), Err(SecAggError::TotalWeight { .. })));
    // A config bigger than max_sites is refused by the server.
    let (_, roster3) = keys_and_roster(&ids[..3], 1, "t");
    let small = FixedPoint::new(1.0, 1.0, 10, 2).unwrap();
    assert!(matches!(SumAccumulator::new(&roster3, small, 10), Err(SecAggError::Config(_))));
}

#[test]
fn masking_is_deterministic_given_the_seeds_and_bound_to_the_task() {
    let ids = site_ids(4);
    let fp = fixed(4);
    let ups = updates(4, 3000, 9);
    let run = |seed: u64, task: &str| {
        let (keys, roster) = keys_and_roster(&ids, seed, task);
        mask_all(&ids, keys, &roster, &fp, &ups)
    };
    let a = run(21, "t");
    assert_eq!(a, run(21, "t"));
    let other_task = run(21, "t-retry");
    let other_keys = run(22, "t");
    for i in 0..4 {
        assert_ne!(a[i][..16], other_task[i][..16], "another task id gives other masks with the same keys");
        assert_ne!(a[i][..16], other_keys[i][..16]);
    }
}

#[test]
fn blocks_masked_in_any_order_equal_the_whole_vector_masked() {
    let ids = site_ids(3);
    let fp = fixed(3);
    let ups = updates(3, 20_000, 4);
    let mut whole = vec![0u64; 20_000];
    fp.encode(ups[1].weight, &ups[1].delta, &mut whole).unwrap();
    let mut blocks = whole.clone();
    let (keys, roster) = keys_and_roster(&ids, 8, "t");
    let mut keys = keys.into_iter();
    let _ = keys.next();
    let kb = keys.next().unwrap();
    mask_update("center_b", kb, &roster, &mut whole).unwrap();
    let (keys, roster) = keys_and_roster(&ids, 8, "t");
    let kb = keys.into_iter().nth(1).unwrap();
    let mut m = Masker::new("center_b", kb, &roster, 20_000).unwrap();
    // Backwards, in odd sizes, crossing the 4096-word scratch and 64-byte ChaCha blocks.
    let cuts = [0usize, 3, 4099, 4100, 9000, 13_333, 20_000];
    for w in cuts.windows(2).rev() {
        m.mask_block(w[0] as u64, &mut blocks[w[0]..w[1]]).unwrap();
    }
    assert_eq!(blocks, whole);
    assert!(matches!(m.mask_block(19_999, &mut [0, 0]), Err(SecAggError::Length { .. })));
    assert!(matches!(m.mask_block(u64::MAX, &mut [0]), Err(SecAggError::Length { .. })));
}

#[test]
fn key_agreement_is_symmetric_and_refuses_bad_keys_and_rosters() {
    let ids = site_ids(3);
    let (keys, roster) = keys_and_roster(&ids, 3, "t");
    let ab = pair_seed(&keys[0], "center_a", "center_b", &roster).unwrap();
    let ba = pair_seed(&keys[1], "center_b", "center_a", &roster).unwrap();
    let ac = pair_seed(&keys[0], "center_a", "center_c", &roster).unwrap();
    assert_eq!(*ab, *ba);
    assert_ne!(*ab, *ac);
    assert!(matches!(pair_seed(&keys[0], "center_a", "center_a", &roster), Err(SecAggError::Roster(_))));
    assert!(matches!(pair_seed(&keys[0], "center_b", "center_a", &roster), Err(SecAggError::RosterMismatch { .. })));
    assert!(matches!(pair_seed(&keys[0], "center_a", "center_z", &roster), Err(SecAggError::NotInRoster { .. })));

    // A low-order public key (here the identity point, all zeros) gives an all-zero shared secret.
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let good = RoundKeys::generate(&mut rng);
    let roster_bad =
        Roster::new(ctx("t"), [("center_a".to_string(), good.public_bytes()), ("evil".to_string(), [0u8; 32])])
            .unwrap();
    assert!(matches!(Masker::new("center_a", good, &roster_bad, 10), Err(SecAggError::LowOrderKey { .. })));

    // The server substituting this site's key in the roster is noticed by the site.
    let (keys, _) = keys_and_roster(&ids, 3, "t");
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let other = RoundKeys::generate(&mut rng);
    let forged = Roster::new(
        ctx("t"),
        [("center_a".to_string(), other.public_bytes()), ("center_b".to_string(), keys[1].public_bytes())],
    )
    .unwrap();
    let mut keys = keys.into_iter();
    assert!(matches!(
        Masker::new("center_a", keys.next().unwrap(), &forged, 10),
        Err(SecAggError::RosterMismatch { .. })
    ));

    // Rosters: at least two sites, no repeated site or key, bounded ids.
    let k = |b: u8| [b; 32];
    assert!(Roster::new(ctx("t"), [("a".to_string(), k(1))]).is_err());
    assert!(Roster::new(ctx("t"), [("a".to_string(), k(1)), ("a".to_string(), k(2))]).is_err());
    assert!(Roster::new(ctx("t"), [("a".to_string(), k(1)), ("b".to_string(), k(1))]).is_err());
    assert!(Roster::new(ctx("t"), [("".to_string(), k(1)), ("b".to_string(), k(2))]).is_err());
    assert!(Roster::new(ctx("t"), [("x".repeat(129), k(1)), ("b".to_string(), k(2))]).is_err());
    let r1 = Roster::new(ctx("t"), [("b".to_string(), k(2)), ("a".to_string(), k(1))]).unwrap();
    let r2 = Roster::new(ctx("t"), [("a".to_string(), k(1)), ("b".to_string(), k(2))]).unwrap();
    assert_eq!(r1.digest(), r2.digest(), "the digest does not depend on the relay order");
    assert_eq!(r1.sites().collect::<Vec<_>>(), vec!["a", "b"]);
}

#[test]
fn the_accumulator_refuses_out_of_order_duplicate_and_oversized_uploads() {
    let ids = site_ids(2);
    let (keys, roster) = keys_and_roster(&ids, 3, "t");
    let fp = fixed(2);
    let ups = updates(2, 100, 3);
    let masked = mask_all(&ids, keys, &roster, &fp, &ups);
    let mut acc = SumAccumulator::new(&roster, fp, 100).unwrap();
    assert!(matches!(acc.add_block("center_a", 0, &masked[0][..10]), Err(SecAggError::OutOfOrder { .. })));
    acc.begin_site("center_a", &roster.digest()).unwrap();
    assert!(matches!(acc.begin_site("center_a", &roster.digest()), Err(SecAggError::Duplicate { .. })));
    acc.add_block("center_a", 0, &masked[0][..10]).unwrap();
    assert!(matches!(acc.add_block("center_a", 20, &masked[0][20..30]), Err(SecAggError::OutOfOrder { .. })));
    assert!(matches!(acc.add_block("center_a", 10, &[0u64; 91]), Err(SecAggError::Length { .. })));
    assert!(matches!(acc.add_block("nobody", 0, &[0u64; 1]), Err(SecAggError::NotInRoster { .. })));
    acc.add_block("center_a", 10, &masked[0][10..]).unwrap();
    assert!(matches!(acc.add_block("center_a", 100, &[]), Err(SecAggError::Duplicate { .. })));
    acc.begin_site("center_b", &roster.digest()).unwrap();
    acc.add_block("center_b", 0, &masked[1]).unwrap();
    // The refused calls changed nothing: the sum decodes to FedAvg.
    let total: u64 = ups.iter().map(|u| u.weight).sum();
    let mean = acc.decode(total).unwrap();
    let exact = plain_fedavg(&ups);
    assert!(mean.iter().zip(&exact).all(|(m, e)| (f64::from(*m) - e).abs() < 1e-7));
    assert!(matches!(acc.decode_block(total, 95, &mut [0f32; 6]), Err(SecAggError::Length { .. })));
}

#[test]
fn words_travel_as_little_endian_bytes() {
    let words = vec![0u64, 1, u64::MAX, 0x0102_0304_0506_0708];
    let mut bytes = Vec::new();
    words_to_le_bytes(&words, &mut bytes);
    assert_eq!(&bytes[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
    let mut back = Vec::new();
    words_from_le_bytes(&bytes, &mut back).unwrap();
    assert_eq!(back, words);
    assert!(matches!(words_from_le_bytes(&bytes[..7], &mut back), Err(SecAggError::Length { .. })));
}

#[test]
fn bench_mask_runs_and_reports_a_correct_mean() {
    let t = bench_mask(10_000, 3).unwrap();
    assert_eq!((t.values, t.sites), (10_000, 3));
    assert!(t.mask_values_per_s > 0.0 && t.mask_s > 0.0);
    assert!(t.max_abs_error < 1e-8, "{}", t.max_abs_error);
    assert!(bench_mask(10, 1).is_err());
}

#[test]
fn low_order_and_non_canonical_public_keys_are_refused_and_real_keys_pass() {
    use fedhcc_secure::secagg::{SecAggError, check_public_key};
    let key = |h: &str| <[u8; 32]>::try_from(hex::decode(h).unwrap()).unwrap();
    // The canonical encodings of the points of order 1, 2, 4 and 8 (Bernstein's list for X25519).
    for low in [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ] {
        assert!(matches!(check_public_key("x", &key(low)), Err(SecAggError::LowOrderKey { .. })), "{low}");
    }
    // p, p + 1 and a set top bit are not canonical encodings.
    for bad in [
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0900000000000000000000000000000000000000000000000000000000000080",
    ] {
        assert!(matches!(check_public_key("x", &key(bad)), Err(SecAggError::NonCanonicalKey)), "{bad}");
    }
    let mut rng = rand::rng();
    for _ in 0..64 {
        let k = RoundKeys::generate(&mut rng);
        check_public_key("x", &k.public_bytes()).unwrap();
    }
}
