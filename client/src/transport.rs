//! The client's side of the wire: the mutual-TLS channel, every RPC a site or the study lead
//! makes, and the conversion between the wire's messages and the task loop's values
//! ([`crate::task`]). With the server's service layer, the only place prost and tonic are used.
//!
//! A site talks through a [`Connection`]; what it sends goes out as an [`Outgoing`] message whose
//! bytes the audit log records first. The study lead's commands go through [`Admin`].
//!
//! The TLS connection is made here, not by tonic: tonic's client TLS offers TLS 1.2 as well and
//! has no setting to turn it off, so [`connect`] dials TCP, runs a TLS 1.3-only handshake
//! ([`fedhcc_core::pki::client_config`], which also refuses an expired certificate of ours or of
//! the study CA) and hands the finished stream to tonic.

use crate::task::{
    AuditEntry, EvaluateTask, FixedPointSettings, Joined, MaskedHeader, Received, RosterReply, StatisticsTask,
    TaskEvent, TaskRef, TrainTask,
};
use fedhcc_core::params::{Fingerprint, ParameterSet, PayloadReader, sha256_hex};
use fedhcc_core::pki::{ClientTlsFiles, PkiError};
use fedhcc_core::standardisation::GroupSums;
use fedhcc_proto as pb;
pub use fedhcc_proto::MAX_CHUNK_BYTES;

mod admin;
mod channel;
pub use admin::{Admin, AdminAnswer, Exported, RunControl};
pub use channel::{connect, connect_admin};
use fedhcc_proto::chunks::{ChunkError, ChunkReceiver};
use pb::federation_client::FederationClient;
use prost::Message as _;
use tonic::transport::Channel;

/// A failure talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {source}")]
    Files { path: std::path::PathBuf, source: std::io::Error },
    #[error("server address '{0}' is not valid")]
    Address(String),
    #[error("cannot connect to the server: {}", causes(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the server refused: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    #[error("the model received is damaged: {0}")]
    Damaged(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] PkiError),
    #[error("{0}")]
    Sink(std::io::Error),
}

/// An error with its causes, outermost first ("transport error: … : invalid peer certificate:
/// Revoked"), so that an operator sees why a connection failed.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = c.source();
    }
    out
}

/// Why the server did not take a request (the kinds the task loop acts on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Already counted (a task resent after a reconnect): nothing to redo.
    AlreadyCounted,
    /// The task or round has closed meanwhile: the next task will come.
    TaskClosed,
    /// The request itself was refused as invalid.
    Invalid,
    /// Any other refusal.
    Other,
}

impl TransportError {
    /// Whether trying again later could help (network trouble, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Connect(_) => true,
            TransportError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Internal
                    // Joined too often: the server's rate limit; the backoff waits it out.
                    | tonic::Code::ResourceExhausted
            ),
            TransportError::Damaged(_) => true,
            _ => false,
        }
    }

    /// When the server answered with a refusal: which kind, and the server's message.
    pub fn refused(&self) -> Option<(Refused, &str)> {
        let TransportError::Status(s) = self else { return None };
        let kind = match s.code() {
            tonic::Code::AlreadyExists => Refused::AlreadyCounted,
            tonic::Code::FailedPrecondition => Refused::TaskClosed,
            tonic::Code::InvalidArgument => Refused::Invalid,
            _ => Refused::Other,
        };
        Some((kind, s.message()))
    }
}

/// Where and how to reach the server.
#[derive(Clone, Debug)]
pub struct ServerTarget {
    pub url: String,
    pub server_name: String,
    pub tls: ClientTlsFiles,
}

/// Downloads the global model of a task and checks its length, SHA-256 and layout fingerprint.
///
/// # Errors
/// A refused request, a broken stream, or a model that does not match its header.
pub async fn download(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    expect_sha: &str,
) -> Result<(ParameterSet, u64), TransportError> {
    download_digest(client, task, expect_sha).await.map(|(p, n, _)| (p, n))
}

