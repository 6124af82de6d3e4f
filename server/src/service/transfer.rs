//! The chunked transfers every kind of upload and download shares (part of the service layer):
//! an upload's header checks against the global model, its chunks received into a spool file while
//! counted and hashed, its commit under the coordinator lock; a checkpoint sent as chunks.
//!
//! A plain update ([`super::FederationService::receive_update`]) and a masked one
//! ([`super::FederationService::receive_masked`]) differ only in what their chunks hold
//! ([`ChunkCheck`]) and in the coordinator's check; a site's model download and the study lead's
//! export differ only in the message that carries a chunk.

use super::{
    CHUNK_IDLE_TIMEOUT, FederationService, check_metrics, check_str, refusal_status, sha_bytes, spool_error, uuid_like,
};
use crate::audit::Entry;
use crate::coordinator::{Coordinator, Refusal, SiteResult, TaskKind};
use crate::spool::Slot;
use crate::state::{GlobalModel, lock};
use fedhcc_proto as pb;
use fedhcc_proto::chunks::{ChunkError, ChunkReceiver};
use fedhcc_proto::{MAX_CHUNK_BYTES, MAX_SAMPLES};
use fedhcc_secure::audit::Direction;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// The fields every upload's header carries, checked before anything else: the model fingerprint
/// and SHA-256 as strings, and the metrics (returned).
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field.
pub(super) fn check_header_fields(h: &pb::UpdateHeader) -> Result<Vec<(String, f64)>, Status> {
    super::check_fingerprint("model_fingerprint", &h.model_fingerprint, false)?;
    check_str("sha256", &h.sha256)?;
    check_metrics(&h.metrics)
}

/// An upload's header against the global model, for a plain or a masked update alike: its layout,
/// `expected` bytes in all (`counted` says how they are counted, for the error), the chunks they
/// travel in, the SHA-256's form and the sample count. `what` names the upload (`update`, `masked
/// update`). Returns the number of chunks to receive.
///
/// # Errors
/// `FAILED_PRECONDITION` for another layout, `INVALID_ARGUMENT` saying what the header should declare.
pub(super) fn check_update_header(
    what: &str,
    h: &pb::UpdateHeader,
    g: &GlobalModel,
    expected: u64,
    counted: &str,
    max_samples: u64,
) -> Result<u64, Status> {
    check_update_layout(h, g)?;
    if h.total_bytes != expected {
        return Err(Status::invalid_argument(format!("{what} declares {} bytes; {counted}", h.total_bytes)));
    }
    let want_chunks = check_update_chunks(what, h, expected)?;
    check_site_samples(h.num_samples, max_samples)?;
    Ok(want_chunks)
}

impl FederationService {
    /// [`check_update_header`] under this study's `max_site_samples`.
    ///
    /// # Errors
    /// As [`check_update_header`].
    pub(super) fn check_header(
        &self,
        what: &str,
        h: &pb::UpdateHeader,
        g: &GlobalModel,
        expected: u64,
        counted: &str,
    ) -> Result<u64, Status> {
        check_update_header(what, h, g, expected, counted, self.shared.study.federation.site_sample_limit())
    }
}

/// A site's declared training-sample count (its FedAvg weight): at least 1 and at most
/// `max_samples` (the study's `max_site_samples`, never above [`MAX_SAMPLES`]).
///
/// # Errors
/// `INVALID_ARGUMENT` naming the limit.
pub(super) fn check_site_samples(n: u64, max_samples: u64) -> Result<(), Status> {
    let max = max_samples.min(MAX_SAMPLES);
    if n == 0 || n > max {
        let why = if max < MAX_SAMPLES { " (the study's max_site_samples)" } else { "" };
        return Err(Status::invalid_argument(format!("num_samples = {n} (1 to {max} allowed{why})")));
    }
    Ok(())
}

/// The update's layout fingerprint against the global model's.
///
/// # Errors
/// `FAILED_PRECONDITION` naming both layouts.
fn check_update_layout(h: &pb::UpdateHeader, g: &GlobalModel) -> Result<(), Status> {
    if h.model_fingerprint != g.fingerprint().to_hex() {
        return Err(Status::failed_precondition(format!(
            "update layout {} does not match the study model {}",
            super::prefix(&h.model_fingerprint, 12),
            g.fingerprint().short()
        )));
    }
    Ok(())
}

