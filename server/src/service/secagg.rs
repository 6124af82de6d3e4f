//! The service's side of secure aggregation (part of the service layer: errors become
//! `tonic::Status` here too): the key exchange (`AdvertiseKey`, `AwaitRoster`) and masked uploads.
//!
//! A masked upload (`UpdateHeader.encoding = "secagg-u64"`) is 8 little-endian bytes per model value
//! and nothing else: uniformly distributed words that the server can check only for their count,
//! chunking and hash, not for finiteness. It is spooled as `spool/<task>/<site>.msk`; the driver folds
//! the files of every roster member into one sum and decodes only that ([`crate::secure_sum`]).

use super::{
    CHUNK_IDLE_TIMEOUT, FederationService, check_metrics, check_str, refusal_status, sha_bytes, spool_error, uuid_like,
};
use crate::audit::Entry;
use crate::coordinator::{RosterKeys, RosterState, SiteResult, TaskKind};
use crate::state::lock;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::privacy;
use fedhcc_proto as pb;
use fedhcc_proto::{ENCODING_SECAGG_U64, KEY_BYTES, MAX_CHUNK_BYTES, MAX_SAMPLES};
use fedhcc_secure::audit::Direction;
use fedhcc_secure::secagg::{Roster, SecAggContext};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

/// The fixed-point encoding a train task carries under secure aggregation (`None` without it, or
/// if the settings are unusable, which the study's validation at load rules out).
pub(super) fn fixed_point_params(study: &StudyConfig) -> Option<pb::FixedPointParams> {
    let fp = privacy::fixed_point(&study.federation).ok().flatten()?;
    Some(pb::FixedPointParams {
        clip: fp.clip(),
        scale: fp.scale(),
        max_weight: fp.max_weight(),
        max_sites: fp.max_sites(),
    })
}

/// The roster the sites mask for: the task's keys bound to the study, run, round and task id.
///
/// # Errors
/// A roster the secure-aggregation library refuses (cannot happen for one the coordinator fixed:
/// at least two sites, distinct keys).
pub(crate) fn roster(study: &StudyConfig, round: u32, task_id: &str, keys: &RosterKeys) -> Result<Roster, String> {
    let ctx = SecAggContext {
        study_id: study.study_id.clone(),
        run_id: study.run_id.clone(),
        round,
        task_id: task_id.to_string(),
    };
    Roster::new(ctx, keys.iter().map(|(s, k)| (s.clone(), *k))).map_err(|e| e.to_string())
}

/// How an upload is encoded, checked against the study.
pub(super) enum UploadKind {
    Plain,
    Masked,
}

/// Whether the header's encoding is the one this study takes.
///
/// # Errors
/// An unmasked update under secure aggregation, a masked one without it, or an unknown encoding.
pub(super) fn upload_kind(study: &StudyConfig, h: &pb::UpdateHeader) -> Result<UploadKind, Status> {
    check_str("encoding", &h.encoding)?;
    let secure = study.federation.secure_aggregation;
    match h.encoding.as_str() {
        "" | "f32" if secure => Err(Status::failed_precondition(
            "this study uses secure aggregation: the server accepts only masked updates (encoding secagg-u64); the \
             site's client must be a version with secure aggregation",
        )),
        "" | "f32" => Ok(UploadKind::Plain),
        ENCODING_SECAGG_U64 if secure => Ok(UploadKind::Masked),
        ENCODING_SECAGG_U64 => Err(Status::invalid_argument(
            "a masked (secagg-u64) update, but this study does not use secure aggregation",
        )),
        other => Err(Status::invalid_argument(format!("unknown update encoding '{other}' (f32 or secagg-u64)"))),
    }
}

fn public_key(bytes: &[u8]) -> Result<[u8; 32], Status> {
    <[u8; KEY_BYTES]>::try_from(bytes).map_err(|_| {
        Status::invalid_argument(format!("public_key is {} bytes; an X25519 public key is {KEY_BYTES}", bytes.len()))
    })
}

impl FederationService {
    /// `AdvertiseKey`: records `site`'s public key for the task's key exchange.
    pub(super) async fn advertise_key_checked(&self, site: &str, r: pb::KeyAdvertisement) -> Result<pb::Ack, Status> {
        let t = self.check_task_ref(r.task.as_ref())?;
        if !self.shared.study.federation.secure_aggregation {
            return Err(Status::failed_precondition("this study does not use secure aggregation; no key is needed"));
        }
        let key = public_key(&r.public_key)?;
        let actions = lock(&self.shared.coord)
            .key_advertised(site, &t.task_id, key, Instant::now())
            .map_err(|r| refusal_status(&r))?;
        tracing::info!(site, task = %t.task_id, "secure aggregation: public key received");
        self.shared.apply(actions);
        Ok(pb::Ack { message: format!("key for {} recorded", t.task_id) })
    }

