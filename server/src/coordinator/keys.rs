//! Secure aggregation in the round state machine (pure, like the rest of the coordinator): the key
//! exchange of every train task and the rule that a round whose roster is not complete is never
//! decoded.
//!
//! Rules, per train task (one attempt of one round):
//! - the selected sites each advertise a fresh public key; the key exchange closes when every
//!   selected site that is still connected (and has not declined the task) has one in, or at the key
//!   deadline. The **roster** is then fixed: the connected sites that advertised, if they are at least
//!   `max(2, min_sites)`; otherwise the attempt is discarded at the key deadline and retried. A site
//!   left out of the roster was never part of any mask, so fixing the roster without it loses nothing;
//! - only roster members may upload, and the sum is decoded only when **every** roster member's
//!   masked update is in;
//! - a roster member that disconnects (or declines) before its update is in, or the round deadline,
//!   aborts the attempt: its pairwise masks are in the other sites' updates and cannot be removed. The
//!   round restarts at once as a new task (new id, fresh keys) with the sites connected then. The
//!   abort is kept for the status view.

use super::{Action, Coordinator, Refusal, TaskKind};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A roster: site id → X25519 public key, in site-id order.
pub type RosterKeys = BTreeMap<String, [u8; 32]>;

/// The key exchange of the current train task, and what the status view shows about aborts.
#[derive(Debug, Clone)]
pub(super) struct KeyExchange {
    timeout: Duration,
    /// Task whose keys these are.
    task_id: Option<String>,
    keys: RosterKeys,
    deadline: Option<Instant>,
    fixed: bool,
    last_abort: Option<String>,
    aborted: u32,
    /// The round whose dropouts `drops` counts, and how often each roster member of it dropped out
    /// after the key exchange (each time aborting an attempt).
    drops_round: u32,
    drops: BTreeMap<String, u32>,
}

/// A roster member that drops out this often in one round is left out of that round's next
/// attempts (so that one site cannot stall a round by joining every roster and leaving it).
pub const DROPS_BEFORE_EXCLUSION: u32 = 2;

impl KeyExchange {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            task_id: None,
            keys: BTreeMap::new(),
            deadline: None,
            fixed: false,
            last_abort: None,
            aborted: 0,
            drops_round: 0,
            drops: BTreeMap::new(),
        }
    }

    /// Counts a dropout of `site` in `round`; true when it now reaches [`DROPS_BEFORE_EXCLUSION`].
    fn note_drop(&mut self, round: u32, site: &str) -> bool {
        if self.drops_round != round {
            self.drops_round = round;
            self.drops.clear();
        }
        let n = self.drops.entry(site.to_string()).or_insert(0);
        *n += 1;
        *n == DROPS_BEFORE_EXCLUSION
    }

    /// The sites left out of `round`'s next attempts for dropping out too often.
    pub(super) fn excluded(&self, round: u32) -> BTreeSet<String> {
        if self.drops_round != round {
            return BTreeSet::new();
        }
        self.drops.iter().filter(|(_, n)| **n >= DROPS_BEFORE_EXCLUSION).map(|(s, _)| s.clone()).collect()
    }

    /// Deadline of the key exchange while it is open.
    pub(super) fn deadline(&self) -> Option<Instant> {
        if self.fixed { None } else { self.deadline }
    }
}

/// Where the roster of a task stands (for `AwaitRoster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RosterState {
    /// The key exchange is still open.
    Open,
    /// Fixed, with this site in it.
    Fixed(RosterKeys),
}

impl Coordinator {
    /// Turns on secure aggregation: every train task starts with a key exchange that waits at most
    /// `key_timeout` for the selected sites' public keys.
    pub fn enable_secure_aggregation(&mut self, key_timeout: Duration) {
        self.secagg = Some(KeyExchange::new(key_timeout));
    }

    /// The deadline of the running train task's key exchange while it is open. An exchange whose
    /// attempt has ended has none: after an attempt aborted with too few keys while too few sites
    /// are connected to start the next one, its passed deadline would wake the driver again and
    /// again with nothing to do.
    pub(super) fn key_deadline(&self) -> Option<Instant> {
        let (k, task) = (self.secagg.as_ref()?, self.task.as_ref()?);
        let open =
            task.kind == TaskKind::Train && task.roster.is_none() && k.task_id.as_deref() == Some(task.id.as_str());
        if open { k.deadline() } else { None }
    }

