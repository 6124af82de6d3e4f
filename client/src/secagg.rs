//! A site's side of secure aggregation (part of the task loop): under a train task that asks for it,
//! the site
//!
//! 1. makes a fresh X25519 key pair for that task alone and advertises its public half (before the
//!    download, so the key exchange closes while the sites train);
//! 2. trains as usual, then fetches the task's roster (every site's public key) and checks that it
//!    holds this site's key and that the server's digest matches the one computed here;
//! 3. under differential privacy clips the update to L2 norm C and adds N(0, σ²C²/n) to each value
//!    (n = sites in the roster), leaving the standardisation tensors (`standardise.*`, delta 0)
//!    alone;
//! 4. encodes `weight × delta` in fixed point (weight = sample count, or 1 under DP), adds its
//!    pairwise masks block by block and uploads the masked words (`secagg-u64`).
//!
//! The keys are consumed by the masking: they can mask nothing else. The masked payload is kept
//! until the next task, so an upload cut by a reconnect is sent again byte for byte (masking a
//! second update with the same masks would let the server subtract the two).

use crate::runner::Runner;
use crate::task::{MaskedHeader, RosterReply, TaskRef, TrainTask};
use crate::transport::{Connection, Refused};
use crate::{ClientError, Executor, ExecutorError, TransportError};
use fedhcc_core::params::ParameterSet;
use fedhcc_core::privacy::encoding_weight;
use fedhcc_core::standardisation;
use fedhcc_secure::audit::Direction;
use fedhcc_secure::dp::{GaussianNoise, clip_factor};
use fedhcc_secure::secagg::{EncodeStats, FixedPoint, Masker, Roster, RoundKeys, SecAggContext, words_to_le_bytes};
use rand::Rng;
use sha2::{Digest, Sha256};

/// Values encoded and masked at a time.
const BLOCK: usize = 8192;

/// What a train task asks of the site under secure aggregation (checked: it comes from the network).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskingSpec {
    pub fixed: FixedPoint,
    /// `(σ, C)` under differential privacy.
    pub dp: Option<(f64, f64)>,
}

impl MaskingSpec {
    /// The spec a train task carries.
    ///
    /// # Errors
    /// A message naming the setting when the task's fixed point or DP settings are missing or out
    /// of range.
    pub fn from_task(t: &TrainTask) -> Result<Self, String> {
        let p =
            t.fixed_point.as_ref().ok_or("the task asks for secure aggregation but carries no fixed-point settings")?;
        let fixed = FixedPoint::new(p.scale, p.clip, p.max_weight, p.max_sites)
            .map_err(|e| format!("the task's fixed-point settings are unusable: {e}"))?;
        let dp = if t.dp_noise_multiplier != 0.0 {
            GaussianNoise::new(t.dp_noise_multiplier, t.dp_l2_clip, 2)
                .map_err(|e| format!("the task's differential privacy settings are unusable: {e}"))?;
            Some((t.dp_noise_multiplier, t.dp_l2_clip))
        } else {
            None
        };
        Ok(Self { fixed, dp })
    }

    /// The weight this site encodes with.
    pub fn weight(&self, samples: u64) -> u64 {
        encoding_weight(self.dp.is_some(), samples)
    }
}

/// What differential privacy did to an update (norms only, no values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpApplied {
    /// L2 norm of the update before clipping.
    pub norm: f64,
    /// Whether it was scaled down to the clip.
    pub clipped: bool,
    /// Standard deviation of the noise this site added to each value.
    pub noise_std: f64,
}

