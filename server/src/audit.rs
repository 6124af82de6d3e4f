//! The server's audit trail: `state_dir/audit.jsonl`, a hash-chained JSON-lines log
//! ([`fedhcc_secure::audit`]) of every message that carries task data, sent or received.
//!
//! | kind | direction | what is hashed and counted |
//! |---|---|---|
//! | `join` | received | the encoded `JoinRequest` |
//! | `task_statistics`, `task_train`, `task_evaluate`, `finished` | sent | the encoded `TaskEvent` |
//! | `model` | sent | the model payload (the checkpoint file), once every chunk went out |
//! | `update` | received | the update payload, once it was checked and spooled |
//! | `evaluation`, `statistics`, `task_refusal` | received | the encoded report |
//!
//! Heartbeats (round and phase only, every few seconds) and replies (acknowledgements, the join
//! reply) carry no task data and are not recorded; requests refused before their payload was read
//! are in the event log and `/metrics`, not here. A site's log records the same messages from its
//! side, so an upload or download shows the same SHA-256 in both logs.
//!
//! Entries are appended on a blocking thread (each is `fdatasync`ed), never while a std mutex of
//! the server is held across `.await`. A failing append is logged as an error and the message is
//! still handled: the audit trail documents the federation, it does not gate it.

use fedhcc_secure::audit::{AuditError, AuditLog, AuditRecord, Direction};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file name of the audit log in the server's state folder.
pub const FILE_NAME: &str = "audit.jsonl";

/// One message to record, with owned fields (it travels to a blocking thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Sent or received.
    pub direction: Direction,
    /// The site.
    pub peer: String,
    /// Task id (empty for a join).
    pub task: String,
    /// Round (0 outside a round).
    pub round: u32,
    /// Message kind (see the module table).
    pub kind: &'static str,
    /// Payload bytes.
    pub bytes: u64,
    /// SHA-256 of the payload.
    pub sha256: [u8; 32],
}

impl Entry {
    /// An entry for `payload` (its length and SHA-256).
    pub fn of_bytes(
        direction: Direction,
        peer: &str,
        task: &str,
        round: u32,
        kind: &'static str,
        payload: &[u8],
    ) -> Self {
        Self {
            direction,
            peer: peer.to_string(),
            task: task.to_string(),
            round,
            kind,
            bytes: payload.len() as u64,
            sha256: Sha256::digest(payload).into(),
        }
    }
}

/// The server's audit log; `Default` is a server without one (unit tests of other parts).
#[derive(Clone, Debug, Default)]
pub struct ServerAudit {
    log: Option<Arc<Mutex<AuditLog>>>,
    path: PathBuf,
}

impl ServerAudit {
    /// Opens (or creates) `state_dir/audit.jsonl`, verifying the entries already there.
    ///
    /// # Errors
    /// A log that does not verify (it is never appended to: move it aside and keep it as evidence),
    /// a log in use by another process, or an I/O failure.
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = state_dir.join(FILE_NAME);
        let log = AuditLog::open_append(&path)?;
        Ok(Self { log: Some(Arc::new(Mutex::new(log))), path })
    }

    /// The log file (empty path when there is none).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` on a blocking thread; a failure is logged, not returned.
    pub async fn record(&self, entry: Entry) {
        let Some(log) = self.log.clone() else { return };
        let path = self.path.clone();
        let kind = entry.kind;
        let appended = tokio::task::spawn_blocking(move || append(&log, &entry)).await;
        match appended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, kind, "audit entry not written"),
            Err(e) => tracing::error!(error = %e, path = %path.display(), kind, "audit entry not written"),
        }
    }
}

fn append(log: &Mutex<AuditLog>, e: &Entry) -> Result<(), AuditError> {
    let record = AuditRecord {
        direction: e.direction,
        peer: &e.peer,
        task: &e.task,
        round: e.round,
        kind: e.kind,
        bytes: e.bytes,
        payload_sha256: e.sha256,
    };
    crate::state::lock(log).append(&record).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_messages_in_a_chain_that_verifies_and_resumes_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = ServerAudit::open(tmp.path()).unwrap();
        audit.record(Entry::of_bytes(Direction::Received, "a", "", 0, "join", b"join bytes")).await;
        audit.record(Entry::of_bytes(Direction::Sent, "a", "r1a1", 1, "model", b"model")).await;
        assert!(ServerAudit::open(tmp.path()).is_err(), "locked while the server holds it");
        drop(audit);
        let audit = ServerAudit::open(tmp.path()).unwrap();
        audit.record(Entry::of_bytes(Direction::Received, "a", "r1a1", 1, "update", b"update")).await;
        let s = fedhcc_secure::audit::verify(&tmp.path().join(FILE_NAME)).unwrap();
        assert_eq!((s.entries, s.bytes_sent, s.bytes_received), (3, 5, 16));
        let text = std::fs::read_to_string(tmp.path().join(FILE_NAME)).unwrap();
        assert!(text.contains(&hex::encode(Sha256::digest(b"update"))), "{text}");
        // A server without a log records nothing and does not fail.
        ServerAudit::default().record(Entry::of_bytes(Direction::Sent, "a", "", 0, "x", b"")).await;
    }
}
