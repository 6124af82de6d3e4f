//! The gRPC service. The only place where errors become `tonic::Status`, and (with the client's
//! transport) the only place prost types meet the rest of the server.
//!
//! Every handler first establishes who is calling from the verified peer certificate, then checks
//! the request against the coordinator before accepting any payload bytes. A refused request
//! leaves the round, the model and the database as they were.
//!
//! Size: the Federation service's handlers, each a few lines (identity from the certificate, the
//! checks, the conversion to domain values); the secure-aggregation handlers are already a room of
//! their own (`service/`).

use crate::audit::Entry;
use crate::coordinator::{Refusal, SiteResult, TaskKind, parse_task_id};
use crate::metrics::RefusalReason;
use crate::spool::Answer;
use crate::state::{Shared, lock};
use crate::store::EvaluationRecord;
use fedhcc_core::params::{Layout, ParamsError, PayloadReader};
use fedhcc_core::pki::{PeerIdentity, Role, peer_identity};
use fedhcc_core::standardisation::{self, GroupSums, MIN_CELL};
use fedhcc_proto as pb;
use fedhcc_proto::{
    MAX_CHUNK_BYTES, MAX_METRICS, MAX_REFUSAL_MESSAGE_LEN, MAX_RULE_LEN, MAX_SAMPLES, MAX_STAT_COLUMNS,
    MAX_STAT_GROUPS, MAX_STRING_LEN,
};
use fedhcc_secure::audit::Direction;
use fedhcc_secure::policy::PolicyRule;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

mod secagg;
mod transfer;
pub(crate) use secagg::roster as secagg_roster;
pub(crate) use transfer::{Stall, send_checkpoint};

/// How often a waiting site hears from the server.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Longest pause between two chunks of an upload.
pub const CHUNK_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The tonic service.
#[derive(Clone)]
pub struct FederationService {
    pub(crate) shared: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn refusal_status(r: &Refusal) -> Status {
    let msg = r.to_string();
    match r {
        Refusal::Stale { .. } | Refusal::Future { .. } | Refusal::WrongPhase { .. } | Refusal::KeyExchange { .. } => {
            Status::failed_precondition(msg)
        }
        Refusal::Duplicate { .. } => Status::already_exists(msg),
        Refusal::NotSelected { .. } => Status::permission_denied(msg),
    }
}

fn check_str(field: &str, s: &str) -> Result<(), Status> {
    check_text(field, s, MAX_STRING_LEN)
}

/// A string from a request: at most `max` bytes and no control characters (it may end up in a log
/// line, the event log or the status view).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn check_text(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.len() > max {
        return Err(Status::invalid_argument(format!("{field} is {} bytes long (at most {max})", s.len())));
    }
    if s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("{field} contains control characters")));
    }
    Ok(())
}

/// A model layout fingerprint from a request: 64 hex digits (a SHA-256), or empty where
/// `optional` (a site that names no model). Checked before it is compared or shown, so that no
/// message ever cuts a site's string inside a character.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn check_fingerprint(field: &str, s: &str, optional: bool) -> Result<(), Status> {
    if s.is_empty() && optional {
        return Ok(());
    }
    if fedhcc_core::params::Fingerprint::from_hex(s).is_none() {
        return Err(Status::invalid_argument(format!(
            "{field} is not a model fingerprint (64 hexadecimal digits, as `fedhcc` writes it)"
        )));
    }
    Ok(())
}