/// [`download`], also returning the SHA-256 of the payload received (for the audit log).
///
/// # Errors
/// As [`download`].
pub async fn download_digest(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    expect_sha: &str,
) -> Result<(ParameterSet, u64, [u8; 32]), TransportError> {
    let mut stream = client.download_model(task).await?.into_inner();
    let header = match stream.message().await? {
        Some(pb::ModelPart { part: Some(pb::model_part::Part::Header(h)) }) => h,
        _ => return Err(TransportError::Damaged("the download did not start with a header".into())),
    };
    if !expect_sha.is_empty() && header.sha256 != expect_sha {
        return Err(TransportError::Damaged(format!(
            "the server offers model {} but the task named {expect_sha}",
            header.sha256
        )));
    }
    let total = usize::try_from(header.total_bytes).map_err(|_| TransportError::Damaged("model too large".into()))?;
    if total > fedhcc_core::params::MAX_PARAMS * 4 + fedhcc_core::params::MAX_HEADER_LEN {
        return Err(TransportError::Damaged(format!(
            "the model declares {total} bytes, more than this client accepts"
        )));
    }
    // Decoded as it arrives, straight into the model's values: one model-sized allocation.
    let mut reader = PayloadReader::new();
    let mut values: Vec<f32> = Vec::with_capacity(total / 4);
    let mut receiver = ChunkReceiver::new(header.total_bytes, None);
    let damaged = |e: ChunkError| TransportError::Damaged(format!("the model download was refused: {e}"));
    while let Some(part) = stream.message().await? {
        let Some(pb::model_part::Part::Chunk(c)) = part.part else {
            return Err(TransportError::Damaged("a second header inside the download".into()));
        };
        receiver.accept(&c).map_err(damaged)?;
        reader
            .push(&c, |off, vals| {
                debug_assert_eq!(off, values.len());
                values.extend_from_slice(vals);
            })
            .map_err(|e| TransportError::Damaged(e.to_string()))?;
    }
    let digest = receiver.finish(&header.sha256).map_err(damaged)?;
    reader.finish().map_err(|e| TransportError::Damaged(e.to_string()))?;
    let layout = reader.layout().cloned().ok_or_else(|| TransportError::Damaged("no model header".into()))?;
    let params = ParameterSet::new(layout, values).map_err(|e| TransportError::Damaged(e.to_string()))?;
    if params.fingerprint().to_hex() != header.model_fingerprint {
        return Err(TransportError::Damaged("the model's layout differs from its header".into()));
    }
    Ok((params, total as u64, digest))
}

/// Uploads an update (a delta) as a header and chunks of at most 1 MiB.
///
/// # Errors
/// A refused or broken upload.
pub async fn upload(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    delta: &ParameterSet,
    num_samples: u64,
    metrics: Vec<(String, f64)>,
) -> Result<u64, TransportError> {
    let payload = bytes::Bytes::from(delta.encode());
    let header = update_header(task, delta, num_samples, &payload, metrics);
    send_update(client, header, payload).await
}

/// The header of a plain update (`payload`: the delta's encoding).
fn update_header(
    task: pb::TaskRef,
    delta: &ParameterSet,
    num_samples: u64,
    payload: &[u8],
    m: Vec<(String, f64)>,
) -> pb::UpdateHeader {
    pb::UpdateHeader {
        task: Some(task),
        model_fingerprint: delta.fingerprint().to_hex(),
        num_samples,
        total_bytes: payload.len() as u64,
        sha256: sha256_hex(payload),
        chunks: payload.len().div_ceil(MAX_CHUNK_BYTES) as u32,
        metrics: metrics(m),
        encoding: String::new(),
        roster_digest: Default::default(),
        encoded_weight: 0,
    }
}

/// `payload` in chunks of at most 1 MiB.
fn chunk_parts(payload: bytes::Bytes) -> impl Iterator<Item = pb::UploadPart> {
    (0..payload.len().div_ceil(MAX_CHUNK_BYTES)).map(move |i| {
        let end = ((i + 1) * MAX_CHUNK_BYTES).min(payload.len());
        pb::UploadPart { part: Some(pb::upload_part::Part::Chunk(payload.slice(i * MAX_CHUNK_BYTES..end))) }
    })
}

/// Sends an upload: the header, then the payload's chunks.
async fn send_update(
    client: &mut FederationClient<Channel>,
    header: pb::UpdateHeader,
    payload: bytes::Bytes,
) -> Result<u64, TransportError> {
    let n = payload.len() as u64;
    let first = pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) };
    client.upload_update(tokio_stream::iter(std::iter::once(first).chain(chunk_parts(payload)))).await?;
    Ok(n)
}

// ---- The wire's messages ↔ the task loop's values ----

impl From<pb::TaskRef> for TaskRef {
    fn from(t: pb::TaskRef) -> Self {
        Self { study_id: t.study_id, run_id: t.run_id, round: t.round, task_id: t.task_id }
    }
}

impl From<&TaskRef> for pb::TaskRef {
    fn from(t: &TaskRef) -> Self {
        Self { study_id: t.study_id.clone(), run_id: t.run_id.clone(), round: t.round, task_id: t.task_id.clone() }
    }
}

