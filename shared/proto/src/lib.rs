//! The federation protocol: generated prost messages and tonic client/server for
//! `proto/fedhcc.proto`, plus the limits both ends enforce.
//!
//! Prost types appear only here, in the server's service layer and in the client's transport layer.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedhcc.v1");
}

pub use v1::*;

pub mod chunks;

/// Largest chunk of a model or update, in bytes.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Largest gRPC message either end decodes: one chunk plus framing headroom.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + 64 * 1024;
/// Largest string field accepted in a request (ids, fingerprints, hashes, metric names).
pub const MAX_STRING_LEN: usize = 256;
/// Most metrics in one report.
pub const MAX_METRICS: usize = 64;
/// Most input groups in one statistics report.
pub const MAX_STAT_GROUPS: usize = 8;
/// Most columns in one statistics group.
pub const MAX_STAT_COLUMNS: usize = 4096;
/// Longest policy rule name in a task refusal.
pub const MAX_RULE_LEN: usize = 64;
/// Longest message in a task refusal (bytes).
pub const MAX_REFUSAL_MESSAGE_LEN: usize = 1024;
/// Largest sample count a site may announce or report (join, update, evaluation).
pub const MAX_SAMPLES: u64 = 1_000_000_000;
/// Length of an X25519 public key and of a secure-aggregation roster digest, in bytes.
pub const KEY_BYTES: usize = 32;
/// Most sites in one secure-aggregation roster (the study's `max_sites` cannot exceed it).
pub const MAX_ROSTER_SITES: usize = 1024;
/// `UpdateHeader.encoding` of a masked secure-aggregation upload: 8 little-endian bytes per value.
pub const ENCODING_SECAGG_U64: &str = "secagg-u64";
/// Protocol version announced in Join.
pub const PROTOCOL_VERSION: &str = concat!("fedhcc/", env!("CARGO_PKG_VERSION"), "/v1");

impl TaskRef {
    /// A short human-readable form: `round 3 (task r3a1)`.
    pub fn describe(&self) -> String {
        format!("round {} (task {})", self.round, self.task_id)
    }
}

impl TaskEvent {
    /// The audit-log kind of this event and the task it carries, the same on the server (sent) and
    /// the site (received): `task_train`, `task_evaluate`, `task_statistics` or `finished`. `None`
    /// for a heartbeat (no task data, not audited) or an empty event.
    pub fn audit_kind(&self) -> Option<(&'static str, Option<&TaskRef>)> {
        use task_event::Event;
        Some(match self.event.as_ref()? {
            Event::Train(t) => ("task_train", t.task.as_ref()),
            Event::Evaluate(t) => ("task_evaluate", t.task.as_ref()),
            Event::Statistics(t) => ("task_statistics", t.task.as_ref()),
            Event::Finished(_) => ("finished", None),
            Event::Heartbeat(_) => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_event_has_its_audit_kind_and_a_heartbeat_none() {
        let t = || Some(TaskRef { task_id: "r2a1".into(), round: 2, ..Default::default() });
        let kind = |e: task_event::Event| TaskEvent { event: Some(e) }.audit_kind().map(|(k, t)| (k, t.cloned()));
        assert_eq!(
            kind(task_event::Event::Train(TrainTask { task: t(), ..Default::default() })),
            Some(("task_train", t()))
        );
        assert_eq!(
            kind(task_event::Event::Evaluate(EvaluateTask { task: t(), ..Default::default() })),
            Some(("task_evaluate", t()))
        );
        assert_eq!(
            kind(task_event::Event::Statistics(StatisticsTask { task: t(), ..Default::default() })),
            Some(("task_statistics", t()))
        );
        assert_eq!(kind(task_event::Event::Finished(RunFinished::default())), Some(("finished", None)));
        assert_eq!(kind(task_event::Event::Heartbeat(Heartbeat::default())), None);
        assert_eq!(TaskEvent { event: None }.audit_kind(), None);
    }
}
