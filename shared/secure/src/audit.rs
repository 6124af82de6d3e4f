//! Audit trail: a hash-chained JSON-lines log of every message a site or the server sends and
//! receives — sizes, hashes, ids and rounds, never patient data or model values.
//!
//! One line per message:
//!
//! ```json
//! {"seq":0,"time":"2025-01-01T10:00:00.000000Z","direction":"sent","peer":"server","task":"r1-train",
//!  "round":1,"kind":"update","bytes":4096,"payload_sha256":"…","prev_hash":"000…0","hash":"…"}
//! ```
//!
//! `hash` is the SHA-256 (hex) of the line's JSON without the `hash` field, exactly as written
//! (fields in this order, no spaces); `prev_hash` is the previous line's `hash` (64 zeros for the
//! first); `seq` counts from 0. [`verify`] recomputes every hash and link and names the first line that
//! is edited, out of sequence (an entry removed, inserted or reordered), not written by this code
//! (not in canonical form), or truncated (a last line without its newline, e.g. after a crash).
//!
//! # What a hash chain can and cannot show
//!
//! Any change to an entry breaks its hash or the next entry's link, unless whoever changed it also
//! rewrote every later entry, and cutting whole entries off the end leaves a shorter valid log. Both
//! are caught by comparing the head ([`VerifySummary::head_hash`]) with a copy kept elsewhere (the
//! other side's log of the same messages, or a head hash recorded by the study lead).
//!
//! # Durability
//!
//! [`AuditLog::append`] writes the whole line with one `write` call on a file opened for appending;
//! with [`SyncPolicy::EveryEntry`] (the default) it then calls `fdatasync`, so an entry that was
//! appended survives a power loss (a few milliseconds per entry; there are a handful of messages per
//! round). [`SyncPolicy::Os`] leaves flushing to the operating system (and [`AuditLog::sync`]); a crash
//! may then lose the last entries or leave a truncated last line, which [`verify`] reports. A failed
//! write is cut back to the last complete entry. The file is locked (advisory, exclusive) while an
//! [`AuditLog`] has it open, so two processes cannot interleave entries.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest line [`verify`] reads (bytes, without the newline).
pub const MAX_LINE_BYTES: usize = 4096;
/// Longest `peer`, `task` or `kind` (bytes).
pub const MAX_FIELD_BYTES: usize = 256;

/// Whether the message left or reached the writer of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Sent by the log's owner.
    Sent,
    /// Received by the log's owner.
    Received,
}

/// One message to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditRecord<'a> {
    /// Sent or received.
    pub direction: Direction,
    /// The other side (site id or `server`).
    pub peer: &'a str,
    /// Task id (empty for messages outside a task, e.g. join).
    pub task: &'a str,
    /// Round (0 outside a round).
    pub round: u32,
    /// Message kind (e.g. `join`, `model`, `update`, `evaluation`, `refusal`).
    pub kind: &'a str,
    /// Payload size in bytes.
    pub bytes: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
}

/// One line of the log, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// When it was appended (RFC 3339, UTC).
    pub time: String,
    /// Sent or received.
    pub direction: Direction,
    /// The other side.
    pub peer: String,
    /// Task id.
    pub task: String,
    /// Round.
    pub round: u32,
    /// Message kind.
    pub kind: String,
    /// Payload bytes.
    pub bytes: u64,
    /// SHA-256 of the payload (hex).
    pub payload_sha256: String,
    /// The previous entry's hash.
    pub prev_hash: String,
    /// SHA-256 of this entry without this field.
    pub hash: String,
}

/// The hashed part of an entry: the same fields and order as [`AuditEntry`], without `hash`.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: &'a str,
    direction: Direction,
    peer: &'a str,
    task: &'a str,
    round: u32,
    kind: &'a str,
    bytes: u64,
    payload_sha256: &'a str,
    prev_hash: &'a str,
}

