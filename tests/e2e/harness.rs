//! Test helpers: a fresh study CA per test, a server `run(...)` future on 127.0.0.1:0 with real
//! mutual TLS, raw protocol clients for each identity, and deterministic executors.

use fedhcc_core::config::{FederationConfig, ServerConfig, StudyConfig, TrainingConfig};
use fedhcc_core::params::ParameterSet;
use fedhcc_core::pki::{self, CertDir, ClientTlsFiles, ServerTlsFiles};
use fedhcc_proto as pb;
pub use fedhcc_site::executor::NoiseExecutor;
use pb::federation_client::FederationClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const STUDY: &str = "test-study";

pub fn study(rounds: u32, min_sites: usize, timeout_s: u64) -> StudyConfig {
    StudyConfig {
        study_id: STUDY.into(),
        run_id: "run-1".into(),
        federation: FederationConfig {
            rounds,
            min_sites,
            round_timeout_s: timeout_s,
            evaluate_every: 0,
            strategy: "fedavg".into(),
            secure_aggregation: false,
            secure_aggregation_params: None,
            dp: None,
            server_optimizer: None,
            trimmed_mean: None,
            fedbn: None,
            start: Default::default(),
            max_site_samples: None,
        },
        training: TrainingConfig::default(),
        model: Default::default(),
        cohort: Default::default(),
        imaging: Default::default(),
        evaluation: Default::default(),
    }
}

/// A model of `n` values `0, 1, 2, …` in two tensors.
pub fn model(n: usize) -> ParameterSet {
    let a = n / 2;
    ParameterSet::from_tensors(vec![
        ("layer.weight".into(), vec![a], (0..a).map(|i| i as f32).collect()),
        ("layer.bias".into(), vec![n - a], (a..n).map(|i| i as f32).collect()),
    ])
    .unwrap()
}

pub struct TestServer {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub token: CancellationToken,
    pub handle: Option<JoinHandle<Result<fedhcc_server::RunOutcome, fedhcc_server::ServerError>>>,
}

impl TestServer {
    pub fn certs(&self) -> CertDir {
        CertDir::new(self.dir.join("certs"))
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
    pub fn site_tls(&self, site: &str) -> ClientTlsFiles {
        let c = self.certs();
        ClientTlsFiles { ca: c.ca(), cert: c.site(site), key: c.site_key(site), crl: None }
    }
    pub fn target(&self, tls: ClientTlsFiles) -> fedhcc_client::ServerTarget {
        fedhcc_client::ServerTarget { url: self.url(), server_name: "localhost".into(), tls }
    }
    pub async fn client_as(&self, site: &str) -> FederationClient<Channel> {
        fedhcc_client::transport::connect(&self.target(self.site_tls(site))).await.expect("channel")
    }
    pub async fn admin(&self) -> FederationClient<Channel> {
        let c = self.certs();
        let tls = ClientTlsFiles { ca: c.ca(), cert: c.admin("lead"), key: c.admin_key("lead"), crl: None };
        fedhcc_client::transport::connect(&self.target(tls)).await.expect("channel")
    }
    pub async fn status(&self) -> pb::StatusReply {
        self.admin().await.status(pb::StatusRequest {}).await.expect("status").into_inner()
    }
    /// Waits (retrying until a deadline) for the status to satisfy `pred`.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&pb::StatusReply) -> bool) -> pb::StatusReply {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}; last status: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    pub async fn stop(mut self) -> fedhcc_server::RunOutcome {
        self.token.cancel();
        self.join().await
    }
    pub async fn join(&mut self) -> fedhcc_server::RunOutcome {
        let h = self.handle.take().expect("server handle");
        tokio::time::timeout(Duration::from_secs(60), h).await.expect("server stops").expect("join").expect("server ok")
    }
}

/// Makes a certificate directory for `sites` (+ admin "lead") under `dir/certs`.
pub fn make_certs(dir: &Path, sites: &[&str]) {
    let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
    pki::init(&dir.join("certs"), STUDY, "localhost", &sites, Some("lead"), 2).expect("certs");
}