    /// Whether train tasks use secure aggregation.
    pub fn secure_aggregation(&self) -> bool {
        self.secagg.is_some()
    }

    /// The last aborted secure-aggregation attempt (why) and the number of aborts since start.
    pub fn secure_aggregation_aborts(&self) -> (Option<&str>, u32) {
        self.secagg.as_ref().map_or((None, 0), |k| (k.last_abort.as_deref(), k.aborted))
    }

    fn quorum(&self) -> usize {
        self.cfg.min_sites.max(2)
    }

    /// Called when a task starts: a train task under secure aggregation opens a fresh key exchange.
    pub(super) fn open_key_exchange(&mut self, kind: TaskKind, task_id: &str, now: Instant) {
        if let Some(k) = &mut self.secagg {
            k.keys.clear();
            k.fixed = false;
            let train = kind == TaskKind::Train;
            k.task_id = train.then(|| task_id.to_string());
            k.deadline = train.then(|| now + k.timeout);
        }
    }

    /// `site` advertises `key` for the train task `task_id`. Advertising the same key again is
    /// harmless (a resent request); a new key replaces the old one until the roster is fixed.
    ///
    /// # Errors
    /// As [`Coordinator::check_submission`], and [`Refusal::KeyExchange`] when the study has no
    /// secure aggregation, the roster is already fixed (without this site, or with another key of
    /// it), or another site already uses this key.
    pub fn key_advertised(
        &mut self,
        site: &str,
        task_id: &str,
        key: [u8; 32],
        now: Instant,
    ) -> Result<Vec<Action>, Refusal> {
        self.check_submission(site, TaskKind::Train, task_id)?;
        let refuse = |reason: String| Refusal::KeyExchange { task: task_id.to_string(), reason };
        let k = self.secagg.as_mut().ok_or_else(|| refuse("this study does not use secure aggregation".into()))?;
        if k.fixed {
            return match k.keys.get(site) {
                Some(have) if *have == key => Ok(vec![]),
                Some(_) => Err(refuse(
                    "the key exchange has closed with another key of this site; this attempt of the round cannot use \
                     a new one"
                        .into(),
                )),
                None => Err(refuse("the key exchange has closed without this site".into())),
            };
        }
        if k.keys.iter().any(|(s, v)| s != site && *v == key) {
            return Err(refuse("another site already uses this public key; make a fresh key pair".into()));
        }
        k.keys.insert(site.to_string(), key);
        Ok(self.try_close(now, false))
    }

    /// The roster of `task_id` as `site` may see it.
    ///
    /// # Errors
    /// As [`Coordinator::check_submission`] (a site that already uploaded has no more use for it),
    /// and [`Refusal::KeyExchange`] when the roster was fixed without this site.
    pub fn roster_for(&self, site: &str, task_id: &str) -> Result<RosterState, Refusal> {
        self.check_submission(site, TaskKind::Train, task_id)?;
        let refuse = |reason: &str| Refusal::KeyExchange { task: task_id.to_string(), reason: reason.into() };
        let k = self.secagg.as_ref().ok_or_else(|| refuse("this study does not use secure aggregation"))?;
        match self.task.as_ref().and_then(|t| t.roster.as_ref()) {
            None => Ok(RosterState::Open),
            Some(r) if r.contains_key(site) => Ok(RosterState::Fixed(r.clone())),
            Some(_) => Err(refuse(if k.keys.contains_key(site) {
                "the key exchange closed while this site was disconnected; it is not in this round's roster"
            } else {
                "the key exchange closed before this site's key arrived; it is not in this round's roster"
            })),
        }
    }

    /// Checks that `site` may upload a masked update for `task_id`: a submission may be made and
    /// the site is in the fixed roster.
    ///
    /// # Errors
    /// As [`Coordinator::check_submission`], and [`Refusal::KeyExchange`] before the roster is fixed
    /// or for a site not in it.
    pub fn check_masked_submission(&self, site: &str, task_id: &str) -> Result<(), Refusal> {
        match self.roster_for(site, task_id)? {
            RosterState::Fixed(_) => Ok(()),
            RosterState::Open => Err(Refusal::KeyExchange {
                task: task_id.to_string(),
                reason: "the key exchange is still open; a masked update needs the fixed roster".into(),
            }),
        }
    }

