//! The study lead's admin commands through the real CLI (`fedhcc admin --config admin.toml …`) and
//! the admin RPCs: a manual start, pause and resume (a round in flight commits, nothing new is
//! announced), the allow-list (a removed site is refused at once and after a restart, an added one
//! joins), export (checkpoint and safetensors) and abort. Every command is refused with a site
//! certificate, and each one shows in the dashboard's event log and in `fedhcc status`.

use crate::dashboard::{https_get, start_with_dashboard};
use crate::harness::*;
use fedhcc_core::config::{AdminConfig, StartMode};
use fedhcc_core::pki::ClientTlsFiles;
use fedhcc_proto as pb;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Writes an admin configuration for `server` with `tls`; returns its path.
fn admin_config(dir: &Path, name: &str, server: &TestServer, tls: ClientTlsFiles) -> String {
    let p = dir.join(name);
    let cfg = AdminConfig { server: server.url(), server_name: "localhost".into(), tls };
    std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
    p.display().to_string()
}

fn admin_tls(server: &TestServer) -> ClientTlsFiles {
    let c = server.certs();
    ClientTlsFiles { ca: c.ca(), cert: c.admin("lead"), key: c.admin_key("lead"), crl: None }
}

/// `fedhcc admin --config CFG args…` on a blocking thread: (success, stdout, stderr).
async fn admin(cfg: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["admin".to_string(), "--config".into(), cfg.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || fedhcc(&all.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

/// Like [`admin`], and it must succeed.
async fn admin_ok(cfg: &str, args: &[&str]) -> String {
    let (ok, out, err) = admin(cfg, args).await;
    assert!(ok, "fedhcc admin {args:?} failed: {err}");
    out
}

fn client(server: &TestServer, site: &str, pause_ms: u64, token: &CancellationToken) -> ClientTask {
    tokio::spawn(fedhcc_client::run(
        client_options(server, site),
        shifting(1.0, 10, Duration::from_millis(pause_ms)),
        token.clone(),
    ))
}

type ClientTask = tokio::task::JoinHandle<Result<fedhcc_client::ClientOutcome, fedhcc_client::ClientError>>;

fn actions(s: &pb::StatusReply) -> Vec<String> {
    s.admin.as_ref().map(|a| a.recent_actions.iter().map(|x| x.action.clone()).collect()).unwrap_or_default()
}

fn control(s: &pb::StatusReply) -> String {
    s.admin.as_ref().map(|a| a.run_control.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_start_pause_and_resume_need_the_admin_certificate_and_show_in_the_event_log() {
    let tmp = tempfile::tempdir().unwrap();
    let mut st = study(3, 2, 60);
    st.federation.start = StartMode::Manual;
    let mut live = start_with_dashboard(tmp.path(), &["a", "b"], st).await;
    let server = &live.server;
    let as_admin = admin_config(tmp.path(), "admin.toml", server, admin_tls(server));
    let as_site = admin_config(tmp.path(), "site-as-admin.toml", server, server.site_tls("a"));
    let token = CancellationToken::new();
    // Long enough local training that a pause lands while round 1 is in flight.
    let (ca, cb) = (client(server, "a", 2000, &token), client(server, "b", 2000, &token));
    let s = server.wait_status("both sites connected", |s| s.sites.iter().filter(|x| x.connected).count() == 2).await;
    assert_eq!((s.phase.as_str(), control(&s).as_str()), ("waiting_for_start", "awaiting_start"));

    // A site certificate is refused by every admin RPC, and by the CLI.
    let mut site = fedhcc_client::transport::connect_admin(&server.target(server.site_tls("a"))).await.unwrap();
    let refusals = [
        site.control(pb::ControlRequest { command: pb::ControlCommand::Start.into() }).await.err(),
        site.set_site_access(pb::SiteAccessRequest { site_id: "b".into(), allowed: false }).await.err(),
        site.export_model(pb::ExportRequest {}).await.err(),
    ];
    for r in refusals {
        let e = r.expect("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("admin certificate") && e.message().contains("'a'"), "{}", e.message());
    }
    let (ok, _, err) = admin(&as_site, &["start"]).await;
    assert!(!ok && err.contains("admin certificate"), "{err}");
    let s = server.status().await;
    assert!(s.rounds.is_empty() && s.phase == "waiting_for_start", "nothing started: {s:?}");
    assert!(actions(&s).is_empty(), "a refused command is not recorded");

    assert!(admin_ok(&as_admin, &["start"]).await.contains("run started"));
    server.wait_status("round 1 training", |s| s.phase == "training").await;
    let out = admin_ok(&as_admin, &["pause"]).await;
    assert!(out.contains("paused") && out.contains("r1a1"), "{out}");
    let (ok, _, err) = admin(&as_admin, &["start"]).await;
    assert!(!ok && err.contains("already started"), "{err}");
    // The round in flight commits; then nothing new is announced.
    let s = server.wait_status("round 1 committed, paused", |s| s.phase == "paused" && s.rounds.len() == 1).await;
    assert_eq!(control(&s), "paused");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = server.status().await;
    assert_eq!((s.phase.as_str(), s.rounds.len()), ("paused", 1), "no new round while paused");

    // The commands show in `fedhcc status` and the dashboard's event log.
    let (ok, text, err) = {
        let cfg = as_admin.clone();
        tokio::task::spawn_blocking(move || fedhcc(&["status", "--config", &cfg])).await.unwrap()
    };
    assert!(ok, "{err}");
    assert!(text.contains("Run control: paused") && text.contains("admin actions") && text.contains("lead"), "{text}");
    let dash = https_get(&live, "/api/dashboard", &[], Some(admin_tls(server))).await;
    assert_eq!(dash.status, 200, "{}", dash.body);
    let d: Value = serde_json::from_str(&dash.body).unwrap();
    let admin_events: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "admin")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(admin_events.len(), 2, "{admin_events:?}");
    assert!(admin_events[0].starts_with("lead: run started") && admin_events[1].starts_with("lead: run paused"));
    assert_eq!(d["status"]["admin"]["run_control"], "paused");

    assert!(admin_ok(&as_admin, &["resume"]).await.contains("run resumed"));
    let out = live.server.join().await;
    assert!(out.finished && !out.aborted);
    assert_eq!(out.rounds_completed, 3);
    for c in [ca, cb] {
        assert!(c.await.unwrap().unwrap().finished);
    }
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    let logged: Vec<String> = store.admin_actions(10).unwrap().into_iter().map(|a| a.action).collect();
    assert_eq!(logged, ["start", "pause", "resume"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_changes_and_a_pause_outlive_a_restart_and_a_removed_site_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let server = start_server(tmp.path(), &["a", "b"], study(40, 1, 60), model(100)).await;
    let as_admin = admin_config(tmp.path(), "admin.toml", &server, admin_tls(&server));
    let token = CancellationToken::new();
    let ca = client(&server, "a", 50, &token);
    let cb = client(&server, "b", 50, &token);
    server.wait_status("a round with both", |s| s.rounds.iter().any(|r| r.participants.len() == 2)).await;

    let out = admin_ok(&as_admin, &["disallow", "b"]).await;
    assert!(out.contains("removed from the allow-list"), "{out}");
    let ended = tokio::time::timeout(Duration::from_secs(20), cb).await.expect("b is cut off").unwrap();
    let e = ended.expect_err("b is refused").to_string();
    assert!(e.contains("removed from this study's allow-list") || e.contains("not on this study's allow-list"), "{e}");
    let n = server.status().await.rounds.len();
    let s = server.wait_status("a round without b", |s| s.rounds.len() > n + 1).await;
    assert_eq!(s.rounds.last().unwrap().participants, ["a"]);
    assert!(s.sites.iter().all(|x| x.site_id != "b"));
    assert_eq!(s.admin.as_ref().unwrap().removed_sites, ["b"]);
    let mut b = server.client_as("b").await;
    let join = pb::JoinRequest { study_id: STUDY.into(), ..Default::default() };
    assert_eq!(b.join(join.clone()).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert!(admin_ok(&as_admin, &["disallow", "b"]).await.contains("not on the allow-list"), "idempotent");

    // c was never in the configuration: allowed by the study lead, it joins and trains.
    assert!(admin_ok(&as_admin, &["allow", "c"]).await.contains("added to the allow-list"));
    let cc = client(&server, "c", 50, &token);
    server.wait_status("a round with c", |s| s.rounds.iter().any(|r| r.participants.contains(&"c".to_string()))).await;
    admin_ok(&as_admin, &["pause"]).await;
    server.wait_status("paused", |s| s.phase == "paused").await;
    let paused_at = server.status().await.rounds.len();
    token.cancel();
    for c in [ca, cc] {
        assert!(!c.await.unwrap().unwrap().finished);
    }
    server.stop().await;

    // Restarted with the same configuration (which still lists b and not c), on a new port: the
    // sites and the study lead are pointed at it.
    let mut server = start_server(tmp.path(), &["a", "b"], study(40, 1, 60), model(100)).await;
    let as_admin = admin_config(tmp.path(), "admin.toml", &server, admin_tls(&server));
    let token = CancellationToken::new();
    let (ca, cc) = (client(&server, "a", 50, &token), client(&server, "c", 50, &token));
    let s = server.wait_status("a and c back", |s| s.sites.iter().filter(|x| x.connected).count() == 2).await;
    assert_eq!((s.phase.as_str(), control(&s).as_str()), ("paused", "paused"), "the pause outlived the restart");
    assert_eq!(s.rounds.len(), paused_at);
    assert_eq!(s.sites.iter().map(|x| x.site_id.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    let mut b = server.client_as("b").await;
    assert_eq!(b.join(join).await.unwrap_err().code(), tonic::Code::PermissionDenied, "b stays removed");
    admin_ok(&as_admin, &["resume"]).await;
    server.wait_status("training again", |s| s.rounds.len() > paused_at).await;
    let out = admin_ok(&as_admin, &["abort"]).await;
    assert!(out.contains("aborted"), "{out}");
    let outcome = server.join().await;
    assert!(outcome.aborted);
    for c in [ca, cc] {
        assert!(c.await.unwrap().unwrap().finished, "the sites hear that the run ended");
    }
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    assert_eq!(store.site_access().unwrap(), [("b".to_string(), false), ("c".to_string(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_the_committed_model_and_abort_ends_the_run_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    let mut server = start_server(tmp.path(), &["a"], study(50, 1, 60), model(1000)).await;
    let as_admin = admin_config(tmp.path(), "admin.toml", &server, admin_tls(&server));
    let token = CancellationToken::new();
    let ca = client(&server, "a", 30, &token);
    server.wait_status("two rounds", |s| s.rounds.len() >= 2).await;
    admin_ok(&as_admin, &["pause"]).await;
    let s = server.wait_status("paused", |s| s.phase == "paused").await;
    let last = s.rounds.last().unwrap().clone();

    let fhcp = tmp.path().join("out/model.fhcp");
    let out = admin_ok(&as_admin, &["export", "--out", fhcp.to_str().unwrap()]).await;
    assert!(out.contains(&format!("round {}", last.round)), "{out}");
    let bytes = std::fs::read(&fhcp).unwrap();
    assert_eq!(sha(&bytes), last.checkpoint_sha256, "the committed checkpoint, byte for byte");
    let p = fedhcc_core::params::ParameterSet::decode(&bytes).unwrap();
    assert!(p.values().iter().enumerate().all(|(i, v)| (v - (i as f32 + last.round as f32)).abs() < 1e-3));
    let st = tmp.path().join("out/model.safetensors");
    admin_ok(&as_admin, &["export", "--out", st.to_str().unwrap()]).await;
    let raw = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["round"], last.round.to_string());
    assert_eq!(header["__metadata__"]["checkpoint_sha256"], last.checkpoint_sha256.as_str());
    assert_eq!(header["layer.weight"]["shape"], serde_json::json!([500]));
    assert_eq!(raw.len(), 8 + n + 1000 * 4);
    assert!(
        std::fs::read_dir(tmp.path().join("out")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".part"))
    );

    let out = admin_ok(&as_admin, &["abort"]).await;
    assert!(out.contains(&format!("after {} committed rounds", last.round)), "{out}");
    let outcome = server.join().await;
    assert!(outcome.aborted && outcome.finished);
    assert_eq!(
        (outcome.rounds_completed, outcome.final_sha256.as_str()),
        (last.round, last.checkpoint_sha256.as_str())
    );
    assert!(ca.await.unwrap().unwrap().finished);
    let (rounds, _) = durable_state(&tmp.path().join("state"));
    assert_eq!(rounds.len() as u32, last.round, "nothing committed after the abort");

    // Restarted, the aborted run stays over.
    let server = start_server(tmp.path(), &["a"], study(50, 1, 60), model(1000)).await;
    let as_admin = admin_config(tmp.path(), "admin.toml", &server, admin_tls(&server));
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        if let Ok(mut c) = fedhcc_client::transport::connect(&server.target(admin_tls(&server))).await
            && let Ok(s) = c.status(pb::StatusRequest {}).await
        {
            break s.into_inner();
        }
        assert!(Instant::now() < deadline, "the restarted server answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((s.phase.as_str(), control(&s).as_str()), ("finished", "aborted"));
    let (ok, _, err) = admin(&as_admin, &["resume"]).await;
    assert!(!ok && err.contains("aborted"), "{err}");
    server.stop().await;
}
