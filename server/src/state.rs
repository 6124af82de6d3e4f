//! State shared by the gRPC service, the round driver and the listener: the coordinator behind a
//! std mutex (never held across `.await`), the current global model, the announcement channel that
//! wakes every waiting site, and the connection registry.

use crate::coordinator::{Action, Coordinator, Task, TaskKind};
use crate::events::{EventKind, EventLog};
use crate::metrics::{Metrics, RefusalReason};
use crate::spool::Spool;
use crate::store::Store;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::{Fingerprint, Layout};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The global model as served to sites: a checkpoint file on disk (never a second copy in memory).
#[derive(Clone, Debug)]
pub struct GlobalModel {
    /// The committed round it comes from (0 = initial model).
    pub round: u32,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub layout: Layout,
}

impl GlobalModel {
    pub fn fingerprint(&self) -> Fingerprint {
        self.layout.fingerprint()
    }
}

/// What every `WaitTask` stream watches.
#[derive(Clone, Debug, Default)]
pub struct Announcement {
    pub task: Option<Task>,
    pub finished: Option<u32>,
}

/// Per-site facts for the status view.
#[derive(Clone, Debug, Default)]
pub struct SiteInfo {
    pub connections: usize,
    pub last_seen_unix: i64,
    pub rounds_contributed: u32,
    pub last_refusal: String,
    /// Requests of this site refused since the server started.
    pub refusals: u32,
    /// The protocol version the site's client announced at its last join.
    pub client_version: String,
    /// Training samples the site announced at its last join (its data summary).
    pub samples: u64,
    /// The last task the site declined under its own policy: `task: rule: message` (empty if none).
    pub policy_refusal: String,
}

/// Everything the server's tasks share. Each field says who writes it.
pub struct Shared {
    pub study: StudyConfig,
    /// Site ids that may join: the configured list with the study lead's changes (written by the
    /// admin service only).
    pub allowed: crate::allow_list::AllowList,
    /// Written by handlers (submissions, connections) and the driver (ticks, commits).
    pub coord: Mutex<Coordinator>,
    /// Written by the driver only, after a checkpoint is durable. `None` while aggregating.
    pub global: RwLock<Option<Arc<GlobalModel>>>,
    /// Sender held here; every `WaitTask` forwarder holds a receiver.
    pub announce: watch::Sender<Announcement>,
    /// Written by `WaitTask` connection guards and handlers.
    pub sites: Mutex<BTreeMap<String, SiteInfo>>,
    /// Wakes the driver when the coordinator's deadline may have changed.
    pub wake: Notify,
    /// Actions for the round driver (IO that must not run in a request handler); the driver holds
    /// the receiver. Unbounded: an action is a small command, at most a few per request, and losing
    /// one (an Aggregate, a Finish) would stall the run; a handler never waits on the driver.
    pub jobs: mpsc::UnboundedSender<Action>,
    /// The run's state folder (round records, checkpoints, reports).
    pub state_dir: PathBuf,
    /// The open task's answers on disk ([`crate::spool`]).
    pub spool: Spool,
    /// Used from `spawn_blocking` and short handler sections only.
    pub store: Arc<Mutex<Store>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub task_started: Mutex<Option<Instant>>,
    /// Counters and histograms for `/metrics`; written by handlers and the driver.
    pub metrics: Metrics,
    /// Recent events for the dashboard; written by handlers and the driver.
    pub events: EventLog,
    /// `state_dir/audit.jsonl`: messages carrying task data, appended by handlers.
    pub audit: crate::audit::ServerAudit,
    /// Per-site join rate limit; taken by `Join`.
    pub joins: crate::ratelimit::RateLimiter,
    /// Per-site rate limit of the reports that write the audit log (`RefuseTask`, `AdvertiseKey`,
    /// `ReportEvaluation`, `ReportStatistics`).
    pub reports: crate::ratelimit::RateLimiter,
    /// The sites with an upload in progress: one at a time per site.
    pub uploads: Mutex<std::collections::BTreeSet<String>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Locks a std mutex, recovering the data if a panicking thread poisoned it (the state machine's
/// invariants hold between calls, so the data is still consistent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A site's one upload in progress ([`Shared::start_upload`]); ends when dropped.
pub struct UploadInProgress<'a> {
    shared: &'a Shared,
    site: String,
}

impl Drop for UploadInProgress<'_> {
    fn drop(&mut self) {
        lock(&self.shared.uploads).remove(&self.site);
    }
}

