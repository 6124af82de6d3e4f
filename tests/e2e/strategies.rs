//! Aggregation strategies through the real server and clients: FedBN never sends local layers
//! (checked on the spooled bytes of a real upload), a FedAdam server restarted mid-run makes the
//! same model as one that ran through, and the coordinate-wise median over real spooled updates.

use crate::harness::*;
use fedhcc_client::local_layers::LocalLayers;
use fedhcc_core::aggregation::LocalParameters;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::ParameterSet;
use fedhcc_proto as pb;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn with_strategy(mut s: StudyConfig, strategy: &str) -> StudyConfig {
    s.federation.strategy = strategy.into();
    s
}

/// A model with two normalisation tensors between shared ones.
fn model_with_bn() -> ParameterSet {
    ParameterSet::from_tensors(vec![
        ("layer.weight".into(), vec![4000], (0..4000).map(|i| i as f32 * 1e-3).collect()),
        ("layer.bn.gamma".into(), vec![500], vec![1.0; 500]),
        ("layer.bn.beta".into(), vec![500], vec![0.0; 500]),
        ("head.bias".into(), vec![3], vec![0.5; 3]),
    ])
    .unwrap()
}

async fn next_event(s: &mut tonic::Streaming<pb::TaskEvent>, what: &str) -> pb::task_event::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} in time"))
            .unwrap()
            .unwrap();
        match ev.event {
            Some(pb::task_event::Event::Heartbeat(_)) | None => {}
            Some(e) => return e,
        }
    }
}

#[tokio::test]
async fn fedbn_uploads_carry_only_shared_parameters_and_local_layers_stay_at_the_site() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let full = model_with_bn();
    let rule = LocalParameters::normalisation_layers();
    let (shared, _) = rule.split(&full).unwrap();
    let mut server = start_server(tmp.path(), &["a", "b"], with_strategy(study(1, 2, 60), "fedbn"), full.clone()).await;

    // Site b speaks the protocol by hand, so the round stays open while a's upload is inspected.
    let mut b = server.client_as("b").await;
    let mut sb = open_tasks(&mut b).await;
    let local_file = tmp.path().join("site-a/fedbn-local.fhcp");
    let executor =
        LocalLayers::new(shifting(1.0, 30, Duration::ZERO), rule.clone(), &full, Some(local_file.clone())).unwrap();
    let ca = tokio::spawn(fedhcc_client::run(client_options(&server, "a"), executor, CancellationToken::new()));
    let pb::task_event::Event::Train(task) = next_event(&mut sb, "train task").await else {
        panic!("expected a train task")
    };
    assert_eq!(task.model_fingerprint, shared.fingerprint().to_hex(), "the server serves the shared layout");

    // What a sent, byte for byte as received (the spool file is hash-checked against its header).
    let spooled = server.state().join("spool").join(&task.task.as_ref().unwrap().task_id).join("a.upd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !spooled.exists() {
        assert!(Instant::now() < deadline, "a's update never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bytes = std::fs::read(&spooled).unwrap();
    assert_eq!(bytes.len(), shared.layout().payload_len(), "exactly the shared parameters' payload");
    assert!(bytes.len() < full.layout().payload_len());
    let sent = ParameterSet::decode(&bytes).unwrap();
    let names: Vec<&str> = sent.layout().specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["layer.weight", "head.bias"]);
    assert!(sent.values().iter().all(|&v| (v - 1.0).abs() < 1e-5), "the delta of the shared parameters");

    // An upload of the full model, local layers included, is refused.
    let tref = task.task.clone().unwrap();
    let full_delta = full.encode();
    let err =
        raw_upload(&mut b, header_for(&tref, &full_delta, &full.fingerprint().to_hex(), 1 << 20), chunks(&full_delta))
            .await
            .expect_err("full model refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
    let mut d = shared.clone();
    d.values_mut().iter_mut().for_each(|v| *v = -0.25);
    let good = d.encode();
    let mut h = header_for(&tref, &good, &task.model_fingerprint, 1 << 20);
    h.num_samples = 90;
    raw_upload(&mut b, h, chunks(&good)).await.unwrap();
    let pb::task_event::Event::Evaluate(ev) = next_event(&mut sb, "evaluate task").await else {
        panic!("expected an evaluate task")
    };
    b.report_evaluation(pb::EvaluationReport { task: ev.task, num_samples: 5, metrics: vec![], ..Default::default() })
        .await
        .unwrap();
    // b hangs up, so the server need not wait for it to hear that the run is over.
    drop((sb, b));

    let out = server.join().await;
    assert!(out.finished);
    let a_out = ca.await.unwrap().unwrap();
    assert_eq!(a_out.bytes_up, shared.layout().payload_len() as u64);
    let global = ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    assert_eq!(global.fingerprint(), shared.fingerprint(), "the server never holds local layers");
    // FedAvg of the shared part: (30·1 + 90·(−0.25)) / 120 = 0.0625.
    for (g, s) in global.values().iter().zip(shared.values()) {
        assert!((g - (s + 0.0625)).abs() < 1e-5, "{g} vs {s} + 0.0625");
    }
    // a's local layers moved by a's own training only, and were kept at the site.
    let local = ParameterSet::decode(&std::fs::read(&local_file).unwrap()).unwrap();
    assert_eq!(local.get("layer.bn.gamma").unwrap(), &[2.0; 500][..]);
    assert_eq!(local.get("layer.bn.beta").unwrap(), &[1.0; 500][..]);
    let rec = &fedhcc_server::store::Store::open(&server.state(), "run-1").unwrap().rounds().unwrap()[0];
    assert_eq!(rec.bytes_in, 2 * shared.layout().payload_len() as u64);
}

fn fedadam_study(rounds: u32) -> StudyConfig {
    // A short round timeout: should the stop land between an upload and its commit, the resent
    // task is retried after seconds, not minutes (the values do not depend on it).
    let mut s = with_strategy(study(rounds, 1, 5), "fedadam");
    s.federation.server_optimizer =
        Some(fedhcc_core::aggregation::ServerOptimizerConfig { lr: 0.3, beta1: 0.9, beta2: 0.99, tau: 0.01 });
    s
}

/// Runs a fedadam study for 4 rounds with one site, optionally stopping the server after two
/// committed rounds and starting it again; returns the final model's SHA-256.
async fn fedadam_run(dir: &std::path::Path, restart: bool) -> String {
    make_certs(dir, &["a"]);
    let server = start_server(dir, &["a"], fedadam_study(4), model(100)).await;
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::from_millis(if restart { 200 } else { 0 })),
        CancellationToken::new(),
    ));
    let out = if restart {
        server.wait_status("two rounds committed", |s| s.rounds.len() >= 2).await;
        let addr = server.addr;
        let stopped = server.stop().await;
        assert!(!stopped.finished && stopped.rounds_completed >= 2);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let opts = fedhcc_server::ServerOptions {
            config: server_config(dir, &["a"]),
            study: fedadam_study(4),
            initial_model: model(100),
        };
        fedhcc_server::run(listener, opts, CancellationToken::new()).await.unwrap()
    } else {
        let mut server = server;
        server.join().await
    };
    assert!(out.finished);
    assert_eq!(out.rounds_completed, 4);
    assert!(ca.await.unwrap().unwrap().finished);
    out.final_sha256
}

