//! The round driver: everything a round does after the last answer is in, off the request path.
//! It owns the aggregation strategy, reads the coordinator's [`Action`]s from an unbounded queue
//! (a small command each: [`Shared::apply`] never drops one, the run cannot stall on a full queue)
//! and carries out each in a function of its own: pooling statistics, aggregating and committing a
//! round, writing the evaluation report, discarding a task's spool, finishing or aborting the run.
//! It also closes tasks at their deadline.

use crate::coordinator::{self, Action, Task, TaskKind};
use crate::error::ServerError;
use crate::events::EventKind;
use crate::spool::{Answer, Spool, SpooledUpdate};
use crate::state::{self, GlobalModel, Shared, lock};
use crate::store::{RoundRecord, Store};
use crate::strategy::{self, FedAvg, Strategy, UpdateSource};
use crate::{evaluation, privacy, secure_sum};
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::ParameterSet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The round driver's state: the run it serves, the strategy (with its carried state) and how many
/// checkpoints to keep.
pub(crate) struct Driver {
    pub shared: Arc<Shared>,
    pub strategy: Box<dyn Strategy>,
    pub keep: usize,
}

impl Driver {
    /// Runs until the run finishes (true) or the server shuts down (false): carries out each queued
    /// action in turn and closes tasks at their deadline.
    pub async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Action>) -> bool {
        let far = Duration::from_secs(3600);
        loop {
            let deadline = lock(&self.shared.coord).deadline();
            let sleep_until = deadline.unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => return false,
                job = jobs.recv() => {
                    let Some(action) = job else { return false };
                    if self.handle(action).await {
                        self.let_the_sites_hear_it().await;
                        self.shared.shutdown.cancel();
                        return true;
                    }
                }
                _ = tokio::time::sleep_until(sleep_until.into()) => {
                    let actions = lock(&self.shared.coord).tick(Instant::now());
                    self.shared.apply(actions);
                }
                _ = self.shared.wake.notified() => {}
            }
        }
    }

    /// Gives every site a moment to hear that the run is over.
    async fn let_the_sites_hear_it(&mut self) {
        let grace = Instant::now() + Duration::from_secs(10);
        while Instant::now() < grace && !self.shared.connected_sites().is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = self.shared.shutdown.cancelled() => break,
            }
        }
    }

    /// Carries out one driver action. Returns true when the run is finished.
    async fn handle(&mut self, action: Action) -> bool {
        match action {
            Action::Announce(task) => {
                announce(&self.shared, task).await;
                false
            }
            Action::RosterFixed(_) => false,
            Action::SecureAggregationAborted { task, reason } => {
                self.secure_aggregation_aborted(&task, &reason).await;
                false
            }
            Action::Discard { task, reason } => {
                self.discard(&task, &reason).await;
                false
            }
            Action::StatisticsDone { task, reported, missing } => {
                self.statistics_done(&task, &reported, &missing).await;
                false
            }
            Action::EvaluationDone { task, reported, missing } => {
                self.evaluation_done(task, &reported, &missing).await;
                false
            }
            Action::Finish { rounds_completed } => {
                self.finish(rounds_completed);
                true
            }
            Action::Abort { task, rounds_completed } => {
                self.abort(task, rounds_completed).await;
                true
            }
            Action::Aggregate { task, results, failures } => {
                self.aggregate(task, results, failures).await;
                false
            }
        }
    }

    /// A secure-aggregation attempt was aborted: its masked updates are useless; the round restarts.
    async fn secure_aggregation_aborted(&mut self, task: &Task, reason: &str) {
        let shared = &self.shared;
        tracing::warn!(
            task = %task.id,
            round = task.round,
            %reason,
            "secure aggregation attempt aborted; the round restarts with fresh keys"
        );
        shared.metrics.round_retried();
        shared.events.push(
            EventKind::Retry,
            None,
            format!(
                "round {}: secure aggregation attempt {} aborted ({reason}); restarted with fresh keys and a new \
                 task id",
                task.round, task.id
            ),
        );
        self.shared.spool.discard(&task.id).await;
    }

    /// A round closed without enough updates: they are discarded and the round is retried.
    async fn discard(&mut self, task: &Task, reason: &str) {
        let shared = &self.shared;
        tracing::warn!(task = %task.id, %reason, "round closed without enough updates; it will be retried");
        shared.metrics.round_retried();
        shared.events.push(
            EventKind::Retry,
            None,
            format!("round {}: closed without enough updates ({reason}); it will be retried", task.round),
        );
        self.shared.spool.discard(&task.id).await;
    }

    /// The statistics task closed: the sites' sums are pooled into the initial model.
    async fn statistics_done(&mut self, task: &Task, reported: &BTreeSet<String>, missing: &BTreeSet<String>) {
        let shared = &self.shared;
        let span = tracing::info_span!("statistics", task = %task.id);
        let _e = span.enter();
        let Some(global) = shared.global() else {
            tracing::error!("no initial model to put the statistics into");
            return;
        };
        let (store, spool, task_id, sites) =
            (Arc::clone(&shared.store), self.shared.spool.clone(), task.id.clone(), reported.clone());
        let joined =
            tokio::task::spawn_blocking(move || pool_statistics(&store, &global, &spool, &task_id, &sites)).await;
        self.shared.spool.discard(&task.id).await;
        let actions = match joined {
            Ok(Ok(new_global)) => {
                tracing::info!(?reported, ?missing, "pooled feature statistics written into the initial model");
                shared.set_global(Some(Arc::new(new_global)));
                lock(&shared.coord).statistics_committed(Instant::now())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the sites' statistics could not be pooled; asking again");
                lock(&shared.coord).statistics_failed(Instant::now())
            }
            Err(e) => {
                tracing::error!(error = %e, "pooling the statistics failed; asking again");
                lock(&shared.coord).statistics_failed(Instant::now())
            }
        };
        shared.apply(actions);
    }

    /// An evaluation closed: its report is written before the next action (the run's end), so that
    /// the report exists when the run finishes.
    async fn evaluation_done(&mut self, task: Task, reported: &BTreeSet<String>, missing: &BTreeSet<String>) {
        let shared = &self.shared;
        tracing::info!(task = %task.id, ?reported, ?missing, "evaluation closed");
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() { "none".to_string() } else { s.iter().cloned().collect::<Vec<_>>().join(", ") }
        };
        shared.events.push(
            EventKind::Evaluation,
            None,
            format!(
                "round {}: evaluation closed; reported: {}; missing: {}",
                task.round,
                list(reported),
                list(missing)
            ),
        );
        let (store, study, state_dir) = (Arc::clone(&shared.store), shared.study.clone(), shared.state_dir.clone());
        let missing = missing.clone();
        let written = tokio::task::spawn_blocking(move || {
            let records = lock(&store).evaluations().map_err(|e| e.to_string())?;
            evaluation::write_report(&state_dir, &study, &task.id, task.round, &records, &missing)
        })
        .await;
        match written {
            Ok(Ok(path)) => tracing::info!(report = %path.display(), "evaluation report written"),
            Ok(Err(e)) => tracing::error!(error = %e, "the evaluation report could not be written"),
            Err(e) => tracing::error!(error = %e, "writing the evaluation report failed"),
        }
    }

    /// Every round committed and evaluated: the sites are told the run is over.
    fn finish(&self, rounds_completed: u32) {
        let shared = &self.shared;
        tracing::info!(rounds_completed, "run finished");
        shared.events.push(EventKind::Run, None, format!("run finished after {rounds_completed} rounds"));
        shared.announce.send_modify(|a| {
            a.task = None;
            a.finished = Some(rounds_completed);
        });
    }

    /// The study lead aborted the run: the task in flight is dropped, the last committed model is final.
    async fn abort(&mut self, task: Option<Task>, rounds_completed: u32) {
        let shared = &self.shared;
        if let Some(t) = &task {
            self.shared.spool.discard(&t.id).await;
        }
        let dropped = task.map(|t| format!("; task {} was dropped", t.id)).unwrap_or_default();
        tracing::warn!(rounds_completed, "run aborted by the study lead{dropped}");
        shared.events.push(
            EventKind::Run,
            None,
            format!(
                "run aborted by the study lead after {rounds_completed} committed rounds{dropped}; the model of \
                 round {rounds_completed} is final"
            ),
        );
        shared.announce.send_modify(|a| {
            a.task = None;
            a.finished = Some(rounds_completed);
        });
    }

    /// A training round closed: the spooled updates are aggregated into the next global model,
    /// which is checkpointed and committed (or the round is retried).
    async fn aggregate(
        &mut self,
        task: Task,
        results: BTreeMap<String, coordinator::SiteResult>,
        failures: BTreeMap<String, String>,
    ) {
        let span = tracing::info_span!("aggregate", round = task.round, task = %task.id);
        let _e = span.enter();
        let shared = Arc::clone(&self.shared);
        let started = lock(&shared.task_started).unwrap_or_else(Instant::now);
        let Some(global) = shared.global() else {
            tracing::error!("no global model to aggregate into");
            return;
        };
        // Stop serving the old model: the round is closed, and memory stays at one model.
        shared.set_global(None);
        let (store, spool, study) = (Arc::clone(&shared.store), self.shared.spool.clone(), shared.study.clone());
        let (res_c, fail_c, task_c) = (results.clone(), failures.clone(), task.clone());
        let mut strat = std::mem::replace(&mut self.strategy, Box::new(FedAvg));
        let kept_global = Arc::clone(&global);
        let joined = tokio::task::spawn_blocking(move || {
            let r = aggregate_round(&store, &study, &global, &spool, &task_c, &res_c, &fail_c, strat.as_mut());
            (r, strat, global)
        })
        .await;
        let (result, strat, old_global) = match joined {
            Ok(v) => v,
            Err(e) => {
                // The strategy went with the task: rebuild it, and retry the round.
                tracing::error!(error = %e, "aggregation task failed; the round is retried");
                self.round_not_committed(kept_global).await;
                return;
            }
        };
        drop(kept_global);
        self.strategy = strat;
        self.shared.spool.discard(&task.id).await;
        match result {
            Ok((new_global, state_file, agg_s)) => {
                let record = RoundRecord {
                    round: task.round,
                    attempt: task.attempt,
                    task_id: task.id.clone(),
                    participants: results.keys().cloned().collect(),
                    samples: results.values().map(|r| r.samples).collect(),
                    losses: results
                        .values()
                        .map(|r| r.metrics.iter().find(|(n, _)| n == "train_loss").map(|(_, v)| *v))
                        .collect(),
                    failures: failures.into_iter().collect(),
                    duration_s: started.elapsed().as_secs_f64(),
                    aggregate_s: agg_s,
                    bytes_in: shared.bytes_in.load(Ordering::Relaxed),
                    bytes_out: shared.bytes_out.load(Ordering::Relaxed),
                    checkpoint: new_global.path.display().to_string(),
                    checkpoint_sha256: new_global.sha256.clone(),
                    committed_unix: state::now_unix(),
                    strategy_state: state_file.as_ref().map(|(p, _)| p.clone()),
                    strategy_state_sha256: state_file.map(|(_, sha)| sha),
                    secure_aggregation: task.roster.is_some(),
                    epsilon: privacy::epsilon_for_round(&shared.study, task.round),
                };
                self.commit(record, new_global, old_global).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "aggregation failed; the round is retried");
                self.round_not_committed(old_global).await;
            }
        }
    }

    /// Records an aggregated round (and prunes old checkpoints), then serves its model; a round that
    /// cannot be recorded is retried with `old_global`.
    async fn commit(&mut self, record: RoundRecord, new_global: GlobalModel, old_global: Arc<GlobalModel>) {
        let shared = Arc::clone(&self.shared);
        let (store, rec, keep) = (Arc::clone(&shared.store), record.clone(), self.keep);
        let committed = tokio::task::spawn_blocking(move || {
            let mut s = lock(&store);
            let r = s.commit_round(&rec);
            if r.is_ok() {
                s.prune_checkpoints(rec.round, keep);
            }
            r
        })
        .await;
        match committed {
            Ok(Ok(())) => {
                tracing::info!(
                    participants = ?record.participants,
                    duration_s = record.duration_s,
                    aggregate_s = record.aggregate_s,
                    bytes_in = record.bytes_in,
                    "round committed"
                );
                shared.metrics.round_committed(record.duration_s, record.aggregate_s);
                let failed = if record.failures.is_empty() {
                    String::new()
                } else {
                    let f: Vec<&str> = record.failures.iter().map(|(s, _)| s.as_str()).collect();
                    format!("; no update from {}", f.join(", "))
                };
                shared.events.push(
                    EventKind::Round,
                    None,
                    format!(
                        "round {} committed: updates from {} in {:.1} s{failed}",
                        record.round,
                        record.participants.join(", "),
                        record.duration_s
                    ),
                );
                shared.set_global(Some(Arc::new(new_global)));
                let actions = lock(&shared.coord).round_committed(record.round, Instant::now());
                shared.apply(actions);
            }
            other => {
                tracing::error!(result = ?other.map(|r| r.err()), "round could not be recorded; retrying it");
                self.round_not_committed(old_global).await;
            }
        }
    }

    /// A round whose aggregation or record failed: undo what the strategy carried forward, serve the
    /// old model again and let the coordinator retry the round (or stop the server if the strategy's
    /// state cannot be restored).
    async fn round_not_committed(&mut self, old_global: Arc<GlobalModel>) {
        let shared = Arc::clone(&self.shared);
        shared.metrics.round_retried();
        shared.events.push(
            EventKind::Retry,
            None,
            "the round could not be committed (the server log says why); it is retried",
        );
        match reset_strategy(&shared).await {
            Some(s) => self.strategy = s,
            None => {
                shared.shutdown.cancel();
                return;
            }
        }
        shared.set_global(Some(old_global));
        let actions = lock(&shared.coord).aggregation_failed(Instant::now());
        shared.apply(actions);
    }
}

