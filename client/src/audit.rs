//! The site's audit trail: `state_dir/audit.jsonl`, a hash-chained JSON-lines log
//! ([`fedhcc_secure::audit`]) of every message this client sends or receives that carries task
//! data. The server keeps the same kind of log of the same messages, so an upload or a download
//! shows the same SHA-256 on both sides.
//!
//! | kind | direction | what is hashed and counted |
//! |---|---|---|
//! | `join` | sent | the encoded `JoinRequest` |
//! | `task_statistics`, `task_train`, `task_evaluate`, `finished` | received | the encoded `TaskEvent` |
//! | `model` | received | the model payload, after its length, SHA-256 and layout were checked |
//! | `update` | sent | the update payload |
//! | `statistics`, `evaluation`, `task_refusal` | sent | the encoded report |
//!
//! Heartbeats (round and phase, every few seconds) and the server's replies carry no task data and
//! are not recorded. A message is recorded **before** it is sent: what could have left the site is
//! always in the log (a send that then fails leaves an entry for a message the server may not have
//! received). If the log cannot be written the message is not sent and the client stops, naming the
//! file: every byte that leaves the site is accounted for. Entries carry sizes, hashes, ids and
//! rounds, never patient data or model values.

use fedhcc_secure::audit::{AuditError, AuditLog, AuditRecord, Direction};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The file name of the audit log in the site's state folder.
pub const FILE_NAME: &str = "audit.jsonl";

/// The site's audit log; without a state folder (tests, benchmarks) nothing is recorded
/// (`Default` is such a log).
#[derive(Debug, Default)]
pub struct SiteAudit {
    log: Option<AuditLog>,
    peer: String,
}

impl SiteAudit {
    /// Opens (or creates) `state_dir/audit.jsonl`, verifying the entries already there; `peer`
    /// names the server in every entry. `None` records nothing.
    ///
    /// # Errors
    /// A log that does not verify (it is never appended to: move it aside and keep it as evidence),
    /// a log in use by another client, or an I/O failure.
    pub fn open(state_dir: Option<&Path>, peer: &str) -> Result<Self, AuditError> {
        let log = match state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| AuditError::Io { path: dir.to_path_buf(), source })?;
                Some(AuditLog::open_append(&dir.join(FILE_NAME))?)
            }
            None => None,
        };
        Ok(Self { log, peer: peer.to_string() })
    }

    /// The log file, if there is one.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Records a message whose payload is `payload`.
    ///
    /// # Errors
    /// The entry could not be written (the caller must not send the message).
    pub fn record(
        &mut self,
        direction: Direction,
        task: &str,
        round: u32,
        kind: &str,
        payload: &[u8],
    ) -> Result<(), AuditError> {
        self.record_digest(direction, task, round, kind, payload.len() as u64, Sha256::digest(payload).into())
    }

    /// Records a message by its size and SHA-256 (for payloads hashed as they streamed).
    ///
    /// # Errors
    /// The entry could not be written.
    pub fn record_digest(
        &mut self,
        direction: Direction,
        task: &str,
        round: u32,
        kind: &str,
        bytes: u64,
        sha256: [u8; 32],
    ) -> Result<(), AuditError> {
        let Some(log) = &mut self.log else { return Ok(()) };
        let record = AuditRecord { direction, peer: &self.peer, task, round, kind, bytes, payload_sha256: sha256 };
        log.append(&record).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_to_the_state_folder_and_nothing_without_one() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let mut a = SiteAudit::open(Some(&state), "localhost").unwrap();
        a.record(Direction::Sent, "", 0, "join", b"join").unwrap();
        a.record_digest(Direction::Received, "r1a1", 1, "model", 7, [3; 32]).unwrap();
        let e = SiteAudit::open(Some(&state), "localhost").unwrap_err();
        assert!(matches!(e, AuditError::Locked { .. }), "one client per log: {e}");
        drop(a);
        let s = fedhcc_secure::audit::verify(&SiteAudit::path(&state)).unwrap();
        assert_eq!((s.entries, s.bytes_sent, s.bytes_received), (2, 4, 7));
        assert!(s.peers.contains("localhost"));
        let mut none = SiteAudit::open(None, "x").unwrap();
        none.record(Direction::Sent, "", 0, "join", b"").unwrap();
    }
}