impl Shared {
    /// Starts `site`'s upload; `None` while another upload of that site is in progress, so that a
    /// site cannot spool several models at once.
    pub fn start_upload(&self, site: &str) -> Option<UploadInProgress<'_>> {
        lock(&self.uploads).insert(site.to_string()).then(|| UploadInProgress { shared: self, site: site.to_string() })
    }

    /// Every allowed site with what is known of it (a site never seen: the defaults), in site order.
    pub fn allowed_site_infos(&self) -> Vec<(String, SiteInfo)> {
        let infos = lock(&self.sites);
        self.allowed.sites().iter().map(|s| (s.clone(), infos.get(s).cloned().unwrap_or_default())).collect()
    }

    /// The current global model, if one is being served.
    pub fn global(&self) -> Option<Arc<GlobalModel>> {
        self.global.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_global(&self, g: Option<Arc<GlobalModel>>) {
        *self.global.write().unwrap_or_else(std::sync::PoisonError::into_inner) = g;
    }

    /// Sends a task to the sites (the driver calls this once the task's attempt number is in
    /// `server.db`): the announcement, its event, the round's byte counters and start time.
    pub fn announce_task(&self, task: Task) {
        tracing::info!(task = %task.id, round = task.round, sites = ?task.selected, "task announced");
        self.metrics.task_closed(self.bytes_in.swap(0, Ordering::Relaxed), self.bytes_out.swap(0, Ordering::Relaxed));
        let what = match task.kind {
            TaskKind::Statistics => "feature statistics",
            TaskKind::Train => "training",
            TaskKind::Evaluate => "evaluation",
        };
        let sites: Vec<&str> = task.selected.iter().map(String::as_str).collect();
        self.events.push(
            EventKind::Task,
            None,
            format!("round {}: {what} task {} sent to {}", task.round, task.id, sites.join(", ")),
        );
        *lock(&self.task_started) = Some(Instant::now());
        self.announce.send_modify(|an| an.task = Some(task));
    }

    /// Carries out the coordinator's actions. Nothing here touches `server.db` (a request handler
    /// calls this): a roster is announced at once; everything else, a new task's announcement
    /// included (its attempt number is recorded first), goes to the driver's queue, in order.
    pub fn apply(&self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::RosterFixed(task) => {
                    // Sites waiting in AwaitRoster watch the announcement: the task now carries its roster.
                    let roster: Vec<&str> = task.roster.iter().flat_map(|r| r.keys()).map(String::as_str).collect();
                    tracing::info!(task = %task.id, round = task.round, ?roster, "secure aggregation: key exchange closed");
                    self.events.push(
                        EventKind::Task,
                        None,
                        format!(
                            "round {}: secure-aggregation keys exchanged for task {} by {}",
                            task.round,
                            task.id,
                            roster.join(", ")
                        ),
                    );
                    self.announce.send_modify(|an| an.task = Some(task));
                }
                other => {
                    // Fails only once the driver has stopped (the server is shutting down).
                    if self.jobs.send(other).is_err() {
                        tracing::debug!("the round driver has stopped; action not carried out");
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    /// Connected and allowed sites.
    pub fn connected_sites(&self) -> BTreeSet<String> {
        lock(&self.sites)
            .iter()
            .filter(|(s, i)| i.connections > 0 && self.allowed.contains(s))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Notes a new `WaitTask` connection of `site`; the returned guard notes its end.
    pub fn connect(self: &Arc<Self>, site: &str) -> ConnectionGuard {
        let first = {
            let mut sites = lock(&self.sites);
            let info = sites.entry(site.to_string()).or_default();
            info.connections += 1;
            info.last_seen_unix = now_unix();
            info.connections == 1
        };
        if first {
            tracing::info!(site, "site connected");
            self.events.push(EventKind::Site, Some(site), "connected");
            self.sites_changed();
        }
        ConnectionGuard { shared: Arc::clone(self), site: site.to_string() }
    }

    fn sites_changed(&self) {
        let connected = self.connected_sites();
        let actions = lock(&self.coord).sites_changed(connected, Instant::now());
        self.apply(actions);
    }

    /// Remembers the last refusal of a site for the status view (in memory only: a refused request
    /// changes nothing durable).
    pub fn note_refusal(&self, site: &str, why: &str) {
        let mut sites = lock(&self.sites);
        let info = sites.entry(site.to_string()).or_default();
        info.last_refusal = why.chars().take(200).collect();
        info.refusals = info.refusals.saturating_add(1);
    }

    /// Counts a refused request for `/metrics` and the event log; a site on the allow-list also
    /// gets it noted for the status view.
    pub fn refused(&self, site: Option<&str>, reason: RefusalReason, why: &str) {
        self.metrics.refused(reason);
        self.events.push(EventKind::Refusal, site, format!("{}: {why}", reason.as_str()));
        if let Some(s) = site.filter(|s| self.allowed.contains(s)) {
            self.note_refusal(s, why);
        }
    }

    /// Notes a task the site declined under its own policy: counted for `/metrics`, in the event log
    /// and kept for the status view (in memory only).
    pub fn declined(&self, site: &str, task_id: &str, rule: &str, message: &str) {
        self.metrics.declined();
        self.events.push(
            EventKind::Declined,
            Some(site),
            format!("task {task_id} declined by the site's policy ({rule}): {message}"),
        );
        let mut sites = lock(&self.sites);
        let info = sites.entry(site.to_string()).or_default();
        info.policy_refusal = format!("{task_id}: {rule}: {message}").chars().take(300).collect();
    }

    /// Notes what a site announced when it joined (client version, training samples).
    pub fn joined(&self, site: &str, client_version: &str, samples: u64) {
        let mut sites = lock(&self.sites);
        let info = sites.entry(site.to_string()).or_default();
        info.client_version = client_version.chars().take(64).collect();
        info.samples = samples;
    }

    pub fn touch(&self, site: &str) {
        lock(&self.sites).entry(site.to_string()).or_default().last_seen_unix = now_unix();
    }
}

/// Held by a `WaitTask` forwarder for as long as the site's stream is open.
pub struct ConnectionGuard {
    shared: Arc<Shared>,
    site: String,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let last = {
            let mut sites = lock(&self.shared.sites);
            let info = sites.entry(self.site.clone()).or_default();
            info.connections = info.connections.saturating_sub(1);
            info.last_seen_unix = now_unix();
            info.connections == 0
        };
        if last {
            tracing::info!(site = %self.site, "site disconnected");
            self.shared.events.push(EventKind::Site, Some(&self.site), "disconnected");
            self.shared.sites_changed();
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A `Shared` over a fresh state folder for unit tests (3 rounds, sites `a` and `b`), with `jobs` as
/// the driver queue.
#[cfg(test)]
pub(crate) fn test_shared(dir: &std::path::Path, jobs: mpsc::UnboundedSender<Action>) -> Arc<Shared> {
    use crate::coordinator::CoordinatorConfig;
    let study: StudyConfig =
        toml::from_str("study_id = \"s\"\n[federation]\nrounds = 3\nevaluate_every = 1\n").expect("a study");
    let coord = Coordinator::new(
        CoordinatorConfig {
            rounds: 3,
            min_sites: 2,
            round_timeout: std::time::Duration::from_secs(60),
            evaluate_every: 1,
            statistics: false,
        },
        0,
    );
    Arc::new(Shared {
        allowed: ["a".to_string(), "b".to_string()].into(),
        study,
        coord: Mutex::new(coord),
        global: RwLock::new(None),
        announce: watch::channel(Announcement::default()).0,
        sites: Mutex::new(BTreeMap::new()),
        wake: Notify::default(),
        jobs,
        state_dir: dir.to_path_buf(),
        spool: Spool::at(dir.join("spool")),
        store: Arc::new(Mutex::new(Store::open(dir, "run-1").expect("a store"))),
        bytes_in: AtomicU64::default(),
        bytes_out: AtomicU64::default(),
        task_started: Mutex::new(None),
        metrics: Metrics::default(),
        events: EventLog::default(),
        audit: crate::audit::ServerAudit::default(),
        joins: crate::ratelimit::RateLimiter::default(),
        reports: crate::ratelimit::RateLimiter::reports(),
        uploads: Mutex::default(),
        shutdown: CancellationToken::default(),
        tracker: TaskTracker::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handlers hand the driver its actions faster than it takes them (many sites answering at once
    /// while it aggregates): none may be lost, since a lost Aggregate or Finish stalls the run.
    #[test]
    fn a_flood_of_driver_actions_while_the_driver_is_busy_loses_none() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = test_shared(tmp.path(), tx);
        let n = 10_000u32;
        for i in 0..n {
            shared.apply(vec![Action::Finish { rounds_completed: i }]);
        }
        let mut got = 0u32;
        while let Ok(action) = rx.try_recv() {
            assert!(matches!(action, Action::Finish { rounds_completed } if rounds_completed == got), "out of order");
            got += 1;
        }
        assert_eq!(got, n, "the driver received {got} of {n} actions");
    }

    /// A request handler's `apply` writes no SQLite: a new task goes to the driver, which records its
    /// attempt number before the sites hear of it.
    #[tokio::test]
    async fn a_new_task_is_recorded_by_the_driver_before_it_is_announced() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = test_shared(tmp.path(), tx);
        let task = Task {
            kind: TaskKind::Train,
            round: 1,
            attempt: 4,
            id: "r1a4".into(),
            selected: ["a".to_string(), "b".to_string()].into(),
            roster: None,
        };
        let announced = shared.announce.subscribe();
        shared.apply(vec![Action::Announce(task.clone())]);
        assert!(announced.borrow().task.is_none(), "not announced from the request path");
        assert_eq!(lock(&shared.store).attempts_announced().unwrap(), 0, "nothing written on the request path");
        let Ok(Action::Announce(queued)) = rx.try_recv() else { panic!("the announcement is the driver's") };
        crate::driver::announce(&shared, queued).await;
        assert_eq!(lock(&shared.store).attempts_announced().unwrap(), 4, "recorded");
        assert_eq!(announced.borrow().task.as_ref().map(|t| t.id.as_str()), Some("r1a4"), "then announced");
    }
}