/// The study's strategy with the state saved with the last committed round restored (fresh when
/// no round is committed).
///
/// # Errors
/// Invalid settings, or a missing, altered or mismatched saved state.
pub(crate) fn strategy_at_last_round(study: &StudyConfig, store: &Store) -> Result<Box<dyn Strategy>, ServerError> {
    let mut s = strategy::from_study(study)?;
    let rounds = store.rounds()?;
    let last = rounds.last();
    let state = match last {
        Some(r) => store.read_strategy_state(r)?,
        None => None,
    };
    s.restore_state(state, last.map_or(0, |r| r.round))?;
    Ok(s)
}

/// A new task: its attempt number recorded in `server.db` (off the async threads), then the task
/// sent to the sites, so that a restarted server numbers its tasks after it. A failed record is
/// logged and the task still goes out (the run goes on; only a restart could then reuse the id).
pub(crate) async fn announce(shared: &Arc<Shared>, task: Task) {
    let (store, attempt) = (Arc::clone(&shared.store), task.attempt);
    let recorded = tokio::task::spawn_blocking(move || lock(&store).record_attempt_announced(attempt)).await;
    let failure = match recorded {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(e) = failure {
        tracing::error!(
            task = %task.id,
            error = %e,
            "the task's attempt number could not be recorded in server.db; after a restart this task id may be \
             announced again"
        );
    }
    shared.announce_task(task);
}

/// After a round that was not committed: the strategy as of the last committed round. `None`
/// (after logging why) when that cannot be had; the server must then stop rather than aggregate
/// with a wrong state.
async fn reset_strategy(shared: &Arc<Shared>) -> Option<Box<dyn Strategy>> {
    let store = Arc::clone(&shared.store);
    let study = shared.study.clone();
    match tokio::task::spawn_blocking(move || strategy_at_last_round(&study, &lock(&store))).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot restore the aggregation strategy's state; stopping the server");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "restoring the aggregation strategy failed; stopping the server");
            None
        }
    }
}