/// Clips the update's L2 norm to `clip` and adds N(0, σ²C²/sites) to each value, over every tensor
/// except the standardisation statistics (`standardise.*`), which stay exactly as they are.
///
/// # Errors
/// σ or C not positive, no sites, or a value that is not finite.
pub fn privatize<R: Rng + ?Sized>(
    delta: &mut ParameterSet,
    noise_multiplier: f64,
    clip: f64,
    sites: u32,
    rng: &mut R,
) -> Result<DpApplied, String> {
    let noise = GaussianNoise::new(noise_multiplier, clip, sites).map_err(|e| e.to_string())?;
    let ranges = private_ranges(delta);
    let values = delta.values_mut();
    let mut sq = 0f64;
    for r in &ranges {
        for (i, v) in values[r.clone()].iter().enumerate() {
            if !v.is_finite() {
                return Err(format!("value {} of the update is not a finite number", r.start + i));
            }
            sq += f64::from(*v) * f64::from(*v);
        }
    }
    let norm = sq.sqrt();
    let factor = clip_factor(norm, clip);
    let clipped = factor < 1.0;
    // f32 rounding could leave the norm a hair above the clip: shrink by a few more epsilons.
    let factor = if clipped { factor * (1.0 - 4.0 * f64::from(f32::EPSILON)) } else { 1.0 };
    for r in &ranges {
        let part = &mut values[r.clone()];
        if clipped {
            for v in part.iter_mut() {
                *v = (f64::from(*v) * factor) as f32;
            }
        }
        noise.add_noise(part, rng);
    }
    Ok(DpApplied { norm, clipped, noise_std: noise.per_site_std() })
}

/// The value ranges of `delta` that DP covers: every tensor but the standardisation statistics.
fn private_ranges(delta: &ParameterSet) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for spec in delta.layout().specs() {
        let n = spec.numel();
        if !spec.name.starts_with(standardisation::PREFIX) {
            out.push(at..at + n);
        }
        at += n;
    }
    out
}

/// Encodes `weight × values` in fixed point and masks it, block by block, into the upload payload
/// (8 little-endian bytes per value). Consumes `keys`.
///
/// # Errors
/// The roster does not hold this site with these keys, a peer key is degenerate, the weight is above
/// `max_weight`, or a value is not finite.
pub fn mask_payload(
    site: &str,
    keys: RoundKeys,
    roster: &Roster,
    fixed: &FixedPoint,
    weight: u64,
    values: &[f32],
) -> Result<(Vec<u8>, EncodeStats), String> {
    let mut masker = Masker::new(site, keys, roster, values.len() as u64).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(values.len() * 8);
    let mut words = vec![0u64; BLOCK.min(values.len())];
    let mut stats = EncodeStats::default();
    let mut offset = 0u64;
    for block in values.chunks(BLOCK) {
        let w = &mut words[..block.len()];
        let s = fixed.encode(weight, block, w).map_err(|e| e.to_string())?;
        stats.clipped += s.clipped;
        masker.mask_block(offset, w).map_err(|e| e.to_string())?;
        words_to_le_bytes(w, &mut out);
        offset += block.len() as u64;
    }
    Ok((out, stats))
}

/// The roster a site masks for, from the server's reply, checked against the task and the digest
/// the server computed.
///
/// # Errors
/// A roster for another task, a member with a key that is not 32 bytes, a roster the library
/// refuses, more sites than the fixed point holds, or a digest that differs.
pub fn roster_from_reply(tref: &TaskRef, reply: &RosterReply, fixed: &FixedPoint) -> Result<Roster, String> {
    if reply.task_id.as_deref() != Some(tref.task_id.as_str()) {
        return Err("the server sent the roster of another task".into());
    }
    if reply.members.len() > fixed.max_sites() as usize {
        return Err(format!(
            "the roster has {} sites; the study's fixed point holds at most {}",
            reply.members.len(),
            fixed.max_sites()
        ));
    }
    let mut members = Vec::with_capacity(reply.members.len());
    for (site, public_key) in &reply.members {
        let key = <[u8; 32]>::try_from(public_key.as_slice())
            .map_err(|_| format!("site {site}'s public key is {} bytes, not 32", public_key.len()))?;
        members.push((site.clone(), key));
    }
    let ctx = SecAggContext {
        study_id: tref.study_id.clone(),
        run_id: tref.run_id.clone(),
        round: tref.round,
        task_id: tref.task_id.clone(),
    };
    let roster = Roster::new(ctx, members).map_err(|e| e.to_string())?;
    if roster.digest().as_slice() != reply.digest.as_slice() {
        return Err("the roster's digest differs from the server's (another study, run, round or key set)".into());
    }
    Ok(roster)
}

/// A masked upload ready to send (kept to resend the same bytes after a reconnect).
#[derive(Clone, Debug)]
pub(crate) struct MaskedUpload {
    pub task_id: String,
    pub payload: bytes::Bytes,
    pub header: MaskedHeader,
}

/// What the client keeps between the calls of one secure-aggregation task.
#[derive(Default)]
pub(crate) struct SiteSecAgg {
    /// The key pair of the task in progress, until the masking consumes it.
    keys: Option<(String, RoundKeys)>,
    /// The last masked upload, until the next task.
    masked: Option<MaskedUpload>,
}

