//! fedhcc-server: the aggregation server.
//!
//! - [`coordinator`]: the round state machine (pure, no IO).
//! - [`strategy`]: aggregation rules (pure): FedAvg, FedProx, FedAdam/FedYogi, FedBN, median,
//!   trimmed mean; a server optimizer's state is saved with every committed round.
//! - [`store`]: SQLite round records and atomic checkpoints.
//! - [`service`]: the gRPC service (the only place errors become `tonic::Status`).
//! - [`listener`]: TLS 1.3 accept loop with client-certificate and revocation checks.
//! - [`dashboard`]: the study lead's web page, its JSON and `/metrics` ([`metrics`]), over HTTPS on
//!   a port of its own; [`events`] keeps the recent events it shows.
//! - [`audit`]: the hash-chained audit log of messages carrying task data; [`ratelimit`]: the
//!   per-site join limit.
//! - [`admin`]: the study lead's commands (start, pause, resume, abort, allow-list, export) over
//!   the `Admin` RPCs; [`allow_list`]: the sites that may join, with the study lead's changes.
//! - [`privacy`]: secure aggregation and DP settings at start, ε per round, their status;
//!   [`secure_sum`]: the decoded sum of a round's masked updates, handed to the strategy.
//! - [`run`]: wires them together; the caller binds the listener and owns shutdown.

pub mod admin;
pub mod allow_list;
pub mod audit;
pub mod coordinator;
pub mod dashboard;
pub mod evaluation;
pub mod events;
pub mod listener;
pub mod metrics;
pub mod privacy;
pub mod ratelimit;
pub mod secure_sum;
pub mod service;
pub mod state;
pub mod store;
pub mod strategy;

