//! A malicious site against the server and the other sites (issue #15): each attack is made with
//! the site's own valid certificate over real mutual TLS, and each must be refused with a clear
//! answer while the other sites' rounds go on and nothing durable changes.

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