/// After the key advertisement: go on with the task, or it is done with.
pub(crate) enum Prepared {
    Proceed(MaskingSpec),
    Done,
}

impl<E: Executor> Runner<E> {
    /// Before the download of a secure-aggregation train task: resends an update already masked for
    /// it, or advertises this task's public key. `Done` when the task needs nothing more from this
    /// site (resent, settings unusable, or the key exchange closed without it).
    pub(crate) async fn secagg_prepare(
        &mut self,
        conn: &mut Connection,
        tref: &TaskRef,
        t: &TrainTask,
    ) -> Result<Prepared, ClientError> {
        let round = tref.round;
        if self.secagg.masked.as_ref().is_some_and(|m| m.task_id != tref.task_id) {
            self.secagg.masked = None;
        }
        if let Some(m) = self.secagg.masked.clone() {
            tracing::info!(task = %tref.task_id, "sending the update masked for this task again");
            let sent = conn.upload_masked(&m.header, m.payload).await;
            self.upload_outcome(round, sent)?;
            self.finish_task(tref, &format!("round {round} done; waiting for the next task"));
            return Ok(Prepared::Done);
        }
        let spec = match MaskingSpec::from_task(t) {
            Ok(s) => s,
            Err(e) => return Ok(self.skip_task(tref, &format!("cannot take part in secure aggregation: {e}"))),
        };
        let samples = self.executor.as_ref().map(Executor::num_samples).unwrap_or(0);
        if spec.weight(samples) > spec.fixed.max_weight() {
            return Ok(self.skip_task(
                tref,
                &format!(
                    "this site's {samples} training samples exceed the study's secure aggregation max_weight {}; the \
                     study lead must raise it",
                    spec.fixed.max_weight()
                ),
            ));
        }
        if self.secagg.keys.as_ref().is_none_or(|(id, _)| *id != tref.task_id) {
            self.secagg.keys = Some((tref.task_id.clone(), RoundKeys::generate(&mut rand::rng())));
        }
        let public = self.secagg.keys.as_ref().map(|(_, k)| k.public_bytes()).unwrap_or_default();
        let ad = crate::transport::key_advertisement(tref, public);
        self.audit.record(Direction::Sent, &tref.task_id, round, "key", &ad.bytes())?;
        match conn.advertise_key(ad).await {
            Ok(()) => Ok(Prepared::Proceed(spec)),
            Err(e) => match e.refused() {
                Some((Refused::TaskClosed | Refused::AlreadyCounted, reason)) => {
                    Ok(self.skip_task(tref, &format!("the server did not take this site's key: {reason}")))
                }
                _ => Err(e.into()),
            },
        }
    }