/// Pools the spooled statistics of `sites` (in site order) into the initial model and writes it
/// as the round-0 checkpoint.
fn pool_statistics(
    store: &Mutex<Store>,
    global: &GlobalModel,
    spool: &Spool,
    task_id: &str,
    sites: &BTreeSet<String>,
) -> Result<GlobalModel, ServerError> {
    let bad = |what: String| ServerError::Model(what);
    let mut per_site = Vec::with_capacity(sites.len());
    for site in sites {
        let file = spool.answer(task_id, site, Answer::Statistics);
        let bytes = std::fs::read(&file).map_err(|e| ServerError::Io(format!("{}: {e}", file.display())))?;
        per_site.push(
            fedhcc_core::standardisation::decode_sums(&bytes).map_err(|e| bad(format!("{}: {e}", file.display())))?,
        );
    }
    let groups = fedhcc_core::standardisation::groups(&global.layout);
    let mut merged = Vec::with_capacity(groups.len());
    for (g, _) in &groups {
        let parts: Vec<&fedhcc_core::standardisation::GroupSums> =
            per_site.iter().filter_map(|gs| gs.iter().find(|x| &x.group == g)).collect();
        merged.push(fedhcc_core::standardisation::GroupSums::merge(&parts).map_err(|e| bad(e.to_string()))?);
    }
    let bytes = lock(store).read_checkpoint(&global.path, &global.sha256)?;
    let mut model = ParameterSet::decode(&bytes).map_err(|e| bad(format!("{}: {e}", global.path.display())))?;
    fedhcc_core::standardisation::write(&mut model, &merged).map_err(|e| bad(e.to_string()))?;
    let (path, sha256, bytes) = lock(store).write_checkpoint(0, &model)?;
    Ok(GlobalModel { round: 0, path, sha256, bytes, layout: model.layout().clone() })
}

