//! fedhcc-client: a site's client. It dials out to the server over mutual TLS, waits for tasks,
//! runs them with an [`Executor`] (local training and evaluation on the site's own data) and
//! returns only weights deltas and aggregate metrics. It reconnects with exponential backoff and
//! jitter, so a server restart or a network outage only delays it.
//!
//! - [`transport`]: TLS channel, chunked download/upload (the only place prost types are used).
//! - [`local_layers`]: FedBN, an executor wrapper that keeps normalisation layers at the site.
//! - [`secagg`]: secure aggregation at the site (key pair per task, DP clipping and noise, fixed
//!   point, pairwise masks); the server sees only masked words.
//! - [`site_policy`]: the site's `[policy]` applied to every task before it runs; a declined task
//!   is logged here and reported to the server (`RefuseTask`), and the client goes on waiting.
//! - [`audit`]: `state_dir/audit.jsonl`, every message carrying task data, sent or received.
//! - [`run`]: the task loop.

pub mod audit;
pub mod local_layers;
pub mod secagg;
pub mod site_policy;
pub mod status;
pub mod transport;

use fedhcc_core::params::{Fingerprint, ParameterSet};
use fedhcc_core::standardisation::GroupSums;
use fedhcc_proto as pb;
use fedhcc_secure::audit::Direction;
use fedhcc_secure::policy::TaskKind;
use prost::Message as _;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
pub use transport::{ServerTarget, TransportError};

/// Hyper-parameters of a train task, as the executor sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSpec {
    pub round: u32,
    pub total_rounds: u32,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub prox_mu: f64,
    pub seed: u64,
}

/// What local training returns.
#[derive(Clone, Debug)]
pub struct TrainResult {
    /// The locally trained weights (the client sends their delta against the global model).
    pub params: ParameterSet,
    /// FedAvg weight.
    pub num_samples: u64,
    /// Aggregate metrics only, e.g. `train_loss`.
    pub metrics: Vec<(String, f64)>,
}

/// What an evaluation returns: aggregate metrics only, never per-patient values.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub num_samples: u64,
    pub metrics: Vec<(String, f64)>,
    /// The site's evaluation summary (its own statistics, score histograms, survival counts, under
    /// its minimum cell size); `None` when the executor makes none.
    pub summary: Option<fedhcc_stats::federated::SiteEvaluation>,
}

/// Lets a long task notice that it should stop, and report how far it is (shown in
/// `status.json` while it runs).
#[derive(Clone, Debug, Default)]
pub struct TaskControl {
    cancelled: Arc<AtomicBool>,
    /// (done, total) in units of work, e.g. epochs; total 0 = nothing reported.
    progress: Arc<(AtomicU64, AtomicU64)>,
}

impl TaskControl {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
    /// Notes that `done` of `total` units of work (epochs) are finished.
    pub fn report_progress(&self, done: u64, total: u64) {
        self.progress.0.store(done.min(total), Ordering::Relaxed);
        self.progress.1.store(total, Ordering::Relaxed);
    }
    /// The last progress reported: (done, total).
    pub fn progress(&self) -> Option<(u64, u64)> {
        let total = self.progress.1.load(Ordering::Relaxed);
        (total > 0).then(|| (self.progress.0.load(Ordering::Relaxed), total))
    }
}

/// A failure inside local work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExecutorError(pub String);