use coordinator::{Action, Coordinator, CoordinatorConfig, Phase, TaskKind};
use events::EventKind;
use fedhcc_core::config::{ServerConfig, StudyConfig};
use fedhcc_core::params::{Layout, ParameterSet, decode_header};
use fedhcc_proto as pb;
use state::{Announcement, GlobalModel, Shared, lock};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use store::{RoundRecord, Store};
use strategy::{FedAvg, Strategy, StrategyError, UpdateBlocks, UpdateSource};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A failure that stops the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] fedhcc_core::pki::PkiError),
    #[error("the initial model does not match the checkpoints in the state folder: {0}")]
    Model(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(String),
    #[error("aggregation strategy: {0}")]
    Strategy(#[from] StrategyError),
    #[error("{0}")]
    Audit(#[from] fedhcc_secure::audit::AuditError),
}

/// How long shutdown waits for open connections and tasks.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `run` needs besides the listener.
pub struct ServerOptions {
    pub config: ServerConfig,
    pub study: StudyConfig,
    /// The model every site starts from (used when the state folder has no committed round).
    /// Under FedBN the server keeps only its shared parameters ([`strategy::server_model`]).
    pub initial_model: ParameterSet,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub finished: bool,
    /// The study lead aborted the run (`fedhcc admin abort`): the last committed model is final.
    pub aborted: bool,
    pub rounds_completed: u32,
    pub final_checkpoint: PathBuf,
    pub final_sha256: String,
}

/// Runs the server on an already-bound listener until the run finishes (every round committed and
/// evaluated, and the sites told) or `shutdown` is cancelled. With a `[dashboard]` table in the
/// configuration it also binds the dashboard's address and serves the dashboard there.
///
/// # Errors
/// Unusable state folder, TLS files, checkpoints or dashboard address; never for a misbehaving site.
pub async fn run(
    listener: TcpListener,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> Result<RunOutcome, ServerError> {
    let dashboard = match &opts.config.dashboard {
        Some(d) => Some(TcpListener::bind(&d.listen).await.map_err(|e| {
            ServerError::Io(format!("dashboard: cannot listen on {} ([dashboard] listen): {e}", d.listen))
        })?),
        None => None,
    };
    run_with_dashboard(listener, dashboard, opts, shutdown).await
}

/// [`run`] with the dashboard on an already-bound listener (tests bind `127.0.0.1:0`); `None`
/// serves no dashboard. A listener needs the configuration's `[dashboard]` table (token, metrics).
///
/// # Errors
/// As [`run`]; also a dashboard listener without a `[dashboard]` table, or an unusable token file.
pub async fn run_with_dashboard(
    listener: TcpListener,
    dashboard: Option<TcpListener>,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> Result<RunOutcome, ServerError> {
    let ServerOptions { config, study, initial_model } = opts;
    let config = config.with_absolute_paths();
    let dashboard = match (dashboard, &config.dashboard) {
        (Some(l), Some(cfg)) => Some((l, dashboard::Dashboard::prepare(cfg, &config.tls, &config.state_dir)?)),
        (Some(_), None) => {
            return Err(ServerError::Io(
                "a dashboard listener was given but the server configuration has no [dashboard] table".into(),
            ));
        }
        (None, _) => None,
    };
    let description = strategy::from_study(&study)?.describe();
    // Under FedBN the server holds (and the wire carries) the shared parameters only.
    let initial_model = strategy::server_model(&study, initial_model)?;
    warn_if_nothing_is_trimmed(&study, config.allowed_sites.len());
    let tls = fedhcc_core::pki::server_config(&config.tls)?;
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|e| ServerError::Io(format!("{}: {e}", state_dir.display())))?;
    let run_id = study.run_id.clone();
    let store = Store::open(&state_dir, &run_id)?;
    let audit = audit::ServerAudit::open(&state_dir)?;
    store.check_identity(&study.study_id, &initial_model.fingerprint().to_hex())?;
    store.check_strategy(&description)?;
    // Secure aggregation and DP keep their settings for the whole run; the ε budget may end it early.
    let rounds_to_run = privacy::check_at_start(&study, &store, config.allowed_sites.len())?;
    store.init_admin()?;
    // The strategy's carried state (a server optimizer's moments) as of the last committed round.
    let strategy = strategy_at_last_round(&study, &store)?;
    tracing::info!(strategy = %description, "aggregation strategy");

    // Resume after the newest committed round whose checkpoint verifies.
    let rounds = store.rounds()?;
    let (completed, global) = match rounds.last() {
        Some(last) => {
            let path = PathBuf::from(&last.checkpoint);
            let layout = verify_checkpoint(&store, &path, &last.checkpoint_sha256)?;
            if layout.fingerprint() != initial_model.fingerprint() {
                return Err(ServerError::Model(format!("checkpoint {} has another layout", path.display())));
            }
            tracing::info!(round = last.round, checkpoint = %path.display(), "resuming after the last committed round");
            let bytes = layout.payload_len() as u64;
            (last.round, GlobalModel { round: last.round, path, sha256: last.checkpoint_sha256.clone(), bytes, layout })
        }
        None => {
            let (path, sha, bytes) = store.write_checkpoint(0, &initial_model)?;
            let layout = initial_model.layout().clone();
            (0, GlobalModel { round: 0, path, sha256: sha, bytes, layout })
        }
    };
    // A model with standardisation tensors pools the sites' feature statistics before round 1.
    let statistics = !fedhcc_core::standardisation::groups(initial_model.layout()).is_empty();
    drop(initial_model);
    let spool_dir = state_dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool_dir);
    std::fs::create_dir_all(&spool_dir).map_err(|e| ServerError::Io(format!("{}: {e}", spool_dir.display())))?;
    write_effective_config(&state_dir, &config, &study);

    let coord = Coordinator::new(
        CoordinatorConfig {
            rounds: rounds_to_run,
            min_sites: study.federation.min_sites,
            round_timeout: Duration::from_secs(study.federation.round_timeout_s),
            evaluate_every: study.federation.evaluate_every,
            statistics,
        },
        completed,
    )
    // A restart after a round that was due an evaluation, before any site's evaluation of it was
    // recorded, evaluates it first (the final model's evaluation included).
    .with_evaluation_recorded(store.evaluations()?.iter().any(|r| r.round == completed))
    .with_control(admin::initial_control(&store, study.federation.start, completed)?)
    // Task ids go on after those announced before a restart (never reused within a run).
    .after_attempts(store.attempts_announced()?);
    let allowed = allow_list::AllowList::new(config.allowed_sites.iter().cloned(), &store.site_access()?);
    let mut coord = coord;
    if let Some(p) = fedhcc_core::privacy::secure_aggregation_params(&study.federation) {
        // The key exchange closes by half the round timeout at the latest, leaving the rest to train.
        let round = Duration::from_secs(study.federation.round_timeout_s);
        coord.enable_secure_aggregation(Duration::from_secs(p.key_timeout_s).min(round / 2));
    }
    let already_finished = coord.phase() == Phase::Finished;
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let inner = shutdown.child_token();
    let (announce, _) = watch::channel(Announcement { task: None, finished: already_finished.then_some(completed) });
    let shared = Arc::new(Shared {
        allowed,
        study,
        coord: Mutex::new(coord),
        global: RwLock::new(Some(Arc::new(global))),
        announce,
        sites: Mutex::new(BTreeMap::new()),
        wake: Notify::new(),
        jobs: jobs_tx,
        spool_dir,
        store: Arc::new(Mutex::new(store)),
        bytes_in: Default::default(),
        bytes_out: Default::default(),
        task_started: Mutex::new(None),
        metrics: Default::default(),
        events: Default::default(),
        audit,
        joins: Default::default(),
        shutdown: inner.clone(),
        tracker: TaskTracker::new(),
    });

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let accept = {
        let tracker = shared.tracker.clone();
        let token = inner.clone();
        let files = config.tls.clone();
        shared.tracker.spawn(listener::accept_loop(listener, tls, files, conn_tx, token, tracker))
    };
    let driver = shared.tracker.spawn(drive(Arc::clone(&shared), jobs_rx, strategy, config.keep_checkpoints));
    if let Some((l, d)) = dashboard {
        d.spawn(l, Arc::clone(&shared))?;
    }

    let svc = service::FederationService { shared: Arc::clone(&shared) };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Bounded per-connection buffering: with many sites uploading at once, memory is set by
        // these windows and the 1 MiB message limit, not by the model size.
        .initial_stream_window_size(Some(512 * 1024))
        .initial_connection_window_size(Some(1024 * 1024))
        .add_service(
            pb::federation_server::FederationServer::new(svc)
                .max_decoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::admin_server::AdminServer::new(admin::AdminService::new(Arc::clone(&shared)))
                .max_decoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(conn_rx),
            inner.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    // Graceful shutdown waits for open connections; a peer that never closes its side must not
    // keep the server alive, so it gets a few seconds.
    let served = tokio::select! {
        r = &mut server => r,
        _ = async { inner.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
    };
    inner.cancel();
    shared.tracker.close();
    let _ = accept.await;
    let finished = driver.await.unwrap_or(false) || already_finished;
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.tracker.wait()).await.is_err() {
        tracing::warn!("some connection tasks did not stop in time");
    }
    served?;
    let g = shared.global();
    let (completed, aborted) = {
        let c = lock(&shared.coord);
        (c.completed_rounds(), c.control() == coordinator::RunControl::Aborted)
    };
    Ok(RunOutcome {
        finished,
        aborted,
        rounds_completed: completed,
        final_checkpoint: g.as_ref().map(|g| g.path.clone()).unwrap_or_default(),
        final_sha256: g.map(|g| g.sha256.clone()).unwrap_or_default(),
    })
}

fn write_effective_config(state_dir: &Path, config: &ServerConfig, study: &StudyConfig) {
    #[derive(serde::Serialize)]
    struct Effective<'a> {
        server: &'a ServerConfig,
        study: &'a StudyConfig,
    }
    match toml::to_string_pretty(&Effective { server: config, study }) {
        Ok(text) => {
            if let Err(e) =
                fedhcc_core::pki::write_atomic(&state_dir.join("effective-config.toml"), text.as_bytes(), false)
            {
                tracing::warn!(error = %e, "could not write the effective configuration");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not serialise the effective configuration"),
    }
}

/// The study's strategy with the state saved with the last committed round restored (fresh when
/// no round is committed).
///
/// # Errors
/// Invalid settings, or a missing, altered or mismatched saved state.
fn strategy_at_last_round(study: &StudyConfig, store: &Store) -> Result<Box<dyn Strategy>, ServerError> {
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

fn warn_if_nothing_is_trimmed(study: &StudyConfig, sites: usize) {
    if study.federation.strategy == fedhcc_core::aggregation::StrategyKind::TrimmedMean.as_str() {
        let beta = study.federation.trimmed_mean.unwrap_or_default().trim_fraction;
        if let Ok(t) = strategy::TrimmedMean::new(beta)
            && t.trimmed_per_end(sites) == 0
        {
            tracing::warn!(
                trim_fraction = beta,
                sites,
                "trimmed_mean: with this many sites nothing is trimmed; it is the unweighted mean of the updates"
            );
        }
    }
}

/// Pools the spooled statistics of `sites` (in site order) into the initial model and writes it
/// as the round-0 checkpoint.
fn pool_statistics(
    store: &Mutex<Store>,
    global: &GlobalModel,
    spool: &Path,
    sites: &BTreeSet<String>,
) -> Result<GlobalModel, ServerError> {
    let bad = |what: String| ServerError::Model(what);
    let mut per_site = Vec::with_capacity(sites.len());
    for site in sites {
        let file = spool.join(format!("{site}.stats"));
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

fn verify_checkpoint(store: &Store, path: &Path, sha: &str) -> Result<Layout, ServerError> {
    let bytes = store.read_checkpoint(path, sha)?;
    let (layout, _) = decode_header(&bytes).map_err(|e| ServerError::Model(format!("{}: {e}", path.display())))?;
    Ok(layout)
}

/// The round driver: runs aggregation, checkpoints and records off the request path, and closes
/// tasks at their deadline. Returns whether the run finished.
async fn drive(
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<Action>,
    mut strategy: Box<dyn Strategy>,
    keep: usize,
) -> bool {
    let far = Duration::from_secs(3600);
    loop {
        let deadline = lock(&shared.coord).deadline();
        let sleep_until = deadline.unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return false,
            job = jobs.recv() => {
                let Some(action) = job else { return false };
                if handle_action(&shared, action, &mut strategy, keep).await {
                    // Give every site a moment to hear that the run is over, then stop.
                    let grace = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < grace && !shared.connected_sites().is_empty() {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = shared.shutdown.cancelled() => break,
                        }
                    }
                    shared.shutdown.cancel();
                    return true;
                }
            }
            _ = tokio::time::sleep_until(sleep_until.into()) => {
                let actions = lock(&shared.coord).tick(Instant::now());
                shared.apply(actions);
            }
            _ = shared.wake.notified() => {}
        }
    }
}

/// Carries out one driver action. Returns true when the run is finished.
async fn handle_action(shared: &Arc<Shared>, action: Action, strategy: &mut Box<dyn Strategy>, keep: usize) -> bool {
    match action {
        Action::Announce(_) | Action::RosterFixed(_) => false,
        Action::SecureAggregationAborted { task, reason } => {
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
            let _ = tokio::fs::remove_dir_all(shared.spool_dir.join(&task.id)).await;
            false
        }
        Action::Discard { task, reason } => {
            tracing::warn!(task = %task.id, %reason, "round closed without enough updates; it will be retried");
            shared.metrics.round_retried();
            shared.events.push(
                EventKind::Retry,
                None,
                format!("round {}: closed without enough updates ({reason}); it will be retried", task.round),
            );
            let _ = tokio::fs::remove_dir_all(shared.spool_dir.join(&task.id)).await;
            false
        }
        Action::StatisticsDone { task, reported, missing } => {
            let span = tracing::info_span!("statistics", task = %task.id);
            let _e = span.enter();
            let spool = shared.spool_dir.join(&task.id);
            let Some(global) = shared.global() else {
                tracing::error!("no initial model to put the statistics into");
                return false;
            };
            let store = Arc::clone(&shared.store);
            let sites = reported.clone();
            let joined = tokio::task::spawn_blocking(move || pool_statistics(&store, &global, &spool, &sites)).await;
            let _ = tokio::fs::remove_dir_all(shared.spool_dir.join(&task.id)).await;
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
            false
        }
        Action::EvaluationDone { task, reported, missing } => {
            tracing::info!(task = %task.id, ?reported, ?missing, "evaluation closed");
            let list = |s: &std::collections::BTreeSet<String>| {
                if s.is_empty() { "none".to_string() } else { s.iter().cloned().collect::<Vec<_>>().join(", ") }
            };
            shared.events.push(
                EventKind::Evaluation,
                None,
                format!(
                    "round {}: evaluation closed; reported: {}; missing: {}",
                    task.round,
                    list(&reported),
                    list(&missing)
                ),
            );
            // Written before the next action (the run's end), so the report exists when it finishes.
            let (store, study) = (Arc::clone(&shared.store), shared.study.clone());
            let state_dir = shared.spool_dir.parent().map(Path::to_path_buf).unwrap_or_default();
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
            false
        }
        Action::Finish { rounds_completed } => {
            tracing::info!(rounds_completed, "run finished");
            shared.events.push(EventKind::Run, None, format!("run finished after {rounds_completed} rounds"));
            shared.announce.send_modify(|a| {
                a.task = None;
                a.finished = Some(rounds_completed);
            });
            true
        }
        Action::Abort { task, rounds_completed } => {
            if let Some(t) = &task {
                let _ = tokio::fs::remove_dir_all(shared.spool_dir.join(&t.id)).await;
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
            true
        }
        Action::Aggregate { task, results, failures } => {
            let span = tracing::info_span!("aggregate", round = task.round, task = %task.id);
            let _e = span.enter();
            let started = lock(&shared.task_started).unwrap_or_else(Instant::now);
            let Some(global) = shared.global() else {
                tracing::error!("no global model to aggregate into");
                return false;
            };
            // Stop serving the old model: the round is closed, and memory stays at one model.
            shared.set_global(None);
            let spool = shared.spool_dir.join(&task.id);
            let store = Arc::clone(&shared.store);
            let (res_c, fail_c, task_c) = (results.clone(), failures.clone(), task.clone());
            let study = shared.study.clone();
            let mut strat = std::mem::replace(strategy, Box::new(FedAvg));
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
                    round_not_committed(shared, strategy, kept_global).await;
                    return false;
                }
            };
            drop(kept_global);
            *strategy = strat;
            let _ = tokio::fs::remove_dir_all(shared.spool_dir.join(&task.id)).await;
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
                    let store = Arc::clone(&shared.store);
                    let rec = record.clone();
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
                                aggregate_s = agg_s,
                                bytes_in = record.bytes_in,
                                "round committed"
                            );
                            shared.metrics.round_committed(record.duration_s, agg_s);
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
                            let actions = lock(&shared.coord).round_committed(task.round, Instant::now());
                            shared.apply(actions);
                        }
                        other => {
                            tracing::error!(result = ?other.map(|r| r.err()), "round could not be recorded; retrying it");
                            round_not_committed(shared, strategy, old_global).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "aggregation failed; the round is retried");
                    round_not_committed(shared, strategy, old_global).await;
                }
            }
            false
        }
    }
}

