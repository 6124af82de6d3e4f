//! Aggregation under secure aggregation: the spooled masked updates of every roster member
//! (`spool/<task>/<site>.msk`, 8 little-endian bytes per value) are folded into one wrapping sum
//! modulo 2^64 ([`SumAccumulator`]), in which the pairwise masks cancel; only that sum is decoded,
//! and only when every roster member's update is in it. The decoded weighted mean delta reaches the
//! strategy as **one** update ([`SecureSum`]) carrying the round's total sample count, so FedAvg,
//! FedProx, FedBN (w ← w + Δ̄) and FedAdam/FedYogi (a step along Δ̄) run unchanged.
//!
//! Memory: the sum holds 8 bytes per model value (twice an f32 model) beside the global model; the
//! spooled files are read 64 KiB at a time. The server never holds, and never writes, any site's
//! update in the clear.

use crate::coordinator::{SiteResult, Task};
use crate::spool::{Answer, Spool};
use crate::strategy::{StrategyError, UpdateBlocks, UpdateSource};
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::Layout;
use fedhcc_core::privacy;
use fedhcc_secure::secagg::SumAccumulator;
use std::collections::BTreeMap;
use std::io::Read;

/// Values folded or decoded at a time.
const BLOCK_WORDS: usize = 8192;
/// What errors name as the "site" of the decoded sum.
const SUM_NAME: &str = "secure sum";

/// The decoded sum of a round's masked updates, readable as one update (the weighted mean delta).
#[derive(Debug)]
pub struct SecureSum {
    acc: SumAccumulator,
    /// Sum of the weights the sites encoded with (sample counts, or one per site under DP).
    total_weight: u64,
    /// Sum of the sites' sample counts (sent in the clear).
    samples: u64,
}

fn err(message: String) -> StrategyError {
    StrategyError::Update { site: SUM_NAME.into(), message }
}

impl SecureSum {
    /// Folds the spooled masked update of every member of `task`'s roster (from `spool`) into
    /// one sum of `layout`'s length.
    ///
    /// # Errors
    /// No roster, settings the secure-aggregation library refuses, a roster member without an
    /// accepted result or spool file, or a file of the wrong length.
    pub fn fold(
        study: &StudyConfig,
        task: &Task,
        results: &BTreeMap<String, SiteResult>,
        spool: &Spool,
        layout: &Layout,
    ) -> Result<Self, StrategyError> {
        let keys = task.roster.as_ref().ok_or_else(|| err(format!("task {} has no roster", task.id)))?;
        let roster = crate::service::secagg_roster(study, task.round, &task.id, keys).map_err(err)?;
        let fixed = privacy::fixed_point(&study.federation)
            .map_err(err)?
            .ok_or_else(|| err("the study does not use secure aggregation".into()))?;
        let len = layout.numel() as u64;
        let mut acc = SumAccumulator::new(&roster, fixed, len).map_err(|e| err(e.to_string()))?;
        let dp = study.federation.dp.is_some();
        let (mut total_weight, mut samples) = (0u64, 0u64);
        let mut bytes = vec![0u8; BLOCK_WORDS * 8];
        let mut words = Vec::with_capacity(BLOCK_WORDS);
        for site in roster.sites() {
            let r = results.get(site).ok_or_else(|| err(format!("roster member {site} has no accepted update")))?;
            total_weight = total_weight.saturating_add(privacy::encoding_weight(dp, r.samples));
            samples = samples.saturating_add(r.samples);
            let path = spool.answer(&task.id, site, Answer::Masked);
            let site_err = |m: String| StrategyError::Update { site: site.into(), message: m };
            let mut f = std::fs::File::open(&path).map_err(|e| site_err(format!("{}: {e}", path.display())))?;
            let size = f.metadata().map_err(|e| site_err(format!("{}: {e}", path.display())))?.len();
            if size != len.saturating_mul(8) {
                return Err(site_err(format!(
                    "{}: {size} bytes; a masked update of {len} values is {} bytes",
                    path.display(),
                    len.saturating_mul(8)
                )));
            }
            acc.begin_site(site, &roster.digest()).map_err(|e| site_err(e.to_string()))?;
            let mut offset = 0u64;
            while offset < len {
                let n = BLOCK_WORDS.min((len - offset) as usize);
                f.read_exact(&mut bytes[..n * 8]).map_err(|e| site_err(format!("{}: {e}", path.display())))?;
                words.clear();
                fedhcc_secure::secagg::words_from_le_bytes(&bytes[..n * 8], &mut words)
                    .map_err(|e| site_err(e.to_string()))?;
                acc.add_block(site, offset, &words).map_err(|e| site_err(e.to_string()))?;
                offset += n as u64;
            }
        }
        Ok(Self { acc, total_weight, samples })
    }

