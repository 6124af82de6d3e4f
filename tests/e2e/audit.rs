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

/// The entries of a log, as JSON values.
fn entries(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// (task, SHA-256) of the entries of `kind` going `direction`, with `peer` if given.
fn digests(log: &[serde_json::Value], kind: &str, direction: &str, peer: Option<&str>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = log
        .iter()
        .filter(|e| e["kind"] == kind && e["direction"] == direction && peer.is_none_or(|p| e["peer"] == p))
        .map(|e| (e["task"].as_str().unwrap().to_string(), e["payload_sha256"].as_str().unwrap().to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_federated_run_leaves_verifiable_audit_logs_whose_transfers_agree_on_both_sides() {
    use crate::harness::*;
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut server = start_server(tmp.path(), &["a", "b"], study(2, 2, 60), model(1000)).await;
    let token = tokio_util::sync::CancellationToken::new();
    let site_state = |s: &str| tmp.path().join(format!("site-{s}"));
    let mut clients = Vec::new();
    for (s, delta) in [("a", 1.0), ("b", -1.0)] {
        let opts = fedhcc_client::ClientOptions { state_dir: Some(site_state(s)), ..client_options(&server, s) };
        let exec = shifting(delta, 20, Duration::ZERO);
        clients.push(tokio::spawn(fedhcc_client::run(opts, exec, token.clone())));
    }
    let out = server.join().await;
    assert!(out.finished);
    for c in clients {
        assert!(c.await.unwrap().unwrap().finished);
    }

    let server_log = tmp.path().join("state/audit.jsonl");
    for path in [&server_log, &site_state("a").join("audit.jsonl"), &site_state("b").join("audit.jsonl")] {
        let (ok, stdout, stderr) = fedhcc(&["audit", "verify", path.to_str().unwrap()]);
        assert!(ok && stdout.contains("intact"), "{}: {stdout}{stderr}", path.display());
    }
    let server_log = entries(&server_log);
    for s in ["a", "b"] {
        let site_log = entries(&site_state(s).join("audit.jsonl"));
        assert!(site_log.iter().all(|e| e["peer"] == "localhost"), "a site's peer is the server");
        // Every update the site sent is the update the server received from it, byte for byte
        // (two rounds), and every model the server sent is the model the site received.
        let sent = digests(&site_log, "update", "sent", None);
        assert_eq!(sent.len(), 2, "{s}: {sent:?}");
        assert_eq!(sent, digests(&server_log, "update", "received", Some(s)), "site {s}: uploads");
        let models = digests(&site_log, "model", "received", None);
        assert_eq!(models.len(), 3, "two train tasks and the final evaluation: {models:?}");
        assert_eq!(models, digests(&server_log, "model", "sent", Some(s)), "site {s}: downloads");
        assert_eq!(
            digests(&site_log, "evaluation", "sent", None),
            digests(&server_log, "evaluation", "received", Some(s)),
            "site {s}: reports"
        );
        assert_eq!(digests(&site_log, "join", "sent", None), digests(&server_log, "join", "received", Some(s)));
        for kind in ["task_train", "task_evaluate", "finished"] {
            assert_eq!(
                digests(&site_log, kind, "received", None),
                digests(&server_log, kind, "sent", Some(s)),
                "site {s}: {kind}"
            );
        }
        assert!(site_log.iter().all(|e| e["kind"] != "heartbeat"));
    }
    // The final model's SHA-256 is the checkpoint's; it was the last model sent.
    let last_model = server_log.iter().rev().find(|e| e["kind"] == "model").unwrap();
    assert_eq!(last_model["payload_sha256"], out.final_sha256.as_str());

    // Editing one line of a site's log (a smaller update size) is caught, naming the line.
    let a_log = site_state("a").join("audit.jsonl");
    let text = std::fs::read_to_string(&a_log).unwrap();
    let line = text.lines().position(|l| l.contains("\"kind\":\"update\"")).unwrap();
    edit(&a_log, |l| l[line] = l[line].replacen("\"bytes\":", "\"bytes\":1", 1));
    let err = fails(&a_log);
    assert!(err.contains(&format!("line {}", line + 1)) && err.contains("edited"), "{err}");
}