    /// [`Coordinator::try_close`] for a train task under secure aggregation.
    pub(super) fn try_close_secure(&mut self, now: Instant, deadline_passed: bool) -> Vec<Action> {
        let Some(task) = self.task.clone() else { return vec![] };
        let quorum = self.quorum();
        let Some(k) = self.secagg.as_ref() else { return vec![] };
        let Some(roster) = &task.roster else {
            // The key exchange is open: close it when nobody connected is left to wait for.
            let candidates: RosterKeys =
                k.keys.iter().filter(|(s, _)| self.connected.contains(*s)).map(|(s, v)| (s.clone(), *v)).collect();
            let waiting = task
                .selected
                .iter()
                .any(|s| self.connected.contains(s) && !self.declined.contains_key(s) && !candidates.contains_key(s));
            let key_deadline = deadline_passed || k.deadline.is_some_and(|d| now >= d);
            if waiting && !key_deadline {
                return vec![];
            }
            if candidates.len() >= quorum {
                if let Some(k) = self.secagg.as_mut() {
                    k.keys = candidates.clone();
                    k.fixed = true;
                }
                let mut task = task;
                task.roster = Some(candidates);
                self.task = Some(task.clone());
                return vec![Action::RosterFixed(task)];
            }
            if !key_deadline {
                // Too few keys and nobody left to wait for: a disconnected site may come back
                // before the key deadline.
                return vec![];
            }
            let reason = format!(
                "secure aggregation: only {} of the {quorum} sites needed sent a key before the key exchange closed",
                candidates.len()
            );
            return self.restart_secure(task, reason, now);
        };
        let pending: Vec<&String> = roster.keys().filter(|s| !self.results.contains_key(*s)).collect();
        if pending.is_empty() {
            self.deadline = None;
            self.phase = super::Phase::Aggregating;
            let results = std::mem::take(&mut self.results);
            let declined = std::mem::take(&mut self.declined);
            let failures: BTreeMap<String, String> = task
                .selected
                .iter()
                .filter(|s| !roster.contains_key(*s))
                .map(|s| {
                    let why = match declined.get(s) {
                        Some(d) => format!("declined: {d}"),
                        None => "not in the secure-aggregation roster (no key before the key exchange closed)".into(),
                    };
                    (s.clone(), why)
                })
                .collect();
            return vec![Action::Aggregate { task, results, failures }];
        }
        let dropped: BTreeSet<&String> = pending
            .iter()
            .copied()
            .filter(|s| !self.connected.contains(*s) || self.declined.contains_key(*s))
            .collect();
        if dropped.is_empty() && !deadline_passed {
            return vec![];
        }
        // The members that broke this attempt (dropped out, or silent until the deadline) count
        // toward their exclusion from the round's next attempts.
        let culprits: Vec<String> = if dropped.is_empty() {
            pending.iter().map(|s| s.to_string()).collect()
        } else {
            dropped.iter().map(|s| s.to_string()).collect()
        };
        let mut excluded_now = Vec::new();
        if let Some(k) = self.secagg.as_mut() {
            for s in &culprits {
                if k.note_drop(task.round, s) {
                    excluded_now.push(s.clone());
                }
            }
        }
        let mut reason = if dropped.is_empty() {
            let p: Vec<&str> = pending.iter().map(|s| s.as_str()).collect();
            format!(
                "secure aggregation: no masked update from {} before the round deadline; their masks are in the other \
                 sites' updates, so the sum cannot be decoded",
                p.join(", ")
            )
        } else {
            let d: Vec<&str> = dropped.iter().map(|s| s.as_str()).collect();
            format!(
                "secure aggregation: {} dropped out after the key exchange; {} masks are in the other sites' updates, \
                 so the sum cannot be decoded",
                d.join(", "),
                if d.len() == 1 { "its" } else { "their" }
            )
        };
        if !excluded_now.is_empty() {
            reason.push_str(&format!(
                "; {} broke {DROPS_BEFORE_EXCLUSION} attempts of this round and {} left out of its next attempts",
                excluded_now.join(", "),
                if excluded_now.len() == 1 { "is" } else { "are" }
            ));
        }
        self.restart_secure(task, reason, now)
    }

