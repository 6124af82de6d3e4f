//! Site policy and request hardening end to end: a site declines what its own `[policy]` forbids
//! (logged at the site, recorded in both audit logs, shown to the study lead) and the run goes on
//! without it; malformed refusals, oversize or control-character strings, impossible sample counts
//! and a join flood are refused with a status naming the problem, each leaving the round, the model
//! and the database as they were.

use crate::harness::*;
use fedhcc_core::config::StartMode;
use fedhcc_proto as pb;
use fedhcc_secure::policy::SitePolicy;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_declines_what_its_policy_forbids_and_the_run_goes_on_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    // One site is enough for a round, and both are selected: the run starts when the lead says so.
    let mut st = study(2, 1, 60);
    st.federation.start = StartMode::Manual;
    let mut server = start_server(tmp.path(), &["a", "b"], st, model(100)).await;
    let token = CancellationToken::new();
    let a = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::from_millis(800)),
        token.clone(),
    ));
    let b_state = tmp.path().join("site-b");
    let b_opts = fedhcc_client::ClientOptions {
        state_dir: Some(b_state.clone()),
        policy: SitePolicy { max_rounds: Some(1), ..SitePolicy::default() },
        ..client_options(&server, "b")
    };
    let b = tokio::spawn(fedhcc_client::run(b_opts, shifting(5.0, 10, Duration::ZERO), token.clone()));
    server.wait_status("both sites connected", |s| s.sites.iter().all(|x| x.connected)).await;
    let c = server.certs();
    let admin_tls =
        fedhcc_core::pki::ClientTlsFiles { ca: c.ca(), cert: c.admin("lead"), key: c.admin_key("lead"), crl: None };
    let mut admin = fedhcc_client::transport::connect_admin(&server.target(admin_tls)).await.unwrap();
    admin.control(pb::ControlRequest { command: pb::ControlCommand::Start.into() }).await.unwrap();

    // Round 2 is past b's limit: it declines at once, and the study lead sees why.
    let s = server
        .wait_status("b declined round 2", |s| {
            s.sites.iter().any(|x| x.site_id == "b" && x.policy_refusal.contains("r2"))
        })
        .await;
    let b_status = s.sites.iter().find(|x| x.site_id == "b").unwrap();
    assert!(
        b_status.policy_refusal.contains("max_rounds") && b_status.policy_refusal.contains("limit of 1 rounds"),
        "{}",
        b_status.policy_refusal
    );
    let out = server.join().await;
    assert!(out.finished, "the run went on without b");
    let (ra, rb) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert!(ra.finished && rb.finished);
    assert_eq!((ra.rounds_trained, ra.evaluations, ra.tasks_declined), (2, 1, 0));
    assert_eq!((rb.rounds_trained, rb.evaluations, rb.tasks_declined), (1, 0, 2), "round 2 and its evaluation");

    let store = fedhcc_server::store::Store::open(&server.state(), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds[0].participants, ["a", "b"]);
    assert_eq!(rounds[1].participants, ["a"], "b's declined round closed without waiting for it");
    assert_eq!(
        rounds[1].failures,
        [("b".to_string(), "declined: max_rounds: round 2 is past this site's limit of 1 rounds".to_string())]
    );
    assert!(rounds[1].duration_s < 30.0, "not held to the 60 s deadline: {}", rounds[1].duration_s);
    let evals = store.evaluations().unwrap();
    assert_eq!(evals.iter().map(|e| e.site.as_str()).collect::<Vec<_>>(), ["a"]);

    // Both audit logs hold the refusals, with the same bytes.
    let refusals = |path: &std::path::Path, direction: &str| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["kind"] == "task_refusal" && e["direction"] == direction)
            .map(|e| format!("{} {}", e["task"], e["payload_sha256"]))
            .collect()
    };
    let site_side = refusals(&b_state.join("audit.jsonl"), "sent");
    assert_eq!(site_side.len(), 2, "{site_side:?}");
    assert_eq!(site_side, refusals(&server.state().join("audit.jsonl"), "received"));
    // The site's own status file says what it declined and why.
    let status = fedhcc_client::status::read(&b_state).unwrap();
    let last = status.last_error.unwrap_or_default();
    assert!(last.contains("declined by this site's policy (max_rounds)"), "{last}");
}

