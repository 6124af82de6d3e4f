//! Fault drills with real processes (`fedhcc bench drills --drill … --dir D --json`), each checked
//! again here from what the server left on disk: its database, checkpoints and spool.
//!
//! - the server SIGKILLed while an update is half received, then restarted: it resumes after the last
//!   committed round, which is unchanged, and the run finishes;
//! - a client SIGKILLed while its update is being received: the round commits without it (the
//!   quorum allows), and the restarted client takes part again;
//! - a client that starts its download and stops reading: each round waits for it until the
//!   deadline and commits with the others.

use crate::harness::*;
use fedhcc_server::store::{RoundRecord, Store};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Runs one drill into a fresh folder: (its JSON, the drill's folder).
fn drill(name: &str) -> (tempfile::TempDir, Value, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("drills");
    let (ok, out, err) = fedhcc(&["bench", "drills", "--drill", name, "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(ok, "fedhcc bench drills --drill {name} failed: {err}\n{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(v[name]["passed"], true, "{v}");
    let folder = dir.join(name);
    (tmp, v[name].clone(), folder)
}

/// The committed rounds, and a check that the newest checkpoint matches its recorded SHA-256.
fn committed(dir: &Path) -> Vec<RoundRecord> {
    let state = dir.join("server-state");
    let rounds = Store::open(&state, "run-1").unwrap().rounds().unwrap();
    let last = rounds.last().expect("a committed round");
    assert_eq!(sha(&std::fs::read(&last.checkpoint).unwrap()), last.checkpoint_sha256);
    rounds
}

fn no_part_files(dir: &Path) {
    let spool = dir.join("server-state/spool");
    for task in std::fs::read_dir(&spool).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(task.path()).unwrap().flatten() {
            assert!(!f.file_name().to_string_lossy().ends_with(".part"), "left in the spool: {:?}", f.path());
        }
    }
}

#[test]
fn server_killed_mid_upload_resumes_after_the_last_committed_round() {
    let (_tmp, v, dir) = drill("server-kill");
    assert!(v["killed_during_task"].as_str().unwrap().starts_with("r2"), "{v}");
    assert!(v["bytes_received_at_kill"].as_u64().unwrap() >= 2 << 20, "half an update was on disk: {v}");
    let rounds = committed(&dir);
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let before: Vec<RoundRecord> = serde_json::from_value(v["committed_before_kill"].clone()).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(rounds[0], before[0], "the round committed before the kill is unchanged");
    assert_eq!(rounds[1].participants, ["a", "b"], "round 2 redone with both sites after the restart");
    no_part_files(&dir);
}

#[test]
fn client_killed_mid_upload_is_left_out_when_the_quorum_allows_and_comes_back() {
    let (_tmp, v, dir) = drill("client-kill");
    let rounds = committed(&dir);
    let n = rounds.len() as u32;
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
    let killed = v["round"]["round"].as_u64().unwrap() as u32;
    let r = &rounds[killed as usize - 1];
    assert_eq!(r.participants, ["center_a"]);
    // Recorded as disconnected by the attempt it died in (a retry of the round without it, on a loaded
    // machine, has nothing to record of it).
    let task = v["killed_in_task"].as_str().unwrap();
    let (_, _, killed_attempt) = fedhcc_server::coordinator::parse_task_id(task).unwrap();
    if r.attempt == killed_attempt {
        assert!(r.failures.contains(&("center_b".to_string(), "disconnected".to_string())), "{:?}", r.failures);
    }
    if killed < n {
        assert!(rounds[killed as usize..].iter().any(|r| r.participants.contains(&"center_b".to_string())));
    }
    no_part_files(&dir);
}

#[test]
fn a_stalled_client_times_out_each_round_and_the_others_go_on() {
    let (_tmp, v, dir) = drill("stall");
    let timeout = v["round_timeout_s"].as_f64().unwrap();
    let rounds = committed(&dir);
    assert_eq!(rounds.len(), 3);
    for r in &rounds {
        assert_eq!(r.participants, ["a", "b"]);
        assert!(r.failures.iter().any(|(s, why)| s == "c" && why.contains("deadline")), "{:?}", r.failures);
        assert!(r.duration_s >= timeout - 0.5, "round {} took {} s", r.round, r.duration_s);
    }
}