    /// Aborts the current secure-aggregation attempt and restarts the round (fresh keys, new id).
    fn restart_secure(&mut self, task: super::Task, reason: String, now: Instant) -> Vec<Action> {
        if let Some(k) = &mut self.secagg {
            k.last_abort = Some(format!("{}: {reason}", task.id));
            k.aborted = k.aborted.saturating_add(1);
            // This attempt's exchange is over; the next attempt, when it starts, opens its own.
            k.keys.clear();
            k.task_id = None;
            k.deadline = None;
        }
        self.deadline = None;
        self.results.clear();
        self.declined.clear();
        self.task = None;
        self.phase = super::Phase::WaitingForSites;
        let mut actions = vec![Action::SecureAggregationAborted { task, reason }];
        actions.extend(self.try_start(TaskKind::Train, now));
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CoordinatorConfig, Phase, SiteResult};
    use super::*;

    fn coord(min_sites: usize) -> Coordinator {
        let mut c = Coordinator::new(
            CoordinatorConfig {
                rounds: 2,
                min_sites,
                round_timeout: Duration::from_secs(100),
                evaluate_every: 0,
                statistics: false,
            },
            0,
        );
        c.enable_secure_aggregation(Duration::from_secs(10));
        c
    }
    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }
    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }
    fn res() -> SiteResult {
        SiteResult { samples: 5, metrics: vec![], bytes: 8 }
    }
    fn announced(a: &[Action]) -> super::super::Task {
        a.iter().find_map(|x| if let Action::Announce(t) = x { Some(t.clone()) } else { None }).expect("announce")
    }
    fn fixed(a: &[Action]) -> RosterKeys {
        match a {
            [Action::RosterFixed(t)] => t.roster.clone().expect("roster"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_roster_is_fixed_when_every_connected_site_has_a_key_and_only_members_upload() {
        let t0 = Instant::now();
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b", "c"]), t0));
        assert_eq!(c.roster_for("a", &t.id), Ok(RosterState::Open));
        assert!(matches!(c.check_masked_submission("a", &t.id), Err(Refusal::KeyExchange { .. })));
        assert!(c.key_advertised("a", &t.id, key(1), t0).unwrap().is_empty());
        assert!(c.key_advertised("a", &t.id, key(9), t0).unwrap().is_empty(), "replaced before the roster is fixed");
        let dup = c.key_advertised("b", &t.id, key(9), t0).unwrap_err();
        assert!(dup.to_string().contains("already uses this public key"), "{dup}");
        assert!(c.key_advertised("b", &t.id, key(2), t0).unwrap().is_empty());
        // c leaves before sending a key: nothing of it is in any mask, the roster closes without it.
        let roster = fixed(&c.sites_changed(set(&["a", "b"]), t0));
        assert_eq!(roster.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(roster["a"], key(9));
        assert_eq!(c.roster_for("b", &t.id), Ok(RosterState::Fixed(roster.clone())));
        assert!(c.key_advertised("a", &t.id, key(9), t0).unwrap().is_empty(), "the same key again is harmless");
        assert!(c.key_advertised("a", &t.id, key(7), t0).unwrap_err().to_string().contains("another key"));
        // c comes back: it is not in this attempt's roster.
        c.sites_changed(set(&["a", "b", "c"]), t0);
        assert!(c.roster_for("c", &t.id).unwrap_err().to_string().contains("not in this round's roster"));
        assert!(c.key_advertised("c", &t.id, key(3), t0).unwrap_err().to_string().contains("without this site"));
        assert!(matches!(
            c.submission_accepted("c", TaskKind::Train, &t.id, res(), t0),
            Err(Refusal::KeyExchange { .. })
        ));
        assert!(c.submission_accepted("a", TaskKind::Train, &t.id, res(), t0).unwrap().is_empty());
        match &c.submission_accepted("b", TaskKind::Train, &t.id, res(), t0).unwrap()[..] {
            [Action::Aggregate { task, results, failures }] => {
                assert_eq!(task.roster.as_ref(), Some(&roster));
                assert_eq!(results.keys().collect::<Vec<_>>(), ["a", "b"]);
                assert!(failures["c"].contains("not in the secure-aggregation roster"), "{failures:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.phase(), Phase::Aggregating);
        let next = announced(&c.round_committed(1, t0));
        assert_eq!(c.roster_for("a", &next.id), Ok(RosterState::Open), "every round exchanges fresh keys");
    }

    #[test]
    fn a_site_that_breaks_two_attempts_of_a_round_is_left_out_of_its_next_attempts() {
        let t0 = Instant::now();
        let mut c = coord(2);
        let mut t = announced(&c.sites_changed(set(&["a", "b", "c"]), t0));
        let mut now = t0;
        for attempt in 1..=2u8 {
            assert_eq!(t.selected, set(&["a", "b", "c"]), "attempt {attempt}");
            c.key_advertised("a", &t.id, key(10 * attempt + 1), now).unwrap();
            c.key_advertised("b", &t.id, key(10 * attempt + 2), now).unwrap();
            fixed(&c.key_advertised("c", &t.id, key(10 * attempt + 3), now).unwrap());
            c.submission_accepted("a", TaskKind::Train, &t.id, res(), now).unwrap();
            c.submission_accepted("b", TaskKind::Train, &t.id, res(), now).unwrap();
            // c joined the roster, stays connected and never uploads: the attempt dies at its deadline.
            now += Duration::from_secs(101);
            let a = c.tick(now);
            let (reason, next) = match &a[..] {
                [Action::SecureAggregationAborted { reason, .. }, Action::Announce(next)] => {
                    (reason.clone(), next.clone())
                }
                other => panic!("{other:?}"),
            };
            assert_eq!(reason.contains("c broke 2 attempts of this round"), attempt == 2, "{reason}");
            t = next;
        }
        // The third attempt goes to a and b only, although c is still connected.
        assert_eq!(t.selected, set(&["a", "b"]), "{t:?}");
        c.key_advertised("a", &t.id, key(91), now).unwrap();
        fixed(&c.key_advertised("b", &t.id, key(92), now).unwrap());
        c.submission_accepted("a", TaskKind::Train, &t.id, res(), now).unwrap();
        assert!(matches!(
            c.submission_accepted("b", TaskKind::Train, &t.id, res(), now).unwrap()[..],
            [Action::Aggregate { .. }]
        ));
        // The next round starts afresh: c is selected again.
        let next = announced(&c.round_committed(1, now));
        assert_eq!(next.selected, set(&["a", "b", "c"]));
    }

    #[test]
    fn exclusion_never_takes_a_round_below_its_quorum() {
        let t0 = Instant::now();
        let mut c = coord(2);
        let mut t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        let mut now = t0;
        for attempt in 1..=2u8 {
            c.key_advertised("a", &t.id, key(10 * attempt + 1), now).unwrap();
            fixed(&c.key_advertised("b", &t.id, key(10 * attempt + 2), now).unwrap());
            c.submission_accepted("a", TaskKind::Train, &t.id, res(), now).unwrap();
            now += Duration::from_secs(101);
            t = announced(&c.tick(now));
        }
        assert_eq!(t.selected, set(&["a", "b"]), "with two sites both stay: one alone is no quorum");
    }

    #[test]
    fn a_roster_member_lost_after_the_key_exchange_aborts_and_restarts_the_round_with_fresh_keys() {
        let t0 = Instant::now();
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b", "c"]), t0));
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        c.key_advertised("b", &t.id, key(2), t0).unwrap();
        fixed(&c.key_advertised("c", &t.id, key(3), t0).unwrap());
        c.submission_accepted("a", TaskKind::Train, &t.id, res(), t0).unwrap();
        let a = c.sites_changed(set(&["a", "b"]), t0);
        match &a[..] {
            [Action::SecureAggregationAborted { task, reason }, Action::Announce(next)] => {
                assert_eq!(task.id, "r1a1");
                assert!(reason.contains("c dropped out after the key exchange"), "{reason}");
                assert_eq!((next.id.as_str(), &next.selected), ("r1a2", &set(&["a", "b"])));
                assert_eq!(next.roster, None);
            }
            other => panic!("{other:?}"),
        }
        let (last, n) = c.secure_aggregation_aborts();
        assert!(last.is_some_and(|l| l.starts_with("r1a1: ")) && n == 1);
        // The old attempt is closed for everyone; the new one needs new keys.
        assert!(matches!(c.key_advertised("a", "r1a1", key(1), t0), Err(Refusal::Stale { .. })));
        c.key_advertised("a", "r1a2", key(4), t0).unwrap();
        fixed(&c.key_advertised("b", "r1a2", key(5), t0).unwrap());
        // The round deadline with a member missing aborts too.
        c.submission_accepted("b", TaskKind::Train, "r1a2", res(), t0).unwrap();
        let a = c.tick(t0 + Duration::from_secs(101));
        match &a[..] {
            [Action::SecureAggregationAborted { reason, .. }, Action::Announce(next)] => {
                assert!(reason.contains("no masked update from a before the round deadline"), "{reason}");
                assert_eq!(next.id, "r1a3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_exchange_that_fails_with_too_few_sites_connected_leaves_no_deadline_behind() {
        // The driver sleeps until `deadline()` and then ticks. A deadline that has passed and that
        // no tick clears wakes it again at once, for ever: a busy loop while too few sites are
        // connected to start the next attempt.
        let t0 = Instant::now();
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        assert!(c.sites_changed(set(&["a"]), t0).is_empty(), "b may come back before the key deadline");
        let key_deadline = t0 + Duration::from_secs(10);
        assert_eq!(c.deadline(), Some(key_deadline));
        match &c.tick(key_deadline)[..] {
            [Action::SecureAggregationAborted { reason, .. }] => {
                assert!(reason.contains("only 1 of the 2 sites needed sent a key"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((c.phase(), c.current_task()), (Phase::WaitingForSites, None), "one site: nothing is announced");
        assert_eq!(c.deadline(), None, "nothing runs, so nothing is due: the driver waits for a site");
        assert!(c.tick(key_deadline + Duration::from_secs(1)).is_empty());
        // The same after the round deadline passes with the key exchange still open.
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        c.sites_changed(set(&["a"]), t0);
        assert!(matches!(c.tick(t0 + Duration::from_secs(100))[..], [Action::SecureAggregationAborted { .. }]));
        assert_eq!(c.deadline(), None);
        // b is back: the round is announced again with a key exchange and a deadline of its own.
        let later = t0 + Duration::from_secs(200);
        let next = announced(&c.sites_changed(set(&["a", "b"]), later));
        assert_eq!(next.id, "r1a2");
        assert_eq!(c.deadline(), Some(later + Duration::from_secs(10)));
    }

    #[test]
    fn the_key_deadline_fixes_the_roster_with_the_keys_in_or_retries_below_quorum() {
        let t0 = Instant::now();
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b", "c"]), t0));
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(10)), "the key deadline comes first");
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        c.key_advertised("b", &t.id, key(2), t0).unwrap();
        assert!(c.tick(t0 + Duration::from_secs(9)).is_empty());
        let roster = fixed(&c.tick(t0 + Duration::from_secs(10)));
        assert_eq!(roster.keys().collect::<Vec<_>>(), ["a", "b"], "c, connected but silent, is left out");
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(100)));

        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b"]), t0));
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        let a = c.tick(t0 + Duration::from_secs(10));
        match &a[..] {
            [Action::SecureAggregationAborted { reason, .. }, Action::Announce(next)] => {
                assert!(reason.contains("only 1 of the 2 sites needed sent a key"), "{reason}");
                assert_eq!(next.id, "r1a2");
            }
            other => panic!("{other:?}"),
        }
        // A declined site is not waited for; a roster member that declines aborts the attempt.
        let mut c = coord(2);
        let t = announced(&c.sites_changed(set(&["a", "b", "c"]), t0));
        c.key_advertised("a", &t.id, key(1), t0).unwrap();
        c.site_declined("c", &t.id, "require_dp", t0).unwrap();
        let roster = fixed(&c.key_advertised("b", &t.id, key(2), t0).unwrap());
        assert_eq!(roster.len(), 2);
        let a = c.site_declined("b", &t.id, "max_rounds", t0).unwrap();
        assert!(matches!(&a[0], Action::SecureAggregationAborted { reason, .. } if reason.contains("b dropped out")));
    }
}