/// The header's chunk count for `expected` bytes and its SHA-256's form; `what` names the upload
/// (`update`, `masked update`). Returns the number of chunks to receive.
///
/// # Errors
/// `INVALID_ARGUMENT` saying what the header should declare.
fn check_update_chunks(what: &str, h: &pb::UpdateHeader, expected: u64) -> Result<u64, Status> {
    let want_chunks = expected.div_ceil(MAX_CHUNK_BYTES as u64);
    if u64::from(h.chunks) != want_chunks {
        return Err(Status::invalid_argument(format!(
            "{what} declares {} chunks; {expected} bytes travel in {want_chunks} chunks of at most {MAX_CHUNK_BYTES} \
             bytes",
            h.chunks
        )));
    }
    if h.sha256.len() != 64 || !h.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument("sha256 must be 64 hexadecimal digits"));
    }
    Ok(want_chunks)
}

/// What an upload's chunks are checked for beyond their count, sizes and hash.
pub(super) trait ChunkCheck {
    /// Looks at the next chunk before it is written.
    ///
    /// # Errors
    /// The `Status` the upload is refused with.
    fn chunk(&mut self, chunk: &[u8]) -> Result<(), Status>;

    /// Runs once every declared byte has arrived, before the hash is compared.
    ///
    /// # Errors
    /// The `Status` the upload is refused with.
    fn end(self) -> Result<(), Status>;
}

/// An upload received into the spool, not yet in place.
pub(super) struct ReceivedUpload {
    /// The file it was received into (`<site>.<n>.part`).
    pub part: PathBuf,
    /// The name the file takes once the upload is accepted (`<site>.<ext>`).
    pub fin: PathBuf,
    /// Bytes received.
    pub bytes: u64,
}

/// Receives `site`'s upload into a new `.part` file in the task's spool folder (created if need be): exactly
/// `want_chunks` chunks of 1 to [`MAX_CHUNK_BYTES`] bytes, `h.total_bytes` in all, each seen by
/// `check`, and the SHA-256 the header declares. Once accepted it is to take the slot's final name.
///
/// # Errors
/// A stalled, short, long or altered upload, what `check` refuses, or a spool file that cannot be
/// written; the `.part` file is removed.
pub(super) async fn spool_upload(
    slot: Slot,
    stream: &mut Streaming<pb::UploadPart>,
    h: &pb::UpdateHeader,
    want_chunks: u64,
    check: impl ChunkCheck,
) -> Result<ReceivedUpload, Status> {
    tokio::fs::create_dir_all(slot.dir()).await.map_err(|e| spool_error(slot.dir(), e))?;
    let part = slot.part(&uuid_like());
    let fin = slot.fin().to_path_buf();
    match receive_chunks(stream, &part, h, want_chunks, check).await {
        Ok(bytes) => Ok(ReceivedUpload { part, fin, bytes }),
        Err(s) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(s)
        }
    }
}

/// Receives an upload's chunks into `part`, checked as they come; returns the bytes received.
async fn receive_chunks(
    stream: &mut Streaming<pb::UploadPart>,
    part: &Path,
    h: &pb::UpdateHeader,
    want_chunks: u64,
    mut check: impl ChunkCheck,
) -> Result<u64, Status> {
    let mut file = tokio::fs::File::create(part).await.map_err(|e| spool_error(part, e))?;
    let mut receiver = ChunkReceiver::new(h.total_bytes, Some(want_chunks));
    loop {
        let msg = tokio::time::timeout(CHUNK_IDLE_TIMEOUT, stream.message()).await.map_err(|_| {
            Status::deadline_exceeded(format!("no chunk for {} s; upload abandoned", CHUNK_IDLE_TIMEOUT.as_secs()))
        })??;
        let Some(msg) = msg else { break };
        let Some(pb::upload_part::Part::Chunk(chunk)) = msg.part else {
            return Err(Status::invalid_argument("a second header arrived inside the upload"));
        };
        receiver.accept(&chunk).map_err(|e| chunk_status(&e))?;
        check.chunk(&chunk)?;
        file.write_all(&chunk).await.map_err(|e| spool_error(part, e))?;
    }
    let bytes = receiver.bytes();
    if bytes == h.total_bytes {
        check.end()?;
    }
    receiver.finish(&h.sha256).map_err(|e| chunk_status(&e))?;
    file.flush().await.map_err(|e| spool_error(part, e))?;
    Ok(bytes)
}

/// A refused upload's status: `DATA_LOSS` for bytes altered on the way, else `INVALID_ARGUMENT`.
fn chunk_status(e: &ChunkError) -> Status {
    if e.is_digest() {
        Status::data_loss(format!("the upload was refused: {e}; nothing was stored"))
    } else {
        Status::invalid_argument(format!("the upload was refused: {e}"))
    }
}

