//! Audit trail: an intact log verifies and resumes; every kind of edit is found and named by line;
//! a broken log is never appended to.

use chrono::{DateTime, TimeZone, Utc};
use fedhcc_secure::audit::{
    AuditError, AuditLog, AuditRecord, Direction, GENESIS_HASH, MAX_LINE_BYTES, SyncPolicy, verify,
};
use sha2::{Digest, Sha256};
use std::path::Path;

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, second).unwrap()
}

fn record(i: u32) -> AuditRecord<'static> {
    const PEERS: [&str; 2] = ["server", "center_b"];
    const KINDS: [&str; 3] = ["model", "update", "evaluation"];
    AuditRecord {
        direction: if i.is_multiple_of(2) { Direction::Received } else { Direction::Sent },
        peer: PEERS[(i % 2) as usize],
        task: "run1-r1-train",
        round: 1 + i / 3,
        kind: KINDS[(i % 3) as usize],
        bytes: 1000 + u64::from(i),
        payload_sha256: Sha256::digest(i.to_le_bytes()).into(),
    }
}

/// A log of `n` entries written by the library.
fn write_log(path: &Path, n: u32) -> String {
    let mut log = AuditLog::open_append(path).unwrap();
    for i in 0..n {
        log.append_at(&record(i), at(i)).unwrap();
    }
    log.head_hash().to_string()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// The error `verify` gives, and that `open_append` refuses the same log without changing it.
fn broken(path: &Path) -> AuditError {
    let before = std::fs::read(path).unwrap();
    let err = verify(path).unwrap_err();
    let again = AuditLog::open_append(path).unwrap_err();
    assert_eq!(again.to_string(), err.to_string(), "open_append refuses a broken log");
    assert_eq!(std::fs::read(path).unwrap(), before, "the broken log is left as it was");
    assert!(err.to_string().contains(&path.display().to_string()), "names the file: {err}");
    err
}

#[test]
fn an_intact_log_verifies_with_its_summary_and_resumes_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let head = write_log(&path, 6);
    let s = verify(&path).unwrap();
    assert_eq!(s.entries, 6);
    assert_eq!(s.first_time.as_deref(), Some("2025-03-01T09:00:00.000000Z"));
    assert_eq!(s.last_time.as_deref(), Some("2025-03-01T09:00:05.000000Z"));
    assert_eq!(s.peers.iter().map(String::as_str).collect::<Vec<_>>(), vec!["center_b", "server"]);
    assert_eq!(s.bytes_received, 1000 + 1002 + 1004);
    assert_eq!(s.bytes_sent, 1001 + 1003 + 1005);
    assert_eq!(s.head_hash, head);
    let first = &lines(&path)[0];
    assert!(first.starts_with("{\"seq\":0,\"time\":\"2025-03-01T09:00:00.000000Z\",\"direction\":\"received\""));
    assert!(first.contains(&format!("\"prev_hash\":\"{GENESIS_HASH}\"")));

    // Reopened: the chain continues from the last entry.
    let mut log = AuditLog::open_append_with(&path, SyncPolicy::Os).unwrap();
    assert_eq!((log.entries(), log.head_hash()), (6, head.as_str()));
    let e = log.append(&record(6)).unwrap();
    assert_eq!((e.seq, e.prev_hash.as_str()), (6, head.as_str()));
    log.sync().unwrap();
    drop(log);
    assert_eq!(verify(&path).unwrap().entries, 7);

    // An empty (new) log is intact.
    let empty = dir.path().join("new.jsonl");
    drop(AuditLog::open_append(&empty).unwrap());
    let s = verify(&empty).unwrap();
    assert_eq!((s.entries, s.head_hash.as_str(), s.first_time), (0, GENESIS_HASH, None));
}

#[test]
fn an_edited_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 5);
    let mut l = lines(&path);
    l[2] = l[2].replace("\"bytes\":1002", "\"bytes\":9002");
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::Altered { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("line 3") && err.to_string().contains("edited"), "{err}");

    // The peer changed, too: same finding.
    write_log(&dir.path().join("b.jsonl"), 5);
    let path = dir.path().join("b.jsonl");
    let mut l = lines(&path);
    l[0] = l[0].replace("\"peer\":\"server\"", "\"peer\":\"center_x\"");
    write_lines(&path, &l);
    assert!(matches!(broken(&path), AuditError::Altered { line: 1, .. }));
}

#[test]
fn an_edited_and_rehashed_entry_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 5);
    let mut l = lines(&path);
    let mut e: fedhcc_secure::audit::AuditEntry = serde_json::from_str(&l[1]).unwrap();
    e.bytes = 1;
    e.hash = e.compute_hash();
    l[1] = serde_json::to_string(&e).unwrap();
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::BrokenChain { line: 3, .. }), "{err}");
}

#[test]
fn a_reformatted_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 3);
    let mut l = lines(&path);
    l[1] = l[1].replacen(",", ", ", 1);
    write_lines(&path, &l);
    assert!(matches!(broken(&path), AuditError::NotCanonical { line: 2, .. }));
    // An unknown field smuggled in.
    let path = dir.path().join("b.jsonl");
    write_log(&path, 3);
    let mut l = lines(&path);
    l[2] = l[2].replacen('{', "{\"note\":\"x\",", 1);
    write_lines(&path, &l);
    assert!(matches!(broken(&path), AuditError::Malformed { line: 3, .. }));
}

