//! Whole rounds with real clients: FedAvg by sample count, bit-identical reruns, a site lost
//! mid-round (completed without it, or retried), and resuming from the database.

use crate::harness::*;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn run_study(dir: &std::path::Path, rounds: u32) -> (fedhcc_server::RunOutcome, Vec<u8>) {
    make_certs(dir, &["a", "b"]);
    let server = start_server(dir, &["a", "b"], study(rounds, 2, 60), model(1000)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 30, Duration::ZERO),
        token.clone(),
    ));
    let cb = tokio::spawn(fedhcc_client::run(
        client_options(&server, "b"),
        shifting(-0.25, 90, Duration::from_millis(20)),
        token.clone(),
    ));
    let mut server = server;
    let out = server.join().await;
    let (ra, rb) = (ca.await.unwrap().unwrap(), cb.await.unwrap().unwrap());
    assert!(ra.finished && rb.finished, "both sites hear that the run finished");
    assert_eq!((ra.rounds_trained, rb.rounds_trained), (rounds, rounds));
    assert_eq!(ra.final_model_sha256, out.final_sha256);
    let bytes = std::fs::read(&out.final_checkpoint).unwrap();
    (out, bytes)
}

#[tokio::test]
async fn fedavg_weights_by_samples_and_reruns_are_bit_identical() {
    let t1 = tempfile::tempdir().unwrap();
    let (out, bytes) = run_study(t1.path(), 3).await;
    assert!(out.finished);
    assert_eq!(out.rounds_completed, 3);
    let p = fedhcc_core::params::ParameterSet::decode(&bytes).unwrap();
    // Each round adds (30·1 + 90·(−0.25)) / 120 = 0.0625.
    for (i, v) in p.values().iter().enumerate() {
        assert!((v - (i as f32 + 3.0 * 0.0625)).abs() < 1e-3, "value {i}: {v}");
    }
    let store = fedhcc_server::store::Store::open(&t1.path().join("state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(rounds[0].participants, ["a", "b"]);
    assert_eq!(rounds[0].samples, [30, 90]);
    assert!(rounds[0].bytes_in > 0 && rounds[0].bytes_out > 0);
    assert_eq!(store.evaluations().unwrap().len(), 2, "final evaluation by both sites");

    let t2 = tempfile::tempdir().unwrap();
    let (out2, bytes2) = run_study(t2.path(), 3).await;
    assert_eq!(out2.final_sha256, out.final_sha256, "same inputs, same bits");
    assert_eq!(bytes, bytes2);
}

#[tokio::test]
async fn a_site_lost_mid_round_is_left_out_when_quorum_allows() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut server = start_server(tmp.path(), &["a", "b"], study(3, 1, 60), model(100)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::from_millis(300)),
        token.clone(),
    ));
    // b never finishes training; it is stopped while it trains in a round it was selected for.
    let b_token = CancellationToken::new();
    let cb = tokio::spawn(fedhcc_client::run(
        client_options(&server, "b"),
        shifting(9.0, 10, Duration::from_secs(3600)),
        b_token.clone(),
    ));
    server
        .wait_status("b selected", |s| s.phase == "training" && s.sites.iter().any(|x| x.site_id == "b" && x.selected))
        .await;
    b_token.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), cb).await.expect("b stops");
    assert!(stopped.unwrap().is_err(), "b's training was cut short");
    let out = server.join().await;
    assert!(out.finished);
    ca.await.unwrap().unwrap();
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    let r = store.rounds().unwrap();
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|x| x.participants == ["a"]), "b's update never counted");
    assert!(
        r.iter().any(|x| x.failures == [("b".to_string(), "disconnected".to_string())]),
        "the round b was selected for records it as disconnected: {:?}",
        r.iter().map(|x| &x.failures).collect::<Vec<_>>()
    );
    let p = fedhcc_core::params::ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    assert!((p.values()[0] - 3.0).abs() < 1e-6, "only a's updates: {}", p.values()[0]);
}

