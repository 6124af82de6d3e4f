//! The round state machine. Pure: no IO, no clock of its own, no async. Callers feed it events
//! (sites connected, an update accepted, time passing, a round committed) with the current
//! `Instant`, and carry out the [`Action`]s it returns. This keeps every rule about rounds,
//! quorum, retries and late or duplicate submissions testable in microseconds.
//!
//! Size: one state machine; its rules (quorum, retries, late and duplicate submissions, pause and
//! abort) are written against one another and would hide from one another across files. A third of
//! the file is its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

mod control;
pub use control::{AdminCommand, ControlRefusal, RunControl};
mod keys;
pub use keys::{RosterKeys, RosterState};

/// Fixed parameters of a run.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub rounds: u32,
    pub min_sites: usize,
    pub round_timeout: Duration,
    /// Evaluate every k committed rounds (0 = only after the last).
    pub evaluate_every: u32,
    /// Before round 1 of a fresh run, collect the sites' feature statistics (the model carries
    /// standardisation tensors).
    pub statistics: bool,
}

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    WaitingForSites,
    /// Collecting the sites' feature sums before round 1.
    Statistics,
    Training,
    Aggregating,
    Evaluating,
    Finished,
    /// Paused by the study lead: nothing new is announced until the run is resumed.
    Paused,
    /// `[federation] start = "manual"`: waiting for the study lead's `start` before anything is
    /// announced.
    AwaitingStart,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForSites => "waiting_for_sites",
            Phase::Statistics => "pooling_statistics",
            Phase::Training => "training",
            Phase::Aggregating => "aggregating",
            Phase::Evaluating => "evaluating",
            Phase::Finished => "finished",
            Phase::Paused => "paused",
            Phase::AwaitingStart => "waiting_for_start",
        }
    }
}

/// What kind of task is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Feature sums for the pooled standardisation (before round 1; `round` is 0).
    Statistics,
    Train,
    Evaluate,
}

/// The task the sites are working on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub kind: TaskKind,
    /// For a train task: the round being trained. For an evaluate task: the last committed round.
    pub round: u32,
    pub attempt: u32,
    pub id: String,
    pub selected: BTreeSet<String>,
    /// Under secure aggregation, once the key exchange has closed: the sites whose masked updates
    /// make up the sum, with their public keys ([`keys`]).
    pub roster: Option<RosterKeys>,
}

/// One site's accepted answer to a task (aggregate numbers only).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteResult {
    pub samples: u64,
    pub metrics: Vec<(String, f64)>,
    pub bytes: u64,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Tell the selected sites about a new task.
    Announce(Task),
    /// The train task closed with enough results: aggregate these (in this fixed site order),
    /// checkpoint, record, then call [`Coordinator::round_committed`].
    Aggregate { task: Task, results: BTreeMap<String, SiteResult>, failures: BTreeMap<String, String> },
    /// The task closed without enough results; its spooled updates can be discarded.
    Discard { task: Task, reason: String },
    /// The statistics task closed with enough answers: pool the sums these sites reported (in
    /// this order) into the initial model, then call [`Coordinator::statistics_committed`] (or
    /// [`Coordinator::statistics_failed`]).
    StatisticsDone { task: Task, reported: BTreeSet<String>, missing: BTreeSet<String> },
    /// An evaluate task closed: these sites reported.
    EvaluationDone { task: Task, reported: BTreeSet<String>, missing: BTreeSet<String> },
    /// Every round is committed and evaluated.
    Finish { rounds_completed: u32 },
    /// Secure aggregation: the key exchange of this train task has closed; its roster is
    /// `task.roster`. Tell the sites waiting for it.
    RosterFixed(Task),
    /// Secure aggregation: this attempt can never be decoded (a roster member dropped out, or too
    /// few keys came in); its spooled masked updates can be discarded. The restarted attempt is
    /// announced by the action that follows.
    SecureAggregationAborted { task: Task, reason: String },
    /// The study lead aborted the run: the task in flight (if any) is dropped, its spooled answers
    /// can be discarded, and the model of the last committed round is final.
    Abort { task: Option<Task>, rounds_completed: u32 },
}

/// Why a submission is refused. The service turns these into gRPC statuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// For a round or task that has closed.
    Stale { submitted: String, current: String },
    /// For a round or task that has not started.
    Future { submitted: String, current: String },
    /// This site already answered this task.
    Duplicate { task: String },
    /// This site was not selected for this task.
    NotSelected { task: String },
    /// The run is not collecting this kind of answer now.
    WrongPhase { phase: Phase },
    /// Secure aggregation: the key exchange or roster does not allow this (see `reason`).
    KeyExchange { task: String, reason: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Stale { submitted, current } => {
                write!(f, "task {submitted} has closed; the server is now at {current}")
            }
            Refusal::Future { submitted, current } => {
                write!(f, "task {submitted} has not started; the server is at {current}")
            }
            Refusal::Duplicate { task } => write!(f, "this site already submitted for task {task}"),
            Refusal::NotSelected { task } => write!(f, "this site was not selected for task {task}"),
            Refusal::WrongPhase { phase } => {
                write!(f, "the server is not accepting this now (phase: {})", phase.as_str())
            }
            Refusal::KeyExchange { task, reason } => write!(f, "task {task}: {reason}"),
        }
    }
}