/// A round whose aggregation or record failed: undo what the strategy carried forward, serve the
/// old model again and let the coordinator retry the round (or stop the server if the strategy's
/// state cannot be restored).
async fn round_not_committed(shared: &Arc<Shared>, strategy: &mut Box<dyn Strategy>, old_global: Arc<GlobalModel>) {
    shared.metrics.round_retried();
    shared.events.push(
        EventKind::Retry,
        None,
        "the round could not be committed (the server log says why); it is retried",
    );
    match reset_strategy(shared).await {
        Some(s) => *strategy = s,
        None => {
            shared.shutdown.cancel();
            return;
        }
    }
    shared.set_global(Some(old_global));
    let actions = lock(&shared.coord).aggregation_failed(Instant::now());
    shared.apply(actions);
}

/// A spooled update file, read back in blocks.
struct SpoolFile {
    site: String,
    samples: u64,
    path: PathBuf,
}

impl UpdateSource for SpoolFile {
    fn site(&self) -> &str {
        &self.site
    }
    fn samples(&self) -> u64 {
        self.samples
    }
    fn read(&mut self, layout: &Layout, on_values: &mut dyn FnMut(usize, &[f32])) -> Result<(), StrategyError> {
        let err = |m: String| StrategyError::Update { site: self.site.clone(), message: m };
        let mut f = std::fs::File::open(&self.path).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        let mut reader = fedhcc_core::params::PayloadReader::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
            if n == 0 {
                break;
            }
            reader.push(&buf[..n], &mut *on_values)?;
            if let Some(l) = reader.layout()
                && l.fingerprint() != layout.fingerprint()
            {
                return Err(err("layout differs from the global model".into()));
            }
        }
        reader.finish()?;
        Ok(())
    }

    fn blocks(&mut self, layout: &Layout) -> Result<Box<dyn UpdateBlocks + '_>, StrategyError> {
        let err = |m: String| StrategyError::Update { site: self.site.clone(), message: m };
        let f = std::fs::File::open(&self.path).map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        let reader = fedhcc_core::params::ValueReader::new(std::io::BufReader::with_capacity(64 * 1024, f))
            .map_err(|e| err(format!("{}: {e}", self.path.display())))?;
        if reader.layout().fingerprint() != layout.fingerprint() {
            return Err(err("layout differs from the global model".into()));
        }
        Ok(Box::new(SpoolBlocks { site: &self.site, path: &self.path, reader }))
    }
}