impl AuditEntry {
    /// SHA-256 (hex) of the entry without its `hash` field.
    pub fn compute_hash(&self) -> String {
        let body = Body {
            seq: self.seq,
            time: &self.time,
            direction: self.direction,
            peer: &self.peer,
            task: &self.task,
            round: self.round,
            kind: &self.kind,
            bytes: self.bytes,
            payload_sha256: &self.payload_sha256,
            prev_hash: &self.prev_hash,
        };
        // Serialising a struct of strings and integers cannot fail; an empty hash would not verify.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// Why a log does not verify, or cannot be written. Every variant about content names the line
/// (1-based) and the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file cannot be read or written.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The log.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process has the log open for writing.
    #[error("audit log {} is in use by another fedhcc process (it is locked); stop that process first", path.display())]
    Locked {
        /// The log.
        path: PathBuf,
    },
    /// The last line has no newline: it was cut short.
    #[error(
        "audit log {} line {line}: the last entry is incomplete (truncated, e.g. by a crash or a full disk while it \
         was written)",
        path.display()
    )]
    Truncated {
        /// The log.
        path: PathBuf,
        /// The truncated line.
        line: u64,
    },
    /// The line is not an entry.
    #[error("audit log {} line {line}: not an audit entry ({reason})", path.display())]
    Malformed {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The line parses, but not byte for byte as it would have been written.
    #[error(
        "audit log {} line {line}: the entry was edited (its text is not as fedhcc writes it: spacing, field order \
         or escaping changed)",
        path.display()
    )]
    NotCanonical {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
    },
    /// The entry's content does not match its hash.
    #[error("audit log {} line {line}: the entry was edited (its content no longer matches its hash)", path.display())]
    Altered {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
    },
    /// The entry's sequence number is not the next one.
    #[error("audit log {} line {line}: expected entry number {expected}, found {found}: {}", path.display(),
        if found > expected { "entries were removed before this line, or moved after it" }
        else { "an entry was inserted, duplicated or moved here" })]
    OutOfSequence {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
        /// The seq that should be here.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The entry does not link to the one before it.
    #[error(
        "audit log {} line {line}: the entry does not follow the one before it (its prev_hash is not that entry's \
         hash): the previous entry was edited and re-hashed, or entries were removed, inserted or reordered here",
        path.display()
    )]
    BrokenChain {
        /// The log.
        path: PathBuf,
        /// The line.
        line: u64,
    },
    /// A record to append has an unusable field.
    #[error("audit log {}: cannot record the message: {reason}", path.display())]
    BadRecord {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write failed and could not be undone; the log takes no more entries.
    #[error("audit log {}: an earlier write failed and could not be undone; verify the log before using it", path.display())]
    Poisoned {
        /// The log.
        path: PathBuf,
    },
}

impl AuditError {
    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Truncated { line, .. }
            | Self::Malformed { line, .. }
            | Self::NotCanonical { line, .. }
            | Self::Altered { line, .. }
            | Self::OutOfSequence { line, .. }
            | Self::BrokenChain { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// What an intact log contains.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VerifySummary {
    /// Entries.
    pub entries: u64,
    /// Time of the first entry.
    pub first_time: Option<String>,
    /// Time of the last entry.
    pub last_time: Option<String>,
    /// Every peer named.
    pub peers: BTreeSet<String>,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Hash of the last entry ([`GENESIS_HASH`] for an empty log): compare with a copy kept elsewhere
    /// to detect entries cut off the end.
    pub head_hash: String,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn field_problem(name: &str, v: &str) -> Option<String> {
    if v.len() > MAX_FIELD_BYTES {
        Some(format!("{name} is longer than {MAX_FIELD_BYTES} bytes"))
    } else if v.chars().any(char::is_control) {
        Some(format!("{name} contains control characters"))
    } else {
        None
    }
}

/// Checks lines one after another.
struct Verifier<'a> {
    path: &'a Path,
    summary: VerifySummary,
}

impl<'a> Verifier<'a> {
    fn new(path: &'a Path) -> Self {
        Self { path, summary: VerifySummary { head_hash: GENESIS_HASH.to_string(), ..Default::default() } }
    }

    fn malformed(&self, line: u64, reason: impl Into<String>) -> AuditError {
        AuditError::Malformed { path: self.path.to_path_buf(), line, reason: reason.into() }
    }