/// The round state machine.
#[derive(Debug)]
pub struct Coordinator {
    cfg: CoordinatorConfig,
    phase: Phase,
    completed: u32,
    attempt: u32,
    task: Option<Task>,
    deadline: Option<Instant>,
    connected: BTreeSet<String>,
    results: BTreeMap<String, SiteResult>,
    /// Sites that declined the current task under their own policy, with the rule and reason: they
    /// count as answered without a result. Cleared when a task starts.
    declined: BTreeMap<String, String>,
    /// The statistics task has yet to succeed.
    statistics_pending: bool,
    /// What the study lead allows (admin commands); only `Running` announces tasks.
    control: RunControl,
    /// The kind of task to start when a paused (or not yet started) run goes on.
    held: TaskKind,
    /// Secure aggregation's key exchange (`None`: updates in the clear).
    secagg: Option<keys::KeyExchange>,
    /// A restarted run owes the evaluation of its last committed round
    /// ([`Coordinator::with_evaluation_recorded`]): it comes before anything else.
    evaluation_pending: bool,
}

/// Task ids: `r3a1` = round 3, attempt 1; `e3a1` = evaluation after round 3; `s0a1` = the
/// statistics task before round 1.
pub fn task_id(kind: TaskKind, round: u32, attempt: u32) -> String {
    match kind {
        TaskKind::Statistics => format!("s{round}a{attempt}"),
        TaskKind::Train => format!("r{round}a{attempt}"),
        TaskKind::Evaluate => format!("e{round}a{attempt}"),
    }
}

/// Parses a task id back into (kind, round, attempt).
pub fn parse_task_id(id: &str) -> Option<(TaskKind, u32, u32)> {
    let kind = match id.as_bytes().first()? {
        b'r' => TaskKind::Train,
        b'e' => TaskKind::Evaluate,
        b's' => TaskKind::Statistics,
        _ => return None,
    };
    let (r, a) = id[1..].split_once('a')?;
    Some((kind, r.parse().ok()?, a.parse().ok()?))
}

impl Coordinator {
    /// A coordinator resuming after `completed` committed rounds (0 for a fresh run).
    pub fn new(cfg: CoordinatorConfig, completed: u32) -> Self {
        let phase = if completed >= cfg.rounds { Phase::Finished } else { Phase::WaitingForSites };
        let statistics_pending = cfg.statistics && completed == 0;
        Self {
            statistics_pending,
            control: RunControl::Running,
            held: TaskKind::Train,
            cfg,
            phase,
            completed,
            attempt: 0,
            task: None,
            deadline: None,
            connected: BTreeSet::new(),
            results: BTreeMap::new(),
            declined: BTreeMap::new(),
            secagg: None,
            evaluation_pending: false,
        }
    }

    /// The coordinator of a restarted run, told whether any site's evaluation of the last committed
    /// round is recorded. When that round was due an evaluation (the last round, or a multiple of
    /// `evaluate_every`) and none is recorded, the server stopped before the evaluation closed: it
    /// is announced again under a fresh task id once the quorum is connected, and the run trains on
    /// or finishes only after it closes (under the usual deadline). Call it before
    /// [`Coordinator::with_control`]; a fresh run, or one whose evaluation is recorded, is unchanged.
    #[must_use]
    pub fn with_evaluation_recorded(mut self, recorded: bool) -> Self {
        let k = self.cfg.evaluate_every;
        let due =
            self.completed > 0 && (self.completed >= self.cfg.rounds || (k > 0 && self.completed.is_multiple_of(k)));
        if due && !recorded && self.control != RunControl::Aborted && self.task.is_none() {
            self.evaluation_pending = true;
            if self.phase == Phase::Finished {
                self.phase = Phase::WaitingForSites;
            }
        }
        self
    }

    /// The coordinator numbering its tasks after `announced`, the highest attempt this run
    /// announced before a restart (the server records each before announcing it): a task id is
    /// never announced twice in a run, so an answer computed for a task announced before the
    /// restart is refused as stale instead of being taken for a new task with the same id.
    #[must_use]
    pub fn after_attempts(mut self, announced: u32) -> Self {
        self.attempt = self.attempt.max(announced);
        self
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn completed_rounds(&self) -> u32 {
        self.completed
    }
    pub fn total_rounds(&self) -> u32 {
        self.cfg.rounds
    }
    pub fn current_task(&self) -> Option<&Task> {
        self.task.as_ref()
    }
    /// The next moment the driver must [`Coordinator::tick`]: the task's deadline, or earlier the
    /// deadline of its secure-aggregation key exchange. `None` while no task runs: the driver then
    /// waits for an event (a site, an answer, a command), never for a moment that has passed.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.deadline, self.key_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    pub fn connected(&self) -> &BTreeSet<String> {
        &self.connected
    }
    /// Sites that have answered the current task (with a result, or by declining it).
    pub fn answered(&self) -> impl Iterator<Item = &String> {
        self.results.keys().chain(self.declined.keys())
    }
    /// Sites that declined the current task under their own policy, with the rule and reason.
    pub fn declined(&self) -> &BTreeMap<String, String> {
        &self.declined
    }
    /// The round a train task would carry now.
    pub fn current_round(&self) -> u32 {
        (self.completed + 1).min(self.cfg.rounds)
    }

