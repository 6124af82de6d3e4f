//! The study lead's hold on a run (admin commands): start a run that waits for a manual start,
//! pause, resume, abort. Pure like the rest of the coordinator: the server persists the new
//! [`RunControl`] (so it outlives a restart) and carries out the actions.
//!
//! Rules:
//! - only a `Running` run announces a task; anything else holds the kind of task that would have
//!   come next and starts it on `start` / `resume`;
//! - a task in flight when the run is paused may finish, and its round aggregate and commit;
//! - abort drops the task in flight (its answers are discarded) and ends the run with the model of
//!   the last committed round; during aggregation it waits for the commit, then ends the run.

use super::{Action, Coordinator, Phase, TaskKind};
use std::time::Instant;

/// What the study lead lets the run do. Persisted by the server under the run's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunControl {
    /// `[federation] start = "manual"`: nothing is announced until `fedhcc admin start`.
    AwaitingStart,
    /// Tasks are announced as usual.
    Running,
    /// No new task is announced; one in flight may finish and its round commit.
    Paused,
    /// Ended by the study lead; the last committed model is final.
    Aborted,
}

impl RunControl {
    /// The name used in the database, the status and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            RunControl::AwaitingStart => "awaiting_start",
            RunControl::Running => "running",
            RunControl::Paused => "paused",
            RunControl::Aborted => "aborted",
        }
    }

    /// The value named by [`RunControl::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [RunControl::AwaitingStart, RunControl::Running, RunControl::Paused, RunControl::Aborted]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// An admin command that changes the run's [`RunControl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    Start,
    Pause,
    Resume,
    Abort,
}

impl AdminCommand {
    /// The command's name (`fedhcc admin <name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            AdminCommand::Start => "start",
            AdminCommand::Pause => "pause",
            AdminCommand::Resume => "resume",
            AdminCommand::Abort => "abort",
        }
    }
}

/// Why an admin command cannot be carried out now. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRefusal {
    /// The run has finished (or was aborted): there is nothing left to control.
    Ended { aborted: bool },
    /// `start` for a run that is not waiting for one.
    AlreadyStarted { control: RunControl },
    /// `pause` or `resume` before the run was started.
    NotStarted,
    /// `pause` for a paused run.
    AlreadyPaused,
    /// `resume` for a run that is not paused.
    NotPaused,
    /// `abort` while an abort waits for the aggregation in progress.
    AlreadyAborting,
}

impl std::fmt::Display for ControlRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlRefusal::Ended { aborted: true } => {
                write!(f, "the run was aborted; start another run_id to train again")
            }
            ControlRefusal::Ended { aborted: false } => write!(f, "the run has finished; there is nothing to control"),
            ControlRefusal::AlreadyStarted { control } => {
                write!(f, "the run has already started (it is {}); use pause or resume", control.as_str())
            }
            ControlRefusal::NotStarted => {
                write!(f, "the run has not started yet (start = \"manual\"); `fedhcc admin start` starts it")
            }
            ControlRefusal::AlreadyPaused => write!(f, "the run is already paused; `fedhcc admin resume` resumes it"),
            ControlRefusal::NotPaused => write!(f, "the run is not paused"),
            ControlRefusal::AlreadyAborting => {
                write!(f, "the run is already being aborted (after the aggregation in progress is committed)")
            }
        }
    }
}

impl Coordinator {
    /// The coordinator with `control` as the study lead left it (read back from the database on
    /// a restart): a run awaiting its start or paused announces nothing; an aborted run is over.
    #[must_use]
    pub fn with_control(mut self, control: RunControl) -> Self {
        self.control = control;
        if self.phase == Phase::WaitingForSites {
            self.phase = match control {
                RunControl::AwaitingStart => Phase::AwaitingStart,
                RunControl::Running => Phase::WaitingForSites,
                RunControl::Paused => Phase::Paused,
                RunControl::Aborted => Phase::Finished,
            };
        }
        self
    }

    /// What the study lead allows now.
    pub fn control(&self) -> RunControl {
        self.control
    }

