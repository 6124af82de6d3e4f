//! The import boundaries of ARCHITECTURE.md, checked on the sources: burn only in the model crate;
//! the wire's types (prost messages, tonic) only in the protocol crate and the rooms that speak the
//! wire. A file that starts using them elsewhere fails here.

use std::path::{Path, PathBuf};

/// Where the wire's types belong: the protocol crate, the server's gRPC services, the reply of its
/// `Status` RPC (the status view) and their wiring, the client's transport.
const PROTOCOL_ROOMS: &[&str] = &[
    "shared/proto/",
    "server/src/service.rs",
    "server/src/service/",
    "server/src/admin.rs",
    "server/src/status.rs",
    "server/src/lib.rs",
    "server/src/error.rs",
    "client/src/transport.rs",
    "client/src/transport/",
];

/// Where burn may be used.
const BURN_ROOMS: &[&str] = &["shared/model/"];

/// The Rust sources of the product (tests read the wire on purpose: the attacks speak it).
fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = ["src", "server", "client", "site", "shared"].iter().map(|d| root.join(d)).collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The code lines (comments and doc comments left out) that name one of `needles` as a path.
fn uses(text: &str, needles: &[&str]) -> Vec<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

fn within(path: &str, rooms: &[&str]) -> bool {
    rooms.iter().any(|r| if r.ends_with('/') { path.starts_with(r) } else { path == *r })
}

const WIRE: &[&str] = &["fedhcc_proto", "pb::", "tonic::", "prost::"];
const BURN: &[&str] = &["burn::", "use burn"];

#[test]
fn the_wire_and_burn_stay_in_their_rooms() {
    let files = sources();
    assert!(files.len() > 100, "read {} source files", files.len());
    let mut stray = Vec::new();
    let mut seen_wire = 0;
    for (path, text) in &files {
        let wire = uses(text, WIRE);
        if !wire.is_empty() {
            seen_wire += 1;
            if !within(path, PROTOCOL_ROOMS) {
                stray.push(format!("{path}: the wire's types outside the transport and service modules: {}", wire[0]));
            }
        }
        let burn = uses(text, BURN);
        if !burn.is_empty() && !within(path, BURN_ROOMS) {
            stray.push(format!("{path}: burn outside the model crate: {}", burn[0]));
        }
    }
    assert!(seen_wire >= PROTOCOL_ROOMS.len(), "the check sees the wire where it is used ({seen_wire} files)");
    assert!(stray.is_empty(), "import boundaries crossed:\n{}", stray.join("\n"));
}

#[test]
fn a_comment_is_not_a_use_but_code_is() {
    assert!(uses("//! burn::Tensor in a doc comment\n    // pb::Ack in a comment", BURN).is_empty());
    assert_eq!(uses("use burn::tensor::Tensor;\n", BURN).len(), 1);
    assert_eq!(uses("    let r: pb::Ack = x;\n", WIRE).len(), 1);
    assert!(within("server/src/service/secagg.rs", PROTOCOL_ROOMS) && !within("server/src/state.rs", PROTOCOL_ROOMS));
}

/// A source file longer than this says at its top why it is one file (a `//! Size:` line).
const LONG_FILE_LINES: usize = 700;

#[test]
fn long_files_say_why_they_are_one_file() {
    let mut unexplained = Vec::new();
    for (path, text) in sources().into_iter().filter(|(p, _)| !p.contains("/tests/") && !p.contains("/benches/")) {
        let lines = text.lines().count();
        let explained = text.lines().take_while(|l| l.starts_with("//!")).any(|l| l.starts_with("//! Size:"));
        if lines > LONG_FILE_LINES && !explained {
            unexplained.push(format!("{path}: {lines} lines"));
        }
    }
    assert!(
        unexplained.is_empty(),
        "files over {LONG_FILE_LINES} lines without a `//! Size:` reason at their top:\n{}",
        unexplained.join("\n")
    );
}

#[test]
fn the_coordinator_does_no_io_and_reads_no_clock() {
    const IO: &[&str] =
        &["std::fs", "std::net", "std::thread", "tokio", "rusqlite", "File::", "Instant::now", "SystemTime"];
    let mut checked = 0;
    for (path, text) in sources().into_iter().filter(|(p, _)| p.starts_with("server/src/coordinator")) {
        // Its tests make their own `Instant`s; the state machine itself is handed them.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let io = uses(code, IO);
        assert!(io.is_empty(), "{path}: the coordinator must stay pure, found: {}", io[0]);
        checked += 1;
    }
    assert!(checked >= 3, "read {checked} coordinator files");
}
