//! `fedhcc audit verify FILE`: checks a site's or the server's audit log (hash-chained JSON lines,
//! `fedhcc_secure::audit`) from its first entry to its last. Prints a one-line summary when intact;
//! otherwise fails with the line number and what is wrong there (edited, removed, inserted or
//! reordered entry, truncated last line).

use anyhow::Result;
use clap::Subcommand;
use fedhcc_secure::audit::{VerifySummary, verify};
use std::path::{Path, PathBuf};

/// `fedhcc audit …`.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log: every entry's hash, its link to the previous entry and its sequence
    /// number. Exit 0 with a summary when intact; non-zero with the line and the problem otherwise.
    Verify {
        /// The audit log (JSON lines) to check.
        file: PathBuf,
    },
}

/// Runs an `audit` subcommand.
pub fn run(cmd: &AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Verify { file } => {
            let summary = verify(file)?;
            println!("{}", summary_line(file, &summary));
            Ok(())
        }
    }
}

/// `FILE: intact, N entries, FIRST … LAST, peers: a, b; X bytes sent, Y received; head HASH`.
fn summary_line(file: &Path, s: &VerifySummary) -> String {
    let span = match (&s.first_time, &s.last_time) {
        (Some(first), Some(last)) => format!("{first} … {last}"),
        _ => "no entries yet".to_string(),
    };
    let peers =
        if s.peers.is_empty() { "none".to_string() } else { s.peers.iter().cloned().collect::<Vec<_>>().join(", ") };
    format!(
        "{}: intact, {} entries, {span}, peers: {peers}; {} bytes sent, {} received; head {}",
        file.display(),
        s.entries,
        s.bytes_sent,
        s.bytes_received,
        s.head_hash
    )
}
