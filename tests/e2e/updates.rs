//! Bad updates: each is refused with a status naming the problem, and the round, the model and the
//! database are exactly as before.

use crate::harness::*;
use fedhcc_core::params::ParameterSet;
use fedhcc_proto as pb;
use tonic::Code;

/// 300 000 parameters: 1.2 MB, so an update travels in two chunks.
const N: usize = 300_000;

fn delta(v: f32) -> ParameterSet {
    let mut d = model(N);
    d.values_mut().iter_mut().for_each(|x| *x = v);
    d
}

#[tokio::test]
async fn bad_updates_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    let server = start_server(tmp.path(), &["a", "b", "c"], study(2, 2, 120), model(N)).await;
    let mut a = server.client_as("a").await;
    let mut b = server.client_as("b").await;
    let mut sa = open_tasks(&mut a).await;
    let mut sb = open_tasks(&mut b).await;
    let task_a = next_train(&mut sa).await;
    let _task_b = next_train(&mut sb).await;
    let tref = task_a.task.clone().unwrap();
    let fp = task_a.model_fingerprint.clone();
    let good = delta(0.5).encode();
    let before_status = server.status().await;
    assert_eq!((before_status.phase.as_str(), before_status.current_round), ("training", 1));
    let before = durable_state(&server.state());

    let mut expect = async |name: &str, header: pb::UpdateHeader, body: Vec<Vec<u8>>, code: Code, words: &str| {
        let err = raw_upload(&mut a, header, body).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(words), "{name}: '{}' should mention '{words}'", err.message());
        let s = server.status().await;
        assert_eq!((s.phase.as_str(), s.current_round, s.attempt), ("training", 1, before_status.attempt), "{name}");
        assert_eq!(durable_state(&server.state()), before, "{name}: durable state changed");
    };

    // NaN and infinity inside the weights.
    let mut nan = delta(0.5);
    nan.values_mut()[N - 3] = f32::NAN;
    let nan = nan.encode();
    expect("nan", header_for(&tref, &nan, &fp, 1 << 20), chunks(&nan), Code::InvalidArgument, "not finite").await;
    let mut inf = delta(0.5);
    inf.values_mut()[7] = f32::NEG_INFINITY;
    let inf = inf.encode();
    expect("inf", header_for(&tref, &inf, &fp, 1 << 20), chunks(&inf), Code::InvalidArgument, "layer.weight").await;

    // Another layout (fingerprint) declared, and another layout inside a correctly declared payload.
    let other = ParameterSet::from_tensors(vec![("x".into(), vec![N], vec![0.0; N])]).unwrap();
    let ob = other.encode();
    expect(
        "fingerprint",
        header_for(&tref, &ob, &other.fingerprint().to_hex(), 1 << 20),
        chunks(&ob),
        Code::FailedPrecondition,
        "does not match",
    )
    .await;
    let mut h = header_for(&tref, &ob, &fp, 1 << 20);
    h.total_bytes = good.len() as u64;
    h.chunks = 2;
    let mut padded = ob.clone();
    padded.resize(good.len(), 0);
    h.sha256 = sha(&padded);
    expect("layout inside", h, chunks(&padded), Code::FailedPrecondition, "layout").await;

    // Wrong total length, bad SHA-256, truncated stream.
    let mut h = header_for(&tref, &good, &fp, 1 << 20);
    h.total_bytes += 4;
    expect("length", h, chunks(&good), Code::InvalidArgument, "bytes").await;
    let mut h = header_for(&tref, &good, &fp, 1 << 20);
    h.sha256 = sha(b"something else");
    expect("sha", h, chunks(&good), Code::DataLoss, "SHA-256").await;
    let h = header_for(&tref, &good, &fp, 1 << 20);
    expect("truncated", h, vec![chunks(&good)[0].clone()], Code::InvalidArgument, "ended after").await;

    // Too many chunks, an oversize chunk.
    let h = header_for(&tref, &good, &fp, 1 << 20);
    let mut many = chunks(&good);
    many.push(vec![0; 4]);
    expect("too many chunks", h, many, Code::InvalidArgument, "more chunks").await;
    let h = header_for(&tref, &good, &fp, 1 << 20);
    let big = vec![good[..(1 << 20) + 1].to_vec(), good[(1 << 20) + 1..].to_vec()];
    expect("oversize chunk", h, big, Code::InvalidArgument, "allowed").await;

    // A stale round, a future round, another run.
    let mut stale = tref.clone();
    stale.round = 0;
    stale.task_id = "r0a1".into();
    expect("stale", header_for(&stale, &good, &fp, 1 << 20), chunks(&good), Code::FailedPrecondition, "has closed")
        .await;
    let mut future = tref.clone();
    future.round = 2;
    future.task_id = "r2a9".into();
    expect(
        "future",
        header_for(&future, &good, &fp, 1 << 20),
        chunks(&good),
        Code::FailedPrecondition,
        "has not started",
    )
    .await;
    let mut wrong_run = tref.clone();
    wrong_run.run_id = "run-0".into();
    expect("other run", header_for(&wrong_run, &good, &fp, 1 << 20), chunks(&good), Code::FailedPrecondition, "run-0")
        .await;
    let err = a
        .upload_update(tokio_stream::iter(vec![pb::UploadPart {
            part: Some(pb::upload_part::Part::Chunk(vec![1].into())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(durable_state(&server.state()), before);

    // A site that was not selected (it connected after the round started).
    let mut c = server.client_as("c").await;
    let err = raw_upload(&mut c, header_for(&tref, &good, &fp, 1 << 20), chunks(&good)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("not selected"));

    // The good update is accepted; the same update again is a duplicate.
    raw_upload(&mut a, header_for(&tref, &good, &fp, 1 << 20), chunks(&good)).await.expect("good update");
    let err = raw_upload(&mut a, header_for(&tref, &good, &fp, 1 << 20), chunks(&good)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(durable_state(&server.state()), before, "nothing is committed until the round closes");
    let s = server.status().await;
    let site_a = s.sites.iter().find(|x| x.site_id == "a").unwrap();
    assert!(site_a.last_refusal.contains("already submitted"), "{}", site_a.last_refusal);
    server.stop().await;
}

#[tokio::test]
async fn admin_and_unknown_identities_cannot_upload_or_download() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], study(1, 2, 120), model(10)).await;
    let mut a = server.client_as("a").await;
    let mut b = server.client_as("b").await;
    let mut sa = open_tasks(&mut a).await;
    let _sb = open_tasks(&mut b).await;
    let task = next_train(&mut sa).await;
    let tref = task.task.unwrap();
    let err = server.admin().await.download_model(tref.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut bad = tref.clone();
    bad.task_id = "nonsense".into();
    let err = a.download_model(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}
