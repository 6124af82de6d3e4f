//! The real binary: `certs` on the command line, every shipped config parses, and a server
//! killed with SIGKILL mid-round resumes with every committed round intact.

use crate::harness::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_fedhcc");

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("study") {
            fedhcc_core::config::load_study(&p).unwrap();
        } else if name.starts_with("server") {
            fedhcc_core::config::load_server(&p).unwrap();
        } else if name.starts_with("site-") {
            fedhcc_core::config::load_site(&p).unwrap();
        } else if name == "admin.toml" {
            fedhcc_core::config::load_admin(&p).unwrap();
        } else {
            continue;
        }
        n += 1;
    }
    // The clinical reference, preoperative and postoperative models: a study, a server and two sites
    // each; the admin tool. (cross-center.toml is typed by `fedhcc`'s own tests, with the models.)
    assert_eq!(n, 13, "3 studies, 3 servers, 6 sites, admin");
}

#[test]
fn certs_commands_work_and_refuse_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("c");
    let out = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(&d)
        .args(["--study", "s1", "--server-name", "srv", "--sites", "a,b", "--admin", "lead"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(&d)
        .args(["--study", "s1", "--server-name", "srv", "--sites", "a"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let issue = Command::new(BIN).args(["certs", "issue", "--dir"]).arg(&d).args(["--site", "c"]).output().unwrap();
    assert!(issue.status.success(), "{}", String::from_utf8_lossy(&issue.stderr));
    let revoke = Command::new(BIN).args(["certs", "revoke", "--dir"]).arg(&d).args(["--site", "c"]).output().unwrap();
    assert!(revoke.status.success());
    let bad = Command::new(BIN).args(["certs", "revoke", "--dir"]).arg(&d).args(["--site", "nobody"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no valid certificate"));
}

fn write_server_files(dir: &Path, port: u16, rounds: u32) -> std::path::PathBuf {
    std::fs::write(
        dir.join("study.toml"),
        format!("study_id = \"{STUDY}\"\n[federation]\nrounds = {rounds}\nmin_sites = 1\nround_timeout_s = 60\n[model]\nkind = \"synthetic\"\nparams = 200000\n"),
    )
    .unwrap();
    let p = dir.join("server.toml");
    std::fs::write(
        &p,
        format!(
            "study = \"study.toml\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\nallowed_sites = [\"a\"]\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key.pem\"\ncrl = \"certs/crl.pem\"\n"
        ),
    )
    .unwrap();
    p
}

fn spawn_server(cfg: &Path, log: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["server", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_round_resumes_with_every_round_intact() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = write_server_files(tmp.path(), port, 5);
    let mut server = spawn_server(&cfg, &tmp.path().join("server1.log"));
    let ts = TestServer {
        dir: tmp.path().to_path_buf(),
        addr: ([127, 0, 0, 1], port).into(),
        token: CancellationToken::new(),
        handle: None,
    };
    let token = CancellationToken::new();
    let client = tokio::spawn(fedhcc_client::run(
        client_options(&ts, "a"),
        shifting(1.0, 10, Duration::from_millis(300)),
        token.clone(),
    ));
    // Kill the server while round 3 is being trained (two rounds committed).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The server process may not be listening yet: a failed connection is retried.
        let c = ts.certs();
        let tls =
            fedhcc_core::pki::ClientTlsFiles { ca: c.ca(), cert: c.admin("lead"), key: c.admin_key("lead"), crl: None };
        if let Ok(mut admin) = fedhcc_client::transport::connect(&ts.target(tls)).await
            && let Ok(s) = admin.status(fedhcc_proto::StatusRequest {}).await
            && s.into_inner().rounds.len() >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "two rounds in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let (before, _) = durable_state(&ts.state());
    assert!(before.len() >= 2);

    let mut server = spawn_server(&cfg, &tmp.path().join("server2.log"));
    let out = tokio::time::timeout(Duration::from_secs(120), client).await.expect("client finishes").unwrap().unwrap();
    assert!(out.finished, "the client reconnected and saw the end of the run");
    let status = server.wait().unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(tmp.path().join("server2.log")).unwrap());
    let store = fedhcc_server::store::Store::open(&ts.state(), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(&rounds[..before.len()], &before[..], "committed rounds are never rewritten");
    let last = rounds.last().unwrap();
    let bytes = std::fs::read(&last.checkpoint).unwrap();
    assert_eq!(sha(&bytes), last.checkpoint_sha256, "checkpoint hash verified");
    let p = fedhcc_core::params::ParameterSet::decode(&bytes).unwrap();
    assert!(p.values().iter().all(|v| (v - 5.0).abs() < 1e-6), "five rounds of +1");
}

/// `--log`, then `FEDHCC_LOG`, then `RUST_LOG` set the log filter; one that does not parse stops the
/// command with exit code 2 and a message naming where it came from, instead of logging at `info`.
#[test]
fn a_bad_log_filter_is_refused_naming_the_flag_or_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-audit.jsonl");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg("audit").arg("verify").arg(&missing).env_remove("FEDHCC_LOG").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, env, named) in [
        (&["--log", "verbose"][..], &[][..], "--log = 'verbose'"),
        (&[][..], &[("FEDHCC_LOG", "fedhcc_server=loud")][..], "FEDHCC_LOG = 'fedhcc_server=loud'"),
        (&[][..], &[("RUST_LOG", "warning")][..], "RUST_LOG = 'warning'"),
        // The flag wins over both variables, and FEDHCC_LOG over RUST_LOG: each bad one is named.
        (&["--log", "nope"][..], &[("FEDHCC_LOG", "warn"), ("RUST_LOG", "warn")][..], "--log = 'nope'"),
        (&[][..], &[("FEDHCC_LOG", "nope"), ("RUST_LOG", "warn")][..], "FEDHCC_LOG = 'nope'"),
    ] {
        let (code, stderr) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(named) && stderr.contains("not a log level"), "{stderr}");
    }
    // A good filter from any source lets the command run (and fail on its own: exit code 1).
    for (args, env) in [
        (&["--log", "warn"][..], &[("RUST_LOG", "nope")][..]),
        (&[][..], &[("FEDHCC_LOG", "error"), ("RUST_LOG", "nope")][..]),
        (&[][..], &[("RUST_LOG", "warn,fedhcc_server=debug")][..]),
    ] {
        let (code, stderr) = run(args, env);
        assert_eq!(code, Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("no-such-audit.jsonl") && !stderr.contains("log level"), "{stderr}");
    }
}