    fn describe_current(&self) -> String {
        match &self.task {
            Some(t) => format!("task {}", t.id),
            None => format!("round {} ({})", self.current_round(), self.phase.as_str()),
        }
    }

    /// The set of connected, allowed sites changed.
    pub fn sites_changed(&mut self, connected: BTreeSet<String>, now: Instant) -> Vec<Action> {
        self.connected = connected;
        match self.phase {
            Phase::WaitingForSites => self.try_start(TaskKind::Train, now),
            Phase::Statistics | Phase::Training | Phase::Evaluating => self.try_close(now, false),
            Phase::Aggregating | Phase::Finished | Phase::Paused | Phase::AwaitingStart => vec![],
        }
    }

    /// The connected sites a new `kind` task of `round` goes to: under secure aggregation, without
    /// those that broke [`keys::DROPS_BEFORE_EXCLUSION`] of the round's attempts, as long as the
    /// others still make the quorum.
    fn selectable(&self, kind: TaskKind, round: u32) -> BTreeSet<String> {
        let excluded = match (&self.secagg, kind) {
            (Some(k), TaskKind::Train) => k.excluded(round),
            _ => BTreeSet::new(),
        };
        let rest: BTreeSet<String> = self.connected.difference(&excluded).cloned().collect();
        if rest.len() >= self.cfg.min_sites { rest } else { self.connected.clone() }
    }

    fn try_start(&mut self, kind: TaskKind, now: Instant) -> Vec<Action> {
        if self.control != RunControl::Running {
            // Paused, not started or aborted: nothing new is announced.
            return self.hold(kind, now);
        }
        // A fresh run pools the sites' statistics before it trains; a restarted run first evaluates
        // the round whose evaluation the restart cut short.
        let owed = kind == TaskKind::Train && self.evaluation_pending;
        let kind = match kind {
            TaskKind::Train if self.statistics_pending => TaskKind::Statistics,
            TaskKind::Train if self.evaluation_pending => TaskKind::Evaluate,
            kind => kind,
        };
        if owed && self.connected.len() < self.cfg.min_sites {
            // Not skipped like one due with nobody connected: it waits for the quorum.
            self.phase = Phase::WaitingForSites;
            return vec![];
        }
        if self.connected.len() < self.cfg.min_sites {
            self.phase = if kind == TaskKind::Evaluate { self.phase } else { Phase::WaitingForSites };
            if kind == TaskKind::Evaluate && self.connected.is_empty() {
                // Nobody to evaluate with: the evaluation is skipped rather than blocking the run.
                return self.after_evaluation(now);
            }
            if kind != TaskKind::Evaluate {
                return vec![];
            }
        }
        self.attempt = self.attempt.saturating_add(1);
        let round = match kind {
            TaskKind::Statistics => 0,
            TaskKind::Train => self.completed + 1,
            TaskKind::Evaluate => self.completed,
        };
        let task = Task {
            kind,
            round,
            attempt: self.attempt,
            id: task_id(kind, round, self.attempt),
            selected: self.selectable(kind, round),
            roster: None,
        };
        self.phase = match kind {
            TaskKind::Statistics => Phase::Statistics,
            TaskKind::Train => Phase::Training,
            TaskKind::Evaluate => Phase::Evaluating,
        };
        self.results.clear();
        self.declined.clear();
        self.deadline = Some(now + self.cfg.round_timeout);
        self.task = Some(task.clone());
        self.open_key_exchange(kind, &task.id, now);
        vec![Action::Announce(task)]
    }

    /// Checks whether `site` may submit for `task_id` now (called before any bytes are accepted).
    ///
    /// # Errors
    /// A [`Refusal`] saying why not.
    pub fn check_submission(&self, site: &str, kind: TaskKind, task_id: &str) -> Result<(), Refusal> {
        let current = self.describe_current();
        let Some(task) = &self.task else {
            return Err(Refusal::WrongPhase { phase: self.phase });
        };
        if task.id != task_id {
            let newer = match (parse_task_id(task_id), parse_task_id(&task.id)) {
                (Some((_, r, a)), Some((_, cr, ca))) => (r, a) > (cr, ca),
                _ => false,
            };
            return Err(if newer {
                Refusal::Future { submitted: task_id.to_string(), current }
            } else {
                Refusal::Stale { submitted: task_id.to_string(), current }
            });
        }
        let open = matches!(
            (self.phase, task.kind),
            (Phase::Statistics, TaskKind::Statistics)
                | (Phase::Training, TaskKind::Train)
                | (Phase::Evaluating, TaskKind::Evaluate)
        );
        if task.kind != kind || !open {
            return Err(Refusal::WrongPhase { phase: self.phase });
        }
        if !task.selected.contains(site) {
            return Err(Refusal::NotSelected { task: task.id.clone() });
        }
        if self.results.contains_key(site) || self.declined.contains_key(site) {
            return Err(Refusal::Duplicate { task: task.id.clone() });
        }
        Ok(())
    }