/// A task's reference, which every task must carry.
fn task_ref(t: Option<pb::TaskRef>) -> Result<TaskRef, TransportError> {
    t.map(TaskRef::from).ok_or_else(|| TransportError::Damaged("a task without its reference".into()))
}

impl TryFrom<pb::TrainTask> for TrainTask {
    type Error = TransportError;
    fn try_from(t: pb::TrainTask) -> Result<Self, TransportError> {
        let task = task_ref(t.task)?;
        Ok(Self {
            spec: crate::TrainSpec {
                round: task.round,
                total_rounds: t.total_rounds,
                local_epochs: t.local_epochs,
                batch_size: t.batch_size,
                learning_rate: t.learning_rate,
                weight_decay: t.weight_decay,
                prox_mu: t.prox_mu,
                seed: t.seed,
            },
            task,
            model_fingerprint: t.model_fingerprint,
            model_bytes: t.model_bytes,
            model_sha256: t.model_sha256,
            secure_aggregation: t.secure_aggregation,
            dp_noise_multiplier: t.dp_noise_multiplier,
            dp_delta: t.dp_delta,
            fixed_point: t.fixed_point.map(|p| FixedPointSettings {
                clip: p.clip,
                scale: p.scale,
                max_weight: p.max_weight,
                max_sites: p.max_sites,
            }),
            dp_l2_clip: t.dp_l2_clip,
        })
    }
}

impl From<pb::KeyRoster> for RosterReply {
    fn from(r: pb::KeyRoster) -> Self {
        Self {
            task_id: r.task.map(|t| t.task_id),
            members: r.members.into_iter().map(|m| (m.site_id, m.public_key.to_vec())).collect(),
            digest: r.digest.to_vec(),
        }
    }
}

/// A task event from the wire, with what the audit log records of it (the event's own bytes).
fn received(ev: pb::TaskEvent) -> Received {
    use pb::task_event::Event;
    let audit = ev.audit_kind().map(|(kind, t)| AuditEntry {
        kind,
        task_id: t.map(|t| t.task_id.clone()).unwrap_or_default(),
        round: t.map_or(0, |t| t.round),
        bytes: ev.encode_to_vec(),
    });
    let event = match ev.event {
        None | Some(Event::Heartbeat(_)) => Ok(TaskEvent::Heartbeat),
        Some(Event::Finished(f)) => {
            Ok(TaskEvent::Finished { rounds_completed: f.rounds_completed, final_model_sha256: f.final_model_sha256 })
        }
        Some(Event::Train(t)) => TrainTask::try_from(t).map(TaskEvent::Train),
        Some(Event::Evaluate(t)) => task_ref(t.task).map(|task| {
            TaskEvent::Evaluate(EvaluateTask {
                task,
                model_fingerprint: t.model_fingerprint,
                model_bytes: t.model_bytes,
                model_sha256: t.model_sha256,
                split: t.split,
            })
        }),
        Some(Event::Statistics(t)) => task_ref(t.task)
            .map(|task| TaskEvent::Statistics(StatisticsTask { task, model_fingerprint: t.model_fingerprint })),
    };
    Received { event, audit }
}

fn metrics(m: Vec<(String, f64)>) -> Vec<pb::Metric> {
    m.into_iter().map(|(name, value)| pb::Metric { name, value }).collect()
}

/// A message a site is about to send, in its wire form: [`Outgoing::bytes`] is what the audit log
/// records before it leaves.
#[derive(Clone, Debug)]
pub struct Outgoing<M>(M);

impl<M: prost::Message> Outgoing<M> {
    /// The message's bytes, as they go on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.encode_to_vec()
    }
}

/// Joining the study: this site's model layout and training samples.
pub fn join_request(study_id: &str, fingerprint: Option<Fingerprint>, num_samples: u64) -> Outgoing<pb::JoinRequest> {
    Outgoing(pb::JoinRequest {
        study_id: study_id.to_string(),
        client_version: pb::PROTOCOL_VERSION.into(),
        model_fingerprint: fingerprint.map(|f| f.to_hex()).unwrap_or_default(),
        num_samples,
    })
}

/// A task declined under the site's policy (`rule`, and the message the site's policy lets out).
pub fn refusal(task: &TaskRef, rule: &str, message: String) -> Outgoing<pb::TaskRefusal> {
    Outgoing(pb::TaskRefusal { task: Some(task.into()), rule: rule.to_string(), message })
}