    /// Whether `cmd` can be carried out now, and the [`RunControl`] it leaves (for the caller to
    /// persist before [`Coordinator::command`] applies it).
    ///
    /// # Errors
    /// A [`ControlRefusal`] saying why not.
    pub fn check_command(&self, cmd: AdminCommand) -> Result<RunControl, ControlRefusal> {
        if self.phase == Phase::Finished {
            return Err(ControlRefusal::Ended { aborted: self.control == RunControl::Aborted });
        }
        match (cmd, self.control) {
            (_, RunControl::Aborted) => Err(ControlRefusal::AlreadyAborting),
            (AdminCommand::Start, RunControl::AwaitingStart) => Ok(RunControl::Running),
            (AdminCommand::Start, control) => Err(ControlRefusal::AlreadyStarted { control }),
            (AdminCommand::Pause | AdminCommand::Resume, RunControl::AwaitingStart) => Err(ControlRefusal::NotStarted),
            (AdminCommand::Pause, RunControl::Paused) => Err(ControlRefusal::AlreadyPaused),
            (AdminCommand::Pause, _) => Ok(RunControl::Paused),
            (AdminCommand::Resume, RunControl::Paused) => Ok(RunControl::Running),
            (AdminCommand::Resume, _) => Err(ControlRefusal::NotPaused),
            (AdminCommand::Abort, _) => Ok(RunControl::Aborted),
        }
    }

    /// Carries out an admin command. Start and resume announce the task that was held; pause
    /// announces nothing and lets a task in flight finish; abort drops the task in flight and ends
    /// the run ([`Action::Abort`]), or, during aggregation, ends it once the round is committed.
    ///
    /// # Errors
    /// As [`Coordinator::check_command`]; nothing changed.
    pub fn command(&mut self, cmd: AdminCommand, now: Instant) -> Result<Vec<Action>, ControlRefusal> {
        self.control = self.check_command(cmd)?;
        Ok(match cmd {
            AdminCommand::Start | AdminCommand::Resume => {
                if self.task.is_none() && matches!(self.phase, Phase::Paused | Phase::AwaitingStart) {
                    self.phase = Phase::WaitingForSites;
                    self.try_start(self.held, now)
                } else {
                    // A task paused in flight is still running, or a round is being aggregated:
                    // what follows it is announced as usual.
                    vec![]
                }
            }
            AdminCommand::Pause => {
                if self.task.is_none() && self.phase == Phase::WaitingForSites {
                    self.phase = Phase::Paused;
                    self.held = TaskKind::Train;
                }
                vec![]
            }
            AdminCommand::Abort => {
                if self.phase == Phase::Aggregating {
                    // The round being aggregated is committed first; the commit ends the run.
                    return Ok(vec![]);
                }
                let task = self.task.take();
                self.results.clear();
                self.declined.clear();
                self.deadline = None;
                self.close_key_exchange(now);
                self.phase = Phase::Finished;
                vec![Action::Abort { task, rounds_completed: self.completed }]
            }
        })
    }

    /// Closes a secure-aggregation key exchange left open, so that no deadline wakes the driver
    /// while nothing runs (opening one for a task that is not a train task opens none).
    fn close_key_exchange(&mut self, now: Instant) {
        self.open_key_exchange(TaskKind::Evaluate, "", now);
    }