    /// `AwaitRoster`: the task's roster once its key exchange has closed (waits for it, at most
    /// the round timeout).
    pub(super) async fn await_roster_checked(&self, site: &str, t: pb::TaskRef) -> Result<pb::KeyRoster, Status> {
        let t = self.check_task_ref(Some(&t))?;
        if !self.shared.study.federation.secure_aggregation {
            return Err(Status::failed_precondition("this study does not use secure aggregation; there is no roster"));
        }
        let mut changes = self.shared.announce.subscribe();
        let limit = Duration::from_secs(self.shared.study.federation.round_timeout_s);
        let wait = async {
            loop {
                changes.borrow_and_update();
                let state = lock(&self.shared.coord).roster_for(site, &t.task_id).map_err(|r| refusal_status(&r))?;
                if let RosterState::Fixed(keys) = state {
                    return Ok(keys);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() {
                        return Err(Status::unavailable("the server is stopping"));
                    },
                    _ = self.shared.shutdown.cancelled() => return Err(Status::unavailable("the server is stopping")),
                }
            }
        };
        let keys = tokio::time::timeout(limit, wait).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "the key exchange of {} did not close within {} s",
                t.task_id,
                limit.as_secs()
            ))
        })??;
        let roster = roster(&self.shared.study, t.round, &t.task_id, &keys).map_err(|e| {
            tracing::error!(task = %t.task_id, error = %e, "secure aggregation roster refused");
            Status::internal("the server could not form this round's roster; the study lead has been told in the log")
        })?;
        Ok(pb::KeyRoster {
            task: Some(t),
            members: keys
                .into_iter()
                .map(|(site_id, k)| pb::RosterMember { site_id, public_key: k.to_vec().into() })
                .collect(),
            digest: roster.digest().to_vec().into(),
        })
    }

    /// A masked update (`secagg-u64`): checked against the roster, then spooled as `<site>.msk`.
    pub(super) async fn receive_masked(
        &self,
        site: &str,
        stream: &mut Streaming<pb::UploadPart>,
        h: pb::UpdateHeader,
        t: pb::TaskRef,
    ) -> Result<pb::UploadReply, Status> {
        check_str("model_fingerprint", &h.model_fingerprint)?;
        check_str("sha256", &h.sha256)?;
        let metrics = check_metrics(&h.metrics)?;
        let roster_keys = {
            let coord = lock(&self.shared.coord);
            coord.check_masked_submission(site, &t.task_id).map_err(|r| refusal_status(&r))?;
            coord.current_task().and_then(|task| task.roster.clone()).unwrap_or_default()
        };
        let g = self
            .shared
            .global()
            .ok_or_else(|| Status::unavailable("the server is aggregating; the round has closed"))?;
        if h.model_fingerprint != g.fingerprint().to_hex() {
            return Err(Status::failed_precondition(format!(
                "update layout {} does not match the study model {}",
                &h.model_fingerprint[..h.model_fingerprint.len().min(12)],
                g.fingerprint().short()
            )));
        }
        let expected = (g.layout.numel() as u64).saturating_mul(8);
        if h.total_bytes != expected {
            return Err(Status::invalid_argument(format!(
                "masked update declares {} bytes; {} values of 8 bytes are {expected}",
                h.total_bytes,
                g.layout.numel()
            )));
        }
        let want_chunks = expected.div_ceil(MAX_CHUNK_BYTES as u64);
        if u64::from(h.chunks) != want_chunks {
            return Err(Status::invalid_argument(format!(
                "masked update declares {} chunks; {expected} bytes travel in {want_chunks} chunks of at most \
                 {MAX_CHUNK_BYTES} bytes",
                h.chunks
            )));
        }
        if h.sha256.len() != 64 || !h.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("sha256 must be 64 hexadecimal digits"));
        }
        if h.num_samples == 0 || h.num_samples > MAX_SAMPLES {
            return Err(Status::invalid_argument(format!(
                "num_samples = {} (1 to {MAX_SAMPLES} allowed)",
                h.num_samples
            )));
        }
        let dp = self.shared.study.federation.dp.is_some();
        let weight = privacy::encoding_weight(dp, h.num_samples);
        if h.encoded_weight != weight {
            return Err(Status::invalid_argument(format!(
                "encoded_weight = {}; this study encodes with {}",
                h.encoded_weight,
                if dp {
                    "weight 1 (differential privacy)".to_string()
                } else {
                    format!("num_samples ({})", h.num_samples)
                }
            )));
        }
        if let Some(fp) = privacy::fixed_point(&self.shared.study.federation).ok().flatten()
            && weight > fp.max_weight()
        {
            return Err(Status::invalid_argument(format!(
                "num_samples = {weight} is above the secure aggregation max_weight {}; the study lead must raise \
                 [federation.secure_aggregation_params] max_weight",
                fp.max_weight()
            )));
        }
        let want_digest = roster(&self.shared.study, t.round, &t.task_id, &roster_keys)
            .map_err(|e| Status::internal(format!("the server could not form this round's roster: {e}")))?
            .digest();
        if h.roster_digest.as_ref() != want_digest.as_slice() {
            return Err(Status::failed_precondition(format!(
                "the update was masked for another roster than task {}'s (other sites or keys); its masks cannot \
                 cancel",
                t.task_id
            )));
        }

        let dir = self.shared.spool_dir.join(&t.task_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| spool_error(&dir, e))?;
        let part = dir.join(format!("{site}.{}.part", uuid_like()));
        let fin = dir.join(format!("{site}.msk"));
        let bytes = match spool_words(stream, &part, &h, want_chunks).await {
            Ok(b) => b,
            Err(s) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(s);
            }
        };
        let res = SiteResult { samples: h.num_samples, metrics, bytes };
        let actions = {
            let mut coord = lock(&self.shared.coord);
            // Re-checked under the lock: the attempt may have been aborted, or a parallel duplicate won.
            if let Err(r) = coord.check_masked_submission(site, &t.task_id) {
                drop(coord);
                let _ = std::fs::remove_file(&part);
                return Err(refusal_status(&r));
            }
            if !self.shared.allowed.contains(site) {
                drop(coord);
                let _ = std::fs::remove_file(&part);
                return Err(Status::permission_denied(format!(
                    "site '{site}' was removed from this study's allow-list by the study lead; the update was not used"
                )));
            }
            if let Err(e) = std::fs::rename(&part, &fin) {
                drop(coord);
                let _ = std::fs::remove_file(&part);
                return Err(spool_error(&fin, e));
            }
            coord
                .submission_accepted(site, TaskKind::Train, &t.task_id, res, Instant::now())
                .map_err(|r| refusal_status(&r))?
        };
        self.shared.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        if let Some(info) = lock(&self.shared.sites).get_mut(site) {
            info.rounds_contributed += 1;
        }
        tracing::info!(site, task = %t.task_id, bytes, samples = h.num_samples, "masked update accepted");
        let entry = Entry {
            direction: Direction::Received,
            peer: site.to_string(),
            task: t.task_id.clone(),
            round: t.round,
            kind: "update",
            bytes,
            sha256: sha_bytes(&h.sha256),
        };
        self.shared.audit.record(entry).await;
        self.shared.apply(actions);
        Ok(pb::UploadReply { accepted: true, message: format!("masked update for {} accepted", t.task_id) })
    }
}