/// A train upload received into its spool file, ready to be committed
/// ([`FederationService::commit_upload`]).
pub(super) struct Spooled<'a> {
    /// The task it answers.
    pub task: &'a pb::TaskRef,
    /// Its spool file.
    pub file: ReceivedUpload,
    /// What the coordinator records for the site.
    pub result: SiteResult,
    /// The SHA-256 (hex, checked) of what was received, for the audit log.
    pub sha256: &'a str,
    /// `update` or `masked update`, for the log line and the reply.
    pub what: &'static str,
}

impl FederationService {
    /// Commits a spooled train upload of `site`. Under the coordinator lock: `check` again (the task
    /// may have closed or its attempt been aborted, or a parallel duplicate won), the allow-list (the
    /// study lead may have removed the site while it uploaded), then the spool file renamed into place
    /// and the submission accepted. Then the bytes counted, the log line, the audit entry, and the
    /// coordinator's actions applied.
    ///
    /// # Errors
    /// A refusal, a site no longer allowed, or a spool file that cannot be renamed; the spool file
    /// is removed.
    pub(super) async fn commit_upload(
        &self,
        site: &str,
        up: Spooled<'_>,
        check: impl FnOnce(&Coordinator) -> Result<(), Refusal>,
    ) -> Result<pb::UploadReply, Status> {
        let t = up.task;
        let (samples, bytes) = (up.result.samples, up.result.bytes);
        let actions = {
            let mut coord = lock(&self.shared.coord);
            if let Err(r) = check(&coord) {
                drop(coord);
                let _ = std::fs::remove_file(&up.file.part);
                return Err(refusal_status(&r));
            }
            if !self.shared.allowed.contains(site) {
                drop(coord);
                let _ = std::fs::remove_file(&up.file.part);
                return Err(Status::permission_denied(format!(
                    "site '{site}' was removed from this study's allow-list by the study lead; the update was not used"
                )));
            }
            if let Err(e) = std::fs::rename(&up.file.part, &up.file.fin) {
                drop(coord);
                let _ = std::fs::remove_file(&up.file.part);
                return Err(spool_error(&up.file.fin, e));
            }
            coord
                .submission_accepted(site, TaskKind::Train, &t.task_id, up.result, Instant::now())
                .map_err(|r| refusal_status(&r))?
        };
        self.shared.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        if let Some(info) = lock(&self.shared.sites).get_mut(site) {
            info.rounds_contributed += 1;
        }
        tracing::info!(site, task = %t.task_id, bytes, samples, "{} accepted", up.what);
        let entry = Entry {
            direction: Direction::Received,
            peer: site.to_string(),
            task: t.task_id.clone(),
            round: t.round,
            kind: "update",
            bytes,
            sha256: sha_bytes(up.sha256),
        };
        self.shared.audit.record(entry).await;
        self.shared.apply(actions);
        Ok(pb::UploadReply { accepted: true, message: format!("{} for {} accepted", up.what, t.task_id) })
    }
}

/// How long a download's receiver may leave a chunk untaken, and who it is (for the log).
pub(crate) struct Stall<'a> {
    pub after: Duration,
    pub receiver: &'a str,
}

/// Sends a checkpoint's `bytes` from `file` down `tx` in chunks of at most [`MAX_CHUNK_BYTES`], each
/// wrapped by `part` and counted by `sent`. With a channel of one, one chunk is in flight. Returns
/// whether every chunk went: `false` when the file could not be read (logged, and the receiver told)
/// or the receiver went away.
///
/// A receiver that takes no chunk for `stall.after` is dropped (logged, naming it): a site that stops reading its
/// download holds a buffer and the checkpoint file only that long.
pub(crate) async fn send_checkpoint<T>(
    mut file: tokio::fs::File,
    path: &Path,
    bytes: u64,
    tx: &mpsc::Sender<Result<T, Status>>,
    part: impl Fn(Vec<u8>) -> T,
    mut sent: impl FnMut(u64),
    stall: Stall<'_>,
) -> bool {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MAX_CHUNK_BYTES as u64);
        let mut buf = vec![0u8; n as usize];
        if let Err(e) = file.read_exact(&mut buf).await {
            tracing::error!(path = %path.display(), error = %e, "global model checkpoint read failed");
            let _ = tx.send(Err(Status::internal("the server could not read its global model"))).await;
            return false;
        }
        left -= n;
        sent(n);
        match tokio::time::timeout(stall.after, tx.send(Ok(part(buf)))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return false,
            Err(_) => {
                tracing::warn!(
                    receiver = stall.receiver,
                    checkpoint = %path.display(),
                    stall_s = stall.after.as_secs_f64(),
                    "a download was not read for this long; it is dropped (the receiver can ask again)"
                );
                return false;
            }
        }
    }
    true
}