    fn line(&mut self, line: u64, text: &[u8]) -> Result<(), AuditError> {
        let p = self.path;
        let path = || p.to_path_buf();
        if text.is_empty() {
            return Err(self.malformed(line, "empty line"));
        }
        let text = std::str::from_utf8(text).map_err(|_| self.malformed(line, "not UTF-8 text"))?;
        let entry: AuditEntry = serde_json::from_str(text).map_err(|e| self.malformed(line, e.to_string()))?;
        match serde_json::to_string(&entry) {
            Ok(canonical) if canonical == text => {}
            _ => return Err(AuditError::NotCanonical { path: path(), line }),
        }
        for (name, v) in [("peer", &entry.peer), ("task", &entry.task), ("kind", &entry.kind)] {
            if let Some(p) = field_problem(name, v) {
                return Err(self.malformed(line, p));
            }
        }
        for (name, v) in
            [("payload_sha256", &entry.payload_sha256), ("prev_hash", &entry.prev_hash), ("hash", &entry.hash)]
        {
            if !is_hex64(v) {
                return Err(self.malformed(line, format!("{name} is not 64 lowercase hex digits")));
            }
        }
        if DateTime::parse_from_rfc3339(&entry.time).is_err() {
            return Err(self.malformed(line, "time is not an RFC 3339 timestamp"));
        }
        if entry.compute_hash() != entry.hash {
            return Err(AuditError::Altered { path: path(), line });
        }
        if entry.seq != self.summary.entries {
            return Err(AuditError::OutOfSequence {
                path: path(),
                line,
                expected: self.summary.entries,
                found: entry.seq,
            });
        }
        if entry.prev_hash != self.summary.head_hash {
            return Err(AuditError::BrokenChain { path: path(), line });
        }
        let s = &mut self.summary;
        s.entries += 1;
        if s.first_time.is_none() {
            s.first_time = Some(entry.time.clone());
        }
        match entry.direction {
            Direction::Sent => s.bytes_sent = s.bytes_sent.saturating_add(entry.bytes),
            Direction::Received => s.bytes_received = s.bytes_received.saturating_add(entry.bytes),
        }
        if !s.peers.contains(&entry.peer) {
            s.peers.insert(entry.peer);
        }
        s.last_time = Some(entry.time);
        s.head_hash = entry.hash;
        Ok(())
    }

    /// Reads every line of `reader`; returns the summary and the byte length read.
    fn run<R: Read>(mut self, reader: R) -> Result<(VerifySummary, u64), AuditError> {
        let path = self.path;
        let io = |source| AuditError::Io { path: path.to_path_buf(), source };
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::with_capacity(512);
        let mut line = 0u64;
        let mut len = 0u64;
        loop {
            buf.clear();
            let n = (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                return Ok((self.summary, len));
            }
            line += 1;
            len += n as u64;
            if buf.last() != Some(&b'\n') {
                if n > MAX_LINE_BYTES {
                    return Err(self.malformed(line, format!("line longer than {MAX_LINE_BYTES} bytes")));
                }
                return Err(AuditError::Truncated { path: self.path.to_path_buf(), line });
            }
            buf.pop();
            self.line(line, &buf)?;
        }
    }
}

/// Verifies a log from its first line to its last.
///
/// # Errors
///
/// The first problem found, naming the line: [`AuditError::Altered`], [`AuditError::NotCanonical`]
/// (edited entries), [`AuditError::OutOfSequence`] (removed, inserted, reordered),
/// [`AuditError::BrokenChain`] (an edited and re-hashed entry before this line, or entries moved),
/// [`AuditError::Truncated`], [`AuditError::Malformed`]; [`AuditError::Io`] if it cannot be read.
pub fn verify(path: &Path) -> Result<VerifySummary, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io { path: path.to_path_buf(), source })?;
    Verifier::new(path).run(file).map(|(s, _)| s)
}

/// When appended entries reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// `fdatasync` after every entry (default): an appended entry survives a power loss.
    #[default]
    EveryEntry,
    /// The operating system decides; call [`AuditLog::sync`] at points that matter.
    Os,
}

