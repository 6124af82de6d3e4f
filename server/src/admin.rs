//! The study lead's admin RPCs (`service Admin` in the protocol): start, pause, resume or abort the
//! run, add or remove a site from the allow-list, export the current global model. Part of the
//! service layer (with [`crate::service`], the only places errors become `tonic::Status`).
//!
//! Every call needs the study's admin certificate; a site certificate is refused (and counted as a
//! `not_admin` refusal). A change is recorded in the server database with who asked for it before
//! it takes effect (so it outlives a restart), then shown in the dashboard's event log and in
//! `fedhcc status` ([`admin_view`]).

use crate::coordinator::{AdminCommand, Phase, RunControl};
use crate::events::EventKind;
use crate::metrics::RefusalReason;
use crate::service::{Stall, send_checkpoint};
use crate::state::{Shared, lock, now_unix};
use crate::store::{AdminActionRecord, Store};
use fedhcc_core::config::StartMode;
use fedhcc_core::pki::{Role, peer_identity, validate_name};
use fedhcc_proto as pb;
use fedhcc_proto::MAX_CHUNK_BYTES;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Admin actions shown in the status view.
pub const RECENT_ACTIONS: usize = 20;

/// The tonic service for the study lead's commands.
#[derive(Clone)]
pub struct AdminService {
    pub(crate) shared: Arc<Shared>,
}

impl AdminService {
    /// The service over the server's shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The admin certificate's name, or a refusal for any other caller.
    fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<String, Status> {
        let refuse = |reason: RefusalReason, status: Status| {
            tracing::warn!(what, reason = status.message(), "admin request refused");
            self.shared.refused(None, reason, status.message());
            status
        };
        let Some(leaf) = req.peer_certs().and_then(|c| c.first().cloned()) else {
            return Err(refuse(
                RefusalReason::BadCertificate,
                Status::unauthenticated("no client certificate was presented"),
            ));
        };
        let id = peer_identity(&leaf)
            .map_err(|e| refuse(RefusalReason::BadCertificate, Status::permission_denied(e.to_string())))?;
        if id.study != self.shared.study.study_id {
            return Err(refuse(
                RefusalReason::BadCertificate,
                Status::permission_denied(format!(
                    "certificate is for study '{}', this server runs study '{}'",
                    id.study, self.shared.study.study_id
                )),
            ));
        }
        if id.role != Role::Admin {
            let role = match id.role {
                Role::Site => "site",
                Role::Server => "server",
                Role::Admin => "admin",
            };
            return Err(refuse(
                RefusalReason::NotAdmin,
                Status::permission_denied(format!(
                    "'{}' holds a {role} certificate; {what} needs the study lead's admin certificate",
                    id.name
                )),
            ));
        }
        Ok(id.name)
    }

    fn record_event(&self, admin: &str, message: &str) {
        tracing::info!(admin, "{message}");
        self.shared.events.push(EventKind::Admin, None, format!("{admin}: {message}"));
    }
}

fn store_failure(e: &crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "an admin command could not be recorded");
    Status::internal("the server could not record the command, so nothing was changed; the server log says why")
}

fn blocking_failure(e: &tokio::task::JoinError) -> Status {
    tracing::error!(error = %e, "an admin command failed");
    Status::internal("the command failed inside the server; the server log says why")
}