pub fn server_config(dir: &Path, allowed: &[&str]) -> ServerConfig {
    let c = CertDir::new(dir.join("certs"));
    ServerConfig {
        study: dir.join("study.toml"),
        listen: "127.0.0.1:0".into(),
        state_dir: dir.join("state"),
        tls: ServerTlsFiles { ca: c.ca(), cert: c.server(), key: c.server_key(), crl: c.crl() },
        allowed_sites: allowed.iter().map(|s| s.to_string()).collect(),
        keep_checkpoints: 3,
        dashboard: None,
        revocation_check_s: 60,
    }
}

/// Starts a server `run(...)` on 127.0.0.1:0 in this runtime.
pub async fn start_server(dir: &Path, allowed: &[&str], study: StudyConfig, initial: ParameterSet) -> TestServer {
    start_server_with(dir, server_config(dir, allowed), study, initial).await
}

/// [`start_server`] with a server configuration of the test's own.
pub async fn start_server_with(
    dir: &Path,
    config: ServerConfig,
    study: StudyConfig,
    initial: ParameterSet,
) -> TestServer {
    if let Ok(filter) = std::env::var("FEDHCC_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let opts = fedhcc_server::ServerOptions { config, study, initial_model: initial };
    let handle = tokio::spawn(fedhcc_server::run(listener, opts, token.clone()));
    TestServer { dir: dir.to_path_buf(), addr, token, handle: Some(handle) }
}

pub fn client_options(server: &TestServer, site: &str) -> fedhcc_client::ClientOptions {
    fedhcc_client::ClientOptions {
        site_id: site.into(),
        study_id: STUDY.into(),
        run_id: "run-1".into(),
        target: server.target(server.site_tls(site)),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        give_up_after: Some(Duration::from_secs(60)),
        state_dir: None,
        policy: Default::default(),
    }
}

/// The site's executor of the federation tests (`fedhcc-site`'s, as `bench rounds` runs it): every
/// value moved by exactly `delta`, so the expected FedAvg is known to the last bit; `pause`
/// simulates training time.
pub fn shifting(delta: f32, samples: u64, pause: Duration) -> NoiseExecutor {
    NoiseExecutor::shift(delta, samples).with_pause(pause)
}

/// Opens a site's WaitTask stream (the site counts as connected from here on).
pub async fn open_tasks(c: &mut FederationClient<Channel>) -> tonic::Streaming<pb::TaskEvent> {
    c.wait_task(pb::WaitTaskRequest { study_id: STUDY.into(), run_id: "run-1".into() }).await.unwrap().into_inner()
}

/// The next train task on a site's stream.
pub async fn next_train(s: &mut tonic::Streaming<pb::TaskEvent>) -> pb::TrainTask {
    loop {
        let ev =
            tokio::time::timeout(Duration::from_secs(30), s.message()).await.expect("a task in time").unwrap().unwrap();
        if let Some(pb::task_event::Event::Train(t)) = ev.event {
            return t;
        }
    }
}

pub fn sha(b: &[u8]) -> String {
    fedhcc_core::params::sha256_hex(b)
}

/// Sends a hand-made upload: `header` then `chunks`.
pub async fn raw_upload(
    c: &mut FederationClient<Channel>,
    header: pb::UpdateHeader,
    chunks: Vec<Vec<u8>>,
) -> Result<pb::UploadReply, tonic::Status> {
    let mut msgs = vec![pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) }];
    msgs.extend(chunks.into_iter().map(|c| pb::UploadPart { part: Some(pb::upload_part::Part::Chunk(c.into())) }));
    c.upload_update(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

/// A well-formed header for `payload` answering `task`.
pub fn header_for(task: &pb::TaskRef, payload: &[u8], fingerprint: &str, chunk: usize) -> pb::UpdateHeader {
    pb::UpdateHeader {
        task: Some(task.clone()),
        model_fingerprint: fingerprint.into(),
        num_samples: 10,
        total_bytes: payload.len() as u64,
        sha256: sha(payload),
        chunks: payload.len().div_ceil(chunk) as u32,
        metrics: vec![],
        ..Default::default()
    }
}

pub fn chunks(payload: &[u8]) -> Vec<Vec<u8>> {
    payload.chunks(fedhcc_proto::MAX_CHUNK_BYTES).map(<[u8]>::to_vec).collect()
}

/// Everything durable about a server: committed rounds and checkpoint files (name, bytes hash).
pub fn durable_state(state: &Path) -> (Vec<fedhcc_server::store::RoundRecord>, Vec<(String, String)>) {
    let store = fedhcc_server::store::Store::open(state, "run-1").unwrap();
    let rounds = store.rounds().unwrap();
    let mut files: Vec<(String, String)> = std::fs::read_dir(state.join("checkpoints"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), sha(&std::fs::read(e.path()).unwrap()))
        })
        .collect();
    files.sort();
    (rounds, files)
}