#[tokio::test]
async fn fedadam_state_survives_a_server_restart() {
    let straight = tempfile::tempdir().unwrap();
    let restarted = tempfile::tempdir().unwrap();
    let (a, b) = (fedadam_run(straight.path(), false).await, fedadam_run(restarted.path(), true).await);
    assert_eq!(a, b, "a restarted server takes exactly the steps an uninterrupted one takes");

    let store = fedhcc_server::store::Store::open(&restarted.path().join("state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert!(rounds.iter().all(|r| r.strategy_state.is_some()), "every round saved the optimizer state");
    let last = store.read_strategy_state(rounds.last().unwrap()).unwrap().unwrap();
    assert_eq!(last.get("server_optimizer.step").unwrap(), &[4.0]);
    // The model moved by the optimizer, not by plain averaging (+1 per round would give 4).
    let p = ParameterSet::decode(&std::fs::read(&rounds[3].checkpoint).unwrap()).unwrap();
    assert!((p.values()[0] - 4.0).abs() > 0.1, "{}", p.values()[0]);

    // The run cannot be resumed under another strategy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = fedhcc_server::ServerOptions {
        config: server_config(restarted.path(), &["a"]),
        study: study(4, 1, 5),
        initial_model: model(100),
    };
    let e = fedhcc_server::run(listener, opts, CancellationToken::new()).await.err().unwrap().to_string();
    assert!(e.contains("fedadam(lr=0.3") && e.contains("asks for fedavg"), "{e}");
}

#[tokio::test]
async fn median_over_real_spooled_updates_ignores_the_outlier_site() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let mut server =
        start_server(tmp.path(), &["a", "b", "c"], with_strategy(study(2, 3, 60), "median"), model(20_000)).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = [("a", 1.0, 10), ("b", 2.0, 10), ("c", 100.0, 1000)]
        .into_iter()
        .map(|(s, delta, samples)| {
            tokio::spawn(fedhcc_client::run(
                client_options(&server, s),
                shifting(delta, samples, Duration::ZERO),
                token.clone(),
            ))
        })
        .collect();
    let out = server.join().await;
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let p = ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    // Median of {1, 2, 100} is 2 per round, whatever c's 1000 samples.
    for (i, v) in p.values().iter().enumerate() {
        assert!((v - (i as f32 + 4.0)).abs() < 1e-3, "value {i}: {v}");
    }
}

#[test]
fn the_demo_runs_with_a_chosen_strategy_and_refuses_an_unknown_one() {
    let bin = env!("CARGO_BIN_EXE_fedhcc");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = std::process::Command::new(bin)
        .args(["demo", "--model", "clinical", "--strategy", "fedyogi", "--rounds", "2", "--patients", "200", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("aggregation strategy fedyogi"), "{stdout}");
    let store = fedhcc_server::store::Store::open(&out.join("server-state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.strategy_state.is_some()), "the server optimizer's state is saved");

    let bad = std::process::Command::new(bin).args(["demo", "--strategy", "fedsgd"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown strategy 'fedsgd'") && err.contains("trimmed_mean"), "{err}");
}