/// What a control command did, in words for the study lead.
fn describe(cmd: AdminCommand, phase: Phase, task: Option<&str>, rounds: u32) -> String {
    match (cmd, task) {
        (AdminCommand::Start, _) => "run started".to_string(),
        (AdminCommand::Resume, _) => "run resumed".to_string(),
        (AdminCommand::Pause, Some(t)) => {
            format!("run paused: task {t} may finish (and its round commit); nothing new is announced until resume")
        }
        (AdminCommand::Pause, None) if phase == Phase::Aggregating => {
            "run paused: the round being aggregated will commit; nothing new is announced until resume".to_string()
        }
        (AdminCommand::Pause, None) => "run paused: nothing new is announced until resume".to_string(),
        (AdminCommand::Abort, _) if phase == Phase::Aggregating => {
            "run aborted: it ends once the round being aggregated is committed".to_string()
        }
        (AdminCommand::Abort, _) => {
            format!("run aborted after {rounds} committed rounds; the model of round {rounds} is final")
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn control(&self, req: Request<pb::ControlRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let admin = self.admin(&req, "controlling the run")?;
        let cmd = match pb::ControlCommand::try_from(req.get_ref().command) {
            Ok(pb::ControlCommand::Start) => AdminCommand::Start,
            Ok(pb::ControlCommand::Pause) => AdminCommand::Pause,
            Ok(pb::ControlCommand::Resume) => AdminCommand::Resume,
            Ok(pb::ControlCommand::Abort) => AdminCommand::Abort,
            _ => return Err(Status::invalid_argument("name a command: start, pause, resume or abort")),
        };
        let shared = Arc::clone(&self.shared);
        let who = admin.clone();
        // The change is recorded before it takes effect, under the coordinator's lock, so the
        // database and the coordinator agree (off the async threads: the write is fsynced).
        let done = tokio::task::spawn_blocking(move || {
            let mut coord = lock(&shared.coord);
            let next = coord.check_command(cmd).map_err(|r| Status::failed_precondition(r.to_string()))?;
            let task = coord.current_task().map(|t| t.id.clone());
            let record = AdminActionRecord {
                unix: now_unix(),
                admin: who,
                action: cmd.as_str().into(),
                detail: task.as_ref().map(|t| format!("task {t} in flight")).unwrap_or_default(),
            };
            lock(&shared.store).record_run_control(next.as_str(), &record).map_err(|e| store_failure(&e))?;
            let phase_before = coord.phase();
            let actions = coord.command(cmd, Instant::now()).map_err(|r| Status::failed_precondition(r.to_string()))?;
            let message = describe(cmd, phase_before, task.as_deref(), coord.completed_rounds());
            Ok::<_, Status>((actions, message, coord.control(), coord.phase()))
        })
        .await
        .map_err(|e| blocking_failure(&e))?;
        let (actions, message, control, phase) = done?;
        self.shared.apply(actions);
        self.record_event(&admin, &message);
        Ok(Response::new(pb::AdminReply {
            message,
            run_control: control.as_str().into(),
            phase: phase.as_str().into(),
        }))
    }

    async fn set_site_access(&self, req: Request<pb::SiteAccessRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let admin = self.admin(&req, "changing the allow-list")?;
        let pb::SiteAccessRequest { site_id: site, allowed } = req.into_inner();
        validate_name("site", &site).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let shared = Arc::clone(&self.shared);
        let (who, s) = (admin.clone(), site.clone());
        let changed = tokio::task::spawn_blocking(move || {
            if shared.allowed.contains(&s) == allowed {
                return Ok(false);
            }
            let record = AdminActionRecord {
                unix: now_unix(),
                admin: who,
                action: if allowed { "allow" } else { "disallow" }.into(),
                detail: s.clone(),
            };
            lock(&shared.store).record_site_access(&s, allowed, &record).map_err(|e| store_failure(&e))?;
            shared.allowed.set(&s, allowed);
            Ok::<_, Status>(true)
        })
        .await
        .map_err(|e| blocking_failure(&e))??;
        let message = match (changed, allowed) {
            (false, true) => format!("site '{site}' is already on the allow-list"),
            (false, false) => format!("site '{site}' is not on the allow-list"),
            (true, true) => format!("site '{site}' added to the allow-list: it may join from now on"),
            (true, false) => format!(
                "site '{site}' removed from the allow-list: its connections are refused from now on, and a round \
                 waiting for it goes on without it when the quorum allows"
            ),
        };
        if changed {
            self.record_event(&admin, &message);
            if !allowed {
                // The coordinator stops counting the site, and every task stream looks again at
                // the allow-list (the removed site's stream ends with a refusal).
                let connected = self.shared.connected_sites();
                let actions = lock(&self.shared.coord).sites_changed(connected, Instant::now());
                self.shared.apply(actions);
                self.shared.announce.send_modify(|_| {});
            }
        }
        let (control, phase) = {
            let c = lock(&self.shared.coord);
            (c.control(), c.phase())
        };
        Ok(Response::new(pb::AdminReply {
            message,
            run_control: control.as_str().into(),
            phase: phase.as_str().into(),
        }))
    }

    type ExportModelStream = BoxStream<pb::ExportPart>;

    async fn export_model(&self, req: Request<pb::ExportRequest>) -> Result<Response<Self::ExportModelStream>, Status> {
        let admin = self.admin(&req, "exporting the model")?;
        let g = self.shared.global().ok_or_else(|| {
            Status::unavailable("a round is being aggregated; the new model is ready in a few seconds: try again")
        })?;
        let file = tokio::fs::File::open(&g.path).await.map_err(|e| {
            tracing::error!(path = %g.path.display(), error = %e, "cannot open the global model checkpoint");
            Status::internal("the server cannot read its global model; the server log says why")
        })?;
        let record = AdminActionRecord {
            unix: now_unix(),
            admin: admin.clone(),
            action: "export".into(),
            detail: format!("model of round {} (SHA-256 {})", g.round, g.sha256),
        };
        let store = Arc::clone(&self.shared.store);
        let recorded = tokio::task::spawn_blocking(move || lock(&store).record_admin_action(&record))
            .await
            .map_err(|e| blocking_failure(&e))?;
        recorded.map_err(|e| store_failure(&e))?;
        self.record_event(&admin, &format!("exported the model of round {}", g.round));
        let header = pb::ExportHeader {
            study_id: self.shared.study.study_id.clone(),
            run_id: self.shared.study.run_id.clone(),
            round: g.round,
            model_fingerprint: g.fingerprint().to_hex(),
            total_bytes: g.bytes,
            sha256: g.sha256.clone(),
            chunks: g.bytes.div_ceil(MAX_CHUNK_BYTES as u64) as u32,
        };
        // One chunk in flight, as for a site's download.
        let (tx, rx) = mpsc::channel(1);
        self.shared.tracker.spawn(async move {
            if tx.send(Ok(pb::ExportPart { part: Some(pb::export_part::Part::Header(header)) })).await.is_err() {
                return;
            }
            let chunk = |buf: Vec<u8>| pb::ExportPart { part: Some(pb::export_part::Part::Chunk(buf.into())) };
            let stall = Stall { after: crate::service::CHUNK_IDLE_TIMEOUT, receiver: "the study lead's export" };
            send_checkpoint(file, &g.path, g.bytes, &tx, chunk, |_| {}, stall).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The run's control state at start: as the study lead last left it, or, never changed, waiting
/// for a manual start (a fresh run with `[federation] start = "manual"`) or running.
///
/// # Errors
/// An unreadable database, or a control value this version does not know.
pub fn initial_control(store: &Store, start: StartMode, completed: u32) -> Result<RunControl, crate::ServerError> {
    match store.run_control()? {
        Some(v) => RunControl::parse(&v).ok_or_else(|| {
            crate::ServerError::Model(format!(
                "the server database records run control '{v}', which this version does not know"
            ))
        }),
        None if start == StartMode::Manual && completed == 0 => Ok(RunControl::AwaitingStart),
        None => Ok(RunControl::Running),
    }
}

/// The study lead's part of the status view: the run's control state, the removed sites and the
/// recent admin actions.
pub fn admin_view(shared: &Shared) -> pb::AdminView {
    let control = lock(&shared.coord).control();
    let recent = lock(&shared.store).admin_actions(RECENT_ACTIONS).unwrap_or_else(|e| {
        tracing::error!(error = %e, "reading the admin actions failed");
        Vec::new()
    });
    pb::AdminView {
        run_control: control.as_str().into(),
        removed_sites: shared.allowed.removed(),
        recent_actions: recent
            .into_iter()
            .map(|a| pb::AdminAction { unix: a.unix, admin: a.admin, action: a.action, detail: a.detail })
            .collect(),
    }
}

/// [`admin_view`] as JSON, for `fedhcc status --json` and the dashboard's `/api/status`.
pub fn admin_json(view: Option<&pb::AdminView>) -> serde_json::Value {
    match view {
        None => serde_json::Value::Null,
        Some(v) => serde_json::json!({
            "run_control": v.run_control,
            "removed_sites": v.removed_sites,
            "recent_actions": v.recent_actions.iter().map(|a| serde_json::json!({
                "unix": a.unix, "admin": a.admin, "action": a.action, "detail": a.detail})).collect::<Vec<_>>(),
        }),
    }
}