/// The `fedhcc` binary under test.
pub const FEDHCC_BIN: &str = env!("CARGO_BIN_EXE_fedhcc");

/// Runs `fedhcc args…` (log level warn): (success, stdout, stderr).
pub fn fedhcc(args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(FEDHCC_BIN).args(args).env("FEDHCC_LOG", "warn").output().expect("runs fedhcc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `fedhcc args…`, which must succeed and print JSON.
pub fn json(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = fedhcc(args);
    assert!(ok, "fedhcc {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("fedhcc {args:?}: not JSON ({e}): {stdout}"))
}

/// The keys every `stats.json` holds (`fedhcc stats`, `fedhcc validate`; `fedhcc_stats::report::StatsReport`).
pub const STATS_JSON_KEYS: [&str; 22] = [
    "n",
    "n_labelled",
    "n_positive",
    "n_events",
    "auc",
    "brier",
    "calibration",
    "cutoff",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "c_index_harrell",
    "c_index_uno",
    "logrank",
    "cox",
    "km",
    "td_auc",
    "net_benefit",
    "notes",
    "cutoff_source",
    "roc",
];

/// Asserts that `stats` has every key of [`STATS_JSON_KEYS`].
pub fn assert_stats_json_keys(stats: &serde_json::Value) {
    for key in STATS_JSON_KEYS {
        assert!(stats.get(key).is_some(), "stats.json lacks '{key}'");
    }
}

/// `fedhcc synth --clinical-only`: `patients` synthetic patients over `centers` centers in `out/<center>/`.
pub fn synth_clinical(out: &Path, centers: usize, patients: usize, seed: u64) {
    let (centers, patients, seed) = (centers.to_string(), patients.to_string(), seed.to_string());
    let args =
        ["synth", "--out", out.to_str().unwrap(), "--centers", &centers, "--patients", &patients, "--seed", &seed];
    let (ok, _, stderr) = fedhcc(&[&args[..], &["--clinical-only"]].concat());
    assert!(ok, "fedhcc synth: {stderr}");
}

/// A site configuration for `site` in a test folder: study `study.toml`, data `cohort/<site>`, state
/// `site-state/<site>`, certificates from `certs/`, the server at 127.0.0.1:`port`.
pub fn site_config_text(site: &str, port: u16) -> String {
    format!(
        "site_id = \"{site}\"\nserver = \"https://127.0.0.1:{port}\"\nserver_name = \"localhost\"\nstudy = \"study.toml\"\n\
         data_dir = \"cohort/{site}\"\nstate_dir = \"site-state/{site}\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/site-{site}.pem\"\nkey = \"certs/site-{site}.key.pem\"\n"
    )
}

/// Runs `fedhcc args…` (log level warn): (exit code, stdout, stderr).
pub fn fedhcc_code(args: &[&str]) -> (Option<i32>, String, String) {
    let out =
        std::process::Command::new(FEDHCC_BIN).args(args).env("FEDHCC_LOG", "warn").output().expect("runs fedhcc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