/// The training split's feature sums (aggregates, small cells already suppressed).
pub fn statistics_report(task: &TaskRef, groups: Vec<GroupSums>) -> Outgoing<pb::StatisticsReport> {
    Outgoing(pb::StatisticsReport {
        task: Some(task.into()),
        groups: groups
            .into_iter()
            .map(|g| pb::FeatureSums {
                group: g.group,
                columns: g.columns,
                sum: g.sum,
                sum_sq: g.sum_sq,
                count: g.count,
            })
            .collect(),
    })
}

/// An evaluation's aggregate metrics and its encoded summary (empty: none).
pub fn evaluation_report(
    task: &TaskRef,
    num_samples: u64,
    m: Vec<(String, f64)>,
    summary: Vec<u8>,
) -> Outgoing<pb::EvaluationReport> {
    Outgoing(pb::EvaluationReport {
        task: Some(task.into()),
        num_samples,
        metrics: metrics(m),
        summary: summary.into(),
    })
}

impl Outgoing<pb::EvaluationReport> {
    /// Whether the report carries a summary.
    pub fn has_summary(&self) -> bool {
        !self.0.summary.is_empty()
    }

    /// The same report without its summary (the metrics alone).
    #[must_use]
    pub fn without_summary(&self) -> Self {
        Outgoing(pb::EvaluationReport { summary: Default::default(), ..self.0.clone() })
    }
}

/// Secure aggregation: this site's public key for one task.
pub fn key_advertisement(task: &TaskRef, public_key: [u8; 32]) -> Outgoing<pb::KeyAdvertisement> {
    Outgoing(pb::KeyAdvertisement { task: Some(task.into()), public_key: public_key.to_vec().into() })
}

/// A site's connection to the server: every RPC of the task loop.
pub struct Connection {
    client: FederationClient<Channel>,
}

/// A site's task stream (`WaitTask`).
pub struct TaskStream(tonic::Streaming<pb::TaskEvent>);

impl TaskStream {
    /// The next event; `None` when the server closed the stream. The event is an error when the
    /// server sent a task without its reference (the audit entry is still given).
    ///
    /// # Errors
    /// A broken stream.
    pub async fn next(&mut self) -> Result<Option<Received>, TransportError> {
        Ok(self.0.message().await?.map(received))
    }
}

impl Connection {
    /// Opens a mutual-TLS (1.3 only) connection (see [`connect`]).
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn open(target: &ServerTarget) -> Result<Self, TransportError> {
        Ok(Self { client: connect(target).await? })
    }

    /// Joins the study; the server answers with its run and round.
    ///
    /// # Errors
    /// A refusal (another study, a model layout the server does not train, not on the allow-list).
    pub async fn join(&mut self, request: Outgoing<pb::JoinRequest>) -> Result<Joined, TransportError> {
        let j = self.client.join(request.0).await?.into_inner();
        Ok(Joined {
            study_id: j.study_id,
            run_id: j.run_id,
            current_round: j.current_round,
            total_rounds: j.total_rounds,
        })
    }