#[tokio::test]
async fn below_quorum_the_round_is_retried_and_then_completes() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut server = start_server(tmp.path(), &["a", "b"], study(1, 2, 2), model(100)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::ZERO),
        token.clone(),
    ));
    let b_token = CancellationToken::new();
    let cb = tokio::spawn(fedhcc_client::run(
        client_options(&server, "b"),
        shifting(1.0, 10, Duration::from_secs(3600)),
        b_token.clone(),
    ));
    server.wait_status("round 1 under way", |s| s.phase == "training" && s.sites.iter().all(|x| x.connected)).await;
    b_token.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), cb).await.expect("b stops");
    assert!(stopped.unwrap().is_err(), "b's training was cut short");
    // After the 2 s deadline, round 1 is retried; it waits for two sites again.
    server.wait_status("retry waits for sites", |s| s.phase == "waiting_for_sites" && s.rounds.is_empty()).await;
    let cb2 = tokio::spawn(fedhcc_client::run(
        client_options(&server, "b"),
        shifting(3.0, 10, Duration::ZERO),
        token.clone(),
    ));
    let out = server.join().await;
    assert!(out.finished);
    ca.await.unwrap().unwrap();
    cb2.await.unwrap().unwrap();
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    let r = store.rounds().unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].attempt >= 2, "attempt {}", r[0].attempt);
    assert_eq!(r[0].participants, ["a", "b"]);
}

#[tokio::test]
async fn restart_resumes_after_the_last_committed_round() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    let server = start_server(tmp.path(), &["a"], study(4, 1, 60), model(100)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::from_millis(200)),
        token.clone(),
    ));
    server.wait_status("two rounds committed", |s| s.rounds.len() >= 2).await;
    let addr = server.addr;
    let stopped = server.stop().await;
    assert!(!stopped.finished);
    let committed = stopped.rounds_completed;
    // Same address, same state folder: the client reconnects by itself.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let opts = fedhcc_server::ServerOptions {
        config: server_config(tmp.path(), &["a"]),
        study: study(4, 1, 60),
        initial_model: model(100),
    };
    let out = fedhcc_server::run(listener, opts, CancellationToken::new()).await.unwrap();
    assert!(out.finished);
    assert_eq!(out.rounds_completed, 4);
    let client = ca.await.unwrap().unwrap();
    assert!(client.finished);
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(committed >= 2);
    let p = fedhcc_core::params::ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    assert!((p.values()[0] - 4.0).abs() < 1e-6, "four rounds of +1: {}", p.values()[0]);
}

#[tokio::test]
async fn after_a_restart_task_ids_are_new_so_old_answers_are_refused_and_every_site_answers_again() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    // A round timeout far beyond the test's waits: a site that ignored the restarted round would
    // show as a hang, not as a slow round.
    let st = || study(1, 2, 600);
    let server = start_server(tmp.path(), &["a", "b"], st(), model(100)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::ZERO),
        token.clone(),
    ));
    // Before the restart: a's update for round 1 is in, b (by hand) has not answered.
    let mut b = server.client_as("b").await;
    let mut tb = open_tasks(&mut b).await;
    let old = next_train(&mut tb).await.task.unwrap();
    let spooled = server.state().join("spool").join(&old.task_id).join("a.upd");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !spooled.exists() {
        assert!(std::time::Instant::now() < deadline, "a's update never reached the spool");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = server.addr;
    drop((b, tb));
    assert!(!server.stop().await.finished);

    // Same address and state folder: a reconnects by itself.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let opts = fedhcc_server::ServerOptions {
        config: server_config(tmp.path(), &["a", "b"]),
        study: st(),
        initial_model: model(100),
    };
    let token2 = CancellationToken::new();
    let handle = tokio::spawn(fedhcc_server::run(listener, opts, token2.clone()));
    let mut server = TestServer { dir: tmp.path().to_path_buf(), addr, token: token2, handle: Some(handle) };
    let mut b = server.client_as("b").await;
    let mut tb = open_tasks(&mut b).await;
    let new = next_train(&mut tb).await.task.unwrap();
    assert_eq!(new.round, 1);
    assert_ne!(new.task_id, old.task_id, "task id {} announced again after the restart", old.task_id);
    // b's answer to the task of before the restart is refused: that task has closed.
    let fp = model(100).fingerprint().to_hex();
    let zeros = fedhcc_core::params::ParameterSet::zeros(model(100).layout().clone()).encode();
    let header = |t: &fedhcc_proto::TaskRef| header_for(t, &zeros, &fp, fedhcc_proto::MAX_CHUNK_BYTES);
    let e = raw_upload(&mut b, header(&old), chunks(&zeros)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("task {} has closed", old.task_id)), "{}", e.message());
    // b answers the new task; a, which had answered round 1 before the restart, trains it again.
    raw_upload(&mut b, header(&new), chunks(&zeros)).await.unwrap();
    drop((b, tb));
    let out = server.join().await;
    assert!(out.finished && ca.await.unwrap().unwrap().finished);
    let rounds = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap().rounds().unwrap();
    assert_eq!(rounds[0].task_id, new.task_id);
    assert_eq!(rounds[0].participants, ["a", "b"]);
    let p = fedhcc_core::params::ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    assert!((p.values()[0] - 0.5).abs() < 1e-6, "(10 · 1 + 10 · 0) / 20: {}", p.values()[0]);
}