/// Receives a masked upload's chunks into `part`, checking the chunk count, sizes and hash as they
/// come (the words themselves are uniformly distributed: there is nothing else to check).
async fn spool_words(
    stream: &mut Streaming<pb::UploadPart>,
    part: &std::path::Path,
    h: &pb::UpdateHeader,
    want_chunks: u64,
) -> Result<u64, Status> {
    let mut file = tokio::fs::File::create(part).await.map_err(|e| spool_error(part, e))?;
    let mut hasher = Sha256::new();
    let (mut chunks, mut bytes) = (0u64, 0u64);
    loop {
        let msg = tokio::time::timeout(CHUNK_IDLE_TIMEOUT, stream.message()).await.map_err(|_| {
            Status::deadline_exceeded(format!("no chunk for {} s; upload abandoned", CHUNK_IDLE_TIMEOUT.as_secs()))
        })??;
        let Some(msg) = msg else { break };
        let Some(pb::upload_part::Part::Chunk(chunk)) = msg.part else {
            return Err(Status::invalid_argument("a second header arrived inside the upload"));
        };
        chunks += 1;
        if chunks > want_chunks {
            return Err(Status::invalid_argument(format!("more chunks than the {want_chunks} declared")));
        }
        if chunk.is_empty() || chunk.len() > MAX_CHUNK_BYTES {
            return Err(Status::invalid_argument(format!(
                "chunk {chunks} is {} bytes (1 to {MAX_CHUNK_BYTES} allowed)",
                chunk.len()
            )));
        }
        bytes += chunk.len() as u64;
        if bytes > h.total_bytes {
            return Err(Status::invalid_argument(format!("more bytes than the {} declared", h.total_bytes)));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| spool_error(part, e))?;
    }
    if bytes != h.total_bytes || chunks != want_chunks {
        return Err(Status::invalid_argument(format!(
            "upload ended after {bytes} of {} bytes ({chunks} of {want_chunks} chunks)",
            h.total_bytes
        )));
    }
    let got = hex::encode(hasher.finalize());
    if !got.eq_ignore_ascii_case(&h.sha256) {
        return Err(Status::data_loss(format!(
            "SHA-256 of the received update is {got}, the header declared {}; nothing was stored",
            h.sha256
        )));
    }
    file.flush().await.map_err(|e| spool_error(part, e))?;
    Ok(bytes)
}