#[test]
fn a_removed_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 6);
    let mut l = lines(&path);
    l.remove(3);
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::OutOfSequence { line: 4, expected: 3, found: 4, .. }), "{err}");
    assert!(err.to_string().contains("removed"), "{err}");
    // The first entry removed.
    let mut l = lines(&path);
    l.remove(0);
    write_lines(&path, &l);
    assert!(matches!(broken(&path), AuditError::OutOfSequence { line: 1, expected: 0, found: 1, .. }));
}

#[test]
fn entries_cut_off_the_end_show_in_the_head_hash() {
    // A chain alone cannot tell a shorter log from a complete one; the head hash kept elsewhere can.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let head = write_log(&path, 4);
    let l = lines(&path);
    write_lines(&path, &l[..3]);
    let s = verify(&path).unwrap();
    assert_eq!(s.entries, 3);
    assert_ne!(s.head_hash, head);
}

#[test]
fn an_inserted_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 5);
    // A copy of an entry inserted after it.
    let mut l = lines(&path);
    l.insert(2, l[1].clone());
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::OutOfSequence { line: 3, expected: 2, found: 1, .. }), "{err}");
    assert!(err.to_string().contains("inserted"), "{err}");

    // A well-formed forged entry (right seq, hash and link) inserted: the entry after it is off.
    write_log(&dir.path().join("b.jsonl"), 5);
    let path = dir.path().join("b.jsonl");
    let mut l = lines(&path);
    let prev: fedhcc_secure::audit::AuditEntry = serde_json::from_str(&l[1]).unwrap();
    let mut forged: fedhcc_secure::audit::AuditEntry = serde_json::from_str(&l[2]).unwrap();
    forged.seq = 2;
    forged.kind = "update".into();
    forged.bytes = 123;
    forged.prev_hash = prev.hash.clone();
    forged.hash = forged.compute_hash();
    l.insert(2, serde_json::to_string(&forged).unwrap());
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::OutOfSequence { line: 4, expected: 3, found: 2, .. }), "{err}");
}

#[test]
fn reordered_entries_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 5);
    let mut l = lines(&path);
    l.swap(1, 3);
    write_lines(&path, &l);
    let err = broken(&path);
    assert!(matches!(err, AuditError::OutOfSequence { line: 2, expected: 1, found: 3, .. }), "{err}");
}

#[test]
fn a_truncated_last_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 4);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [1usize, 40] {
        std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        let err = broken(&path);
        assert!(matches!(err, AuditError::Truncated { line: 4, .. }), "cut {cut}: {err}");
        assert_eq!(err.line(), Some(4));
    }
}

#[test]
fn garbage_lines_are_named_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    write_log(&path, 2);
    let good = lines(&path);
    let cases: Vec<(Vec<u8>, u64)> = vec![
        (b"\n".to_vec(), 1),
        (b"not json\n".to_vec(), 1),
        (format!("{}\n\n", good[0]).into_bytes(), 2),
        ([good[0].as_bytes(), b"\n\xff\xfe\n"].concat(), 2),
        (format!("{}\n[1,2]\n", good[0]).into_bytes(), 2),
        ([b"{\"seq\":0,".to_vec(), vec![b'x'; MAX_LINE_BYTES * 3], b"\n".to_vec()].concat(), 1),
    ];
    for (content, line) in cases {
        std::fs::write(&path, &content).unwrap();
        let err = broken(&path);
        assert!(matches!(err, AuditError::Malformed { .. }), "{err}");
        assert_eq!(err.line(), Some(line), "{err}");
    }
    // A field that is not a hash, a bad time.
    for (from, to) in [("\"payload_sha256\":\"", "\"payload_sha256\":\"zz"), ("\"time\":\"2025", "\"time\":\"x2025")] {
        write_log(&dir.path().join("c.jsonl"), 1);
        let c = dir.path().join("c.jsonl");
        let mut l = lines(&c);
        l[0] = l[0].replacen(from, to, 1);
        write_lines(&c, &l);
        assert!(matches!(broken(&c), AuditError::Malformed { line: 1, .. }));
        std::fs::remove_file(&c).unwrap();
    }
    assert!(matches!(verify(&dir.path().join("missing.jsonl")), Err(AuditError::Io { .. })));
}

#[test]
fn bad_records_are_refused_and_a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let mut log = AuditLog::open_append(&path).unwrap();
    log.append(&record(0)).unwrap();
    let long = "x".repeat(300);
    for bad in [
        AuditRecord { peer: &long, ..record(1) },
        AuditRecord { kind: "update\nforged", ..record(1) },
        AuditRecord { task: "\u{7}", ..record(1) },
    ] {
        assert!(matches!(log.append(&bad), Err(AuditError::BadRecord { .. })));
    }
    assert!(matches!(AuditLog::open_append(&path), Err(AuditError::Locked { .. })));
    log.append(&record(1)).unwrap();
    drop(log);
    let s = verify(&path).unwrap();
    assert_eq!(s.entries, 2, "refused records wrote nothing");
    assert!(AuditLog::open_append(&path).is_ok(), "unlocked once the writer is gone");
}