#[tokio::test]
async fn a_server_stopped_before_the_final_evaluation_closed_evaluates_after_the_restart_then_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a"]);
    // A round timeout far beyond the test's waits: the evaluation must close by the site's answer.
    let st = || study(1, 1, 600);
    let server = start_server(tmp.path(), &["a"], st(), model(100)).await;
    // Before the restart: a (by hand) trains round 1, then never answers the evaluate task.
    let mut a = server.client_as("a").await;
    let mut ta = open_tasks(&mut a).await;
    let train = next_train(&mut ta).await.task.unwrap();
    let fp = model(100).fingerprint().to_hex();
    let zeros = fedhcc_core::params::ParameterSet::zeros(model(100).layout().clone()).encode();
    raw_upload(&mut a, header_for(&train, &zeros, &fp, fedhcc_proto::MAX_CHUNK_BYTES), chunks(&zeros)).await.unwrap();
    let old = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), ta.message()).await.expect("an event").unwrap().unwrap();
        if let Some(fedhcc_proto::task_event::Event::Evaluate(t)) = ev.event {
            break t.task.unwrap();
        }
    };
    assert_eq!(old.round, 1);
    server.wait_status("the final evaluation announced", |s| s.phase == "evaluating" && s.rounds.len() == 1).await;
    let addr = server.addr;
    drop((a, ta));
    let stopped = server.stop().await;
    assert!(!stopped.finished, "stopped before the evaluation closed");
    assert_eq!(stopped.rounds_completed, 1);
    let state = tmp.path().join("state");
    let open = || fedhcc_server::store::Store::open(&state, "run-1").unwrap();
    assert!(open().evaluations().unwrap().is_empty());

    // Restarted with a site that answers: the final evaluation runs under a new task id, then the run finishes.
    let dir = tmp.path().to_path_buf();
    let restart = || {
        let dir = dir.clone();
        async move {
            let listener = loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let opts = fedhcc_server::ServerOptions {
                config: server_config(&dir, &["a"]),
                study: st(),
                initial_model: model(100),
            };
            let token = CancellationToken::new();
            let handle = tokio::spawn(fedhcc_server::run(listener, opts, token.clone()));
            TestServer { dir, addr, token, handle: Some(handle) }
        }
    };
    let mut server = restart().await;
    let ca = tokio::spawn(fedhcc_client::run(
        client_options(&server, "a"),
        shifting(1.0, 10, Duration::ZERO),
        CancellationToken::new(),
    ));
    let out = server.join().await;
    assert!(out.finished);
    assert_eq!((out.rounds_completed, out.final_sha256.as_str()), (1, stopped.final_sha256.as_str()));
    let client = ca.await.unwrap().unwrap();
    assert!(client.finished);
    assert_eq!(client.rounds_trained, 0, "nothing trained again after the restart");
    let records = open().evaluations().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let new = &records[0].task_id;
    assert_eq!((records[0].round, records[0].site.as_str(), records[0].samples), (1, "a", 10));
    assert_ne!(new, &old.task_id, "task id {} announced again after the restart", old.task_id);
    let report = state.join("evaluation").join(format!("{new}.json"));
    assert!(report.is_file(), "{} missing", report.display());
    assert!(!state.join("evaluation").join(format!("{}.json", old.task_id)).exists());

    // Started again: the run is over and evaluated; it announces nothing and records nothing.
    let mut again = restart().await;
    assert_eq!(again.status().await.phase, "finished");
    let mut a = again.client_as("a").await;
    let mut ta = open_tasks(&mut a).await;
    let ev = tokio::time::timeout(Duration::from_secs(30), ta.message()).await.expect("an event").unwrap().unwrap();
    assert!(matches!(ev.event, Some(fedhcc_proto::task_event::Event::Finished(_))), "{ev:?}");
    drop((a, ta));
    again.token.cancel();
    assert!(again.join().await.finished);
    assert_eq!(open().evaluations().unwrap().len(), 1);
}
