//! The task loop of a site's client: join, wait for tasks, check each against the site's policy,
//! run it with the [`Executor`], report; reconnect with backoff after a network failure. It sees
//! tasks and answers as plain values ([`crate::task`]); every RPC goes through
//! [`crate::transport`].

use crate::task::{EvaluateTask, Received, StatisticsTask, TaskEvent, TaskRef, TrainTask};
use crate::transport::{Connection, Refused};
use crate::{
    ClientError, ClientOptions, ClientOutcome, Executor, ExecutorError, TaskControl, TransportError, audit, secagg,
    site_policy, status,
};
use fedhcc_core::params::ParameterSet;
use fedhcc_secure::audit::Direction;
use fedhcc_secure::policy::TaskKind;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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

pub(crate) struct Runner<E> {
    pub(crate) opts: ClientOptions,
    pub(crate) executor: Option<E>,
    outcome: ClientOutcome,
    trained_tasks: std::collections::HashSet<String>,
    report: std::sync::Mutex<Report>,
    /// `state_dir/audit.jsonl`; a message is recorded before it is sent.
    pub(crate) audit: audit::SiteAudit,
    /// Secure aggregation: the key pair of the task in progress and the last masked upload.
    pub(crate) secagg: secagg::SiteSecAgg,
}

impl<E: Executor> Runner<E> {
    /// Logs a change of state and writes it to `status.json` (progress cleared).
    pub(crate) fn status(&self, state: &str, detail: String, round: u32) {
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
    pub(crate) fn note_error(&self, message: String) {
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
    fn new_task(&self, t: &TaskRef) -> Option<TaskRef> {
        (!self.trained_tasks.contains(&t.task_id)).then(|| t.clone())
    }

    /// Notes a task as answered (a resent copy is then left alone).
    pub(crate) fn task_done(&mut self, tref: &TaskRef) {
        self.trained_tasks.insert(tref.task_id.clone());
    }

    /// Records a received task event (heartbeats carry no task data and are not recorded).
    fn audit_event(&mut self, ev: &Received) -> Result<(), ClientError> {
        let Some(a) = &ev.audit else { return Ok(()) };
        self.audit.record(Direction::Received, &a.task_id, a.round, a.kind, &a.bytes)?;
        Ok(())
    }

    /// Checks a task against the site's policy; a refusal is logged here, recorded and reported to
    /// the server, and the task is done with (`false`: do not run it).
    async fn allowed(
        &mut self,
        conn: &mut Connection,
        tref: &TaskRef,
        check: Result<(), fedhcc_secure::policy::PolicyRefusal>,
    ) -> Result<bool, ClientError> {
        let Err(refusal) = check else { return Ok(true) };
        let rule = refusal.rule.as_str();
        tracing::warn!(site = %self.opts.site_id, task = %tref.task_id, round = tref.round, rule, reason = %refusal.message, "task declined by this site's policy");
        let message = site_policy::message_for_server(&self.opts.policy, &refusal);
        let report = crate::transport::refusal(tref, rule, message);
        self.audit.record(Direction::Sent, &tref.task_id, tref.round, "task_refusal", &report.bytes())?;
        if let Some(reason) = not_used(conn.refuse_task(report).await)? {
            tracing::warn!(%reason, "the server did not take the refusal");
        }
        self.outcome.tasks_declined += 1;
        self.task_done(tref);
        self.note_error(format!("{}: declined by this site's policy ({rule}): {}", tref.describe(), refusal.message));
        self.status("waiting", format!("declined {} ({rule}); waiting for the next task", tref.describe()), tref.round);
        Ok(false)
    }

    /// Downloads a task's model, recording it in the audit log; `None` when the task closed.
    async fn fetch_model(
        &mut self,
        conn: &mut Connection,
        tref: &TaskRef,
        sha: &str,
    ) -> Result<Option<(ParameterSet, u64)>, ClientError> {
        let Some((global, n, digest)) = fetch(conn, tref, sha).await? else { return Ok(None) };
        self.audit.record_digest(Direction::Received, &tref.task_id, tref.round, "model", n, digest)?;
        Ok(Some((global, n)))
    }

    /// One connection's life: join, then serve tasks until the stream ends.
    async fn session(&mut self, shutdown: &CancellationToken, connected: &mut bool) -> Result<bool, ClientError> {
        let mut conn = Connection::open(&self.opts.target).await?;
        let (fp, n) = self.executor.as_ref().map(|e| (e.fingerprint(), e.num_samples())).unwrap_or((None, 0));
        let request = crate::transport::join_request(&self.opts.study_id, fp, n);
        self.audit.record(Direction::Sent, "", 0, "join", &request.bytes())?;
        let join = conn.join(request).await?;
        *connected = true;
        if join.run_id != self.opts.run_id {
            // Never followed: a run is what this site's privacy budget and policy count against, and
            // a server that renames it could otherwise start the count again.
            return Err(ClientError::OtherRun { server: join.run_id, configured: self.opts.run_id.clone() });
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
        let mut events = conn.tasks(&self.opts.study_id, &self.opts.run_id).await?;
        self.status("waiting", "waiting for a task".into(), join.current_round);
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                ev = events.next() => ev?,
            };
            let Some(ev) = ev else {
                return Err(TransportError::Damaged("the server closed the task stream".into()).into());
            };
            self.audit_event(&ev)?;
            match ev.event? {
                TaskEvent::Heartbeat => self.write_status(),
                TaskEvent::Finished { rounds_completed, final_model_sha256 } => {
                    self.outcome.finished = true;
                    self.outcome.final_model_sha256 = final_model_sha256;
                    self.status("finished", format!("run finished after {rounds_completed} rounds"), rounds_completed);
                    return Ok(true);
                }
                TaskEvent::Train(t) => self.train(&mut conn, t, shutdown).await?,
                TaskEvent::Evaluate(t) => self.evaluate(&mut conn, t, shutdown).await?,
                TaskEvent::Statistics(t) => self.statistics(&mut conn, t, shutdown).await?,
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
        conn: &mut Connection,
        t: TrainTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(&t.task) else { return Ok(()) };
        let round = tref.round;
        let facts = site_policy::train_facts(
            &t.model_fingerprint,
            round,
            t.secure_aggregation,
            t.dp_noise_multiplier,
            t.dp_delta,
        );
        let check = self.opts.policy.check(&facts);
        if !self.allowed(conn, &tref, check).await? {
            return Ok(());
        }
        // Secure aggregation: this task's public key goes out before the download, so that the key
        // exchange closes while the sites train (or an update already masked for it is resent).
        let masking = if t.secure_aggregation {
            match self.secagg_prepare(conn, &tref, &t).await? {
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
        let Some((global, n)) = self.fetch_model(conn, &tref, &t.model_sha256).await? else { return Ok(()) };
        self.outcome.bytes_down += n;
        let spec = t.spec.clone();
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
            Some(spec) => match self.upload_masked(conn, &tref, spec, delta, result.num_samples, metrics).await? {
                Some(sent) => sent,
                // Skipped (logged and noted there): the site waits for the next task.
                None => return Ok(()),
            },
            None => {
                // Recorded before it leaves: the same bytes and SHA-256 as the upload's payload.
                self.audit.record(Direction::Sent, &tref.task_id, round, "update", &delta.encode())?;
                conn.upload(&tref, &delta, result.num_samples, metrics).await
            }
        };
        self.upload_outcome(round, sent)?;
        self.task_done(&tref);
        self.status("waiting", format!("round {round} done; waiting for the next task"), round);
        Ok(())
    }

    /// Counts an accepted upload; a duplicate (a task resent after a reconnect) or a round that
    /// closed meanwhile is not an error.
    pub(crate) fn upload_outcome(&mut self, round: u32, sent: Result<u64, TransportError>) -> Result<(), ClientError> {
        match sent {
            Ok(n) => {
                self.outcome.bytes_up += n;
                self.outcome.rounds_trained += 1;
            }
            Err(e) => match e.refused() {
                // Already counted (a resent task after a reconnect): nothing to redo.
                Some((Refused::AlreadyCounted, _)) => {}
                // The round closed meanwhile: the next task will come.
                Some((Refused::TaskClosed, reason)) => {
                    tracing::warn!(reason, "update not used");
                    self.note_error(format!("round {round}: the server did not use this update: {reason}"));
                }
                _ => return Err(e.into()),
            },
        }
        Ok(())
    }

    /// Sends this site's training-split feature sums (aggregates, small cells suppressed) for
    /// the study's pooled standardisation.
    async fn statistics(
        &mut self,
        conn: &mut Connection,
        t: StatisticsTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(&t.task) else { return Ok(()) };
        let facts = site_policy::task_facts(TaskKind::Statistics, &t.model_fingerprint, tref.round);
        let check = self.opts.policy.check(&facts);
        if !self.allowed(conn, &tref, check).await? {
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
        let report = crate::transport::statistics_report(&tref, groups);
        self.audit.record(Direction::Sent, &tref.task_id, tref.round, "statistics", &report.bytes())?;
        if let Some(reason) = not_used(conn.report_statistics(report).await)? {
            tracing::warn!(%reason, "statistics not used");
            self.note_error(format!("the server did not use this site's statistics: {reason}"));
        }
        self.task_done(&tref);
        self.status("waiting", "feature statistics sent; waiting for round 1".into(), 0);
        Ok(())
    }

    async fn evaluate(
        &mut self,
        conn: &mut Connection,
        t: EvaluateTask,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let Some(tref) = self.new_task(&t.task) else { return Ok(()) };
        let round = tref.round;
        let facts = site_policy::task_facts(TaskKind::Evaluate, &t.model_fingerprint, round);
        let check = self.opts.policy.check(&facts);
        if !self.allowed(conn, &tref, check).await? {
            return Ok(());
        }
        self.status("evaluating", format!("evaluating the model of round {round} on the '{}' split", t.split), round);
        let Some((global, n)) = self.fetch_model(conn, &tref, &t.model_sha256).await? else { return Ok(()) };
        self.outcome.bytes_down += n;
        let split = t.split.clone();
        let res = self.run_blocking(shutdown, move |e, ctl| e.evaluate(&global, &split, ctl)).await??;
        let check = site_policy::check_evaluation(&self.opts.policy, &res);
        if !self.allowed(conn, &tref, check).await? {
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
        let report = crate::transport::evaluation_report(&tref, res.num_samples, res.metrics, summary);
        self.audit.record(Direction::Sent, &tref.task_id, round, "evaluation", &report.bytes())?;
        let reply = match conn.report_evaluation(&report).await {
            // The summary was refused (the server's study differs, say): the metrics still count.
            Err(e) if report.has_summary() && matches!(e.refused(), Some((Refused::Invalid, _))) => {
                let reason = e.refused().map(|(_, m)| m).unwrap_or_default();
                tracing::warn!(reason, "the server refused the evaluation summary; sending the metrics");
                self.note_error(format!(
                    "round {round}: the server refused this site's evaluation summary ({reason}); the metrics were \
                     sent without it"
                ));
                let bare = report.without_summary();
                self.audit.record(Direction::Sent, &tref.task_id, round, "evaluation", &bare.bytes())?;
                conn.report_evaluation(&bare).await
            }
            other => other,
        };
        match not_used(reply)? {
            None => self.outcome.evaluations += 1,
            Some(reason) => {
                tracing::warn!(%reason, "evaluation not used");
                self.note_error(format!("round {round}: the server did not use this evaluation: {reason}"));
            }
        }
        self.task_done(&tref);
        self.status("waiting", format!("evaluation of round {round} sent; waiting"), round);
        Ok(())
    }
}

/// A report's reply: `None` when it was used, `Some(the server's reason)` when the server had
/// already counted it or its task has closed (nothing to redo), an error otherwise.
fn not_used(reply: Result<(), TransportError>) -> Result<Option<String>, ClientError> {
    match reply {
        Ok(()) => Ok(None),
        Err(e) => match e.refused() {
            Some((Refused::AlreadyCounted | Refused::TaskClosed, reason)) => Ok(Some(reason.to_string())),
            _ => Err(e.into()),
        },
    }
}

/// Downloads a task's model (with the payload's SHA-256); `None` when the task closed meanwhile
/// (the next one will come).
async fn fetch(
    conn: &mut Connection,
    tref: &TaskRef,
    sha: &str,
) -> Result<Option<(ParameterSet, u64, [u8; 32])>, TransportError> {
    match conn.download(tref, sha).await {
        Ok(v) => Ok(Some(v)),
        Err(e) => match e.refused() {
            Some((Refused::TaskClosed, reason)) => {
                tracing::warn!(task = %tref.task_id, reason, "task no longer open; waiting for the next");
                Ok(None)
            }
            _ => Err(e),
        },
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
