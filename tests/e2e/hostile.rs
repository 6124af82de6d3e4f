//! A malicious site against the server and the other sites (issue #15): each attack is made with
//! the site's own valid certificate over real mutual TLS (or, for idle connections, with none), and
//! each must be refused or bounded with a clear answer while the other sites' rounds go on and
//! nothing durable changes: multi-byte strings, low-order keys, parallel uploads, a flood of
//! reports, a crowd of connections that never finish their handshake; and a server that renames the
//! run to start a site's privacy count again.

use crate::harness::*;
use fedhcc_proto as pb;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A site string whose 12th byte falls inside a multi-byte character: a handler that cuts it at a
/// byte offset panics instead of answering.
const MULTIBYTE: &str = "a€€€€";

/// The answer's code, or the transport failure a crashed handler leaves.
fn refusal_code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn a_multibyte_string_gets_a_refusal_not_a_crashed_handler() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], study(1, 2, 60), model(64)).await;
    let state = server.state();

    // Join with a model layout that is not a fingerprint at all.
    let mut a = server.client_as("a").await;
    let join = |fp: &str| pb::JoinRequest {
        study_id: STUDY.into(),
        client_version: pb::PROTOCOL_VERSION.into(),
        model_fingerprint: fp.into(),
        num_samples: 10,
    };
    let r = a.join(join(MULTIBYTE)).await;
    assert_eq!(refusal_code(r), tonic::Code::InvalidArgument, "a refusal, not a crashed handler");

    // An upload whose header names such a layout, during a real round.
    let mut b = server.client_as("b").await;
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let tref = t.task.clone().unwrap();
    let before = durable_state(&state);
    let payload = model(64).encode();
    let header = header_for(&tref, &payload, MULTIBYTE, fedhcc_proto::MAX_CHUNK_BYTES);
    let e = raw_upload(&mut a, header, chunks(&payload)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("model_fingerprint"), "{}", e.message());

    // The server still answers, and nothing durable changed.
    assert_eq!(server.status().await.phase, "training");
    assert_eq!(durable_state(&state), before);
    server.stop().await;
}

#[tokio::test]
async fn a_low_order_key_is_refused_and_the_other_sites_finish_the_round() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let mut s = study(1, 2, 20);
    s.federation.secure_aggregation = true;
    let mut server = start_server(tmp.path(), &["a", "b", "c"], s, model(64)).await;

    // Site c joins first, so it is selected, and answers the key exchange with the all-zero point
    // (and a non-canonical encoding of one).
    let mut c = server.client_as("c").await;
    let mut tc = open_tasks(&mut c).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = [("a", 1.0), ("b", -1.0)]
        .into_iter()
        .map(|(site, delta)| {
            let exec = shifting(delta, 10, Duration::ZERO);
            tokio::spawn(fedhcc_client::run(client_options(&server, site), exec, token.clone()))
        })
        .collect();
    let t = next_train(&mut tc).await;
    let ad = |key: [u8; 32]| pb::KeyAdvertisement { task: t.task.clone(), public_key: key.to_vec().into() };
    let e = c.advertise_key(ad([0; 32])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("low-order"), "{}", e.message());
    let mut non_canonical = [0xff; 32];
    non_canonical[0] = 0xec;
    non_canonical[31] = 0xff;
    let e = c.advertise_key(ad(non_canonical)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // c gives up; the others' round goes on without it.
    drop((tc, c));

    let out = server.join().await;
    assert!(out.finished && out.rounds_completed == 1, "{out:?}");
    for client in clients {
        let outcome = client.await.unwrap().expect("a site is never stopped by another site's key");
        assert!(outcome.finished && outcome.rounds_trained == 1, "{outcome:?}");
    }
}

