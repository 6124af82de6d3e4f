//! `status.json`: what the client is doing, for the site operator (`fedhcc client status`).
//!
//! The client rewrites the file (atomically) at every change of state — joined, waiting,
//! downloading, training (with progress), uploading, evaluating, reconnecting, finished, stopped —
//! and on every server heartbeat while it waits, so `updated_unix` also says whether the client is
//! alive. The last error stays in the file until the next one, even after the client recovered.
//! Only states, round numbers, counts and messages are written: never a patient-level value.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file's name in the site's `state_dir`.
pub const FILE: &str = "status.json";

/// Seconds without an update after which a client that is not finished or stopped is reported as
/// possibly not running (it rewrites the file on every heartbeat, every 5 s, while it waits).
pub const STALE_AFTER_S: u64 = 60;

/// Progress of a long local task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    /// What is counted, e.g. `epochs`.
    pub unit: String,
}

/// The contents of `status.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    pub site_id: String,
    /// `starting`, `joined`, `waiting`, `statistics`, `downloading`, `training`, `uploading`,
    /// `evaluating`, `reconnecting`, `finished` or `stopped`.
    pub state: String,
    /// One sentence for the operator.
    pub detail: String,
    pub round: u32,
    #[serde(default)]
    pub total_rounds: u32,
    pub rounds_trained: u32,
    #[serde(default)]
    pub evaluations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The most recent error (a refused or lost connection, an update the server did not use, a
    /// failed local task), kept after the client recovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_unix: Option<u64>,
    #[serde(default)]
    pub started_unix: u64,
    /// The client process that writes the file.
    #[serde(default)]
    pub pid: u32,
    pub updated_unix: u64,
}

/// `status.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
    #[error(
        "{0}: no status file yet; the client has not run with this state_dir (start it with `fedhcc client --config …`)"
    )]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    Unreadable { path: PathBuf, message: String },
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Reads `state_dir/status.json`.
///
/// # Errors
/// The file is missing, unreadable or not a status file.
pub fn read(state_dir: &Path) -> Result<ClientStatus, StatusFileError> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StatusFileError::Missing(path)),
        Err(e) => return Err(StatusFileError::Unreadable { path, message: format!("cannot read: {e}") }),
    };
    serde_json::from_str(&text)
        .map_err(|e| StatusFileError::Unreadable { path, message: format!("not a fedhcc status file: {e}") })
}

/// Writes `state_dir/status.json` atomically (a reader never sees half a file).
///
/// # Errors
/// The folder or file cannot be written.
pub fn write(state_dir: &Path, status: &ClientStatus) -> Result<(), StatusFileError> {
    let path = state_dir.join(FILE);
    let err = |message: String| StatusFileError::Unreadable { path: path.clone(), message };
    let text = serde_json::to_string_pretty(status).map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(state_dir).map_err(|e| err(format!("cannot create the folder: {e}")))?;
    fedhcc_core::pki::write_atomic(&path, text.as_bytes(), false).map_err(|e| err(e.to_string()))
}

fn ago(then: u64, now: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=1 => "just now".into(),
        2..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{:.1} h ago", s as f64 / 3600.0),
    }
}

impl ClientStatus {
    /// Whether the client has ended (it writes nothing more).
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "finished" | "stopped")
    }

    /// Whether the file is older than [`STALE_AFTER_S`] while the client should still be writing it.
    pub fn stale(&self, now_unix: u64) -> bool {
        !self.ended() && now_unix.saturating_sub(self.updated_unix) > STALE_AFTER_S
    }

    /// The status for a terminal, as `fedhcc client status` prints it.
    pub fn to_text(&self, now_unix: u64) -> String {
        let mut out = String::new();
        let rounds = if self.total_rounds > 0 { format!(" of {}", self.total_rounds) } else { String::new() };
        out.push_str(&format!("Site {}: {}\n", self.site_id, self.state));
        out.push_str(&format!("  {}\n", self.detail));
        if let Some(p) = &self.progress {
            let pct = if p.total > 0 { 100.0 * p.done as f64 / p.total as f64 } else { 0.0 };
            out.push_str(&format!("  progress: {} of {} {} ({pct:.0}%)\n", p.done, p.total, p.unit));
        }
        out.push_str(&format!(
            "  round {}{rounds}; {} rounds trained, {} evaluations sent\n",
            self.round, self.rounds_trained, self.evaluations
        ));
        out.push_str(&format!("  updated {}", ago(self.updated_unix, now_unix)));
        if self.pid != 0 {
            out.push_str(&format!(" by process {}", self.pid));
        }
        out.push('\n');
        if self.stale(now_unix) {
            out.push_str(&format!(
                "  warning: no update for more than {STALE_AFTER_S} s; the client may not be running (check its service or log)\n"
            ));
        }
        match (&self.last_error, self.last_error_unix) {
            (Some(e), Some(t)) => out.push_str(&format!("  last error ({}): {e}\n", ago(t, now_unix))),
            (Some(e), None) => out.push_str(&format!("  last error: {e}\n")),
            _ => out.push_str("  no error so far\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClientStatus {
        ClientStatus {
            site_id: "tongji".into(),
            state: "training".into(),
            detail: "round 3: training locally (4 epochs)".into(),
            round: 3,
            total_rounds: 5,
            rounds_trained: 2,
            evaluations: 0,
            progress: Some(Progress { done: 1, total: 4, unit: "epochs".into() }),
            last_error: Some("server unreachable".into()),
            last_error_unix: Some(900),
            started_unix: 100,
            pid: 42,
            updated_unix: 1000,
        }
    }

    #[test]
    fn round_trips_through_the_file_and_reads_the_older_format() {
        let tmp = tempfile::tempdir().unwrap();
        let e = read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("status.json") && e.contains("has not run"), "{e}");
        write(tmp.path(), &sample()).unwrap();
        assert_eq!(read(tmp.path()).unwrap(), sample());
        // What clients wrote before progress and errors were added still reads.
        std::fs::write(
            tmp.path().join(FILE),
            r#"{"site_id":"a","state":"waiting","detail":"d","round":1,"rounds_trained":0,"updated_unix":5}"#,
        )
        .unwrap();
        let s = read(tmp.path()).unwrap();
        assert_eq!((s.state.as_str(), s.progress, s.last_error), ("waiting", None, None));
        std::fs::write(tmp.path().join(FILE), "{").unwrap();
        let e = read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("status.json") && e.contains("not a fedhcc status file"), "{e}");
    }

    #[test]
    fn the_text_shows_progress_the_last_error_and_a_silent_client() {
        let s = sample();
        let t = s.to_text(1010);
        assert!(t.contains("Site tongji: training"), "{t}");
        assert!(t.contains("progress: 1 of 4 epochs (25%)"), "{t}");
        assert!(t.contains("round 3 of 5; 2 rounds trained"), "{t}");
        assert!(t.contains("last error (110 s ago): server unreachable"), "{t}");
        assert!(!t.contains("may not be running"), "{t}");
        assert!(s.to_text(1000 + STALE_AFTER_S + 1).contains("may not be running"));
        let done = ClientStatus { state: "finished".into(), last_error: None, ..sample() };
        let t = done.to_text(1_000_000);
        assert!(!t.contains("may not be running") && t.contains("no error so far"), "{t}");
    }
}