    fn check_layout(&self, layout: &Layout) -> Result<(), StrategyError> {
        if layout.numel() as u64 != self.acc.len() {
            return Err(err(format!("{} values; the global model has {}", self.acc.len(), layout.numel())));
        }
        Ok(())
    }
}

impl UpdateSource for SecureSum {
    fn site(&self) -> &str {
        SUM_NAME
    }

    fn samples(&self) -> u64 {
        self.samples
    }

    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError> {
        self.check_layout(layout)?;
        let len = self.acc.len() as usize;
        let mut buf = vec![0f32; BLOCK_WORDS.min(len)];
        let mut off = 0usize;
        while off < len {
            let n = BLOCK_WORDS.min(len - off);
            self.acc.decode_block(self.total_weight, off as u64, &mut buf[..n]).map_err(|e| err(e.to_string()))?;
            on_values(off, &buf[..n]);
            off += n;
        }
        Ok(())
    }

    fn blocks(&mut self, layout: &Layout) -> Result<Box<dyn UpdateBlocks + '_>, StrategyError> {
        self.check_layout(layout)?;
        Ok(Box::new(SumBlocks { sum: self, offset: 0 }))
    }
}

/// The decoded mean, block by block.
struct SumBlocks<'a> {
    sum: &'a SecureSum,
    offset: u64,
}

