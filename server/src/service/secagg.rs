//! The service's side of secure aggregation (part of the service layer: errors become
//! `tonic::Status` here too): the key exchange (`AdvertiseKey`, `AwaitRoster`) and masked uploads.
//!
//! A masked upload (`UpdateHeader.encoding = "secagg-u64"`) is 8 little-endian bytes per model value
//! and nothing else: uniformly distributed words that the server can check only for their count,
//! chunking and hash, not for finiteness. It is spooled as `spool/<task>/<site>.msk`; the driver folds
//! the files of every roster member into one sum and decodes only that ([`crate::secure_sum`]).

use super::{FederationService, check_str, refusal_status, transfer};
use crate::coordinator::{RosterKeys, RosterState, SiteResult};
use crate::spool::Answer;
use crate::state::lock;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::privacy;
use fedhcc_proto as pb;
use fedhcc_proto::{ENCODING_SECAGG_U64, KEY_BYTES};
use fedhcc_secure::secagg::{Roster, SecAggContext};
use std::time::{Duration, Instant};
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
        // A low-order or non-canonical key would make every other site's masking fail: refused here,
        // so that one site cannot stop the others.
        fedhcc_secure::secagg::check_public_key(site, &key).map_err(|e| Status::invalid_argument(e.to_string()))?;
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
        let metrics = transfer::check_header_fields(&h)?;
        let roster_keys = {
            let coord = lock(&self.shared.coord);
            coord.check_masked_submission(site, &t.task_id).map_err(|r| refusal_status(&r))?;
            coord.current_task().and_then(|task| task.roster.clone()).unwrap_or_default()
        };
        let g = self
            .shared
            .global()
            .ok_or_else(|| Status::unavailable("the server is aggregating; the round has closed"))?;
        let expected = (g.layout.numel() as u64).saturating_mul(8);
        let counted = format!("{} values of 8 bytes are {expected}", g.layout.numel());
        let want_chunks = self.check_header("masked update", &h, &g, expected, &counted)?;
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

        let file = transfer::spool_upload(
            self.shared.spool.slot(&t.task_id, site, Answer::Masked),
            stream,
            &h,
            want_chunks,
            MaskedWords,
        )
        .await?;
        let result = SiteResult { samples: h.num_samples, metrics, bytes: file.bytes };
        let up = transfer::Spooled { task: &t, file, result, sha256: &h.sha256, what: "masked update" };
        self.commit_upload(site, up, |coord| coord.check_masked_submission(site, &t.task_id)).await
    }
}

/// A masked upload's chunks: uniformly distributed words, nothing to check beyond their count,
/// sizes and hash.
struct MaskedWords;

impl transfer::ChunkCheck for MaskedWords {
    fn chunk(&mut self, _chunk: &[u8]) -> Result<(), Status> {
        Ok(())
    }

    fn end(self) -> Result<(), Status> {
        Ok(())
    }
}