#[tokio::test]
async fn malformed_refusals_strings_counts_and_join_floods_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let server = start_server(tmp.path(), &["a", "b", "c"], study(2, 2, 120), model(10)).await;
    let mut a = server.client_as("a").await;
    let mut b = server.client_as("b").await;
    let mut sa = open_tasks(&mut a).await;
    let _sb = open_tasks(&mut b).await;
    let tref = next_train(&mut sa).await.task.unwrap();
    let before_status = server.status().await;
    assert_eq!((before_status.phase.as_str(), before_status.current_round), ("training", 1));
    let before = durable_state(&server.state());
    let unchanged = async |name: &str| {
        let s = server.status().await;
        assert_eq!((s.phase.as_str(), s.current_round, s.attempt), ("training", 1, before_status.attempt), "{name}");
        assert!(s.sites.iter().all(|x| x.policy_refusal.is_empty()), "{name}: no decline recorded");
        assert_eq!(durable_state(&server.state()), before, "{name}: durable state changed");
    };
    let check = |name: &str, r: Result<(), tonic::Status>, code: Code, words: &str| {
        let e = r.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {}", e.message());
        assert!(e.message().contains(words), "{name}: '{}' should mention '{words}'", e.message());
    };
    let refusal = |t: &pb::TaskRef, rule: &str, message: &str| pb::TaskRefusal {
        task: Some(t.clone()),
        rule: rule.into(),
        message: message.into(),
    };

    let r = a.refuse_task(refusal(&tref, "because", "no")).await.map(drop);
    check("unknown rule", r, Code::InvalidArgument, "not a site-policy rule");
    unchanged("unknown rule").await;
    let r = a.refuse_task(refusal(&tref, "max_rounds", &"x".repeat(2000))).await.map(drop);
    check("long message", r, Code::InvalidArgument, "at most 1024");
    unchanged("long message").await;
    let r = a.refuse_task(refusal(&tref, "max_rounds", "  ")).await.map(drop);
    check("empty message", r, Code::InvalidArgument, "must say why");
    unchanged("empty message").await;
    let r = a.refuse_task(refusal(&tref, "max_rounds", "round 1 \u{1b}[31mred")).await.map(drop);
    check("control characters", r, Code::InvalidArgument, "control characters");
    unchanged("control characters").await;
    let r =
        a.refuse_task(pb::TaskRefusal { task: None, rule: "max_rounds".into(), message: "m".into() }).await.map(drop);
    check("no task", r, Code::InvalidArgument, "names no task");
    unchanged("no task").await;
    let mut stale = tref.clone();
    (stale.round, stale.task_id) = (0, "r0a1".into());
    let r = a.refuse_task(refusal(&stale, "max_rounds", "m")).await.map(drop);
    check("stale refusal", r, Code::FailedPrecondition, "has closed");
    unchanged("stale refusal").await;
    let mut c = server.client_as("c").await;
    let r = c.refuse_task(refusal(&tref, "max_rounds", "m")).await.map(drop);
    check("unselected refusal", r, Code::PermissionDenied, "not selected");
    unchanged("unselected refusal").await;

    let join = |n: u64, version: &str| pb::JoinRequest {
        study_id: STUDY.into(),
        client_version: version.into(),
        model_fingerprint: String::new(),
        num_samples: n,
    };
    let r = c.join(join(2_000_000_000, "v")).await.map(drop);
    check("join samples", r, Code::InvalidArgument, "num_samples");
    unchanged("join samples").await;
    let r = c.join(join(5, "v\n1")).await.map(drop);
    check("join version", r, Code::InvalidArgument, "control characters");
    unchanged("join version").await;
    let r = c.wait_task(pb::WaitTaskRequest { study_id: "s".repeat(300), run_id: "run-1".into() }).await.map(drop);
    check("wait ids", r, Code::InvalidArgument, "at most 256");
    unchanged("wait ids").await;
    let report = pb::EvaluationReport { task: Some(tref.clone()), num_samples: u64::MAX, ..Default::default() };
    let r = a.report_evaluation(report).await.map(drop);
    check("evaluation samples", r, Code::InvalidArgument, "num_samples");
    unchanged("evaluation samples").await;
    // A join flood: the burst is allowed, then the site is told to wait.
    for _ in 0..(fedhcc_server::ratelimit::JOIN_BURST - 2) {
        c.join(join(5, "v")).await.expect("within the burst");
    }
    let r = c.join(join(5, "v")).await.map(drop);
    check("join flood", r, Code::ResourceExhausted, "joined too often");
    unchanged("join flood").await;
    let s = server.status().await;
    let site_c = s.sites.iter().find(|x| x.site_id == "c").unwrap();
    assert!(site_c.last_refusal.contains("joined too often"), "{}", site_c.last_refusal);
    assert!(a.join(join(5, "v")).await.is_ok(), "another site is not limited");

    // A well-formed refusal is taken; a second one, or an update after it, is a duplicate.
    let ack = a.refuse_task(refusal(&tref, "require_dp", "this site requires differential privacy")).await.unwrap();
    assert!(ack.into_inner().message.contains("declined"));
    let r = a.refuse_task(refusal(&tref, "require_dp", "again")).await.map(drop);
    check("second refusal", r, Code::AlreadyExists, "already submitted");
    let payload = model(10).encode();
    let fp = model(10).fingerprint().to_hex();
    let r = raw_upload(&mut a, header_for(&tref, &payload, &fp, 1 << 20), chunks(&payload)).await.map(drop);
    check("update after declining", r, Code::AlreadyExists, "already submitted");
    let s = server.status().await;
    let site_a = s.sites.iter().find(|x| x.site_id == "a").unwrap();
    assert!(site_a.policy_refusal.starts_with(&format!("{}: require_dp: ", tref.task_id)), "{}", site_a.policy_refusal);
    assert_eq!((s.phase.as_str(), s.current_round), ("training", 1), "b has yet to answer (quorum 2)");
    assert_eq!(durable_state(&server.state()), before, "a decline commits nothing");
    server.stop().await;
}