    /// `site` declined `task_id` under its own policy (`why`: the rule and the site's reason). It
    /// counts as answered without a result, so the task closes without waiting for it, and the
    /// round goes on with the others when they meet the quorum. When too few are left, the task
    /// waits for its deadline before it is retried (a site that declined would decline again).
    ///
    /// # Errors
    /// As [`Coordinator::check_submission`]: the task is not the current one, the site was not
    /// selected, or it already answered.
    pub fn site_declined(
        &mut self,
        site: &str,
        task_id: &str,
        why: &str,
        now: Instant,
    ) -> Result<Vec<Action>, Refusal> {
        let kind = self.task.as_ref().map(|t| t.kind).ok_or(Refusal::WrongPhase { phase: self.phase })?;
        self.check_submission(site, kind, task_id)?;
        self.declined.insert(site.to_string(), why.to_string());
        Ok(self.try_close(now, false))
    }

    /// Checks whether `site` may download the model of `task_id` now: the task is the current one
    /// and the site was selected for it (answering again is refused at submission).
    ///
    /// # Errors
    /// A [`Refusal`] saying why not.
    pub fn check_download(&self, site: &str, task_id: &str) -> Result<(), Refusal> {
        match &self.task {
            Some(t) if t.id == task_id && t.selected.contains(site) => Ok(()),
            Some(t) if t.id == task_id => Err(Refusal::NotSelected { task: t.id.clone() }),
            _ => {
                let kind = parse_task_id(task_id).map(|k| k.0).unwrap_or(TaskKind::Train);
                self.check_submission(site, kind, task_id).and(Err(Refusal::WrongPhase { phase: self.phase }))
            }
        }
    }

    /// A site's answer passed every check and is stored (spooled): count it.
    ///
    /// # Errors
    /// A [`Refusal`] if the task closed or the site answered meanwhile; the caller discards it.
    pub fn submission_accepted(
        &mut self,
        site: &str,
        kind: TaskKind,
        task_id: &str,
        result: SiteResult,
        now: Instant,
    ) -> Result<Vec<Action>, Refusal> {
        self.check_submission(site, kind, task_id)?;
        if kind == TaskKind::Train && self.secagg.is_some() {
            self.check_masked_submission(site, task_id)?;
        }
        self.results.insert(site.to_string(), result);
        Ok(self.try_close(now, false))
    }