/// Local work at a site (FLARE's Executor): a task in, a result out. Runs on a blocking thread.
pub trait Executor: Send + 'static {
    /// Layout of the model this site trains, to be checked against the server's at join.
    fn fingerprint(&self) -> Option<Fingerprint>;
    /// Training samples at this site (sent at join; used as the FedAvg weight).
    fn num_samples(&self) -> u64;
    /// Trains locally starting from `global`.
    ///
    /// # Errors
    /// The data or model cannot be used; the reason goes to the site's log.
    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError>;
    /// Evaluates `global` on the named split (`test` or `val`).
    ///
    /// # Errors
    /// The data or model cannot be used.
    fn evaluate(&mut self, global: &ParameterSet, split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError>;
    /// This site's training-split sums, sums of squares and counts per input group, for the
    /// study's pooled standardisation (`fedhcc_core::standardisation`): aggregates only, small
    /// cells already suppressed. The default (a model without standardisation) has none.
    ///
    /// # Errors
    /// The data cannot be summarised.
    fn statistics(&mut self) -> Result<Vec<GroupSums>, ExecutorError> {
        Ok(Vec::new())
    }
}

/// A boxed executor is an executor (for callers that choose one at run time).
impl Executor for Box<dyn Executor> {
    fn fingerprint(&self) -> Option<Fingerprint> {
        (**self).fingerprint()
    }
    fn num_samples(&self) -> u64 {
        (**self).num_samples()
    }
    fn train(
        &mut self,
        global: &ParameterSet,
        spec: &TrainSpec,
        ctl: &TaskControl,
    ) -> Result<TrainResult, ExecutorError> {
        (**self).train(global, spec, ctl)
    }
    fn evaluate(&mut self, global: &ParameterSet, split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError> {
        (**self).evaluate(global, split, ctl)
    }
    fn statistics(&mut self) -> Result<Vec<GroupSums>, ExecutorError> {
        (**self).statistics()
    }
}

/// Settings of a client run.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub site_id: String,
    pub study_id: String,
    pub run_id: String,
    pub target: ServerTarget,
    /// First reconnect delay; doubled each failure up to `max_backoff`, with ±50% jitter.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up after this long without reaching the server (None = never).
    pub give_up_after: Option<Duration>,
    /// `status.json` and the audit log (`audit.jsonl`) are kept here for the site operator; `None`
    /// keeps neither.
    pub state_dir: Option<PathBuf>,
    /// What this site lets the server ask of it (the site configuration's `[policy]`).
    pub policy: fedhcc_secure::policy::SitePolicy,
}

/// How a client run ended.
#[derive(Clone, Debug, Default)]
pub struct ClientOutcome {
    pub finished: bool,
    pub rounds_trained: u32,
    pub evaluations: u32,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub final_model_sha256: String,
    /// Tasks declined under the site's policy.
    pub tasks_declined: u32,
}