impl UpdateBlocks for SumBlocks<'_> {
    fn read_block(&mut self, out: &mut [f32]) -> Result<(), StrategyError> {
        self.sum.acc.decode_block(self.sum.total_weight, self.offset, out).map_err(|e| err(e.to_string()))?;
        self.offset += out.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), StrategyError> {
        if self.offset == self.sum.acc.len() {
            Ok(())
        } else {
            Err(err(format!("{} of {} values were read", self.offset, self.sum.acc.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::TaskKind;
    use crate::strategy::{FedAvg, MemoryUpdate, OptimizerRule, ServerOptimizer, Strategy};
    use fedhcc_core::params::ParameterSet;
    use fedhcc_secure::secagg::{FixedPoint, Masker, RoundKeys, words_to_le_bytes};
    use rand::SeedableRng;
    use std::path::Path;

    fn study(extra: &str) -> StudyConfig {
        toml::from_str(&format!(
            "study_id = \"s\"\nrun_id = \"r\"\n[federation]\nrounds = 3\nsecure_aggregation = true\n{extra}"
        ))
        .unwrap()
    }

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    /// Masks each site's update as a client would and spools it; returns the task.
    fn spool_round(
        study: &StudyConfig,
        dir: &Path,
        updates: &[(&str, u64, Vec<f32>)],
    ) -> (Task, BTreeMap<String, SiteResult>) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let keys: Vec<RoundKeys> = updates.iter().map(|_| RoundKeys::generate(&mut rng)).collect();
        let roster: crate::coordinator::RosterKeys =
            updates.iter().zip(&keys).map(|((s, _, _), k)| (s.to_string(), k.public_bytes())).collect();
        let task = Task {
            kind: TaskKind::Train,
            round: 1,
            attempt: 1,
            id: "r1a1".into(),
            selected: roster.keys().cloned().collect(),
            roster: Some(roster.clone()),
        };
        let r = crate::service::secagg_roster(study, 1, "r1a1", &roster).unwrap();
        let fixed: FixedPoint = privacy::fixed_point(&study.federation).unwrap().unwrap();
        let dp = study.federation.dp.is_some();
        let mut results = BTreeMap::new();
        for ((site, n, delta), k) in updates.iter().zip(keys) {
            let mut words = vec![0u64; delta.len()];
            fixed.encode(privacy::encoding_weight(dp, *n), delta, &mut words).unwrap();
            let mut m = Masker::new(site, k, &r, delta.len() as u64).unwrap();
            m.mask_block(0, &mut words).unwrap();
            let mut bytes = Vec::new();
            words_to_le_bytes(&words, &mut bytes);
            let path = Spool::at(dir).answer("r1a1", site, Answer::Masked);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
            results.insert(site.to_string(), SiteResult { samples: *n, metrics: vec![], bytes: 0 });
        }
        (task, results)
    }

    #[test]
    fn the_decoded_sum_is_the_sample_weighted_mean_within_the_fixed_point_error() {
        let tmp = tempfile::tempdir().unwrap();
        let s = study("");
        let n = BLOCK_WORDS * 2 + 3;
        let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 0.05).collect();
        let c: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * -0.01).collect();
        let (task, results) =
            spool_round(&s, tmp.path(), &[("a", 30, a.clone()), ("b", 90, b.clone()), ("c", 1, c.clone())]);
        let global = ps(vec![1.0; n]);
        let mut sum = SecureSum::fold(&s, &task, &results, &Spool::at(tmp.path()), global.layout()).unwrap();
        assert_eq!(sum.samples(), 121);
        let secure = FedAvg.aggregate(global.clone(), &mut [&mut sum], &BTreeMap::new()).unwrap();
        let mut ua = MemoryUpdate { site: "a".into(), samples: 30, delta: ps(a) };
        let mut ub = MemoryUpdate { site: "b".into(), samples: 90, delta: ps(b) };
        let mut uc = MemoryUpdate { site: "c".into(), samples: 1, delta: ps(c) };
        let plain = FedAvg.aggregate(global, &mut [&mut ua, &mut ub, &mut uc], &BTreeMap::new()).unwrap();
        // Fixed point: ≤ 3 / (2 · 2^37 · 121); f32: the plain fold's three roundings of values near 1.
        let fp = privacy::fixed_point(&s.federation).unwrap().unwrap().max_rounding_error(3, 121);
        let tol = fp + 4.0 * f64::from(f32::EPSILON);
        let worst =
            secure.values().iter().zip(plain.values()).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max);
        assert!(worst <= tol, "max difference {worst:e} > {tol:e}");
        // The server optimizers take the same decoded mean as their pseudo-gradient.
        let (task2, results2) = spool_round(&s, tmp.path(), &[("a", 2, vec![0.5; 4]), ("b", 2, vec![-0.25; 4])]);
        let mut sum =
            SecureSum::fold(&s, &task2, &results2, &Spool::at(tmp.path()), ps(vec![0.0; 4]).layout()).unwrap();
        let mut opt = ServerOptimizer::new(OptimizerRule::Adam, Default::default());
        let out = opt.aggregate(ps(vec![0.0; 4]), &mut [&mut sum], &BTreeMap::new()).unwrap();
        assert!(out.values().iter().all(|v| *v > 0.0), "a step along the mean delta 0.125");
    }

    #[test]
    fn a_missing_altered_or_short_masked_update_never_decodes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = study("");
        let (task, results) = spool_round(&s, tmp.path(), &[("a", 3, vec![0.5; 10]), ("b", 4, vec![-0.5; 10])]);
        let layout = ps(vec![0.0; 10]).layout().clone();
        // One word of b altered (as a lost or forged word would be): the masks no longer cancel.
        let pb = Spool::at(tmp.path()).answer("r1a1", "b", Answer::Masked);
        let good = std::fs::read(&pb).unwrap();
        let mut bad = good.clone();
        bad[15] ^= 0x40;
        std::fs::write(&pb, &bad).unwrap();
        let mut sum = SecureSum::fold(&s, &task, &results, &Spool::at(tmp.path()), &layout).unwrap();
        let e = FedAvg.aggregate(ps(vec![0.0; 10]), &mut [&mut sum], &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("masks did not cancel"), "{e}");
        std::fs::write(&pb, &good[..72]).unwrap();
        let e = SecureSum::fold(&s, &task, &results, &Spool::at(tmp.path()), &layout).unwrap_err().to_string();
        assert!(e.contains("site b") && e.contains("72 bytes"), "{e}");
        std::fs::remove_file(&pb).unwrap();
        assert!(SecureSum::fold(&s, &task, &results, &Spool::at(tmp.path()), &layout).is_err());
        let mut only_a = results.clone();
        only_a.remove("b");
        std::fs::write(&pb, &good).unwrap();
        let e = SecureSum::fold(&s, &task, &only_a, &Spool::at(tmp.path()), &layout).unwrap_err().to_string();
        assert!(e.contains("roster member b has no accepted update"), "{e}");
    }

    #[test]
    fn under_dp_every_site_weighs_one() {
        let tmp = tempfile::tempdir().unwrap();
        let s = study("[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 1.0\ndelta = 1e-5\n");
        let (task, results) = spool_round(&s, tmp.path(), &[("a", 10, vec![0.3; 5]), ("b", 1000, vec![-0.1; 5])]);
        let mut sum = SecureSum::fold(&s, &task, &results, &Spool::at(tmp.path()), ps(vec![0.0; 5]).layout()).unwrap();
        let out = FedAvg.aggregate(ps(vec![0.0; 5]), &mut [&mut sum], &BTreeMap::new()).unwrap();
        assert!(out.values().iter().all(|v| (v - 0.1).abs() < 1e-6), "{:?}", out.values());
    }
}