#[tokio::test]
async fn a_site_cannot_run_parallel_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], study(1, 2, 60), model(64)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let tref = t.task.clone().unwrap();
    let fp = model(64).fingerprint().to_hex();
    let payload = fedhcc_core::params::ParameterSet::zeros(model(64).layout().clone()).encode();

    // The first upload sends its header and then holds its stream open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = header_for(&tref, &payload, &fp, fedhcc_proto::MAX_CHUNK_BYTES);
    tx.send(pb::UploadPart { part: Some(pb::upload_part::Part::Header(header.clone())) }).await.unwrap();
    let mut held = a.clone();
    let first = tokio::spawn(async move { held.upload_update(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    // Wait until the server holds it (its .part file is in the spool).
    let spool = server.state().join("spool");
    let t0 = std::time::Instant::now();
    while !walk_names(&spool).iter().any(|n| n.ends_with(".part")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the first upload never reached the spool");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A second upload of the same site meanwhile is refused at once.
    let e = raw_upload(&mut a, header.clone(), chunks(&payload)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("already in progress"), "{}", e.message());
    // Once the first ends, the site can upload again.
    drop(tx);
    assert!(first.await.unwrap().is_err(), "the held upload ended short");
    raw_upload(&mut a, header, chunks(&payload)).await.expect("one upload at a time is fine");
    server.stop().await;
}

/// The file names under `dir`, recursively.
fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        if e.path().is_dir() {
            out.extend(walk_names(&e.path()));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[tokio::test]
async fn a_flood_of_reports_is_rate_limited_and_the_others_finish() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let mut server = start_server(tmp.path(), &["a", "b", "c"], study(2, 2, 60), model(64)).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|site| {
            let exec = shifting(1.0, 10, Duration::from_millis(200));
            tokio::spawn(fedhcc_client::run(client_options(&server, site), exec, token.clone()))
        })
        .collect();
    // Site c, never selected, floods the server with task refusals (each would be an fsynced audit
    // line) as fast as one connection allows.
    let mut c = server.client_as("c").await;
    let refusal = pb::TaskRefusal {
        task: Some(pb::TaskRef { study_id: STUDY.into(), run_id: "run-1".into(), round: 1, task_id: "r1a9".into() }),
        rule: "max_rounds".into(),
        message: "flood".into(),
    };
    let started = std::time::Instant::now();
    let mut limited = 0;
    for _ in 0..600 {
        if let Err(s) = c.refuse_task(refusal.clone()).await
            && s.code() == tonic::Code::ResourceExhausted
        {
            limited += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(limited > 0, "600 refusals in {elapsed:?} and none was rate limited");

    let out = server.join().await;
    assert!(out.finished && out.rounds_completed == 2, "{out:?}");
    for client in clients {
        assert!(client.await.unwrap().unwrap().finished);
    }
    // What c got into the audit log is bounded by the limit, not by the flood.
    let audit = std::fs::read_to_string(server.state().join("audit.jsonl")).unwrap();
    let from_c = audit.lines().filter(|l| l.contains("\"peer\":\"c\"")).count();
    let bound = fedhcc_server::ratelimit::REPORT_BURST as usize
        + (elapsed.as_millis() / fedhcc_server::ratelimit::REPORT_REFILL.as_millis()) as usize
        + 2;
    assert!(from_c <= bound, "{from_c} audit lines from c (bound {bound}) after {elapsed:?}");
    assert_eq!(from_c + limited, 600, "every refusal either recorded or rate limited");
}

#[tokio::test]
async fn idle_connections_that_never_handshake_are_shed_and_real_sites_get_through() {
    use tokio::io::AsyncReadExt as _;
    const IDLE: usize = 200;
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut server = start_server(tmp.path(), &["a", "b"], study(1, 2, 60), model(64)).await;
    // Connections that open TCP and then say nothing (no TLS ClientHello).
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // The server drops all but the newest MAX_PENDING_HANDSHAKES long before the handshake
    // timeout (10 s).
    let reads: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let closed =
                    matches!(tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await, Ok(Ok(0) | Err(_)));
                (closed, s)
            })
        })
        .collect();
    let mut closed = 0;
    let mut still_open = Vec::new();
    for r in reads {
        let (c, s) = r.await.unwrap();
        closed += usize::from(c);
        still_open.push(s);
    }
    let limit = fedhcc_server::listener::MAX_PENDING_HANDSHAKES;
    assert!(closed >= IDLE - limit, "{closed} of {IDLE} idle connections closed within 3 s (at most {limit} kept)");

    // The real sites connect while the remaining idle connections are still open, and train.
    let token = CancellationToken::new();
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|site| {
            tokio::spawn(fedhcc_client::run(
                client_options(&server, site),
                shifting(1.0, 10, Duration::ZERO),
                token.clone(),
            ))
        })
        .collect();
    let out = server.join().await;
    assert!(out.finished, "{out:?}");
    for c in clients {
        assert!(c.await.unwrap().unwrap().finished);
    }
    drop(still_open);
}