    /// Opens the task stream of `run_id`.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn tasks(&mut self, study_id: &str, run_id: &str) -> Result<TaskStream, TransportError> {
        let request = pb::WaitTaskRequest { study_id: study_id.to_string(), run_id: run_id.to_string() };
        Ok(TaskStream(self.client.wait_task(request).await?.into_inner()))
    }

    /// Reports a task declined under the site's policy.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn refuse_task(&mut self, m: Outgoing<pb::TaskRefusal>) -> Result<(), TransportError> {
        self.client.refuse_task(m.0).await?;
        Ok(())
    }

    /// Sends the feature sums of a statistics task.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn report_statistics(&mut self, m: Outgoing<pb::StatisticsReport>) -> Result<(), TransportError> {
        self.client.report_statistics(m.0).await?;
        Ok(())
    }

    /// Sends an evaluation's results.
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn report_evaluation(&mut self, m: &Outgoing<pb::EvaluationReport>) -> Result<(), TransportError> {
        self.client.report_evaluation(m.0.clone()).await?;
        Ok(())
    }

    /// Secure aggregation: advertises this site's public key for a task.
    ///
    /// # Errors
    /// A refusal (the key exchange has closed) or a broken connection.
    pub async fn advertise_key(&mut self, m: Outgoing<pb::KeyAdvertisement>) -> Result<(), TransportError> {
        self.client.advertise_key(m.0).await?;
        Ok(())
    }

    /// Downloads a task's model (see [`download_digest`]).
    ///
    /// # Errors
    /// As [`download_digest`].
    pub async fn download(
        &mut self,
        task: &TaskRef,
        expect_sha: &str,
    ) -> Result<(ParameterSet, u64, [u8; 32]), TransportError> {
        download_digest(&mut self.client, task.into(), expect_sha).await
    }

    /// Uploads an update in the clear (see [`upload`]).
    ///
    /// # Errors
    /// As [`upload`].
    pub async fn upload(
        &mut self,
        task: &TaskRef,
        delta: &ParameterSet,
        num_samples: u64,
        m: Vec<(String, f64)>,
    ) -> Result<u64, TransportError> {
        upload(&mut self.client, task.into(), delta, num_samples, m).await
    }

    /// Secure aggregation: waits for the task's roster (the server answers once the key exchange
    /// has closed), with the reply's bytes for the audit log.
    ///
    /// # Errors
    /// A refused request (the task closed, or the roster was fixed without this site) or a broken
    /// connection.
    pub async fn await_roster(&mut self, task: &TaskRef) -> Result<(RosterReply, Vec<u8>), TransportError> {
        let reply = self.client.await_roster(pb::TaskRef::from(task)).await?.into_inner();
        if reply.members.len() > fedhcc_proto::MAX_ROSTER_SITES {
            return Err(TransportError::Damaged(format!(
                "the roster has {} sites, more than the protocol's {}",
                reply.members.len(),
                fedhcc_proto::MAX_ROSTER_SITES
            )));
        }
        let bytes = reply.encode_to_vec();
        Ok((reply.into(), bytes))
    }

    /// Uploads a masked update (`secagg-u64`) in chunks of at most 1 MiB.
    ///
    /// # Errors
    /// A refused or broken upload.
    pub async fn upload_masked(&mut self, header: &MaskedHeader, payload: bytes::Bytes) -> Result<u64, TransportError> {
        let header = pb::UpdateHeader {
            task: Some((&header.task).into()),
            model_fingerprint: header.model_fingerprint.clone(),
            num_samples: header.num_samples,
            total_bytes: payload.len() as u64,
            sha256: header.sha256.clone(),
            chunks: payload.len().div_ceil(MAX_CHUNK_BYTES) as u32,
            metrics: metrics(header.metrics.clone()),
            encoding: fedhcc_proto::ENCODING_SECAGG_U64.into(),
            roster_digest: header.roster_digest.clone().into(),
            encoded_weight: header.encoded_weight,
        };
        send_update(&mut self.client, header, payload).await
    }

    /// An upload that stops after its header and `chunks` chunks and keeps the stream open: what
    /// the server sees of a site whose link dies mid-upload (`fedhcc bench drills`). Dropping or
    /// aborting the handle ends it.
    ///
    /// # Errors
    /// A stream that could not be started.
    pub async fn upload_stalled(
        &mut self,
        task: &TaskRef,
        delta: &ParameterSet,
        num_samples: u64,
        chunks: usize,
    ) -> Result<tokio::task::JoinHandle<()>, TransportError> {
        let payload = bytes::Bytes::from(delta.encode());
        let header = update_header(task.into(), delta, num_samples, &payload, Vec::new());
        let (tx, rx) = tokio::sync::mpsc::channel(chunks + 1);
        let parts = std::iter::once(pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) })
            .chain(chunk_parts(payload).take(chunks));
        for part in parts {
            tx.send(part).await.map_err(|_| TransportError::Damaged("the upload stream closed".into()))?;
        }
        let mut client = self.client.clone();
        Ok(tokio::spawn(async move {
            let _ = client.upload_update(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
            drop(tx);
        }))
    }

    /// A download that reads the header and then nothing more, holding the stream open: what the
    /// server sees of a site that stalls mid-download (`fedhcc bench drills`). Dropping the handle
    /// ends it.
    ///
    /// # Errors
    /// A refused request or a broken stream.
    pub async fn download_stalled(&mut self, task: &TaskRef) -> Result<StalledDownload, TransportError> {
        let mut stream = self.client.download_model(pb::TaskRef::from(task)).await?.into_inner();
        stream.message().await?;
        Ok(StalledDownload(stream))
    }

    /// The server's status (the study lead's `fedhcc status`; the admin certificate is needed).
    ///
    /// # Errors
    /// A refusal or a broken connection.
    pub async fn status(&mut self) -> Result<pb::StatusReply, TransportError> {
        Ok(self.client.status(pb::StatusRequest {}).await?.into_inner())
    }
}

/// A download held open after its header ([`Connection::download_stalled`]).
pub struct StalledDownload(#[allow(dead_code)] tonic::Streaming<pb::ModelPart>);