    /// After local training: fetches the roster, applies DP, masks and uploads `delta`. `None` when
    /// the site takes no part in this attempt: the roster the server sent cannot be masked for (a
    /// member's key unusable, this site missing, a digest that differs), or the masking failed. That
    /// is a failed task, logged and shown in `status.json`, never the end of the client: whoever
    /// sent the roster cannot stop a site by it.
    pub(crate) async fn upload_masked(
        &mut self,
        conn: &mut Connection,
        tref: &TaskRef,
        spec: MaskingSpec,
        delta: ParameterSet,
        num_samples: u64,
        metrics: Vec<(String, f64)>,
    ) -> Result<Option<Result<u64, TransportError>>, ClientError> {
        let (reply, bytes) = match conn.await_roster(tref).await {
            Ok(r) => r,
            Err(e) => return Ok(Some(Err(e))),
        };
        self.audit.record(Direction::Received, &tref.task_id, tref.round, "roster", &bytes)?;
        let roster = match roster_from_reply(tref, &reply, &spec.fixed) {
            Ok(r) => r,
            Err(e) => {
                self.secagg.keys = None;
                self.skip_task(tref, &format!("the server's roster cannot be used, so no update is sent: {e}"));
                return Ok(None);
            }
        };
        let Some((_, keys)) = self.secagg.keys.take().filter(|(id, _)| *id == tref.task_id) else {
            return Err(ExecutorError(format!("{}: this site's key pair for the task is gone", tref.describe())).into());
        };
        let site = self.opts.site_id.clone();
        let sites = roster.len() as u32;
        let weight = spec.weight(num_samples);
        let fingerprint = delta.fingerprint().to_hex();
        let masked = tokio::task::spawn_blocking(move || {
            let mut delta = delta;
            let dp = match spec.dp {
                Some((sigma, clip)) => Some(privatize(&mut delta, sigma, clip, sites, &mut rand::rng())?),
                None => None,
            };
            let (payload, stats) = mask_payload(&site, keys, &roster, &spec.fixed, weight, delta.values())?;
            // Hashed once, here, for both the header and the audit log.
            let sha: [u8; 32] = Sha256::digest(&payload).into();
            Ok::<_, String>((payload, sha, stats, dp, roster.digest()))
        })
        .await
        .map_err(|e| ExecutorError(format!("masking the update failed: {e}")))?;
        let masked = match masked {
            Ok(m) => m,
            Err(e) => {
                self.skip_task(tref, &format!("the update cannot be masked, so none is sent: {e}"));
                return Ok(None);
            }
        };
        let (payload, sha, stats, dp, digest) = masked;
        if stats.clipped > 0 {
            tracing::warn!(
                task = %tref.task_id,
                clamped = stats.clipped,
                clip = spec.fixed.clip(),
                "values of the update were beyond the secure aggregation clip and were clamped"
            );
        }
        if let Some(d) = dp {
            tracing::info!(task = %tref.task_id, clipped = d.clipped, noise_std = d.noise_std, "differential privacy applied");
        }
        let mut metrics = metrics;
        metrics.push(("secagg_clamped_values".into(), stats.clipped as f64));
        self.audit.record_digest(Direction::Sent, &tref.task_id, tref.round, "update", payload.len() as u64, sha)?;
        let header = MaskedHeader {
            task: tref.clone(),
            model_fingerprint: fingerprint,
            num_samples,
            sha256: hex::encode(sha),
            metrics,
            roster_digest: digest.to_vec(),
            encoded_weight: weight,
        };
        let payload = bytes::Bytes::from(payload);
        self.secagg.masked =
            Some(MaskedUpload { task_id: tref.task_id.clone(), payload: payload.clone(), header: header.clone() });
        Ok(Some(conn.upload_masked(&header, payload).await))
    }

    /// A task this site cannot take part in: logged, noted for `status.json`, and done with.
    fn skip_task(&mut self, tref: &TaskRef, why: &str) -> Prepared {
        tracing::warn!(site = %self.opts.site_id, task = %tref.task_id, "{why}");
        self.note_error(format!("{}: {why}", tref.describe()));
        self.finish_task(tref, &format!("{} skipped; waiting for the next task", tref.describe()));
        Prepared::Done
    }

    fn finish_task(&mut self, tref: &TaskRef, detail: &str) {
        self.task_done(tref);
        self.status("waiting", detail.to_string(), tref.round);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedhcc_secure::secagg::SumAccumulator;
    use rand::SeedableRng;

    fn delta() -> ParameterSet {
        ParameterSet::from_tensors(vec![
            ("w".into(), vec![3], vec![3.0, 0.0, 4.0]),
            ("standardise.clinical.mean".into(), vec![2], vec![0.0, 0.0]),
            ("b".into(), vec![1], vec![0.0]),
        ])
        .unwrap()
    }

    #[test]
    fn dp_clips_the_l2_norm_and_adds_noise_of_the_configured_scale_but_never_to_the_statistics() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut d = delta();
        let applied = privatize(&mut d, 1e-9, 1.0, 2, &mut rng).unwrap();
        assert_eq!((applied.norm, applied.clipped), (5.0, true));
        let norm = d.values().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= 1.0 && norm > 0.999, "{norm}");
        assert_eq!(d.get("standardise.clinical.mean").unwrap(), &[0.0, 0.0]);
        // Noise: per-site std σC/√n; over many values the sample std matches.
        let n = 200_000;
        let mut big = ParameterSet::from_tensors(vec![
            ("w".into(), vec![n], vec![0.0; n]),
            ("standardise.x.std".into(), vec![4], vec![1.0; 4]),
        ])
        .unwrap();
        let a = privatize(&mut big, 2.0, 0.5, 4, &mut rng).unwrap();
        assert_eq!(a.noise_std, 0.5);
        let w = big.get("w").unwrap();
        let sd = (w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((sd - 0.5).abs() < 0.005, "{sd}");
        assert_eq!(big.get("standardise.x.std").unwrap(), &[1.0; 4]);
        let mut bad = delta();
        bad.values_mut()[0] = f32::NAN;
        assert!(privatize(&mut bad, 1.0, 1.0, 2, &mut rng).unwrap_err().contains("not a finite number"));
    }