#[tokio::test]
async fn a_site_cannot_declare_more_patients_than_the_study_allows() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut s = study(1, 2, 60);
    s.federation.max_site_samples = Some(500);
    let server = start_server(tmp.path(), &["a", "b"], s, model(64)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    // At join: told before it trains.
    let join = |n: u64| pb::JoinRequest {
        study_id: STUDY.into(),
        client_version: pb::PROTOCOL_VERSION.into(),
        model_fingerprint: String::new(),
        num_samples: n,
    };
    let e = a.join(join(1_000_000_000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_site_samples"), "{}", e.message());
    a.join(join(400)).await.expect("within the limit");
    // In an update: the FedAvg weight it claims.
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let tref = t.task.clone().unwrap();
    let state = server.state();
    let before = durable_state(&state);
    let payload = fedhcc_core::params::ParameterSet::zeros(model(64).layout().clone()).encode();
    let mut header = header_for(&tref, &payload, &model(64).fingerprint().to_hex(), fedhcc_proto::MAX_CHUNK_BYTES);
    header.num_samples = 1_000_000_000;
    let e = raw_upload(&mut a, header.clone(), chunks(&payload)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_site_samples"), "{}", e.message());
    assert_eq!(durable_state(&state), before);
    header.num_samples = 500;
    raw_upload(&mut a, header, chunks(&payload)).await.expect("at the limit");
    server.stop().await;
}

#[tokio::test]
async fn a_site_never_follows_a_server_into_another_run() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut s = study(1, 2, 60);
    s.run_id = "run-2".into();
    let server = start_server(tmp.path(), &["a", "b"], s, model(64)).await;
    // The site's study file names run-1 (its privacy budget and policy count against that run).
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        fedhcc_client::run(client_options(&server, "a"), shifting(1.0, 10, Duration::ZERO), CancellationToken::new()),
    )
    .await
    .expect("the client stops instead of following");
    match out {
        Err(e @ fedhcc_client::ClientError::OtherRun { .. }) => {
            assert!(e.to_string().contains("'run-2'") && e.to_string().contains("'run-1'"), "{e}")
        }
        other => panic!("followed the server or failed otherwise: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_download_the_site_stops_reading_is_dropped_after_the_round_timeout() {
    const N: usize = 4_000_000; // 16 MB: far more than the HTTP/2 windows hold
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], study(1, 2, 2), model(N)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let mut download = a.download_model(t.task.clone().unwrap()).await.unwrap().into_inner();
    let total = match download.message().await.unwrap() {
        Some(pb::ModelPart { part: Some(pb::model_part::Part::Header(h)) }) => h.total_bytes,
        other => panic!("{other:?}"),
    };
    // The site stops reading for twice the round timeout, then reads what is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = 0u64;
    while let Ok(Some(pb::ModelPart { part: Some(pb::model_part::Part::Chunk(c)) })) = download.message().await {
        got += c.len() as u64;
    }
    assert!(got < total, "the stalled download was held open to the end ({got} of {total} bytes)");
    server.stop().await;
}
