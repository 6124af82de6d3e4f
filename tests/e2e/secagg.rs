//! Secure aggregation and differential privacy end to end over real mutual TLS: the decoded sum
//! equals plain FedAvg within the fixed-point error; a site lost after the key exchange restarts the
//! round without it (and the model equals a run without that site); the server's spool holds only
//! masked words; bad keys and uploads are refused and change nothing; ε is reported per round and
//! training stops at the budget.

use crate::harness::*;
use fedhcc_client::{EvalResult, Executor, ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::{Fingerprint, ParameterSet};
use fedhcc_core::privacy;
use fedhcc_proto as pb;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Amplitude of [`WaveExecutor`]'s delta: also its Lipschitz constant in the global model.
const AMP: f32 = 0.01;

/// Deterministic "training": `Δ_i = AMP · sin(g_i + phase + 0.01 i)`, so every round's update
/// depends on the model the site downloaded (as real training does), with slope at most `AMP`.
struct WaveExecutor {
    phase: f32,
    samples: u64,
    pause: Duration,
}

impl Executor for WaveExecutor {
    fn fingerprint(&self) -> Option<Fingerprint> {
        None
    }
    fn num_samples(&self) -> u64 {
        self.samples
    }
    fn train(&mut self, global: &ParameterSet, _s: &TrainSpec, _c: &TaskControl) -> Result<TrainResult, ExecutorError> {
        std::thread::sleep(self.pause);
        let mut p = global.clone();
        for (i, v) in p.values_mut().iter_mut().enumerate() {
            *v += AMP * (*v + self.phase + 0.01 * i as f32).sin();
        }
        Ok(TrainResult { params: p, num_samples: self.samples, metrics: vec![("train_loss".into(), 0.5)] })
    }
    fn evaluate(&mut self, _g: &ParameterSet, _split: &str, _c: &TaskControl) -> Result<EvalResult, ExecutorError> {
        Ok(EvalResult { num_samples: self.samples, metrics: vec![("auc".into(), 0.5)], summary: None })
    }
}

/// A model of `n` values in [0, 1), in two tensors.
fn unit_model(n: usize) -> ParameterSet {
    let a = n / 3;
    ParameterSet::from_tensors(vec![
        ("layer.weight".into(), vec![a], (0..a).map(|i| (i as f32 * 0.37).fract()).collect()),
        ("layer.bias".into(), vec![n - a], (a..n).map(|i| (i as f32 * 0.61).fract()).collect()),
    ])
    .unwrap()
}

fn secure_study(rounds: u32, dp: Option<privacy::DpConfig>) -> StudyConfig {
    let mut s = study(rounds, 2, 60);
    s.federation.secure_aggregation = true;
    s.federation.dp = dp;
    s
}

fn wave(site: &str) -> WaveExecutor {
    match site {
        "a" => WaveExecutor { phase: 0.0, samples: 30, pause: Duration::ZERO },
        "b" => WaveExecutor { phase: 1.3, samples: 90, pause: Duration::ZERO },
        _ => WaveExecutor { phase: 2.9, samples: 45, pause: Duration::ZERO },
    }
}

/// Runs `sites` with [`wave`] executors to the end; returns the final model and the server's folder.
async fn run_to_end(
    dir: &Path,
    sites: &[&str],
    study: StudyConfig,
    n: usize,
) -> (ParameterSet, fedhcc_server::RunOutcome) {
    make_certs(dir, sites);
    let mut server = start_server(dir, sites, study, unit_model(n)).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = sites
        .iter()
        .map(|s| tokio::spawn(fedhcc_client::run(client_options(&server, s), wave(s), token.clone())))
        .collect();
    let out = server.join().await;
    for c in clients {
        assert!(c.await.unwrap().unwrap().finished);
    }
    let p = ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    (p, out)
}

#[tokio::test]
async fn the_decoded_sum_equals_plain_fedavg_within_the_fixed_point_error() {
    const ROUNDS: u32 = 3;
    const N: usize = 3000;
    let (plain_dir, secure_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (plain, _) = run_to_end(plain_dir.path(), &["a", "b"], study(ROUNDS, 2, 60), N).await;
    let s = secure_study(ROUNDS, None);
    let fixed = privacy::fixed_point(&s.federation).unwrap().unwrap();
    let (secure, out) = run_to_end(secure_dir.path(), &["a", "b"], s, N).await;
    assert_eq!(out.rounds_completed, ROUNDS);

    // One round, same inputs: the secure path differs from the exact weighted mean by the fixed-point
    // rounding (≤ sites / (2 · scale · total weight)) and one f32 rounding of the mean and of the new
    // value; plain FedAvg by the f32 rounding of its weights, products and two sums. Both stay within
    // 6 f32 epsilons of |w| + AMP. A discrepancy d in the model moves the next update by at most
    // AMP · d (the executor's slope), so over R rounds the bound grows by (1 + AMP)^(R − r).
    let fp = fixed.max_rounding_error(2, 120);
    let eps = f64::from(f32::EPSILON);
    let growth: f64 = (0..ROUNDS).map(|r| (1.0 + f64::from(AMP)).powi(r as i32)).sum();
    let mut worst = (0.0f64, 0.0f64);
    for (i, (p, q)) in plain.values().iter().zip(secure.values()).enumerate() {
        let w = f64::from(p.abs().max(q.abs())) + f64::from(AMP) * f64::from(ROUNDS);
        let tol = growth * (fp + 6.0 * eps * (w + f64::from(AMP)));
        let d = f64::from((p - q).abs());
        assert!(d <= tol, "value {i}: plain {p} vs secure {q}: |Δ| = {d:e} > {tol:e}");
        if d > worst.0 {
            worst = (d, tol);
        }
    }
    eprintln!(
        "secure vs plain FedAvg over {ROUNDS} rounds: max |Δ| = {:e} (bound there {:e}; fixed point alone {fp:e})",
        worst.0, worst.1
    );

    let store = fedhcc_server::store::Store::open(&secure_dir.path().join("state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    assert!(rounds.iter().all(|r| r.secure_aggregation && r.participants == ["a", "b"] && r.epsilon.is_none()));
    assert_eq!(rounds[0].samples, [30, 90], "sample counts travel in the clear");
    let plain_rounds =
        fedhcc_server::store::Store::open(&plain_dir.path().join("state"), "run-1").unwrap().rounds().unwrap();
    assert!(plain_rounds.iter().all(|r| !r.secure_aggregation));
}

#[tokio::test]
async fn a_site_lost_after_masking_restarts_the_round_without_it_and_the_model_is_that_of_the_others() {
    const N: usize = 140_000; // 1.1 MB of masked words: two chunks
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b", "c"]);
    // The study lead starts the run once all three sites are connected, so all three are selected.
    let mut st = secure_study(2, None);
    st.federation.start = fedhcc_core::config::StartMode::Manual;
    let mut server = start_server(tmp.path(), &["a", "b", "c"], st, unit_model(N)).await;
    // c, by hand: it advertises a key, gets the roster, masks its update and starts uploading it,
    // then dies mid-upload.
    let mut c = server.client_as("c").await;
    let mut c_tasks = open_tasks(&mut c).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = ["a", "b"]
        .iter()
        .map(|s| tokio::spawn(fedhcc_client::run(client_options(&server, s), wave(s), token.clone())))
        .collect();
    server.wait_status("three sites connected", |s| s.sites.iter().filter(|x| x.connected).count() == 3).await;
    let c_ = server.certs();
    let lead =
        fedhcc_core::pki::ClientTlsFiles { ca: c_.ca(), cert: c_.admin("lead"), key: c_.admin_key("lead"), crl: None };
    let mut admin = fedhcc_client::transport::connect_admin(&server.target(lead)).await.unwrap();
    admin.control(pb::ControlRequest { command: pb::ControlCommand::Start.into() }).await.unwrap();
    let t = next_train(&mut c_tasks).await;
    assert!(t.secure_aggregation && t.fixed_point.is_some(), "the task says how to encode: {t:?}");
    let tref = t.task.clone().unwrap();
    let keys = fedhcc_secure::secagg::RoundKeys::generate(&mut rand::rng());
    c.advertise_key(pb::KeyAdvertisement { task: Some(tref.clone()), public_key: keys.public_bytes().to_vec().into() })
        .await
        .unwrap();
    let reply = c.await_roster(tref.clone()).await.unwrap().into_inner();
    let names: Vec<&str> = reply.members.iter().map(|m| m.site_id.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let spec = fedhcc_client::secagg::MaskingSpec::from_task(&t.clone().try_into().unwrap()).unwrap();
    let roster =
        fedhcc_client::secagg::roster_from_reply(&tref.clone().into(), &reply.clone().into(), &spec.fixed).unwrap();
    let (payload, _) =
        fedhcc_client::secagg::mask_payload("c", keys, &roster, &spec.fixed, 45, &vec![0.001f32; N]).unwrap();
    let mut header = header_for(&tref, &payload, &unit_model(N).fingerprint().to_hex(), fedhcc_proto::MAX_CHUNK_BYTES);
    header.num_samples = 45;
    header.encoding = fedhcc_proto::ENCODING_SECAGG_U64.into();
    header.roster_digest = roster.digest().to_vec().into();
    header.encoded_weight = 45;
    let first = payload[..fedhcc_proto::MAX_CHUNK_BYTES].to_vec();
    let parts = vec![
        pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) },
        pb::UploadPart { part: Some(pb::upload_part::Part::Chunk(first.into())) },
    ];
    // The second chunk never comes: the stream stays open until c dies.
    let stream = tokio_stream::StreamExt::chain(tokio_stream::iter(parts), tokio_stream::pending());
    let mut c_up = c.clone();
    let upload = tokio::spawn(async move { c_up.upload_update(stream).await });
    server
        .wait_status("a and b masked and uploaded", |s| {
            s.sites.iter().filter(|x| ["a", "b"].contains(&x.site_id.as_str())).all(|x| x.rounds_contributed >= 1)
        })
        .await;
    // c dies: its upload and its connections end.
    upload.abort();
    drop((c, c_tasks));
    let status = server
        .wait_status("the round restarted", |s| s.privacy.as_ref().is_some_and(|p| p.aborted_attempts == 1))
        .await;
    let p = status.privacy.unwrap();
    assert!(p.last_abort.starts_with(&format!("{}: ", tref.task_id)), "{}", p.last_abort);
    assert!(p.last_abort.contains("c dropped out after the key exchange"), "{}", p.last_abort);
    let json = fedhcc_server::status_json(&server.status().await);
    assert_eq!(json["privacy"]["aborted_attempts"], 1);
    assert!(json["privacy"]["last_abort"].as_str().unwrap().contains("masks are in the other sites' updates"));
    let out = server.join().await;
    for h in clients {
        assert!(h.await.unwrap().unwrap().finished);
    }
    assert_eq!(out.rounds_completed, 2);
    let (records, _) = durable_state(&tmp.path().join("state"));
    assert_eq!(records.len(), 2, "no round was committed from the aborted attempt");
    assert_ne!(records[0].task_id, tref.task_id, "round 1 was committed from the restarted attempt");
    assert_eq!(records[0].participants, ["a", "b"]);
    assert!(records.iter().all(|r| r.secure_aggregation && r.participants == ["a", "b"]));

    // The same study with only a and b: the same model, bit for bit (the sums are exact integers).
    let only = tempfile::tempdir().unwrap();
    let (ab, _) = run_to_end(only.path(), &["a", "b"], secure_study(2, None), N).await;
    let mine = ParameterSet::decode(&std::fs::read(&out.final_checkpoint).unwrap()).unwrap();
    assert!(mine.values().iter().zip(ab.values()).all(|(x, y)| x.to_bits() == y.to_bits()), "never a wrong sum");
}

/// The words of a spooled masked update, if it is there.
fn spooled(state: &Path, task: &str, site: &str) -> Option<Vec<u8>> {
    std::fs::read(state.join("spool").join(task).join(format!("{site}.msk"))).ok()
}

#[tokio::test]
async fn the_server_spools_only_masked_words_never_an_update_in_the_clear() {
    const N: usize = 4000;
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let mut server = start_server(tmp.path(), &["a", "b"], secure_study(1, None), unit_model(N)).await;
    let token = CancellationToken::new();
    let ca = tokio::spawn(fedhcc_client::run(client_options(&server, "a"), wave("a"), token.clone()));
    // b trains slowly: a's masked update waits in the spool meanwhile.
    let slow_b = WaveExecutor { pause: Duration::from_secs(2), ..wave("b") };
    let cb = tokio::spawn(fedhcc_client::run(client_options(&server, "b"), slow_b, token.clone()));
    let state = server.state();
    let deadline = Instant::now() + Duration::from_secs(30);
    let words = loop {
        if let Some(w) = spooled(&state, "r1a1", "a").filter(|w| w.len() == N * 8) {
            break w;
        }
        assert!(Instant::now() < deadline, "a's masked update never reached the spool");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Nothing in the spool is an update in the clear.
    for e in walk(&state.join("spool")) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.ends_with(".upd"), "an unmasked update in the spool: {}", e.display());
        assert!(ParameterSet::decode(&std::fs::read(&e).unwrap()).is_err(), "{} decodes as a model", e.display());
    }
    // What a would have sent in the clear: 30 × its delta in fixed point. No masked word equals it.
    let fixed = privacy::fixed_point(&secure_study(1, None).federation).unwrap().unwrap();
    let global = unit_model(N);
    let delta = {
        let trained = wave("a").train(&global, &spec(), &TaskControl::default()).unwrap().params;
        let mut d = trained;
        d.subtract_in_place(&global).unwrap();
        d
    };
    let mut clear = vec![0u64; N];
    fixed.encode(30, delta.values(), &mut clear).unwrap();
    let masked: Vec<u64> = words.chunks(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
    let equal = masked.iter().zip(&clear).filter(|(m, c)| m == c).count();
    assert_eq!(equal, 0, "masked words equal to the clear encoding");
    // Byte frequencies of the masked words: uniform (chi-square, 255 degrees of freedom; the clear
    // encoding is far from it).
    let chi2 = |bytes: &[u8]| {
        let mut counts = [0f64; 256];
        bytes.iter().for_each(|b| counts[*b as usize] += 1.0);
        let e = bytes.len() as f64 / 256.0;
        counts.iter().map(|c| (c - e).powi(2) / e).sum::<f64>()
    };
    let clear_bytes: Vec<u8> = clear.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert!(chi2(&words) < 400.0, "masked bytes are not uniform: χ² = {}", chi2(&words));
    assert!(chi2(&clear_bytes) > 10_000.0, "the test would not notice a clear encoding");
    let out = server.join().await;
    assert!(out.finished);
    ca.await.unwrap().unwrap();
    cb.await.unwrap().unwrap();
}

fn spec() -> TrainSpec {
    TrainSpec {
        round: 1,
        total_rounds: 1,
        local_epochs: 1,
        batch_size: 1,
        learning_rate: 0.1,
        weight_decay: 0.0,
        prox_mu: 0.0,
        seed: 1,
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

#[tokio::test]
async fn bad_keys_and_uploads_are_refused_and_change_nothing() {
    const N: usize = 64;
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], secure_study(1, None), unit_model(N)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let tref = t.task.clone().unwrap();
    let state = server.state();
    let before = durable_state(&state);
    let code = |r: Result<tonic::Response<pb::Ack>, tonic::Status>| r.err().map(|s| s.code());
    let ad = |key: Vec<u8>| pb::KeyAdvertisement { task: Some(tref.clone()), public_key: key.into() };

    // Keys: wrong length, wrong task.
    assert_eq!(code(a.advertise_key(ad(vec![7; 31])).await), Some(tonic::Code::InvalidArgument));
    let mut other = ad(vec![7; 32]);
    other.task.as_mut().unwrap().task_id = "r1a9".into();
    assert_eq!(code(a.advertise_key(other).await), Some(tonic::Code::FailedPrecondition));
    let ka = fedhcc_secure::secagg::RoundKeys::generate(&mut rand::rng());
    a.advertise_key(ad(ka.public_bytes().to_vec())).await.unwrap();
    // b may not reuse a's key.
    assert_eq!(code(b.advertise_key(ad(ka.public_bytes().to_vec())).await), Some(tonic::Code::FailedPrecondition));

    let fp = unit_model(N).fingerprint().to_hex();
    let masked_header = |payload: &[u8], digest: Vec<u8>, weight: u64| {
        let mut h = header_for(&tref, payload, &fp, fedhcc_proto::MAX_CHUNK_BYTES);
        h.encoding = fedhcc_proto::ENCODING_SECAGG_U64.into();
        h.roster_digest = digest.into();
        h.num_samples = 10;
        h.encoded_weight = weight;
        h
    };
    // An update in the clear is refused under secure aggregation.
    let plain = ParameterSet::zeros(unit_model(N).layout().clone()).encode();
    let e = raw_upload(&mut a, header_for(&tref, &plain, &fp, fedhcc_proto::MAX_CHUNK_BYTES), chunks(&plain))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("only masked updates"), "{}", e.message());
    // A masked update before the roster is fixed.
    let words = vec![5u8; N * 8];
    let e = raw_upload(&mut a, masked_header(&words, vec![0; 32], 10), chunks(&words)).await.unwrap_err();
    assert!(e.message().contains("key exchange is still open"), "{}", e.message());

    let kb = fedhcc_secure::secagg::RoundKeys::generate(&mut rand::rng());
    b.advertise_key(ad(kb.public_bytes().to_vec())).await.unwrap();
    let reply = a.await_roster(tref.clone()).await.unwrap().into_inner();
    assert_eq!(reply.members.len(), 2);
    // Masked for another roster, a wrong weight, a wrong length, an unknown encoding.
    let e = raw_upload(&mut a, masked_header(&words, vec![0; 32], 10), chunks(&words)).await.unwrap_err();
    assert!(e.message().contains("another roster"), "{}", e.message());
    let digest = reply.digest.to_vec();
    let e = raw_upload(&mut a, masked_header(&words, digest.clone(), 3), chunks(&words)).await.unwrap_err();
    assert!(e.message().contains("encoded_weight = 3"), "{}", e.message());
    let short = vec![5u8; N * 8 - 8];
    let e = raw_upload(&mut a, masked_header(&short, digest.clone(), 10), chunks(&short)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut odd = masked_header(&words, digest.clone(), 10);
    odd.encoding = "secagg-u32".into();
    assert!(raw_upload(&mut a, odd, chunks(&words)).await.unwrap_err().message().contains("unknown update encoding"));
    // A hash that does not match the bytes.
    let mut lying = masked_header(&words, digest.clone(), 10);
    lying.sha256 = sha(b"something else");
    assert_eq!(raw_upload(&mut a, lying, chunks(&words)).await.unwrap_err().code(), tonic::Code::DataLoss);

    assert_eq!(durable_state(&state), before, "refusals change nothing durable");
    assert!(walk(&state.join("spool")).is_empty(), "nothing was spooled: {:?}", walk(&state.join("spool")));
    let status = server.status().await;
    assert_eq!(status.privacy.unwrap().roster, ["a", "b"]);
    // A well-formed masked update is taken.
    raw_upload(&mut a, masked_header(&words, digest, 10), chunks(&words)).await.unwrap();
    assert!(spooled(&state, &tref.task_id, "a").is_some());
    server.stop().await;
}

#[tokio::test]
async fn dp_reports_epsilon_after_every_round_and_training_stops_at_the_budget() {
    let dp = privacy::DpConfig { noise_multiplier: 1.0, l2_clip: 0.05, delta: 1e-5, epsilon_budget: None };
    let eps = |k: u32| privacy::epsilon_after(&dp, k).unwrap();
    // A budget that admits exactly two rounds.
    let budget = (eps(2) + eps(3)) / 2.0;
    let dp = privacy::DpConfig { epsilon_budget: Some(budget), ..dp };
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = run_to_end(tmp.path(), &["a", "b"], secure_study(5, Some(dp.clone())), 500).await;
    assert!(out.finished);
    assert_eq!(out.rounds_completed, 2, "the budget stops training after round 2 of 5");
    assert!(model.check_finite().is_ok());
    let store = fedhcc_server::store::Store::open(&tmp.path().join("state"), "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    let acc = fedhcc_secure::dp::RdpAccountant::new(1.0).unwrap();
    for r in &rounds {
        let want =
            acc.epsilon_after(u64::from(r.round), 1e-5, fedhcc_secure::dp::Conversion::Balle2020).unwrap().epsilon;
        assert_eq!(r.epsilon, Some(want), "round {}", r.round);
        assert!(r.secure_aggregation);
    }
    assert!(rounds[1].epsilon.unwrap() <= budget && eps(3) > budget);
}

#[tokio::test]
async fn dp_status_shows_epsilon_and_the_rounds_the_budget_allows() {
    let dp = privacy::DpConfig { noise_multiplier: 2.0, l2_clip: 0.05, delta: 1e-5, epsilon_budget: Some(50.0) };
    let allowed = privacy::dp_rounds_allowed(&dp).unwrap().unwrap();
    assert!(allowed > 3);
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let server = start_server(tmp.path(), &["a", "b"], secure_study(3, Some(dp.clone())), unit_model(200)).await;
    let token = CancellationToken::new();
    let slow = |s: &str| WaveExecutor { pause: Duration::from_millis(300), ..wave(s) };
    let ca = tokio::spawn(fedhcc_client::run(client_options(&server, "a"), slow("a"), token.clone()));
    let cb = tokio::spawn(fedhcc_client::run(client_options(&server, "b"), slow("b"), token.clone()));
    let s = server.wait_status("round 1 committed", |s| !s.rounds.is_empty()).await;
    let p = s.privacy.clone().unwrap();
    assert!(p.secure_aggregation && p.dp);
    assert_eq!((p.noise_multiplier, p.l2_clip, p.delta, p.epsilon_budget), (2.0, 0.05, 1e-5, 50.0));
    assert_eq!(p.rounds_allowed, 3, "the study's 3 rounds fit the budget");
    let e1 = privacy::epsilon_after(&dp, 1).unwrap();
    assert_eq!(s.rounds[0].epsilon, Some(e1));
    let json = fedhcc_server::status_json(&s);
    assert_eq!(json["rounds"][0]["epsilon"], e1);
    assert_eq!(json["privacy"]["dp"]["delta"], 1e-5);
    assert_eq!(json["privacy"]["site_weighting"], "equal", "DP's unweighted mean is said, not silent");
    assert_eq!(json["rounds"][0]["secure_aggregation"], true);
    let mut server = server;
    server.join().await;
    ca.await.unwrap().unwrap();
    cb.await.unwrap().unwrap();
}

/// Masks `values` for the train task `t` as `site` would (its keys, the roster the server answers).
async fn mask_for(
    c: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    t: &pb::TrainTask,
    site: &str,
    keys: fedhcc_secure::secagg::RoundKeys,
    values: &[f32],
) -> (pb::UpdateHeader, Vec<u8>) {
    let tref = t.task.clone().unwrap();
    let reply = c.await_roster(tref.clone()).await.unwrap().into_inner();
    let spec = fedhcc_client::secagg::MaskingSpec::from_task(&t.clone().try_into().unwrap()).unwrap();
    let roster = fedhcc_client::secagg::roster_from_reply(&tref.clone().into(), &reply.into(), &spec.fixed).unwrap();
    let (payload, _) = fedhcc_client::secagg::mask_payload(site, keys, &roster, &spec.fixed, 10, values).unwrap();
    let fp = unit_model(values.len()).fingerprint().to_hex();
    let mut header = header_for(&tref, &payload, &fp, fedhcc_proto::MAX_CHUNK_BYTES);
    header.encoding = fedhcc_proto::ENCODING_SECAGG_U64.into();
    header.roster_digest = roster.digest().to_vec().into();
    header.encoded_weight = 10;
    (header, payload)
}

#[tokio::test]
async fn a_restarted_server_never_reuses_a_task_id_and_refuses_an_update_masked_before_the_restart() {
    const N: usize = 64;
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let keys = || fedhcc_secure::secagg::RoundKeys::generate(&mut rand::rng());
    let advertise = |t: &pb::TrainTask, k: &fedhcc_secure::secagg::RoundKeys| pb::KeyAdvertisement {
        task: t.task.clone(),
        public_key: k.public_bytes().to_vec().into(),
    };
    // Before the restart: both sites exchange keys, a masks its update and it is taken; b never
    // uploads, so the round does not close.
    let server = start_server(tmp.path(), &["a", "b"], secure_study(1, None), unit_model(N)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t1 = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let (ka, kb) = (keys(), keys());
    a.advertise_key(advertise(&t1, &ka)).await.unwrap();
    b.advertise_key(advertise(&t1, &kb)).await.unwrap();
    let (old_header, old_payload) = mask_for(&mut a, &t1, "a", ka, &[0.001; N]).await;
    raw_upload(&mut a, old_header.clone(), chunks(&old_payload)).await.unwrap();
    drop((a, b, ta, tb));
    let stopped = server.stop().await;
    assert_eq!(stopped.rounds_completed, 0);

    // After the restart (same state folder), round 1 is announced again under a new task id.
    let server = start_server(tmp.path(), &["a", "b"], secure_study(1, None), unit_model(N)).await;
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    let t2 = next_train(&mut ta).await;
    next_train(&mut tb).await;
    let state = server.state();
    let before = durable_state(&state);
    let (id1, id2) = (&t1.task.as_ref().unwrap().task_id, &t2.task.as_ref().unwrap().task_id);
    assert_eq!(t2.task.as_ref().unwrap().round, 1);
    assert_ne!(id1, id2, "task id {id1} announced again after the restart");

    // The update masked before the restart, resent as it was: its task has closed.
    let e = raw_upload(&mut a, old_header.clone(), chunks(&old_payload)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("task {id1} has closed")), "{}", e.message());
    // New keys, a new roster. The old update relabelled for the new task still carries the roster
    // its masks were made for: refused, since its masks cannot cancel against the new ones.
    let (ka, kb) = (keys(), keys());
    a.advertise_key(advertise(&t2, &ka)).await.unwrap();
    b.advertise_key(advertise(&t2, &kb)).await.unwrap();
    let mut relabelled = old_header.clone();
    relabelled.task = t2.task.clone();
    let e = raw_upload(&mut a, relabelled, chunks(&old_payload)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("masked for another roster"), "{}", e.message());
    assert_eq!(durable_state(&state), before, "refusals change nothing durable");
    assert!(walk(&state.join("spool")).is_empty(), "nothing was spooled: {:?}", walk(&state.join("spool")));
    // Masked for the new roster, both updates are taken and the round commits.
    let (h, p) = mask_for(&mut a, &t2, "a", ka, &[0.001; N]).await;
    raw_upload(&mut a, h, chunks(&p)).await.unwrap();
    let (h, p) = mask_for(&mut b, &t2, "b", kb, &[0.003; N]).await;
    raw_upload(&mut b, h, chunks(&p)).await.unwrap();
    server.wait_status("round 1 committed", |s| s.rounds.len() == 1).await;
    let (records, _) = durable_state(&state);
    assert_eq!(&records[0].task_id, id2);
    assert_eq!(records[0].participants, ["a", "b"]);
    let model = ParameterSet::decode(&std::fs::read(&records[0].checkpoint).unwrap()).unwrap();
    for (v, w) in model.values().iter().zip(unit_model(N).values()) {
        assert!((v - w - 0.002).abs() < 1e-6, "the mean of the two new updates only: {v} vs {w} + 0.002");
    }
    server.stop().await;
}