    /// Called instead of announcing a task of `kind` when the run is not `Running`.
    pub(super) fn hold(&mut self, kind: TaskKind, now: Instant) -> Vec<Action> {
        self.task = None;
        self.deadline = None;
        self.results.clear();
        self.close_key_exchange(now);
        self.held = kind;
        match self.control {
            RunControl::Aborted => {
                self.phase = Phase::Finished;
                vec![Action::Abort { task: None, rounds_completed: self.completed }]
            }
            RunControl::AwaitingStart => {
                self.phase = Phase::AwaitingStart;
                vec![]
            }
            RunControl::Paused | RunControl::Running => {
                self.phase = Phase::Paused;
                vec![]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CoordinatorConfig, SiteResult, Task};
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn coordinator(rounds: u32, min_sites: usize, evaluate_every: u32) -> Coordinator {
        Coordinator::new(
            CoordinatorConfig {
                rounds,
                min_sites,
                round_timeout: Duration::from_secs(10),
                evaluate_every,
                statistics: false,
            },
            0,
        )
    }
    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }
    fn res() -> SiteResult {
        SiteResult { samples: 5, metrics: vec![], bytes: 0 }
    }
    fn announced(a: &[Action]) -> Option<Task> {
        a.iter().find_map(|x| if let Action::Announce(t) = x { Some(t.clone()) } else { None })
    }

    #[test]
    fn a_manual_start_announces_nothing_until_started_then_the_statistics_or_round_1() {
        let t0 = Instant::now();
        let mut c = coordinator(2, 1, 0).with_control(RunControl::AwaitingStart);
        assert_eq!(c.phase(), Phase::AwaitingStart);
        assert!(c.sites_changed(set(&["a", "b"]), t0).is_empty(), "sites connect, nothing is announced");
        assert_eq!(c.check_command(AdminCommand::Pause), Err(ControlRefusal::NotStarted));
        assert_eq!(c.check_command(AdminCommand::Resume), Err(ControlRefusal::NotStarted));
        let t = announced(&c.command(AdminCommand::Start, t0).unwrap()).expect("round 1");
        assert_eq!((t.id.as_str(), &t.selected), ("r1a1", &set(&["a", "b"])));
        assert_eq!(c.control(), RunControl::Running);
        assert!(matches!(c.command(AdminCommand::Start, t0), Err(ControlRefusal::AlreadyStarted { .. })));

        // A fresh run whose model carries standardisation pools its statistics first.
        let mut s = Coordinator::new(
            CoordinatorConfig {
                rounds: 2,
                min_sites: 1,
                round_timeout: Duration::from_secs(10),
                evaluate_every: 0,
                statistics: true,
            },
            0,
        )
        .with_control(RunControl::AwaitingStart);
        assert!(s.sites_changed(set(&["a"]), t0).is_empty());
        let t = announced(&s.command(AdminCommand::Start, t0).unwrap()).unwrap();
        assert_eq!((t.kind, t.id.as_str()), (TaskKind::Statistics, "s0a1"));
    }

    #[test]
    fn a_paused_run_lets_the_round_in_flight_commit_and_announces_nothing_new() {
        let t0 = Instant::now();
        let mut c = coordinator(3, 2, 0);
        announced(&c.sites_changed(set(&["a", "b"]), t0)).unwrap();
        assert!(c.command(AdminCommand::Pause, t0).unwrap().is_empty());
        assert_eq!(c.phase(), Phase::Training, "the round in flight goes on");
        assert_eq!(c.check_command(AdminCommand::Pause), Err(ControlRefusal::AlreadyPaused));
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        let a = c.submission_accepted("b", TaskKind::Train, "r1a1", res(), t0).unwrap();
        assert!(matches!(&a[..], [Action::Aggregate { .. }]), "{a:?}");
        assert!(c.round_committed(1, t0).is_empty(), "paused: round 2 is not announced");
        assert_eq!((c.phase(), c.completed_rounds()), (Phase::Paused, 1));
        assert!(c.sites_changed(set(&["a"]), t0).is_empty());
        assert!(c.sites_changed(set(&["a", "b"]), t0).is_empty(), "a reconnecting site starts nothing");
        assert!(c.tick(t0 + Duration::from_secs(60)).is_empty());
        assert!(c.check_submission("a", TaskKind::Train, "r2a2").is_err(), "no task is open");
        assert_eq!(
            c.check_command(AdminCommand::Start),
            Err(ControlRefusal::AlreadyStarted { control: RunControl::Paused })
        );
        let t = announced(&c.command(AdminCommand::Resume, t0).unwrap()).expect("round 2 on resume");
        assert_eq!(t.id, "r2a2");
        assert_eq!(c.check_command(AdminCommand::Resume), Err(ControlRefusal::NotPaused));
    }

    #[test]
    fn pausing_before_a_due_evaluation_holds_it_and_resume_announces_it() {
        let t0 = Instant::now();
        let mut c = coordinator(3, 1, 1);
        announced(&c.sites_changed(set(&["a"]), t0)).unwrap();
        c.command(AdminCommand::Pause, t0).unwrap();
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        assert!(c.round_committed(1, t0).is_empty());
        assert_eq!(c.phase(), Phase::Paused);
        let t = announced(&c.command(AdminCommand::Resume, t0).unwrap()).unwrap();
        assert_eq!((t.kind, t.round), (TaskKind::Evaluate, 1), "the evaluation that was due");
    }

    #[test]
    fn a_round_retried_at_its_deadline_while_paused_waits_for_resume() {
        let t0 = Instant::now();
        let mut c = coordinator(3, 2, 0);
        announced(&c.sites_changed(set(&["a", "b"]), t0)).unwrap();
        c.command(AdminCommand::Pause, t0).unwrap();
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        let a = c.tick(t0 + Duration::from_secs(11));
        assert!(matches!(&a[..], [Action::Discard { .. }]), "discarded, not retried: {a:?}");
        assert_eq!(c.phase(), Phase::Paused);
        let t = announced(&c.command(AdminCommand::Resume, t0).unwrap()).unwrap();
        assert_eq!(t.id, "r1a2");
    }

    #[test]
    fn abort_drops_the_task_in_flight_and_ends_with_the_last_committed_round() {
        let t0 = Instant::now();
        let mut c = coordinator(5, 1, 0);
        announced(&c.sites_changed(set(&["a"]), t0)).unwrap();
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        announced(&c.round_committed(1, t0)).unwrap();
        let a = c.command(AdminCommand::Abort, t0).unwrap();
        match &a[..] {
            [Action::Abort { task: Some(t), rounds_completed: 1 }] => assert_eq!(t.id, "r2a2"),
            other => panic!("{other:?}"),
        }
        assert_eq!((c.phase(), c.control()), (Phase::Finished, RunControl::Aborted));
        assert!(c.check_submission("a", TaskKind::Train, "r2a2").is_err(), "the dropped task takes nothing");
        assert!(c.sites_changed(set(&["a", "b"]), t0).is_empty());
        assert_eq!(c.check_command(AdminCommand::Resume), Err(ControlRefusal::Ended { aborted: true }));
        assert!(c.check_command(AdminCommand::Abort).is_err());

        // Restarted after the abort: over, nothing announced.
        let mut r = Coordinator::new(coordinator(5, 1, 0).cfg.clone(), 1).with_control(RunControl::Aborted);
        assert_eq!(r.phase(), Phase::Finished);
        assert!(r.sites_changed(set(&["a"]), t0).is_empty());
    }

    #[test]
    fn abort_during_aggregation_ends_the_run_once_the_round_is_committed() {
        let t0 = Instant::now();
        let mut c = coordinator(5, 1, 0);
        announced(&c.sites_changed(set(&["a"]), t0)).unwrap();
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        assert_eq!(c.phase(), Phase::Aggregating);
        assert!(c.command(AdminCommand::Abort, t0).unwrap().is_empty(), "the commit is awaited");
        assert_eq!(c.check_command(AdminCommand::Abort), Err(ControlRefusal::AlreadyAborting));
        assert_eq!(c.round_committed(1, t0), vec![Action::Abort { task: None, rounds_completed: 1 }]);
        assert_eq!(c.phase(), Phase::Finished);

        // A failed aggregation after the abort ends it with the round before.
        let mut f = coordinator(5, 1, 0);
        announced(&f.sites_changed(set(&["a"]), t0)).unwrap();
        f.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        f.command(AdminCommand::Abort, t0).unwrap();
        assert_eq!(f.aggregation_failed(t0), vec![Action::Abort { task: None, rounds_completed: 0 }]);
    }

    #[test]
    fn a_paused_run_under_secure_aggregation_leaves_no_deadline_behind() {
        let t0 = Instant::now();
        let mut c = coordinator(3, 2, 0);
        c.enable_secure_aggregation(Duration::from_secs(2));
        announced(&c.sites_changed(set(&["a", "b"]), t0)).unwrap();
        assert!(c.deadline().is_some(), "the key exchange is open");
        c.command(AdminCommand::Pause, t0).unwrap();
        // No key comes: the key exchange closes at its deadline below the quorum; nothing new starts.
        let a = c.tick(t0 + Duration::from_secs(3));
        assert!(announced(&a).is_none(), "{a:?}");
        assert_eq!(c.phase(), Phase::Paused);
        assert_eq!(c.deadline(), None, "nothing is left to wake the driver while paused");
        let t = announced(&c.command(AdminCommand::Resume, t0).unwrap()).unwrap();
        assert_eq!(t.round, 1);
        assert!(c.deadline().is_some(), "a fresh key exchange");
    }

    #[test]
    fn a_finished_run_refuses_every_command_and_names_round_trip() {
        let t0 = Instant::now();
        let mut c = coordinator(1, 1, 0);
        announced(&c.sites_changed(set(&["a"]), t0)).unwrap();
        c.submission_accepted("a", TaskKind::Train, "r1a1", res(), t0).unwrap();
        let e = announced(&c.round_committed(1, t0)).unwrap();
        c.submission_accepted("a", TaskKind::Evaluate, &e.id, res(), t0).unwrap();
        assert_eq!(c.phase(), Phase::Finished);
        for cmd in [AdminCommand::Start, AdminCommand::Pause, AdminCommand::Resume, AdminCommand::Abort] {
            assert_eq!(c.check_command(cmd), Err(ControlRefusal::Ended { aborted: false }), "{cmd:?}");
        }
        for rc in [RunControl::AwaitingStart, RunControl::Running, RunControl::Paused, RunControl::Aborted] {
            assert_eq!(RunControl::parse(rc.as_str()), Some(rc));
        }
        assert_eq!(RunControl::parse("stopped"), None);
    }
}