/// An open log, appending entries to the end of a verified chain.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    sync: SyncPolicy,
    next_seq: u64,
    head_hash: String,
    len: u64,
    poisoned: bool,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` with [`SyncPolicy::EveryEntry`], verifies it and resumes
    /// its chain after the last entry.
    ///
    /// # Errors
    ///
    /// Any [`verify`] error (a broken log is never appended to: move it aside, keep it as evidence,
    /// and start a new one), [`AuditError::Locked`] if another process has it open,
    /// [`AuditError::Io`].
    pub fn open_append(path: &Path) -> Result<Self, AuditError> {
        Self::open_append_with(path, SyncPolicy::default())
    }

    /// As [`AuditLog::open_append`] with the given sync policy.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::open_append`].
    pub fn open_append_with(path: &Path, sync: SyncPolicy) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io { path: path.to_path_buf(), source };
        let existed = path.exists();
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked { path: path.to_path_buf() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        if !existed {
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let (summary, len) = Verifier::new(path).run(&mut file)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            sync,
            next_seq: summary.entries,
            head_hash: summary.head_hash,
            len,
            poisoned: false,
        })
    }

    /// Entries in the log.
    pub fn entries(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the last entry.
    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    /// Appends one message, stamped with the current time.
    ///
    /// # Errors
    ///
    /// [`AuditError::BadRecord`] for a peer, task or kind over [`MAX_FIELD_BYTES`] or with control
    /// characters, [`AuditError::Io`] if the write or sync fails (the partial line is cut off),
    /// [`AuditError::Poisoned`] if an earlier failure could not be undone.
    pub fn append(&mut self, record: &AuditRecord<'_>) -> Result<AuditEntry, AuditError> {
        self.append_at(record, Utc::now())
    }

    /// Appends one message with the given time (for replaying or tests; normally use
    /// [`AuditLog::append`]).
    ///
    /// # Errors
    ///
    /// As [`AuditLog::append`].
    pub fn append_at(&mut self, record: &AuditRecord<'_>, time: DateTime<Utc>) -> Result<AuditEntry, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned { path: self.path.clone() });
        }
        for (name, v) in [("peer", record.peer), ("task", record.task), ("kind", record.kind)] {
            if let Some(reason) = field_problem(name, v) {
                return Err(AuditError::BadRecord { path: self.path.clone(), reason });
            }
        }
        let mut entry = AuditEntry {
            seq: self.next_seq,
            time: time.to_rfc3339_opts(SecondsFormat::Micros, true),
            direction: record.direction,
            peer: record.peer.to_string(),
            task: record.task.to_string(),
            round: record.round,
            kind: record.kind.to_string(),
            bytes: record.bytes,
            payload_sha256: hex::encode(record.payload_sha256),
            prev_hash: self.head_hash.clone(),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        let mut line = serde_json::to_string(&entry)
            .map_err(|e| AuditError::BadRecord { path: self.path.clone(), reason: e.to_string() })?;
        line.push('\n');
        if line.len() > MAX_LINE_BYTES + 1 {
            return Err(AuditError::BadRecord {
                path: self.path.clone(),
                reason: format!("the entry would be longer than {MAX_LINE_BYTES} bytes"),
            });
        }
        let written = self.file.write_all(line.as_bytes()).and_then(|()| match self.sync {
            SyncPolicy::EveryEntry => self.file.sync_data(),
            SyncPolicy::Os => Ok(()),
        });
        if let Err(source) = written {
            // Cut a partial line off so that the chain stays valid; if that fails too, stop.
            if self.file.set_len(self.len).and_then(|()| self.file.sync_data()).is_err() {
                self.poisoned = true;
            }
            return Err(AuditError::Io { path: self.path.clone(), source });
        }
        self.len += line.len() as u64;
        self.next_seq += 1;
        self.head_hash.clone_from(&entry.hash);
        Ok(entry)
    }

    /// Flushes appended entries to the disk (for [`SyncPolicy::Os`]).
    ///
    /// # Errors
    ///
    /// [`AuditError::Io`].
    pub fn sync(&self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|source| AuditError::Io { path: self.path.clone(), source })
    }
}
