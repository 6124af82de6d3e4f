//! The server's recent events (sites connecting and leaving, tasks announced, rounds committed or
//! retried, refusals, tasks declined by a site's policy, evaluations), kept in memory for the
//! dashboard's event log. Bounded: the oldest event goes when a new one comes past
//! [`EventLog::CAPACITY`]. Nothing here is durable; the round records in the store are.
//!
//! Messages carry site ids, round and task ids and protocol reasons only, never a patient-level
//! value (no site sends one).

use crate::state::{lock, now_unix};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// What an event is about (the dashboard colours the log by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A site connected or disconnected.
    Site,
    /// A train or evaluate task was announced.
    Task,
    /// A round was committed.
    Round,
    /// A round closed without being committed (it is retried).
    Retry,
    /// A request was refused.
    Refusal,
    /// A site declined a task under its own site policy (the rule and the site's reason).
    Declined,
    /// An evaluation task closed.
    Evaluation,
    /// The run finished.
    Run,
    /// The study lead's admin command (start, pause, resume, abort, allow, disallow, export).
    Admin,
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Increases by one per event, so a reader can tell which ones it has seen.
    pub seq: u64,
    pub unix: i64,
    pub kind: EventKind,
    /// The site concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub message: String,
}

/// The most recent events, oldest first. Written by handlers and the round driver; read by the
/// dashboard. The mutex is held for a push or a copy only.
#[derive(Debug, Default)]
pub struct EventLog {
    inner: Mutex<(u64, VecDeque<Event>)>,
}

impl EventLog {
    /// Events kept.
    pub const CAPACITY: usize = 200;
    /// Longest message kept (characters); refusal reasons are cut to this.
    pub const MAX_MESSAGE: usize = 300;

    /// Appends an event, dropping the oldest past [`Self::CAPACITY`].
    pub fn push(&self, kind: EventKind, site: Option<&str>, message: impl Into<String>) {
        let mut message: String = message.into();
        if message.chars().count() > Self::MAX_MESSAGE {
            message = message.chars().take(Self::MAX_MESSAGE).collect::<String>() + "…";
        }
        let mut g = lock(&self.inner);
        g.0 += 1;
        let ev = Event { seq: g.0, unix: now_unix(), kind, site: site.map(str::to_string), message };
        if g.1.len() == Self::CAPACITY {
            g.1.pop_front();
        }
        g.1.push_back(ev);
    }

    /// A copy of the kept events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        lock(&self.inner).1.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order_and_cuts_long_messages() {
        let log = EventLog::default();
        for i in 0..EventLog::CAPACITY + 5 {
            log.push(EventKind::Round, None, format!("round {i}"));
        }
        let ev = log.recent();
        assert_eq!(ev.len(), EventLog::CAPACITY);
        assert_eq!(ev[0].message, "round 5");
        assert_eq!(ev[0].seq, 6);
        assert!(ev.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        log.push(EventKind::Refusal, Some("a"), "x".repeat(1000));
        let last = log.recent().pop().unwrap();
        assert_eq!(last.site.as_deref(), Some("a"));
        assert_eq!(last.message.chars().count(), EventLog::MAX_MESSAGE + 1);
        let json = serde_json::to_value(&last).unwrap();
        assert_eq!(json["kind"], "refusal");
    }
}