/// The new global model, the strategy-state file (path, SHA-256) if the strategy keeps one, and
/// the seconds aggregation and writing took.
type AggregateResult = Result<(GlobalModel, Option<(String, String)>, f64), ServerError>;

#[allow(clippy::too_many_arguments)]
fn aggregate_round(
    store: &Mutex<Store>,
    study: &StudyConfig,
    global: &GlobalModel,
    spool: &Spool,
    task: &coordinator::Task,
    results: &BTreeMap<String, coordinator::SiteResult>,
    failures: &BTreeMap<String, String>,
    strategy: &mut dyn Strategy,
) -> AggregateResult {
    debug_assert_eq!(task.kind, TaskKind::Train);
    let t0 = Instant::now();
    let mut file =
        std::fs::File::open(&global.path).map_err(|e| ServerError::Io(format!("{}: {e}", global.path.display())))?;
    let params = ParameterSet::read_from(&mut std::io::BufReader::new(&mut file))
        .map_err(|e| ServerError::Model(format!("{}: {e}", global.path.display())))?;
    let next = if task.roster.is_some() {
        // Secure aggregation: one update, the decoded weighted mean of the roster's masked updates.
        let mut sum = secure_sum::SecureSum::fold(study, task, results, spool, params.layout())
            .map_err(|e| ServerError::Model(e.to_string()))?;
        strategy.aggregate(params, &mut [&mut sum], failures)
    } else {
        // Fixed order: BTreeMap iterates by site id.
        let mut sources: Vec<SpooledUpdate> = results
            .iter()
            .map(|(site, r)| SpooledUpdate {
                site: site.clone(),
                samples: r.samples,
                path: spool.answer(&task.id, site, Answer::Update),
            })
            .collect();
        let mut refs: Vec<&mut dyn UpdateSource> = sources.iter_mut().map(|s| s as &mut dyn UpdateSource).collect();
        strategy.aggregate(params, &mut refs, failures)
    }
    .map_err(|e| ServerError::Model(e.to_string()))?;
    let (path, sha, bytes) = lock(store).write_checkpoint(task.round, &next)?;
    let state_file = match strategy.state() {
        Some(st) => {
            let (p, s, _) = lock(store).write_strategy_state(task.round, st)?;
            Some((p.display().to_string(), s))
        }
        None => None,
    };
    let layout = next.layout().clone();
    Ok((GlobalModel { round: task.round, path, sha256: sha, bytes, layout }, state_file, t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    #[test]
    fn the_strategy_resumes_with_the_state_of_the_last_committed_round() {
        let tmp = tempfile::tempdir().unwrap();
        let study: StudyConfig =
            toml::from_str("study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"fedyogi\"\n").unwrap();
        let mut store = Store::open(tmp.path(), "run-1").unwrap();
        assert_eq!(strategy_at_last_round(&study, &store).unwrap().state(), None, "fresh before round 1");
        // Round 1 aggregated and committed with its state.
        let mut s = strategy_at_last_round(&study, &store).unwrap();
        let mut a = strategy::MemoryUpdate { site: "a".into(), samples: 2, delta: ps(vec![0.5, -0.5]) };
        let next = s.aggregate(ps(vec![0.0, 0.0]), &mut [&mut a], &BTreeMap::new()).unwrap();
        let (cp, cp_sha, _) = store.write_checkpoint(1, &next).unwrap();
        let (st, st_sha, _) = store.write_strategy_state(1, s.state().unwrap()).unwrap();
        let rec: store::RoundRecord = serde_json::from_value(serde_json::json!({
            "round": 1, "attempt": 1, "task_id": "r1a1", "participants": ["a"], "samples": [2], "losses": [null],
            "failures": [], "duration_s": 0.0, "aggregate_s": 0.0, "bytes_in": 0, "bytes_out": 0,
            "checkpoint": cp.display().to_string(), "checkpoint_sha256": cp_sha, "committed_unix": 0,
            "strategy_state": st.display().to_string(), "strategy_state_sha256": st_sha,
        }))
        .unwrap();
        store.commit_round(&rec).unwrap();
        let resumed = strategy_at_last_round(&study, &store).unwrap();
        assert_eq!(resumed.state(), s.state());
        // A state file altered after the commit stops the server with a message.
        std::fs::write(&st, b"x").unwrap();
        let e = strategy_at_last_round(&study, &store).err().unwrap().to_string();
        assert!(e.contains("altered"), "{e}");
    }
}