/// A spooled update being read block by block.
struct SpoolBlocks<'a> {
    site: &'a str,
    path: &'a Path,
    reader: fedhcc_core::params::ValueReader<std::io::BufReader<std::fs::File>>,
}

impl SpoolBlocks<'_> {
    fn error(&self, e: fedhcc_core::params::ParamsError) -> StrategyError {
        StrategyError::Update { site: self.site.into(), message: format!("{}: {e}", self.path.display()) }
    }
}

impl UpdateBlocks for SpoolBlocks<'_> {
    fn read_block(&mut self, out: &mut [f32]) -> Result<(), StrategyError> {
        self.reader.read(out).map_err(|e| self.error(e))
    }
    fn finish(self: Box<Self>) -> Result<(), StrategyError> {
        let SpoolBlocks { site, path, reader } = *self;
        reader
            .finish()
            .map_err(|e| StrategyError::Update { site: site.into(), message: format!("{}: {e}", path.display()) })
    }
}

/// The new global model, the strategy-state file (path, SHA-256) if the strategy keeps one, and
/// the seconds aggregation and writing took.
type AggregateResult = Result<(GlobalModel, Option<(String, String)>, f64), ServerError>;

#[allow(clippy::too_many_arguments)]
fn aggregate_round(
    store: &Mutex<Store>,
    study: &StudyConfig,
    global: &GlobalModel,
    spool: &Path,
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
        let mut sources: Vec<SpoolFile> = results
            .iter()
            .map(|(site, r)| SpoolFile {
                site: site.clone(),
                samples: r.samples,
                path: spool.join(format!("{site}.upd")),
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

/// The status view for the study lead.
pub fn status_reply(shared: &Shared) -> pb::StatusReply {
    let (phase, current, total, attempt, selected) = {
        let c = lock(&shared.coord);
        let t = c.current_task();
        (
            c.phase().as_str().to_string(),
            c.current_round(),
            c.total_rounds(),
            t.map(|t| t.attempt).unwrap_or(0),
            t.map(|t| t.selected.clone()).unwrap_or_default(),
        )
    };
    let sites = shared
        .allowed_site_infos()
        .into_iter()
        .map(|(s, i)| pb::SiteStatus {
            selected: selected.contains(&s),
            site_id: s,
            connected: i.connections > 0,
            last_seen_unix: i.last_seen_unix,
            rounds_contributed: i.rounds_contributed,
            last_refusal: i.last_refusal,
            policy_refusal: i.policy_refusal,
        })
        .collect();
    let rounds = lock(&shared.store).rounds().unwrap_or_default();
    let rounds = rounds
        .into_iter()
        .map(|r| {
            let losses: Vec<f64> = r.losses.iter().flatten().copied().collect();
            pb::RoundSummary {
                round: r.round,
                participants: r.participants,
                total_samples: r.samples.iter().sum(),
                mean_train_loss: if losses.is_empty() {
                    f64::NAN
                } else {
                    losses.iter().sum::<f64>() / losses.len() as f64
                },
                duration_s: r.duration_s,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                checkpoint_sha256: r.checkpoint_sha256,
                secure_aggregation: r.secure_aggregation,
                epsilon: r.epsilon,
            }
        })
        .collect();
    pb::StatusReply {
        study_id: shared.study.study_id.clone(),
        run_id: shared.study.run_id.clone(),
        phase,
        current_round: current,
        total_rounds: total,
        attempt,
        sites,
        rounds,
        model_fingerprint: shared.global().map(|g| g.fingerprint().to_hex()).unwrap_or_default(),
        admin: Some(admin::admin_view(shared)),
        privacy: Some(privacy::status(shared)),
    }
}

/// The status view as JSON: what `fedhcc status --json` prints and the dashboard's `/api/status`
/// serves, so both show the same facts. A mean loss that is not a number (no site reported one)
/// is `null`.
pub fn status_json(reply: &pb::StatusReply) -> serde_json::Value {
    serde_json::json!({
        "study_id": reply.study_id, "run_id": reply.run_id, "phase": reply.phase,
        "current_round": reply.current_round, "total_rounds": reply.total_rounds, "attempt": reply.attempt,
        "model_fingerprint": reply.model_fingerprint,
        "admin": admin::admin_json(reply.admin.as_ref()),
        "privacy": privacy::status_json(reply.privacy.as_ref()),
        "sites": reply.sites.iter().map(|s| serde_json::json!({
            "site_id": s.site_id, "connected": s.connected, "last_seen_unix": s.last_seen_unix,
            "rounds_contributed": s.rounds_contributed, "last_refusal": s.last_refusal,
            "selected": s.selected, "policy_refusal": s.policy_refusal})).collect::<Vec<_>>(),
        "rounds": reply.rounds.iter().map(|r| serde_json::json!({
            "round": r.round, "participants": r.participants, "total_samples": r.total_samples,
            "mean_train_loss": if r.mean_train_loss.is_finite() { Some(r.mean_train_loss) } else { None },
            "duration_s": r.duration_s, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "checkpoint_sha256": r.checkpoint_sha256, "secure_aggregation": r.secure_aggregation,
            "epsilon": r.epsilon})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strategy::Median;

    fn ps(v: Vec<f32>) -> ParameterSet {
        ParameterSet::from_tensors(vec![("w".into(), vec![v.len()], v)]).unwrap()
    }

    #[test]
    fn spooled_updates_are_read_block_wise_and_a_damaged_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let n = strategy::BLOCK_VALUES + 5;
        let write = |name: &str, k: f32| {
            let p = tmp.path().join(name);
            std::fs::write(&p, ps((0..n).map(|i| i as f32 * k).collect()).encode()).unwrap();
            p
        };
        let mut files = [
            SpoolFile { site: "a".into(), samples: 1, path: write("a.upd", 1.0) },
            SpoolFile { site: "b".into(), samples: 1, path: write("b.upd", 5.0) },
            SpoolFile { site: "c".into(), samples: 1, path: write("c.upd", 2.0) },
        ];
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let out = Median.aggregate(ps(vec![1.0; n]), &mut refs, &BTreeMap::new()).unwrap();
        assert!(out.values().iter().enumerate().all(|(i, &v)| v == 1.0 + i as f32 * 2.0));

        let bytes = std::fs::read(&files[1].path).unwrap();
        std::fs::write(&files[1].path, &bytes[..bytes.len() - 4]).unwrap();
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let e = Median.aggregate(ps(vec![1.0; n]), &mut refs, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("site b") && e.contains("b.upd"), "{e}");
        let mut refs: Vec<&mut dyn UpdateSource> = files.iter_mut().map(|f| f as &mut dyn UpdateSource).collect();
        let e = Median.aggregate(ps(vec![1.0; 3]), &mut refs, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("layout differs"), "{e}");
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