    #[test]
    fn masked_payloads_of_two_sites_sum_to_the_weighted_update_and_each_alone_looks_uniform() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let fixed = FixedPoint::new(2f64.powi(30), 1.0, 1000, 4).unwrap();
        let tref = TaskRef { study_id: "s".into(), run_id: "r".into(), round: 1, task_id: "r1a1".into() };
        let (ka, kb) = (RoundKeys::generate(&mut rng), RoundKeys::generate(&mut rng));
        let reply = |digest: Vec<u8>| RosterReply {
            task_id: Some(tref.task_id.clone()),
            members: vec![("a".into(), ka.public_bytes().to_vec()), ("b".into(), kb.public_bytes().to_vec())],
            digest,
        };
        assert!(roster_from_reply(&tref, &reply(vec![0; 32]), &fixed).unwrap_err().contains("digest differs"));
        let ctx = SecAggContext { study_id: "s".into(), run_id: "r".into(), round: 1, task_id: "r1a1".into() };
        let r = Roster::new(ctx, [("a".to_string(), ka.public_bytes()), ("b".to_string(), kb.public_bytes())]).unwrap();
        let roster = roster_from_reply(&tref, &reply(r.digest().to_vec()), &fixed).unwrap();
        let n = 20_000;
        let va: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin() * 0.1).collect();
        let vb: Vec<f32> = vec![0.0; n];
        let (pa, _) = mask_payload("a", ka, &roster, &fixed, 3, &va).unwrap();
        let (pb_, _) = mask_payload("b", kb, &roster, &fixed, 5, &vb).unwrap();
        // b's update is all zeros, yet its payload is indistinguishable from uniform: each byte value
        // appears about 1/256 of the time (chi-square over 160 000 bytes, 255 d.o.f.).
        let mut counts = [0f64; 256];
        pb_.iter().for_each(|b| counts[*b as usize] += 1.0);
        let e = pb_.len() as f64 / 256.0;
        let chi2: f64 = counts.iter().map(|c| (c - e).powi(2) / e).sum();
        assert!(chi2 < 350.0, "chi-square {chi2}");
        let mut acc = SumAccumulator::new(&roster, fixed, n as u64).unwrap();
        for (site, p) in [("a", &pa), ("b", &pb_)] {
            let mut words = Vec::new();
            fedhcc_secure::secagg::words_from_le_bytes(p, &mut words).unwrap();
            acc.begin_site(site, &roster.digest()).unwrap();
            acc.add_block(site, 0, &words).unwrap();
        }
        let mean = acc.decode(8).unwrap();
        let tol = fixed.max_rounding_error(2, 8) + 1e-7;
        for (m, a) in mean.iter().zip(&va) {
            assert!((f64::from(*m) - f64::from(*a) * 3.0 / 8.0).abs() <= tol, "{m} vs {a}");
        }
    }

    #[test]
    fn task_settings_from_the_network_are_checked() {
        let mut t = TrainTask { secure_aggregation: true, ..Default::default() };
        assert!(MaskingSpec::from_task(&t).unwrap_err().contains("no fixed-point settings"));
        t.fixed_point = Some(crate::task::FixedPointSettings { clip: 1.0, scale: 1e30, max_weight: 10, max_sites: 2 });
        assert!(MaskingSpec::from_task(&t).unwrap_err().contains("overflow"));
        t.fixed_point =
            Some(crate::task::FixedPointSettings { clip: 1.0, scale: 1024.0, max_weight: 10, max_sites: 2 });
        assert_eq!(MaskingSpec::from_task(&t).unwrap().weight(7), 7);
        t.dp_noise_multiplier = 1.0;
        assert!(MaskingSpec::from_task(&t).unwrap_err().contains("l2_clip"));
        t.dp_l2_clip = 0.5;
        let s = MaskingSpec::from_task(&t).unwrap();
        assert_eq!((s.dp, s.weight(7)), (Some((1.0, 0.5)), 1));
    }
}