/// The first `n` characters of `s` (never cut inside a character), for a message.
pub fn prefix(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// A sample count from a request: at most [`MAX_SAMPLES`].
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn check_samples(field: &str, n: u64) -> Result<(), Status> {
    if n > MAX_SAMPLES {
        return Err(Status::invalid_argument(format!("{field} = {n} (at most {MAX_SAMPLES})")));
    }
    Ok(())
}

/// The 32 bytes of a SHA-256 given in hex (already checked, or computed by the server).
fn sha_bytes(hex_digest: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    // A malformed digest cannot reach here (checked or computed); zeros would show it in the log.
    if let Ok(b) = hex::decode(hex_digest)
        && b.len() == 32
    {
        out.copy_from_slice(&b);
    }
    out
}

/// The audit entry of a request or event message: its encoded length and SHA-256.
fn message_entry(
    direction: Direction,
    site: &str,
    task: Option<&pb::TaskRef>,
    kind: &'static str,
    m: &impl prost::Message,
) -> Entry {
    let (task_id, round) = task.map(|t| (t.task_id.as_str(), t.round)).unwrap_or(("", 0));
    Entry::of_bytes(direction, site, task_id, round, kind, &m.encode_to_vec())
}

/// The reason (a `/metrics` label) behind a refusal the service answered with `code`.
fn refusal_reason(code: tonic::Code) -> RefusalReason {
    match code {
        tonic::Code::FailedPrecondition => RefusalReason::Precondition,
        tonic::Code::AlreadyExists => RefusalReason::Duplicate,
        tonic::Code::PermissionDenied => RefusalReason::NotSelected,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => RefusalReason::Malformed,
        tonic::Code::DataLoss => RefusalReason::Checksum,
        tonic::Code::DeadlineExceeded => RefusalReason::Timeout,
        tonic::Code::ResourceExhausted => RefusalReason::RateLimited,
        _ => RefusalReason::Other,
    }
}

impl FederationService {
    /// The caller's identity from its verified certificate.
    fn identity<T>(&self, req: &Request<T>) -> Result<PeerIdentity, Status> {
        let bad = |s: Status| {
            self.shared.refused(None, RefusalReason::BadCertificate, s.message());
            s
        };
        let certs =
            req.peer_certs().ok_or_else(|| bad(Status::unauthenticated("no client certificate was presented")))?;
        let leaf = certs.first().ok_or_else(|| bad(Status::unauthenticated("no client certificate was presented")))?;
        let id = peer_identity(leaf).map_err(|e| bad(Status::permission_denied(e.to_string())))?;
        if id.study != self.shared.study.study_id {
            return Err(bad(Status::permission_denied(format!(
                "certificate is for study '{}', this server runs study '{}'",
                id.study, self.shared.study.study_id
            ))));
        }
        Ok(id)
    }

    /// The calling site's id, if it is a site on the allow-list.
    fn site<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let id = self.identity(req)?;
        if id.role != Role::Site {
            let msg = format!("certificate '{}' is not a site certificate", id.name);
            self.shared.refused(None, RefusalReason::NotAllowed, &msg);
            return Err(Status::permission_denied(msg));
        }
        if !self.shared.allowed.contains(&id.name) {
            tracing::warn!(site = %id.name, "refused: site not on the allow-list");
            let msg = format!("site '{}' is not on this study's allow-list", id.name);
            self.shared.refused(Some(&id.name), RefusalReason::NotAllowed, &msg);
            return Err(Status::permission_denied(msg));
        }
        self.shared.touch(&id.name);
        Ok(id.name)
    }

    fn check_task_ref(&self, t: Option<&pb::TaskRef>) -> Result<pb::TaskRef, Status> {
        let t = t.ok_or_else(|| Status::invalid_argument("the request names no task"))?;
        for (f, s) in [("study_id", &t.study_id), ("run_id", &t.run_id), ("task_id", &t.task_id)] {
            check_str(f, s)?;
        }
        if t.study_id != self.shared.study.study_id || t.run_id != self.shared.study.run_id {
            return Err(Status::failed_precondition(format!(
                "the request is for study '{}' run '{}', this server runs study '{}' run '{}'",
                t.study_id, t.run_id, self.shared.study.study_id, self.shared.study.run_id
            )));
        }
        let Some((_, round, _)) = parse_task_id(&t.task_id) else {
            return Err(Status::invalid_argument(format!("'{}' is not a task id", t.task_id)));
        };
        if round != t.round {
            return Err(Status::invalid_argument(format!("task {} is not of round {}", t.task_id, t.round)));
        }
        Ok(t.clone())
    }

    /// Takes one of `site`'s report tokens (before anything is written for the report).
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` (refused and counted) when the site sends reports faster than the limit.
    fn report_allowed(&self, site: &str) -> Result<(), Status> {
        self.shared.reports.allow(site, Instant::now()).map_err(|wait| {
            self.refuse(
                site,
                Status::resource_exhausted(format!(
                    "site '{site}' sends reports too fast; try again in {:.2} s",
                    wait.as_secs_f64()
                )),
            )
        })
    }

    fn refuse(&self, site: &str, status: Status) -> Status {
        tracing::warn!(site, code = ?status.code(), reason = status.message(), "request refused");
        self.shared.refused(Some(site), refusal_reason(status.code()), status.message());
        status
    }

    fn task_event(&self, site: &str) -> Option<(String, pb::TaskEvent)> {
        let ann = self.shared.announce.borrow().clone();
        if let Some(rounds) = ann.finished {
            let sha = self.shared.global().map(|g| g.sha256.clone()).unwrap_or_default();
            let ev = pb::task_event::Event::Finished(pb::RunFinished {
                run_id: self.shared.study.run_id.clone(),
                rounds_completed: rounds,
                final_model_sha256: sha,
            });
            return Some(("finished".into(), pb::TaskEvent { event: Some(ev) }));
        }
        let task = ann.task?;
        if !task.selected.contains(site) || lock(&self.shared.coord).answered().any(|s| s == site) {
            return None;
        }
        let g = self.shared.global()?;
        let tref = pb::TaskRef {
            study_id: self.shared.study.study_id.clone(),
            run_id: self.shared.study.run_id.clone(),
            round: task.round,
            task_id: task.id.clone(),
        };
        let t = &self.shared.study.training;
        let ev = match task.kind {
            TaskKind::Train => pb::task_event::Event::Train(pb::TrainTask {
                task: Some(tref),
                model_fingerprint: g.fingerprint().to_hex(),
                model_bytes: g.bytes,
                model_sha256: g.sha256.clone(),
                local_epochs: t.local_epochs,
                batch_size: t.batch_size,
                learning_rate: t.learning_rate,
                weight_decay: t.weight_decay,
                prox_mu: t.prox_mu,
                seed: t.seed.wrapping_add(u64::from(task.round)),
                total_rounds: self.shared.study.federation.rounds,
                // What a site's policy checks: the study's protection of the update.
                secure_aggregation: self.shared.study.federation.secure_aggregation,
                dp_noise_multiplier: self.shared.study.federation.dp.as_ref().map_or(0.0, |d| d.noise_multiplier),
                dp_delta: self.shared.study.federation.dp.as_ref().map_or(0.0, |d| d.delta),
                // How the sites encode (and, under DP, clip) the update before masking it.
                fixed_point: secagg::fixed_point_params(&self.shared.study),
                dp_l2_clip: self.shared.study.federation.dp.as_ref().map_or(0.0, |d| d.l2_clip),
            }),
            TaskKind::Statistics => pb::task_event::Event::Statistics(pb::StatisticsTask {
                task: Some(tref),
                model_fingerprint: g.fingerprint().to_hex(),
            }),
            TaskKind::Evaluate => pb::task_event::Event::Evaluate(pb::EvaluateTask {
                task: Some(tref),
                model_fingerprint: g.fingerprint().to_hex(),
                model_bytes: g.bytes,
                model_sha256: g.sha256.clone(),
                split: "test".into(),
            }),
        };
        Some((task.id, pb::TaskEvent { event: Some(ev) }))
    }
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let site = self.site(&req)?;
        if let Err(wait) = self.shared.joins.allow(&site, Instant::now()) {
            return Err(self.refuse(
                &site,
                Status::resource_exhausted(format!(
                    "site '{site}' joined too often; try again in {:.0} s",
                    wait.as_secs_f64().ceil()
                )),
            ));
        }
        let r = req.into_inner();
        self.shared.audit.record(message_entry(Direction::Received, &site, None, "join", &r)).await;
        let checked = check_str("study_id", &r.study_id)
            .and_then(|()| check_fingerprint("model_fingerprint", &r.model_fingerprint, true))
            .and_then(|()| check_str("client_version", &r.client_version))
            .and_then(|()| check_samples("num_samples", r.num_samples));
        checked.map_err(|s| self.refuse(&site, s))?;
        let limit = self.shared.study.federation.site_sample_limit();
        if r.num_samples > limit {
            return Err(self.refuse(
                &site,
                Status::invalid_argument(format!(
                    "this site declares {} training patients; the study allows at most {limit} per site \
                     (max_site_samples): check the site's data, or ask the study lead",
                    r.num_samples
                )),
            ));
        }
        if r.study_id != self.shared.study.study_id {
            return Err(self.refuse(
                &site,
                Status::failed_precondition(format!(
                    "this site is configured for study '{}', the server runs '{}'",
                    r.study_id, self.shared.study.study_id
                )),
            ));
        }
        let g = self.shared.global();
        let fp = g.as_ref().map(|g| g.fingerprint().to_hex()).unwrap_or_default();
        if !r.model_fingerprint.is_empty() && !fp.is_empty() && r.model_fingerprint != fp {
            return Err(self.refuse(
                &site,
                Status::failed_precondition(format!(
                    "this site's model layout {} differs from the study model {}: check that the site uses the same study configuration",
                    prefix(&r.model_fingerprint, 12),
                    prefix(&fp, 12)
                )),
            ));
        }
        self.shared.joined(&site, &r.client_version, r.num_samples);
        let coord = lock(&self.shared.coord);
        tracing::info!(site, "site joined");
        Ok(Response::new(pb::JoinReply {
            study_id: self.shared.study.study_id.clone(),
            run_id: self.shared.study.run_id.clone(),
            current_round: coord.current_round(),
            total_rounds: coord.total_rounds(),
            model_fingerprint: fp,
            server_version: fedhcc_proto::PROTOCOL_VERSION.into(),
        }))
    }

    type WaitTaskStream = BoxStream<pb::TaskEvent>;

    async fn wait_task(&self, req: Request<pb::WaitTaskRequest>) -> Result<Response<Self::WaitTaskStream>, Status> {
        let site = self.site(&req)?;
        let r = req.into_inner();
        check_str("study_id", &r.study_id)
            .and_then(|()| check_str("run_id", &r.run_id))
            .map_err(|s| self.refuse(&site, s))?;
        if r.study_id != self.shared.study.study_id || r.run_id != self.shared.study.run_id {
            return Err(self.refuse(
                &site,
                Status::failed_precondition(format!(
                    "waiting for study '{}' run '{}', the server runs study '{}' run '{}'",
                    r.study_id, r.run_id, self.shared.study.study_id, self.shared.study.run_id
                )),
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        let guard = self.shared.connect(&site);
        let svc = self.clone();
        let mut ann_rx = self.shared.announce.subscribe();
        let shutdown = self.shared.shutdown.clone();
        self.shared.tracker.spawn(async move {
            let _guard = guard;
            let mut last_sent: Option<String> = None;
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            heartbeat.tick().await;
            loop {
                ann_rx.borrow_and_update();
                if !svc.shared.allowed.contains(&site) {
                    // The study lead removed the site (`fedhcc admin disallow`): its stream ends.
                    let msg = format!("site '{site}' was removed from this study's allow-list by the study lead");
                    svc.shared.refused(Some(&site), RefusalReason::NotAllowed, &msg);
                    // Not awaited: a site that stopped reading must not hold this task.
                    let _ = tx.try_send(Err(Status::permission_denied(msg)));
                    break;
                }
                if let Some((id, ev)) = svc.task_event(&site)
                    && last_sent.as_deref() != Some(id.as_str())
                {
                    let entry = ev.audit_kind().map(|(kind, t)| message_entry(Direction::Sent, &site, t, kind, &ev));
                    if tx.send(Ok(ev)).await.is_err() {
                        break;
                    }
                    if let Some(entry) = entry {
                        svc.shared.audit.record(entry).await;
                    }
                    last_sent = Some(id);
                }
                tokio::select! {
                    changed = ann_rx.changed() => if changed.is_err() { break },
                    _ = heartbeat.tick() => {
                        let (round, phase) = {
                            let c = lock(&svc.shared.coord);
                            (c.current_round(), c.phase().as_str().to_string())
                        };
                        let hb = pb::TaskEvent { event: Some(pb::task_event::Event::Heartbeat(pb::Heartbeat { round, phase })) };
                        if tx.send(Ok(hb)).await.is_err() { break }
                    }
                    _ = tx.closed() => break,
                    _ = shutdown.cancelled() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadModelStream = BoxStream<pb::ModelPart>;

    async fn download_model(&self, req: Request<pb::TaskRef>) -> Result<Response<Self::DownloadModelStream>, Status> {
        let site = self.site(&req)?;
        let t = self.check_task_ref(Some(req.get_ref())).map_err(|s| self.refuse(&site, s))?;
        lock(&self.shared.coord)
            .check_download(&site, &t.task_id)
            .map_err(|r| self.refuse(&site, refusal_status(&r)))?;
        let g = self
            .shared
            .global()
            .ok_or_else(|| Status::unavailable("the global model is being aggregated; try again shortly"))?;
        let file = tokio::fs::File::open(&g.path).await.map_err(|e| {
            tracing::error!(path = %g.path.display(), error = %e, "cannot open the global model checkpoint");
            Status::internal("the server cannot read its global model; the study lead has been told in the server log")
        })?;
        // One chunk in flight per download: memory per site stays about 2 MiB.
        let (tx, rx) = mpsc::channel(1);
        let chunks = g.bytes.div_ceil(MAX_CHUNK_BYTES as u64) as u32;
        let header = pb::ModelPart {
            part: Some(pb::model_part::Part::Header(pb::ModelHeader {
                model_fingerprint: g.fingerprint().to_hex(),
                total_bytes: g.bytes,
                sha256: g.sha256.clone(),
                chunks,
            })),
        };
        let shared = Arc::clone(&self.shared);
        let sent = Entry {
            direction: Direction::Sent,
            peer: site,
            task: t.task_id.clone(),
            round: t.round,
            kind: "model",
            bytes: g.bytes,
            sha256: sha_bytes(&g.sha256),
        };
        self.shared.tracker.spawn(async move {
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            let chunk = |buf: Vec<u8>| pb::ModelPart { part: Some(pb::model_part::Part::Chunk(buf.into())) };
            let count = |n| {
                shared.bytes_out.fetch_add(n, Ordering::Relaxed);
            };
            let who = format!("site {} ({})", sent.peer, sent.task);
            let stall =
                transfer::Stall { after: Duration::from_secs(shared.study.federation.round_timeout_s), receiver: &who };
            if transfer::send_checkpoint(file, &g.path, g.bytes, &tx, chunk, count, stall).await {
                shared.audit.record(sent).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<pb::UploadPart>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let site = self.site(&req)?;
        let Some(_one) = self.shared.start_upload(&site) else {
            return Err(self.refuse(
                &site,
                Status::resource_exhausted(format!(
                    "an upload from site '{site}' is already in progress; a site sends one at a time"
                )),
            ));
        };
        let mut stream = req.into_inner();
        let result = self.receive_update(&site, &mut stream).await;
        result.map_err(|s| self.refuse(&site, s)).map(Response::new)
    }

    async fn report_evaluation(&self, req: Request<pb::EvaluationReport>) -> Result<Response<pb::Ack>, Status> {
        let site = self.site(&req)?;
        self.report_allowed(&site)?;
        let r = req.into_inner();
        let t = self.check_task_ref(r.task.as_ref()).map_err(|s| self.refuse(&site, s))?;
        self.shared.audit.record(message_entry(Direction::Received, &site, Some(&t), "evaluation", &r)).await;
        check_samples("num_samples", r.num_samples).map_err(|s| self.refuse(&site, s))?;
        let metrics = check_metrics(&r.metrics).map_err(|s| self.refuse(&site, s))?;
        let summary = crate::evaluation::decode_summary(&self.shared.study, &r.summary)
            .map_err(|e| self.refuse(&site, Status::invalid_argument(e.to_string())))?;
        lock(&self.shared.coord)
            .check_submission(&site, TaskKind::Evaluate, &t.task_id)
            .map_err(|r| self.refuse(&site, refusal_status(&r)))?;
        let rec = EvaluationRecord {
            round: t.round,
            task_id: t.task_id.clone(),
            site: site.clone(),
            samples: r.num_samples,
            metrics: metrics.clone(),
            summary,
        };
        let store = Arc::clone(&self.shared.store);
        let actions = {
            let mut coord = lock(&self.shared.coord);
            let res = SiteResult { samples: r.num_samples, metrics, bytes: 0 };
            let actions = coord
                .submission_accepted(&site, TaskKind::Evaluate, &t.task_id, res, Instant::now())
                .map_err(|r| self.refuse(&site, refusal_status(&r)))?;
            // Recorded while the coordinator is locked so a report is stored iff it was counted.
            if let Err(e) = lock(&store).record_evaluation(&rec) {
                tracing::error!(error = %e, "evaluation could not be recorded");
            }
            actions
        };
        tracing::info!(site, task = %t.task_id, n = r.num_samples, "evaluation received");
        self.shared.apply(actions);
        Ok(Response::new(pb::Ack { message: format!("evaluation for {} recorded", t.task_id) }))
    }

    async fn report_statistics(&self, req: Request<pb::StatisticsReport>) -> Result<Response<pb::Ack>, Status> {
        let site = self.site(&req)?;
        self.report_allowed(&site)?;
        let r = req.into_inner();
        let t = self.check_task_ref(r.task.as_ref()).map_err(|s| self.refuse(&site, s))?;
        self.shared.audit.record(message_entry(Direction::Received, &site, Some(&t), "statistics", &r)).await;
        lock(&self.shared.coord)
            .check_submission(&site, TaskKind::Statistics, &t.task_id)
            .map_err(|r| self.refuse(&site, refusal_status(&r)))?;
        let g = self
            .shared
            .global()
            .ok_or_else(|| self.refuse(&site, Status::unavailable("the server is pooling statistics; try again")))?;
        let groups = check_statistics(&r.groups, &g.layout).map_err(|s| self.refuse(&site, s))?;
        // Spooled like an update: the driver pools the files in site order once the task closes.
        let file = self.shared.spool.answer(&t.task_id, &site, Answer::Statistics);
        let bytes = standardisation::encode_sums(&groups);
        let written = tokio::fs::create_dir_all(self.shared.spool.task_dir(&t.task_id)).await.and(Ok(()));
        if let Err(e) =
            written.and_then(|()| fedhcc_core::pki::write_atomic(&file, &bytes, false).map_err(std::io::Error::other))
        {
            tracing::error!(error = %e, file = %file.display(), "statistics could not be spooled");
            return Err(Status::unavailable("the server could not store the statistics; try again"));
        }
        let actions = {
            let mut coord = lock(&self.shared.coord);
            let res = SiteResult { samples: 0, metrics: vec![], bytes: bytes.len() as u64 };
            coord.submission_accepted(&site, TaskKind::Statistics, &t.task_id, res, Instant::now())
        };
        let actions = match actions {
            Ok(a) => a,
            Err(refusal) => {
                let _ = tokio::fs::remove_file(&file).await;
                return Err(self.refuse(&site, refusal_status(&refusal)));
            }
        };
        tracing::info!(site, task = %t.task_id, groups = groups.len(), "feature statistics received");
        self.shared.apply(actions);
        Ok(Response::new(pb::Ack { message: format!("statistics for {} recorded", t.task_id) }))
    }

    async fn refuse_task(&self, req: Request<pb::TaskRefusal>) -> Result<Response<pb::Ack>, Status> {
        let site = self.site(&req)?;
        self.report_allowed(&site)?;
        let r = req.into_inner();
        let t = self.check_task_ref(r.task.as_ref()).map_err(|s| self.refuse(&site, s))?;
        self.shared.audit.record(message_entry(Direction::Received, &site, Some(&t), "task_refusal", &r)).await;
        check_refusal(&r.rule, &r.message).map_err(|s| self.refuse(&site, s))?;
        let actions = lock(&self.shared.coord)
            .site_declined(&site, &t.task_id, &format!("{}: {}", r.rule, r.message), Instant::now())
            .map_err(|refusal| self.refuse(&site, refusal_status(&refusal)))?;
        tracing::warn!(site, task = %t.task_id, rule = %r.rule, reason = %r.message, "task declined by the site's policy");
        self.shared.declined(&site, &t.task_id, &r.rule, &r.message);
        self.shared.apply(actions);
        Ok(Response::new(pb::Ack { message: format!("{} declined by {site}: noted", t.task_id) }))
    }

    async fn advertise_key(&self, req: Request<pb::KeyAdvertisement>) -> Result<Response<pb::Ack>, Status> {
        let site = self.site(&req)?;
        self.report_allowed(&site)?;
        let r = req.into_inner();
        self.shared.audit.record(message_entry(Direction::Received, &site, r.task.as_ref(), "key", &r)).await;
        self.advertise_key_checked(&site, r).await.map_err(|s| self.refuse(&site, s)).map(Response::new)
    }

    async fn await_roster(&self, req: Request<pb::TaskRef>) -> Result<Response<pb::KeyRoster>, Status> {
        let site = self.site(&req)?;
        let roster = self.await_roster_checked(&site, req.into_inner()).await.map_err(|s| self.refuse(&site, s))?;
        self.shared.audit.record(message_entry(Direction::Sent, &site, roster.task.as_ref(), "roster", &roster)).await;
        Ok(Response::new(roster))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let id = self.identity(&req)?;
        if id.role != Role::Admin {
            tracing::warn!(peer = %id.name, "refused: status needs an admin certificate");
            self.shared.refused(None, RefusalReason::NotAdmin, &format!("status asked for by '{}'", id.name));
            return Err(Status::permission_denied(format!(
                "'{}' holds a {} certificate; status needs the study lead's admin certificate",
                id.name,
                match id.role {
                    Role::Site => "site",
                    Role::Server => "server",
                    Role::Admin => "admin",
                }
            )));
        }
        Ok(Response::new(crate::status_reply(&self.shared)))
    }
}

/// A statistics report's groups, checked: exactly the model's groups with their widths, sane
/// sums, and no cell below [`MIN_CELL`] (it would reveal a patient's value).
///
/// # Errors
/// `INVALID_ARGUMENT` saying which group or column is wrong.
pub fn check_statistics(groups: &[pb::FeatureSums], layout: &Layout) -> Result<Vec<GroupSums>, Status> {
    if groups.len() > MAX_STAT_GROUPS {
        return Err(Status::invalid_argument(format!(
            "{} statistics groups (at most {MAX_STAT_GROUPS})",
            groups.len()
        )));
    }
    let expected = standardisation::groups(layout);
    let mut out = Vec::with_capacity(groups.len());
    for (want, width) in &expected {
        let g = groups
            .iter()
            .find(|g| &g.group == want)
            .ok_or_else(|| Status::invalid_argument(format!("the statistics lack the model's group '{want}'")))?;
        if g.columns.len() != *width || g.columns.len() > MAX_STAT_COLUMNS {
            return Err(Status::invalid_argument(format!(
                "statistics group '{want}' has {} columns; the model's has {width}",
                g.columns.len()
            )));
        }
        for c in &g.columns {
            check_str("statistics column", c)?;
        }
        let sums = GroupSums {
            group: g.group.clone(),
            columns: g.columns.clone(),
            sum: g.sum.clone(),
            sum_sq: g.sum_sq.clone(),
            count: g.count.clone(),
        };
        sums.check().map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(k) = (0..sums.columns.len()).find(|&k| sums.count[k] > 0 && sums.count[k] < MIN_CELL) {
            return Err(Status::invalid_argument(format!(
                "statistics group '{want}' column '{}' counts {} values; cells under {MIN_CELL} must be suppressed \
                 at the site",
                sums.columns[k], sums.count[k]
            )));
        }
        out.push(sums);
    }
    if groups.len() != expected.len() {
        return Err(Status::invalid_argument(format!(
            "the statistics hold {} groups; the model has {}",
            groups.len(),
            expected.len()
        )));
    }
    Ok(out)
}

/// A task refusal's rule (one of the site-policy rules) and message (bounded text).
///
/// # Errors
/// `INVALID_ARGUMENT` saying what is wrong.
pub fn check_refusal(rule: &str, message: &str) -> Result<(), Status> {
    check_text("rule", rule, MAX_RULE_LEN)?;
    check_text("message", message, MAX_REFUSAL_MESSAGE_LEN)?;
    const RULES: [PolicyRule; 7] = [
        PolicyRule::TaskKind,
        PolicyRule::ModelFingerprint,
        PolicyRule::MaxRounds,
        PolicyRule::SecureAggregation,
        PolicyRule::DifferentialPrivacy,
        PolicyRule::PrivacyBudget,
        PolicyRule::MinGroupSize,
    ];
    if !RULES.iter().any(|r| r.as_str() == rule) {
        let known: Vec<&str> = RULES.iter().map(|r| r.as_str()).collect();
        return Err(Status::invalid_argument(format!(
            "'{rule}' is not a site-policy rule (one of: {})",
            known.join(", ")
        )));
    }
    if message.trim().is_empty() {
        return Err(Status::invalid_argument("a task refusal must say why (message is empty)"));
    }
    Ok(())
}

/// A report's metrics: at most [`MAX_METRICS`], bounded names, finite values.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the metric.
pub fn check_metrics(ms: &[pb::Metric]) -> Result<Vec<(String, f64)>, Status> {
    if ms.len() > MAX_METRICS {
        return Err(Status::invalid_argument(format!("{} metrics (at most {MAX_METRICS})", ms.len())));
    }
    ms.iter()
        .map(|m| {
            check_str("metric name", &m.name)?;
            if !m.value.is_finite() {
                return Err(Status::invalid_argument(format!("metric '{}' is not a finite number", m.name)));
            }
            Ok((m.name.clone(), m.value))
        })
        .collect()
}

impl FederationService {
    async fn receive_update(
        &self,
        site: &str,
        stream: &mut Streaming<pb::UploadPart>,
    ) -> Result<pb::UploadReply, Status> {
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("the upload is empty"))?;
        let Some(pb::upload_part::Part::Header(h)) = first.part else {
            return Err(Status::invalid_argument("an upload must start with its header"));
        };
        let t = self.check_task_ref(h.task.as_ref())?;
        if let secagg::UploadKind::Masked = secagg::upload_kind(&self.shared.study, &h)? {
            return self.receive_masked(site, stream, h, t).await;
        }
        let metrics = transfer::check_header_fields(&h)?;
        lock(&self.shared.coord).check_submission(site, TaskKind::Train, &t.task_id).map_err(|r| refusal_status(&r))?;
        let g = self
            .shared
            .global()
            .ok_or_else(|| Status::unavailable("the server is aggregating; the round has closed"))?;
        let expected = g.layout.payload_len() as u64;
        let counted = format!("a model of this layout is {expected} bytes");
        let want_chunks = self.check_header("update", &h, &g, expected, &counted)?;

        let check = PayloadCheck { reader: PayloadReader::new(), layout: &g.layout };
        let file = transfer::spool_upload(
            self.shared.spool.slot(&t.task_id, site, Answer::Update),
            stream,
            &h,
            want_chunks,
            check,
        )
        .await?;
        let result = SiteResult { samples: h.num_samples, metrics, bytes: file.bytes };
        let up = transfer::Spooled { task: &t, file, result, sha256: &h.sha256, what: "update" };
        self.commit_upload(site, up, |coord| coord.check_submission(site, TaskKind::Train, &t.task_id)).await
    }
}

/// A plain update's chunks: an f32 payload of the study model's layout, every value finite.
struct PayloadCheck<'a> {
    reader: PayloadReader,
    layout: &'a Layout,
}

impl transfer::ChunkCheck for PayloadCheck<'_> {
    fn chunk(&mut self, chunk: &[u8]) -> Result<(), Status> {
        self.reader.push(chunk, |_, _| {}).map_err(|e| payload_status(&e))?;
        if let Some(l) = self.reader.layout()
            && l.fingerprint() != self.layout.fingerprint()
        {
            return Err(Status::failed_precondition(format!(
                "the payload's layout {} does not match the study model {}",
                l.fingerprint(),
                self.layout.fingerprint()
            )));
        }
        Ok(())
    }

    fn end(self) -> Result<(), Status> {
        self.reader.finish().map_err(|e| payload_status(&e))
    }
}

fn payload_status(e: &ParamsError) -> Status {
    Status::invalid_argument(format!("the update is not acceptable: {e}"))
}

fn spool_error(path: &std::path::Path, e: std::io::Error) -> Status {
    tracing::error!(path = %path.display(), error = %e, "spool write failed");
    Status::internal("the server could not store the update; the study lead has been told in the server log")
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_code_has_its_metrics_reason() {
        assert_eq!(refusal_reason(tonic::Code::AlreadyExists), RefusalReason::Duplicate);
        assert_eq!(refusal_reason(tonic::Code::DataLoss), RefusalReason::Checksum);
        assert_eq!(refusal_reason(tonic::Code::OutOfRange), RefusalReason::Malformed);
        assert_eq!(refusal_reason(tonic::Code::Internal), RefusalReason::Other);
    }
    use fedhcc_core::params::ParameterSet;
    use fedhcc_core::standardisation::unset_tensors;

    fn layout() -> Layout {
        let mut t = vec![("w".to_string(), vec![1], vec![0.0])];
        t.extend(unset_tensors(&[("clinical", 2)]));
        ParameterSet::from_tensors(t).unwrap().layout().clone()
    }

    fn sums(count: [u64; 2]) -> pb::FeatureSums {
        pb::FeatureSums {
            group: "clinical".into(),
            columns: vec!["afp".into(), "alb".into()],
            sum: vec![10.0, 20.0],
            sum_sq: vec![30.0, 90.0],
            count: count.to_vec(),
        }
    }

    #[test]
    fn statistics_reports_are_checked_against_the_model_and_the_smallest_cell() {
        let l = layout();
        assert_eq!(check_statistics(&[sums([5, 0])], &l).unwrap()[0].count, vec![5, 0]);
        let small = check_statistics(&[sums([5, 1])], &l).unwrap_err();
        assert!(small.message().contains("cells under 5"), "{}", small.message());
        let mut wide = sums([5, 5]);
        wide.columns.push("x".into());
        assert!(check_statistics(&[wide], &l).unwrap_err().message().contains("columns"));
        let mut other = sums([5, 5]);
        other.group = "wsi".into();
        assert!(check_statistics(&[other], &l).unwrap_err().message().contains("lack the model's group 'clinical'"));
        assert!(check_statistics(&[sums([5, 5]), sums([5, 5])], &l).is_err(), "a duplicate group");
        let mut nan = sums([5, 5]);
        nan.sum[0] = f64::NAN;
        assert!(check_statistics(&[nan], &l).unwrap_err().message().contains("non-finite"));
        let mut short = sums([5, 5]);
        short.count.pop();
        assert!(check_statistics(&[short], &l).is_err());
    }
}