    /// Time passed: close a task whose deadline has come.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.deadline {
            Some(d) if now >= d => self.try_close(now, true),
            // A secure-aggregation key exchange closes at its own deadline.
            _ if self.key_deadline().is_some_and(|d| now >= d) => self.try_close(now, false),
            _ => vec![],
        }
    }

    fn try_close(&mut self, now: Instant, deadline_passed: bool) -> Vec<Action> {
        let Some(task) = self.task.clone() else { return vec![] };
        if task.kind == TaskKind::Train && self.secagg.is_some() {
            return self.try_close_secure(now, deadline_passed);
        }
        let pending: BTreeSet<&String> = task
            .selected
            .iter()
            .filter(|s| !self.results.contains_key(*s) && !self.declined.contains_key(*s))
            .collect();
        let all_answered = pending.is_empty();
        let rest_gone = pending.iter().all(|s| !self.connected.contains(*s));
        match task.kind {
            TaskKind::Statistics | TaskKind::Train => {
                let enough = self.results.len() >= self.cfg.min_sites;
                if !(all_answered || (rest_gone && enough) || deadline_passed) {
                    return vec![];
                }
                if !enough && !deadline_passed && !self.declined.is_empty() {
                    // Too few results because sites declined: retrying at once would only be
                    // declined again, so the task runs to its deadline.
                    return vec![];
                }
                self.deadline = None;
                let declined = std::mem::take(&mut self.declined);
                if enough {
                    self.phase = Phase::Aggregating;
                    let results = std::mem::take(&mut self.results);
                    let mut missing: Vec<String> = pending.into_iter().cloned().collect();
                    let declined_sites: Vec<String> = declined.keys().cloned().collect();
                    return vec![match task.kind {
                        TaskKind::Statistics => {
                            missing.extend(declined_sites);
                            Action::StatisticsDone {
                                task,
                                reported: results.into_keys().collect(),
                                missing: missing.into_iter().collect(),
                            }
                        }
                        _ => {
                            let mut failures: BTreeMap<String, String> = missing
                                .into_iter()
                                .map(|s| {
                                    let why = if self.connected.contains(&s) {
                                        "no update before the round deadline"
                                    } else {
                                        "disconnected"
                                    };
                                    (s, why.to_string())
                                })
                                .collect();
                            failures.extend(declined.into_iter().map(|(s, why)| (s, format!("declined: {why}"))));
                            Action::Aggregate { task, results, failures }
                        }
                    }];
                }
                if !deadline_passed {
                    // Every selected site answered, yet fewer than the quorum: close at once.
                    self.deadline = Some(now);
                    return vec![];
                }
                let mut reason = format!(
                    "only {} of the {} sites needed answered before the deadline",
                    self.results.len(),
                    self.cfg.min_sites
                );
                if !declined.is_empty() {
                    let d: Vec<String> = declined.iter().map(|(s, why)| format!("{s} ({why})")).collect();
                    reason.push_str(&format!("; declined by site policy: {}", d.join(", ")));
                }
                self.results.clear();
                self.task = None;
                self.phase = Phase::WaitingForSites;
                let mut actions = vec![Action::Discard { task, reason }];
                actions.extend(self.try_start(TaskKind::Train, now));
                actions
            }
            TaskKind::Evaluate => {
                if all_answered || rest_gone || deadline_passed {
                    self.deadline = None;
                    let reported: BTreeSet<String> = self.results.keys().cloned().collect();
                    let mut missing: BTreeSet<String> = pending.into_iter().cloned().collect();
                    missing.extend(std::mem::take(&mut self.declined).into_keys());
                    self.results.clear();
                    let mut actions = vec![Action::EvaluationDone { task, reported, missing }];
                    actions.extend(self.after_evaluation(now));
                    return actions;
                }
                vec![]
            }
        }
    }

    fn after_evaluation(&mut self, now: Instant) -> Vec<Action> {
        self.task = None;
        self.evaluation_pending = false;
        if self.completed >= self.cfg.rounds {
            self.phase = Phase::Finished;
            return vec![Action::Finish { rounds_completed: self.completed }];
        }
        self.phase = Phase::WaitingForSites;
        self.try_start(TaskKind::Train, now)
    }

    /// The aggregate of `round` is checkpointed and recorded. Starts what comes next.
    pub fn round_committed(&mut self, round: u32, now: Instant) -> Vec<Action> {
        self.completed = round;
        self.task = None;
        self.results.clear();
        let last = self.completed >= self.cfg.rounds;
        let k = self.cfg.evaluate_every;
        if last || (k > 0 && self.completed.is_multiple_of(k)) {
            self.phase = Phase::Evaluating;
            return self.try_start(TaskKind::Evaluate, now);
        }
        self.phase = Phase::WaitingForSites;
        self.try_start(TaskKind::Train, now)
    }

    /// The pooled statistics are in the initial model (checkpointed): round 1 starts.
    pub fn statistics_committed(&mut self, now: Instant) -> Vec<Action> {
        self.statistics_pending = false;
        self.task = None;
        self.results.clear();
        self.phase = Phase::WaitingForSites;
        self.try_start(TaskKind::Train, now)
    }

    /// The reported statistics could not be pooled: the statistics task is asked again.
    pub fn statistics_failed(&mut self, now: Instant) -> Vec<Action> {
        self.task = None;
        self.results.clear();
        self.phase = Phase::WaitingForSites;
        self.try_start(TaskKind::Train, now)
    }

    /// Aggregation failed (for instance a spooled update vanished): the round is retried.
    pub fn aggregation_failed(&mut self, now: Instant) -> Vec<Action> {
        self.task = None;
        self.results.clear();
        self.phase = Phase::WaitingForSites;
        self.try_start(TaskKind::Train, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rounds: u32, min_sites: usize) -> CoordinatorConfig {
        CoordinatorConfig {
            rounds,
            min_sites,
            round_timeout: Duration::from_secs(10),
            evaluate_every: 0,
            statistics: false,
        }
    }
    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }
    fn res(n: u64) -> SiteResult {
        SiteResult { samples: n, metrics: vec![], bytes: 0 }
    }
    fn announced(a: &[Action]) -> Task {
        a.iter()
            .find_map(|x| if let Action::Announce(t) = x { Some(t.clone()) } else { None })
            .expect("an announcement")
    }

    #[test]
    fn waits_for_min_sites_then_trains_and_aggregates_in_fixed_order() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(2, 2), 0);
        assert!(c.sites_changed(set(&["b"]), t0).is_empty());
        assert_eq!(c.phase(), Phase::WaitingForSites);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        assert_eq!((t.round, t.id.as_str()), (1, "r1a1"));
        assert!(c.submission_accepted("b", TaskKind::Train, "r1a1", res(5), t0).unwrap().is_empty());
        let a = c.submission_accepted("a", TaskKind::Train, "r1a1", res(7), t0).unwrap();
        match &a[..] {
            [Action::Aggregate { results, failures, .. }] => {
                assert_eq!(results.keys().collect::<Vec<_>>(), ["a", "b"]);
                assert!(failures.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.phase(), Phase::Aggregating);
        let t = announced(&c.round_committed(1, t0));
        assert_eq!(t.id, "r2a2");
    }

    #[test]
    fn a_fresh_run_pools_statistics_before_round_1_and_a_resumed_one_does_not() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(CoordinatorConfig { statistics: true, ..cfg(2, 2) }, 0);
        assert!(c.sites_changed(set(&["a"]), t0).is_empty());
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        assert_eq!((t.kind, t.round, t.id.as_str()), (TaskKind::Statistics, 0, "s0a1"));
        assert_eq!(c.phase(), Phase::Statistics);
        assert!(matches!(c.check_submission("a", TaskKind::Train, "s0a1"), Err(Refusal::WrongPhase { .. })));
        assert!(c.submission_accepted("b", TaskKind::Statistics, "s0a1", res(3), t0).unwrap().is_empty());
        let a = c.submission_accepted("a", TaskKind::Statistics, "s0a1", res(4), t0).unwrap();
        match &a[..] {
            [Action::StatisticsDone { reported, missing, .. }] => {
                assert_eq!(reported, &set(&["a", "b"]));
                assert!(missing.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Nothing is announced until the pooled statistics are checkpointed.
        assert_eq!(c.phase(), Phase::Aggregating);
        let t = announced(&c.statistics_committed(t0));
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Train, "r1a2"));
        // A site that answered statistics late is told the task closed.
        assert!(matches!(c.check_submission("a", TaskKind::Statistics, "s0a1"), Err(Refusal::Stale { .. })));

        let mut resumed = Coordinator::new(CoordinatorConfig { statistics: true, ..cfg(3, 1) }, 1);
        assert_eq!(announced(&resumed.sites_changed(set(&["a"]), t0)).kind, TaskKind::Train);
    }

    #[test]
    fn statistics_without_quorum_at_the_deadline_are_asked_again_and_failures_retry() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(CoordinatorConfig { statistics: true, ..cfg(2, 2) }, 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Statistics, "s0a1", res(3), t0).unwrap();
        assert!(c.tick(t0 + Duration::from_secs(5)).is_empty());
        let a = c.tick(t0 + Duration::from_secs(11));
        assert!(matches!(&a[0], Action::Discard { .. }), "{a:?}");
        let t = announced(&a);
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Statistics, "s0a2"));
        c.submission_accepted("a", TaskKind::Statistics, "s0a2", res(3), t0).unwrap();
        c.submission_accepted("b", TaskKind::Statistics, "s0a2", res(3), t0).unwrap();
        let t = announced(&c.statistics_failed(t0));
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Statistics, "s0a3"));
        assert_eq!(parse_task_id("s0a3"), Some((TaskKind::Statistics, 0, 3)));
    }

    #[test]
    fn refuses_stale_future_duplicate_unselected_and_wrong_kind() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(5, 1), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        // b still pending: a duplicate from a is refused.
        assert_eq!(c.check_submission("a", TaskKind::Train, "r1a1"), Err(Refusal::Duplicate { task: "r1a1".into() }));
        assert!(matches!(c.check_submission("b", TaskKind::Train, "r0a9"), Err(Refusal::Stale { .. })));
        assert!(matches!(c.check_submission("b", TaskKind::Train, "r2a2"), Err(Refusal::Future { .. })));
        assert_eq!(c.check_submission("z", TaskKind::Train, "r1a1"), Err(Refusal::NotSelected { task: "r1a1".into() }));
        assert!(matches!(c.check_submission("b", TaskKind::Evaluate, "r1a1"), Err(Refusal::WrongPhase { .. })));
        assert!(c.check_submission("b", TaskKind::Train, "r1a1").is_ok());
    }

    #[test]
    fn a_dropped_site_closes_the_round_early_when_quorum_allows() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(3, 1), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        let a = c.sites_changed(set(&["a"]), t0);
        match &a[..] {
            [Action::Aggregate { results, failures, .. }] => {
                assert_eq!(results.len(), 1);
                assert_eq!(failures.get("b").map(String::as_str), Some("disconnected"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_declined_task_closes_without_the_site_and_is_recorded_as_its_failure() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(3, 1), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        assert!(c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap().is_empty());
        let a = c.site_declined("b", "r1a1", "max_rounds: round 1 is past the limit", t0).unwrap();
        match &a[..] {
            [Action::Aggregate { results, failures, .. }] => {
                assert_eq!(results.keys().collect::<Vec<_>>(), ["a"]);
                assert_eq!(
                    failures.get("b").map(String::as_str),
                    Some("declined: max_rounds: round 1 is past the limit")
                );
            }
            other => panic!("{other:?}"),
        }
        // Declining twice, or after answering, or for another task, is refused.
        let t = announced(&c.round_committed(1, t0));
        assert_eq!(t.id, "r2a2");
        c.site_declined("b", "r2a2", "x", t0).unwrap();
        assert_eq!(c.answered().collect::<Vec<_>>(), ["b"], "a declined site is not sent the task again");
        assert_eq!(c.site_declined("b", "r2a2", "x", t0), Err(Refusal::Duplicate { task: "r2a2".into() }));
        assert_eq!(
            c.check_submission("b", TaskKind::Train, "r2a2"),
            Err(Refusal::Duplicate { task: "r2a2".into() }),
            "no update after declining"
        );
        assert!(matches!(c.site_declined("a", "r1a1", "x", t0), Err(Refusal::Stale { .. })));
        assert_eq!(c.site_declined("z", "r2a2", "x", t0), Err(Refusal::NotSelected { task: "r2a2".into() }));
    }

    #[test]
    fn declines_below_quorum_wait_for_the_deadline_then_retry() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(3, 2), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        assert!(c.site_declined("b", "r1a1", "require_dp", t0).unwrap().is_empty(), "no hot retry loop");
        assert_eq!(c.phase(), Phase::Training);
        let a = c.tick(t0 + Duration::from_secs(11));
        match &a[0] {
            Action::Discard { reason, .. } => {
                assert!(reason.contains("declined by site policy: b (require_dp)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let t = announced(&a);
        assert_eq!(t.id, "r1a2");
        assert!(c.declined().is_empty(), "the retry asks every site again");
        // Declined evaluations close the task and count as missing.
        let mut c = Coordinator::new(cfg(1, 1), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        c.submission_accepted("b", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        announced(&c.round_committed(1, t0));
        c.submission_accepted("a", TaskKind::Evaluate, "e1a2", res(1), t0).unwrap();
        let a = c.site_declined("b", "e1a2", "min_group_size", t0).unwrap();
        match &a[..] {
            [Action::EvaluationDone { reported, missing, .. }, Action::Finish { .. }] => {
                assert_eq!((reported, missing), (&set(&["a"]), &set(&["b"])));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn downloads_only_for_the_current_task_and_selected_sites() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(3, 1), 0);
        c.sites_changed(set(&["a"]), t0);
        c.sites_changed(set(&["a", "b"]), t0);
        assert_eq!(c.check_download("a", "r1a1"), Ok(()));
        assert_eq!(c.check_download("b", "r1a1"), Err(Refusal::NotSelected { task: "r1a1".into() }));
        assert!(matches!(c.check_download("a", "r0a1"), Err(Refusal::Stale { .. })));
        assert!(matches!(c.check_download("a", "r5a1"), Err(Refusal::Future { .. })));
    }

    #[test]
    fn below_quorum_at_the_deadline_the_round_is_retried() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(3, 2), 0);
        c.sites_changed(set(&["a", "b"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        assert!(c.sites_changed(set(&["a"]), t0).is_empty(), "b may come back before the deadline");
        assert!(c.tick(t0 + Duration::from_secs(5)).is_empty());
        let a = c.tick(t0 + Duration::from_secs(11));
        assert!(matches!(a[0], Action::Discard { .. }));
        assert_eq!(a.len(), 1, "only one site connected: wait");
        assert_eq!(c.phase(), Phase::WaitingForSites);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        assert_eq!((t.round, t.attempt), (1, 2));
        assert!(matches!(c.check_submission("a", TaskKind::Train, "r1a1"), Err(Refusal::Stale { .. })));
    }

    #[test]
    fn evaluates_after_the_last_round_then_finishes() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(1, 1), 0);
        c.sites_changed(set(&["a"]), t0);
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(1), t0).unwrap();
        let t = announced(&c.round_committed(1, t0));
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Evaluate, "e1a2"));
        let a = c.submission_accepted("a", TaskKind::Evaluate, "e1a2", res(1), t0).unwrap();
        assert!(matches!(a[0], Action::EvaluationDone { .. }));
        assert_eq!(a[1], Action::Finish { rounds_completed: 1 });
        assert_eq!(c.phase(), Phase::Finished);
    }

    #[test]
    fn a_restarted_coordinator_numbers_its_tasks_after_those_announced_before() {
        let t0 = Instant::now();
        // Before the restart round 3 was announced as r3a3 and retried as r3a4.
        let mut c = Coordinator::new(cfg(4, 1), 2).after_attempts(4);
        let t = announced(&c.sites_changed(set(&["a"]), t0));
        assert_eq!(t.id, "r3a5");
        for old in ["r3a3", "r3a4", "e2a2"] {
            let kind = parse_task_id(old).unwrap().0;
            assert!(matches!(c.check_submission("a", kind, old), Err(Refusal::Stale { .. })), "{old}");
            assert!(matches!(c.check_download("a", old), Err(Refusal::Stale { .. })), "{old}");
        }
        // A fresh run stopped before round 1: its statistics task is asked again under a new id.
        let mut c = Coordinator::new(CoordinatorConfig { statistics: true, ..cfg(2, 1) }, 0).after_attempts(1);
        assert_eq!(announced(&c.sites_changed(set(&["a"]), t0)).id, "s0a2");
        assert!(matches!(c.check_submission("a", TaskKind::Statistics, "s0a1"), Err(Refusal::Stale { .. })));
        // Nothing recorded: numbering starts at 1 as before; a recorded maximum never wraps around.
        assert_eq!(
            announced(&Coordinator::new(cfg(1, 1), 0).after_attempts(0).sites_changed(set(&["a"]), t0)).id,
            "r1a1"
        );
        let mut c = Coordinator::new(cfg(1, 1), 0).after_attempts(u32::MAX);
        assert_eq!(announced(&c.sites_changed(set(&["a"]), t0)).attempt, u32::MAX);
    }

    #[test]
    fn a_restart_before_the_final_evaluation_closed_evaluates_then_finishes() {
        let t0 = Instant::now();
        // Recorded: the run comes up finished and announces nothing.
        let mut done = Coordinator::new(cfg(2, 2), 2).after_attempts(3).with_evaluation_recorded(true);
        assert_eq!(done.phase(), Phase::Finished);
        assert!(done.sites_changed(set(&["a", "b"]), t0).is_empty());
        assert_eq!(done.current_task(), None);

        // Not recorded: the evaluation waits for the quorum, under a fresh task id, then the run finishes.
        let mut c = Coordinator::new(cfg(2, 2), 2).after_attempts(3).with_evaluation_recorded(false);
        assert_eq!(c.phase(), Phase::WaitingForSites);
        assert!(c.sites_changed(set(&["a"]), t0).is_empty(), "waits for the quorum instead of skipping");
        assert!(c.sites_changed(set(&[]), t0).is_empty(), "nobody connected: still owed, not skipped");
        assert_eq!(c.phase(), Phase::WaitingForSites);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        assert_eq!((t.kind, t.round, t.id.as_str()), (TaskKind::Evaluate, 2, "e2a4"));
        assert!(matches!(c.check_submission("a", TaskKind::Evaluate, "e2a3"), Err(Refusal::Stale { .. })));
        assert!(c.submission_accepted("a", TaskKind::Evaluate, "e2a4", res(1), t0).unwrap().is_empty());
        // b never answers: the deadline closes the evaluation as usual.
        assert!(c.tick(t0 + Duration::from_secs(5)).is_empty());
        let a = c.tick(t0 + Duration::from_secs(11));
        match &a[..] {
            [Action::EvaluationDone { reported, missing, .. }, Action::Finish { rounds_completed: 2 }] => {
                assert_eq!((reported, missing), (&set(&["a"]), &set(&["b"])));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.phase(), Phase::Finished);

        // An aborted run stays over; a paused one evaluates when resumed.
        let c = Coordinator::new(cfg(2, 1), 2).with_evaluation_recorded(false).with_control(RunControl::Aborted);
        assert_eq!(c.phase(), Phase::Finished);
        let mut c = Coordinator::new(cfg(2, 1), 2).with_evaluation_recorded(false).with_control(RunControl::Paused);
        assert!(c.sites_changed(set(&["a"]), t0).is_empty());
        let t = announced(&c.command(AdminCommand::Resume, t0).unwrap());
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Evaluate, "e2a1"));
    }

    #[test]
    fn a_restart_before_an_intermediate_evaluation_closed_evaluates_then_trains() {
        let t0 = Instant::now();
        let every = |rounds| CoordinatorConfig { evaluate_every: 2, ..cfg(rounds, 1) };
        let mut c = Coordinator::new(every(4), 2).after_attempts(3).with_evaluation_recorded(false);
        let t = announced(&c.sites_changed(set(&["a"]), t0));
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Evaluate, "e2a4"));
        let a = c.submission_accepted("a", TaskKind::Evaluate, "e2a4", res(1), t0).unwrap();
        assert!(matches!(a[0], Action::EvaluationDone { .. }), "{a:?}");
        let t = announced(&a[1..]);
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Train, "r3a5"));
        // Recorded, or not due after this round: training goes on at once.
        for (c, round) in [
            (Coordinator::new(every(4), 2).with_evaluation_recorded(true), 3),
            (Coordinator::new(every(4), 3).with_evaluation_recorded(false), 4),
            (Coordinator::new(cfg(4, 1), 2).with_evaluation_recorded(false), 3),
        ] {
            let mut c = c;
            let t = announced(&c.sites_changed(set(&["a"]), t0));
            assert_eq!((t.kind, t.round), (TaskKind::Train, round));
        }
        // A fresh run owes nothing.
        let mut c = Coordinator::new(cfg(2, 1), 0).with_evaluation_recorded(false);
        assert_eq!(announced(&c.sites_changed(set(&["a"]), t0)).id, "r1a1");
    }

    #[test]
    fn resumes_after_committed_rounds() {
        let t0 = Instant::now();
        let mut c = Coordinator::new(cfg(4, 1), 2);
        let t = announced(&c.sites_changed(set(&["a"]), t0));
        assert_eq!(t.round, 3);
        assert_eq!(Coordinator::new(cfg(4, 1), 4).phase(), Phase::Finished);
        assert_eq!(parse_task_id("r12a3"), Some((TaskKind::Train, 12, 3)));
        assert_eq!(parse_task_id("x"), None);
    }
}
