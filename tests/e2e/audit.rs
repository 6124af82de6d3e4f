//! `fedhcc audit verify` on a log written by `fedhcc_secure::audit`: intact → exit 0 and a summary;
//! edited, removed, reordered or truncated → non-zero, naming the line.

use crate::harness::fedhcc;
use fedhcc_secure::audit::{AuditLog, AuditRecord, Direction};
use std::path::Path;

fn write_log(path: &Path) {
    let mut log = AuditLog::open_append(path).unwrap();
    for i in 0..5u32 {
        let record = AuditRecord {
            direction: if i.is_multiple_of(2) { Direction::Received } else { Direction::Sent },
            peer: "server",
            task: "run1-r1-train",
            round: 1,
            kind: if i.is_multiple_of(2) { "model" } else { "update" },
            bytes: 100 * u64::from(i + 1),
            payload_sha256: [i as u8; 32],
        };
        log.append(&record).unwrap();
    }
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect();
    f(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Runs `fedhcc audit verify` on `path`, which must fail; returns stderr.
fn fails(path: &Path) -> String {
    let (ok, stdout, stderr) = fedhcc(&["audit", "verify", path.to_str().unwrap()]);
    assert!(!ok, "verify should fail: {stdout}");
    stderr
}

#[test]
fn audit_verify_passes_an_intact_log_and_names_the_line_of_each_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path);
    let (ok, stdout, stderr) = fedhcc(&["audit", "verify", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("intact, 5 entries"), "{stdout}");
    assert!(stdout.contains("Z … ") && stdout.contains("head "), "{stdout}");
    assert!(stdout.contains("peers: server") && stdout.contains("600 bytes sent, 900 received"), "{stdout}");
    let pristine = std::fs::read(&path).unwrap();

    edit(&path, |l| l[2] = l[2].replace("\"bytes\":300", "\"bytes\":301"));
    let err = fails(&path);
    assert!(err.contains("line 3") && err.contains("edited"), "{err}");

    std::fs::write(&path, &pristine).unwrap();
    edit(&path, |l| {
        l.remove(1);
    });
    let err = fails(&path);
    assert!(err.contains("line 2") && err.contains("removed"), "{err}");

    std::fs::write(&path, &pristine).unwrap();
    edit(&path, |l| l.swap(3, 4));
    let err = fails(&path);
    assert!(err.contains("line 4") && err.contains("or moved after it"), "{err}");

    std::fs::write(&path, &pristine[..pristine.len() - 10]).unwrap();
    let err = fails(&path);
    assert!(err.contains("line 5") && err.contains("incomplete"), "{err}");

    let err = fails(&dir.path().join("missing.jsonl"));
    assert!(err.contains("missing.jsonl"), "{err}");
}