/// A failure that ends the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("gave up after {0:?} without reaching the server")]
    GaveUp(Duration),
    #[error("local task failed: {0}")]
    Executor(#[from] ExecutorError),
    #[error("{0}; nothing more is sent until the audit log can be written")]
    Audit(#[from] fedhcc_secure::audit::AuditError),
}

/// What was last written to `status.json`, so heartbeats and progress can rewrite it.
#[derive(Debug, Default)]
struct Report {
    state: String,
    detail: String,
    round: u32,
    total_rounds: u32,
    progress: Option<status::Progress>,
    last_error: Option<(String, u64)>,
    started_unix: u64,
}

struct Runner<E> {
    opts: ClientOptions,
    executor: Option<E>,
    outcome: ClientOutcome,
    trained_tasks: std::collections::HashSet<String>,
    report: std::sync::Mutex<Report>,
    /// `state_dir/audit.jsonl`; a message is recorded before it is sent.
    audit: audit::SiteAudit,
    /// Secure aggregation: the key pair of the task in progress and the last masked upload.
    secagg: secagg::SiteSecAgg,
}

impl<E: Executor> Runner<E> {
    /// Logs a change of state and writes it to `status.json` (progress cleared).
    fn status(&self, state: &str, detail: String, round: u32) {
        tracing::info!(site = %self.opts.site_id, state, round, "{detail}");
        {
            let mut r = self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            r.state = state.to_string();
            r.detail = detail;
            r.round = round;
            r.progress = None;
        }
        self.write_status();
    }

    /// Rewrites `status.json` with the current state (a heartbeat: the client is alive).
    fn write_status(&self) {
        let Some(dir) = &self.opts.state_dir else { return };
        let now = status::now_unix();
        let s = {
            let mut r = self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if r.started_unix == 0 {
                r.started_unix = now;
            }
            status::ClientStatus {
                site_id: self.opts.site_id.clone(),
                state: r.state.clone(),
                detail: r.detail.clone(),
                round: r.round,
                total_rounds: r.total_rounds,
                rounds_trained: self.outcome.rounds_trained,
                evaluations: self.outcome.evaluations,
                progress: r.progress.clone(),
                last_error: r.last_error.as_ref().map(|(e, _)| e.clone()),
                last_error_unix: r.last_error.as_ref().map(|(_, t)| *t),
                started_unix: r.started_unix,
                pid: std::process::id(),
                updated_unix: now,
            }
        };
        if let Err(e) = status::write(dir, &s) {
            tracing::warn!(error = %e, "could not write the status file");
        }
    }

    /// Remembers an error for `status.json` (kept until the next one).
    fn note_error(&self, message: String) {
        let mut r = self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.last_error = Some((message, status::now_unix()));
    }

    /// Records the progress of the running local task, if it changed; true when it did.
    fn note_progress(&self, done: u64, total: u64) -> bool {
        let mut r = self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = Some(status::Progress { done, total, unit: "epochs".into() });
        let changed = r.progress != p;
        r.progress = p;
        changed
    }

    /// The task's reference, unless this client already answered it (a task is resent after a
    /// reconnect).
    fn new_task(&self, t: Option<pb::TaskRef>) -> Result<Option<pb::TaskRef>, TransportError> {
        let t = t.ok_or_else(|| TransportError::Damaged("a task without its reference".into()))?;
        Ok((!self.trained_tasks.contains(&t.task_id)).then_some(t))
    }

    /// Records a received task event (heartbeats carry no task data and are not recorded).
    fn audit_event(&mut self, ev: &pb::TaskEvent) -> Result<(), ClientError> {
        let Some((kind, t)) = ev.audit_kind() else { return Ok(()) };
        let (task, round) = t.map(|t| (t.task_id.as_str(), t.round)).unwrap_or(("", 0));
        self.audit.record(Direction::Received, task, round, kind, &ev.encode_to_vec())?;
        Ok(())
    }

    /// Checks a task against the site's policy; a refusal is logged here, recorded and reported to
    /// the server, and the task is done with (`false`: do not run it).
    async fn allowed(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        tref: &pb::TaskRef,
        check: Result<(), fedhcc_secure::policy::PolicyRefusal>,
    ) -> Result<bool, ClientError> {
        let Err(refusal) = check else { return Ok(true) };
        let rule = refusal.rule.as_str();
        tracing::warn!(site = %self.opts.site_id, task = %tref.task_id, round = tref.round, rule, reason = %refusal.message, "task declined by this site's policy");
        let message = site_policy::message_for_server(&self.opts.policy, &refusal);
        let report = pb::TaskRefusal { task: Some(tref.clone()), rule: rule.to_string(), message };
        self.audit.record(Direction::Sent, &tref.task_id, tref.round, "task_refusal", &report.encode_to_vec())?;
        if let Some(s) = not_used(client.refuse_task(report).await)? {
            tracing::warn!(reason = s.message(), "the server did not take the refusal");
        }
        self.outcome.tasks_declined += 1;
        self.trained_tasks.insert(tref.task_id.clone());
        self.note_error(format!("{}: declined by this site's policy ({rule}): {}", tref.describe(), refusal.message));
        self.status("waiting", format!("declined {} ({rule}); waiting for the next task", tref.describe()), tref.round);
        Ok(false)
    }

    /// Downloads a task's model, recording it in the audit log; `None` when the task closed.
    async fn fetch_model(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        tref: &pb::TaskRef,
        sha: &str,
    ) -> Result<Option<(ParameterSet, u64)>, ClientError> {
        let Some((global, n, digest)) = fetch(client, tref, sha).await? else { return Ok(None) };
        self.audit.record_digest(Direction::Received, &tref.task_id, tref.round, "model", n, digest)?;
        Ok(Some((global, n)))
    }

    /// One connection's life: join, then serve tasks until the stream ends.
    async fn session(&mut self, shutdown: &CancellationToken, connected: &mut bool) -> Result<bool, ClientError> {
        let mut client = transport::connect(&self.opts.target).await?;
        let (fp, n) = self.executor.as_ref().map(|e| (e.fingerprint(), e.num_samples())).unwrap_or((None, 0));
        let request = pb::JoinRequest {
            study_id: self.opts.study_id.clone(),
            client_version: pb::PROTOCOL_VERSION.into(),
            model_fingerprint: fp.map(|f| f.to_hex()).unwrap_or_default(),
            num_samples: n,
        };
        self.audit.record(Direction::Sent, "", 0, "join", &request.encode_to_vec())?;
        let join = client.join(request).await.map_err(TransportError::from)?.into_inner();
        *connected = true;
        if join.run_id != self.opts.run_id {
            tracing::warn!(server_run = %join.run_id, configured = %self.opts.run_id, "the server runs another run id; following the server");
            self.opts.run_id = join.run_id.clone();
        }
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total_rounds = join.total_rounds;
        self.status(
            "joined",
            format!(
                "joined study {} run {} at round {} of {}",
                join.study_id, join.run_id, join.current_round, join.total_rounds
            ),
            join.current_round,
        );
        let mut events = client
            .wait_task(pb::WaitTaskRequest { study_id: self.opts.study_id.clone(), run_id: self.opts.run_id.clone() })
            .await
            .map_err(TransportError::from)?
            .into_inner();
        self.status("waiting", "waiting for a task".into(), join.current_round);
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                ev = events.message() => ev.map_err(TransportError::from)?,
            };
            let Some(ev) = ev else {
                return Err(TransportError::Damaged("the server closed the task stream".into()).into());
            };
            self.audit_event(&ev)?;
            match ev.event {
                Some(pb::task_event::Event::Heartbeat(_)) | None => self.write_status(),
                Some(pb::task_event::Event::Finished(f)) => {
                    self.outcome.finished = true;
                    self.outcome.final_model_sha256 = f.final_model_sha256.clone();
                    self.status(
                        "finished",
                        format!("run finished after {} rounds", f.rounds_completed),
                        f.rounds_completed,
                    );
                    return Ok(true);
                }
                Some(pb::task_event::Event::Train(t)) => self.train(&mut client, t, shutdown).await?,
                Some(pb::task_event::Event::Evaluate(t)) => self.evaluate(&mut client, t, shutdown).await?,
                Some(pb::task_event::Event::Statistics(t)) => self.statistics(&mut client, t, shutdown).await?,
            }
        }
    }

    async fn run_blocking<T: Send + 'static>(
        &mut self,
        shutdown: &CancellationToken,
        f: impl FnOnce(&mut E, &TaskControl) -> T + Send + 'static,
    ) -> Result<T, ClientError> {
        let mut exec = self.executor.take().ok_or_else(|| ExecutorError("executor unavailable".into()))?;
        let ctl = TaskControl::default();
        let ctl2 = ctl.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let r = f(&mut exec, &ctl2);
            (exec, r)
        });
        let cancel_on_shutdown = async {
            shutdown.cancelled().await;
            ctl.cancel();
            std::future::pending::<()>().await
        };
        tokio::pin!(handle, cancel_on_shutdown);
        // While the task runs, its progress goes to status.json once a second when it changes.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let joined = loop {
            tokio::select! {
                j = &mut handle => break j,
                _ = &mut cancel_on_shutdown => unreachable!("pending never completes"),
                _ = tick.tick() => {
                    if let Some((done, total)) = ctl.progress()
                        && self.note_progress(done, total)
                    {
                        self.write_status();
                    }
                }
            }
        };
        let (exec, r) = joined.map_err(|e| ExecutorError(format!("local task panicked: {e}")))?;
        self.executor = Some(exec);
        Ok(r)
    }

    async fn train(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        t: pb::TrainTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(t.task.clone())? else { return Ok(()) };
        let round = tref.round;
        let facts = site_policy::train_facts(
            &t.model_fingerprint,
            round,
            t.secure_aggregation,
            t.dp_noise_multiplier,
            t.dp_delta,
        );
        let check = self.opts.policy.check(&facts);
        if !self.allowed(client, &tref, check).await? {
            return Ok(());
        }
        // Secure aggregation: this task's public key goes out before the download, so that the key
        // exchange closes while the sites train (or an update already masked for it is resent).
        let masking = if t.secure_aggregation {
            match self.secagg_prepare(client, &tref, &t).await? {
                secagg::Prepared::Proceed(spec) => Some(spec),
                secagg::Prepared::Done => return Ok(()),
            }
        } else {
            None
        };
        self.status(
            "downloading",
            format!("round {round}: downloading the global model ({} bytes)", t.model_bytes),
            round,
        );
        let Some((global, n)) = self.fetch_model(client, &tref, &t.model_sha256).await? else { return Ok(()) };
        self.outcome.bytes_down += n;
        let spec = TrainSpec {
            round,
            total_rounds: t.total_rounds,
            local_epochs: t.local_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            weight_decay: t.weight_decay,
            prox_mu: t.prox_mu,
            seed: t.seed,
        };
        self.status("training", format!("round {round}: training locally ({} epochs)", spec.local_epochs), round);
        let started = Instant::now();
        let g = Arc::new(global);
        let g2 = Arc::clone(&g);
        let result = self.run_blocking(shutdown, move |e, ctl| e.train(&g2, &spec, ctl)).await??;
        let mut delta = result.params;
        delta
            .subtract_in_place(&g)
            .map_err(|e| ExecutorError(format!("trained model does not match the global layout: {e}")))?;
        drop(g);
        let mut metrics = result.metrics;
        metrics.push(("train_seconds".into(), started.elapsed().as_secs_f64()));
        self.status("uploading", format!("round {round}: uploading the update"), round);
        let sent = match masking {
            Some(spec) => self.upload_masked(client, &tref, spec, delta, result.num_samples, metrics).await?,
            None => {
                // Recorded before it leaves: the same bytes and SHA-256 as the upload's payload.
                self.audit.record(Direction::Sent, &tref.task_id, round, "update", &delta.encode())?;
                transport::upload(client, tref.clone(), &delta, result.num_samples, metrics).await
            }
        };
        self.upload_outcome(round, sent)?;
        self.trained_tasks.insert(tref.task_id.clone());
        self.status("waiting", format!("round {round} done; waiting for the next task"), round);
        Ok(())
    }

    /// Counts an accepted upload; a duplicate (a task resent after a reconnect) or a round that
    /// closed meanwhile is not an error.
    fn upload_outcome(&mut self, round: u32, sent: Result<u64, TransportError>) -> Result<(), ClientError> {
        match sent {
            Ok(n) => {
                self.outcome.bytes_up += n;
                self.outcome.rounds_trained += 1;
            }
            // Already counted (a resent task after a reconnect): nothing to redo.
            Err(TransportError::Status(s)) if s.code() == tonic::Code::AlreadyExists => {}
            // The round closed meanwhile: the next task will come.
            Err(TransportError::Status(s)) if s.code() == tonic::Code::FailedPrecondition => {
                tracing::warn!(reason = s.message(), "update not used");
                self.note_error(format!("round {round}: the server did not use this update: {}", s.message()));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Sends this site's training-split feature sums (aggregates, small cells suppressed) for
    /// the study's pooled standardisation.
    async fn statistics(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        t: pb::StatisticsTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(t.task.clone())? else { return Ok(()) };
        let facts = site_policy::task_facts(TaskKind::Statistics, &t.model_fingerprint, tref.round);
        let check = self.opts.policy.check(&facts);
        if !self.allowed(client, &tref, check).await? {
            return Ok(());
        }
        self.status("statistics", "sending feature sums and counts for the pooled standardisation".into(), 0);
        let mut groups = self.run_blocking(shutdown, |e, _| e.statistics()).await??;
        let suppressed = site_policy::suppress_small_cells(&mut groups, &self.opts.policy);
        if suppressed > 0 {
            tracing::info!(
                suppressed,
                min = site_policy::min_cell(&self.opts.policy),
                "features observed for too few patients are sent as not observed"
            );
        }
        let report = pb::StatisticsReport {
            task: Some(tref.clone()),
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
        };
        self.audit.record(Direction::Sent, &tref.task_id, tref.round, "statistics", &report.encode_to_vec())?;
        if let Some(s) = not_used(client.report_statistics(report).await)? {
            tracing::warn!(reason = s.message(), "statistics not used");
            self.note_error(format!("the server did not use this site's statistics: {}", s.message()));
        }
        self.trained_tasks.insert(tref.task_id.clone());
        self.status("waiting", "feature statistics sent; waiting for round 1".into(), 0);
        Ok(())
    }

    async fn evaluate(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        t: pb::EvaluateTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(t.task.clone())? else { return Ok(()) };
        let round = tref.round;
        let facts = site_policy::task_facts(TaskKind::Evaluate, &t.model_fingerprint, round);
        let check = self.opts.policy.check(&facts);
        if !self.allowed(client, &tref, check).await? {
            return Ok(());
        }
        self.status("evaluating", format!("evaluating the model of round {round} on the '{}' split", t.split), round);
        let Some((global, n)) = self.fetch_model(client, &tref, &t.model_sha256).await? else { return Ok(()) };
        self.outcome.bytes_down += n;
        let split = t.split.clone();
        let res = self.run_blocking(shutdown, move |e, ctl| e.evaluate(&global, &split, ctl)).await??;
        let check = site_policy::check_evaluation(&self.opts.policy, &res);
        if !self.allowed(client, &tref, check).await? {
            return Ok(());
        }
        let summary = match res.summary.as_ref().map(fedhcc_stats::federated::SiteEvaluation::encode) {
            None => Vec::new(),
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the evaluation summary is not sent");
                self.note_error(format!("round {round}: the evaluation summary is not sent: {e}"));
                Vec::new()
            }
        };
        let report = pb::EvaluationReport {
            task: Some(tref.clone()),
            num_samples: res.num_samples,
            metrics: res.metrics.into_iter().map(|(name, value)| pb::Metric { name, value }).collect(),
            summary: summary.into(),
        };
        self.audit.record(Direction::Sent, &tref.task_id, round, "evaluation", &report.encode_to_vec())?;
        let reply = match client.report_evaluation(report.clone()).await {
            // The summary was refused (the server's study differs, say): the metrics still count.
            Err(s) if s.code() == tonic::Code::InvalidArgument && !report.summary.is_empty() => {
                tracing::warn!(reason = s.message(), "the server refused the evaluation summary; sending the metrics");
                self.note_error(format!(
                    "round {round}: the server refused this site's evaluation summary ({}); the metrics were sent \
                     without it",
                    s.message()
                ));
                let bare = pb::EvaluationReport { summary: Default::default(), ..report };
                self.audit.record(Direction::Sent, &tref.task_id, round, "evaluation", &bare.encode_to_vec())?;
                client.report_evaluation(bare).await
            }
            other => other,
        };
        match not_used(reply)? {
            None => self.outcome.evaluations += 1,
            Some(s) => {
                tracing::warn!(reason = s.message(), "evaluation not used");
                self.note_error(format!("round {round}: the server did not use this evaluation: {}", s.message()));
            }
        }
        self.trained_tasks.insert(tref.task_id.clone());
        self.status("waiting", format!("evaluation of round {round} sent; waiting"), round);
        Ok(())
    }
}

/// A report's reply: `None` when it was used, `Some(status)` when the server had already counted
/// it or its task has closed (nothing to redo), an error otherwise.
fn not_used<T>(reply: Result<T, tonic::Status>) -> Result<Option<tonic::Status>, ClientError> {
    match reply {
        Ok(_) => Ok(None),
        Err(s) if matches!(s.code(), tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition) => Ok(Some(s)),
        Err(s) => Err(TransportError::from(s).into()),
    }
}

/// Downloads a task's model (with the payload's SHA-256); `None` when the task closed meanwhile
/// (the next one will come).
async fn fetch(
    client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    tref: &pb::TaskRef,
    sha: &str,
) -> Result<Option<(ParameterSet, u64, [u8; 32])>, TransportError> {
    match transport::download_digest(client, tref.clone(), sha).await {
        Ok(v) => Ok(Some(v)),
        Err(TransportError::Status(s)) if s.code() == tonic::Code::FailedPrecondition => {
            tracing::warn!(task = %tref.task_id, reason = s.message(), "task no longer open; waiting for the next");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Runs a site's client until the server announces the end of the run, `shutdown` is cancelled,
/// or (if set) `give_up_after` passes without reaching the server.
///
/// # Errors
/// A permanent refusal (wrong study, certificate not accepted, not on the allow-list), a failing
/// local task, or giving up.
pub async fn run<E: Executor>(
    opts: ClientOptions,
    executor: E,
    shutdown: CancellationToken,
) -> Result<ClientOutcome, ClientError> {
    let mut runner = Runner {
        opts,
        executor: Some(executor),
        outcome: ClientOutcome::default(),
        trained_tasks: Default::default(),
        report: Default::default(),
        audit: Default::default(),
        secagg: Default::default(),
    };
    match audit::SiteAudit::open(runner.opts.state_dir.as_deref(), &runner.opts.target.server_name) {
        Ok(a) => runner.audit = a,
        Err(e) => {
            let e = ClientError::from(e);
            runner.note_error(e.to_string());
            runner.status("stopped", format!("stopped: {e}"), 0);
            return Err(e);
        }
    }
    runner.status("starting", format!("connecting to {}", runner.opts.target.url), 0);
    let mut backoff = runner.opts.min_backoff;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(runner.outcome);
        }
        let mut connected = false;
        match runner.session(&shutdown, &mut connected).await {
            Ok(true) => return Ok(runner.outcome),
            Ok(false) => return Ok(runner.outcome),
            Err(ClientError::Transport(e)) if e.is_transient() => {
                if connected {
                    backoff = runner.opts.min_backoff;
                    unreachable_since = None;
                }
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                runner.note_error(format!("server unreachable: {e}"));
                if let Some(limit) = runner.opts.give_up_after
                    && since.elapsed() > limit
                {
                    let e = ClientError::GaveUp(limit);
                    runner.status("stopped", format!("stopped: {e}"), 0);
                    return Err(e);
                }
                let jitter = rand::rng().random_range(0.5..1.5);
                let wait = backoff.mul_f64(jitter);
                runner.status(
                    "reconnecting",
                    format!("server unreachable ({e}); retrying in {:.1} s", wait.as_secs_f64()),
                    0,
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(runner.outcome),
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(runner.opts.max_backoff);
            }
            Err(e) => {
                runner.note_error(e.to_string());
                runner.status("stopped", format!("stopped: {e}"), 0);
                return Err(e);
            }
        }
    }
}
