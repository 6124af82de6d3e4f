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
//! - [`driver`]: the round driver (aggregation, commits, reports, off the request path);
//!   [`spool`]: the open task's answers on disk, the one owner of their names and clean-up.
//! - [`status`]: the study lead's status view and its JSON; [`error`]: what stops the server.
//! - [`run`]: wires them together; the caller binds the listener and owns shutdown.

pub mod admin;
pub mod allow_list;
pub mod audit;
pub mod coordinator;
pub mod dashboard;
mod driver;
pub mod error;
pub mod evaluation;
pub mod events;
pub mod listener;
pub mod metrics;
pub mod privacy;
pub mod ratelimit;
pub mod secure_sum;
pub mod service;
pub mod spool;
pub mod state;
pub mod status;
pub mod store;
pub mod strategy;

use coordinator::{Coordinator, CoordinatorConfig, Phase};
use fedhcc_core::config::{ServerConfig, StudyConfig};
use fedhcc_core::params::{Layout, ParameterSet, decode_header};
use fedhcc_proto as pb;
use state::{Announcement, GlobalModel, Shared, lock};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use store::Store;

pub use error::ServerError;
pub use status::{status_json, status_reply};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        (Some(l), Some(cfg)) => Some((
            l,
            dashboard::Dashboard::prepare(
                cfg,
                &config.tls,
                &config.state_dir,
                Duration::from_secs(config.revocation_check_s),
            )?,
        )),
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
    if study.federation.dp.is_some() {
        tracing::warn!(
            strategy = %study.federation.strategy,
            "differential privacy: every site has weight 1 in the aggregate (the unweighted mean of the sites), not \
             its number of training patients"
        );
    }
    store.init_admin()?;
    // The strategy's carried state (a server optimizer's moments) as of the last committed round.
    let strategy = driver::strategy_at_last_round(&study, &store)?;
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
    let spool = spool::Spool::fresh(&state_dir).map_err(|e| ServerError::Io(e.to_string()))?;
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
        state_dir: state_dir.clone(),
        spool,
        store: Arc::new(Mutex::new(store)),
        bytes_in: Default::default(),
        bytes_out: Default::default(),
        task_started: Mutex::new(None),
        metrics: Default::default(),
        events: Default::default(),
        audit,
        joins: Default::default(),
        reports: ratelimit::RateLimiter::reports(),
        uploads: Default::default(),
        shutdown: inner.clone(),
        tracker: TaskTracker::new(),
    });

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let accept = {
        let tracker = shared.tracker.clone();
        let token = inner.clone();
        let files = config.tls.clone();
        let check = Duration::from_secs(config.revocation_check_s);
        shared.tracker.spawn(listener::accept_loop(listener, tls, files, check, conn_tx, token, tracker))
    };
    let driver = driver::Driver { shared: Arc::clone(&shared), strategy, keep: config.keep_checkpoints };
    let driver = shared.tracker.spawn(driver.run(jobs_rx));
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

fn verify_checkpoint(store: &Store, path: &Path, sha: &str) -> Result<Layout, ServerError> {
    let bytes = store.read_checkpoint(path, sha)?;
    let (layout, _) = decode_header(&bytes).map_err(|e| ServerError::Model(format!("{}: {e}", path.display())))?;
    Ok(layout)
}

/// tonic reads the peer's certificates through the connection it is handed: a [`listener::Revocable`]
/// connection gives those of the TLS stream inside.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for listener::Revocable<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}
