//! The study lead's dashboard and the operators' status commands, end to end: a live server with
//! two clients over mutual TLS, the dashboard loaded in headless Chromium (driven over the DevTools
//! protocol on a pipe) while rounds complete, `/metrics` and `/api/status` over raw HTTPS, and the
//! `fedhcc status` / `fedhcc client status` commands.
//!
//! Chromium is required: Debian's `chromium` package (`apt-get install -y chromium`; `.ci/run`
//! installs it), or the browser named by `FEDHCC_CHROMIUM`.

use crate::harness::*;
use fedhcc_client::{EvalResult, Executor, ExecutorError, TaskControl, TrainResult, TrainSpec};
use fedhcc_core::config::{DashboardConfig, StudyConfig};
use fedhcc_core::params::{Fingerprint, ParameterSet};
use fedhcc_core::pki::ClientTlsFiles;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "e2e-dashboard-token-0123456789";
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A gated executor: each round trains only when the test opens the gate for it, so the test can
// look at the page between rounds.

/// Steps the test has allowed: training round r waits for `r`; the evaluation after the last
/// round waits for `rounds + 1`.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<u32>, Condvar)>);

impl Gate {
    fn open(&self, step: u32) {
        *self.0.0.lock().unwrap() = step;
        self.0.1.notify_all();
    }
    fn wait(&self, step: u32, ctl: &TaskControl) -> Result<(), ExecutorError> {
        let mut g = self.0.0.lock().unwrap();
        while *g < step {
            if ctl.is_cancelled() {
                return Err(ExecutorError("cancelled".into()));
            }
            g = self.0.1.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
        }
        Ok(())
    }
}

struct GatedExecutor {
    gate: Gate,
    rounds: u32,
    /// Per-site offset so the chart lines differ.
    offset: f64,
    last_round: u32,
}

impl Executor for GatedExecutor {
    fn fingerprint(&self) -> Option<Fingerprint> {
        None
    }
    fn num_samples(&self) -> u64 {
        100 + (self.offset * 100.0) as u64
    }
    fn train(&mut self, global: &ParameterSet, s: &TrainSpec, ctl: &TaskControl) -> Result<TrainResult, ExecutorError> {
        ctl.report_progress(0, 2);
        self.gate.wait(s.round, ctl)?;
        ctl.report_progress(2, 2);
        self.last_round = s.round;
        let mut p = global.clone();
        p.values_mut().iter_mut().for_each(|v| *v += 0.5);
        let loss = 0.7 - 0.1 * f64::from(s.round) + self.offset;
        Ok(TrainResult { params: p, num_samples: self.num_samples(), metrics: vec![("train_loss".into(), loss)] })
    }
    fn evaluate(&mut self, _g: &ParameterSet, _split: &str, ctl: &TaskControl) -> Result<EvalResult, ExecutorError> {
        if self.last_round == self.rounds {
            self.gate.wait(self.rounds + 1, ctl)?;
        }
        let r = f64::from(self.last_round);
        Ok(EvalResult {
            num_samples: 40,
            metrics: vec![
                ("auc".into(), 0.6 + 0.08 * r - self.offset),
                ("c_index".into(), 0.55 + 0.06 * r - self.offset),
            ],
            summary: None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A server with its dashboard on 127.0.0.1:0.

pub(crate) struct Live {
    pub(crate) server: TestServer,
    pub(crate) dashboard: std::net::SocketAddr,
}

pub(crate) async fn start_with_dashboard(dir: &Path, sites: &[&str], study: StudyConfig) -> Live {
    make_certs(dir, sites);
    std::fs::write(dir.join("dashboard.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.join("study.toml"), toml::to_string(&study).unwrap()).unwrap();
    let mut config = server_config(dir, sites);
    config.dashboard = Some(DashboardConfig {
        listen: "127.0.0.1:0".into(),
        token_file: Some(dir.join("dashboard.token")),
        metrics_public: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dash = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, dashboard) = (listener.local_addr().unwrap(), dash.local_addr().unwrap());
    let token = tokio_util::sync::CancellationToken::new();
    let opts = fedhcc_server::ServerOptions { config, study, initial_model: model(64) };
    let handle = tokio::spawn(fedhcc_server::run_with_dashboard(listener, Some(dash), opts, token.clone()));
    Live { server: TestServer { dir: dir.to_path_buf(), addr, token, handle: Some(handle) }, dashboard }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTPS/1.1 requests (the dashboard's own TLS: study CA, optional client certificate).

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: String,
}

pub(crate) async fn https_get(
    live: &Live,
    path: &str,
    headers: &[(&str, &str)],
    cert: Option<ClientTlsFiles>,
) -> Reply {
    let certs = live.server.certs();
    let mut roots = rustls::RootCertStore::empty();
    for c in fedhcc_core::pki::load_certs(&certs.ca()).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                fedhcc_core::pki::load_certs(&c.cert).unwrap(),
                fedhcc_core::pki::load_key(&c.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(live.dashboard).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("TLS to the dashboard");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after a complete response; what was read counts.
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut raw)).await.expect("reply in time");
    let text = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body =
        if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") { dechunk(body) } else { body.to_string() };
    Reply { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn metrics(live: &Live) -> BTreeMap<String, f64> {
    let r = https_get(live, "/metrics", &[("Authorization", &format!("Bearer {TOKEN}"))], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    fedhcc_server::metrics::parse_text(&r.body)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{}", r.body))
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium over the DevTools protocol on a pipe (fd 3 in, fd 4 out; NUL-separated JSON).

fn chromium() -> PathBuf {
    const INSTALL: &str = "install it with `apt-get install -y chromium` (Debian; .ci/run does this), or set \
                           FEDHCC_CHROMIUM to a Chrome/Chromium binary";
    if let Some(p) = std::env::var_os("FEDHCC_CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "the dashboard test needs headless Chromium; FEDHCC_CHROMIUM={} is not a file: {INSTALL}",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("the dashboard test needs headless Chromium and none was found on PATH: {INSTALL}");
}

struct Browser {
    child: tokio::process::Child,
    to: tokio::process::ChildStdin,
    from: BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session: String,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and opens `url` in a new page.
    async fn open(url: &str) -> Browser {
        let exe = chromium();
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let mut cmd = tokio::process::Command::new("sh");
        // `exec` keeps the process id; the redirections give Chromium our pipes as fds 3 and 4.
        cmd.arg("-c")
            .arg("exec \"$@\" 3<&0 4>&1 0</dev/null 1>/dev/null")
            .arg("sh")
            .arg(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--ignore-certificate-errors",
                "--remote-debugging-pipe",
                "--window-size=1366,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        let mut b = Browser { child, to, from, next_id: 0, session: String::new(), log, _profile: profile };
        let target = b.call("Target.createTarget", json!({ "url": url }), false).await;
        let id = target["targetId"].as_str().expect("target id").to_string();
        let attached = b.call("Target.attachToTarget", json!({ "targetId": id, "flatten": true }), false).await;
        b.session = attached["sessionId"].as_str().expect("session id").to_string();
        b
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Sends one DevTools command (to the page's session if `on_page`) and returns its result.
    async fn call(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if on_page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).await.unwrap();
        self.to.flush().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut buf = Vec::new();
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.from.read_until(0, &mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!("no DevTools answer to {method} in 30 s; Chromium log:\n{}", self.log_tail())
                })
                .unwrap();
            assert!(n > 0, "Chromium exited; its log:\n{}", self.log_tail());
            buf.pop_if(|b| *b == 0);
            let v: Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value (JSON).
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true }), true).await;
        r["result"]["value"].clone()
    }

    /// What the test reads off the page.
    async fn page(&mut self) -> Value {
        const STATE: &str = r#"(() => {
            const t = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
            const rows = [...document.querySelectorAll('#sites tbody tr')];
            const cells = (sel) => [...document.querySelectorAll(sel)]
                .map((r) => [...r.children].map((c) => c.textContent));
            return {
                url: location.href,
                round: t('round'), completed: t('rounds-completed'), phase: t('phase'),
                sites: rows.map((r) => ({
                    site: r.dataset.site,
                    connected: r.querySelector('.connected').textContent,
                    rounds: r.querySelector('.rounds').textContent,
                    samples: r.querySelector('.samples').textContent,
                })),
                loss_points: document.querySelectorAll('#chart-loss circle').length,
                auc_points: document.querySelectorAll('#chart-auc circle').length,
                cross_center: t('cross-center'), privacy: t('privacy'),
                matrices: [...document.querySelectorAll('#cross-center h3')].map((h) => h.textContent),
                matrix_cells: cells('#cross-center table.matrix tr'), privacy_cells: cells('#privacy tr'),
                events: document.querySelectorAll('#events li').length,
                external: performance.getEntriesByType('resource').map((e) => e.name)
                    .filter((n) => !n.startsWith(location.origin)),
            };
        })()"#;
        self.eval(STATE).await
    }

    /// Polls the page until `pred` holds (panics with the last state after [`WAIT`]).
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.page().await;
            if pred(&p) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the dashboard to show {what}; last page state: {p:#}\nChromium log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// A PNG of the whole page; returns (bytes, width, height).
    async fn screenshot(&mut self) -> (Vec<u8>, u32, u32) {
        use base64::Engine;
        let m = self.call("Page.getLayoutMetrics", json!({}), true).await;
        let (w, h) = (m["cssContentSize"]["width"].as_f64().unwrap(), m["cssContentSize"]["height"].as_f64().unwrap());
        let clip = json!({ "x": 0, "y": 0, "width": w.max(1366.0), "height": h, "scale": 1 });
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "clip": clip, "captureBeyondViewport": true }),
                true,
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let dim = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
        let (pw, ph) = (dim(16), dim(20));
        (png, pw, ph)
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.call("Browser.close", json!({}), false)).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn site_row<'a>(page: &'a Value, site: &str) -> &'a Value {
    page["sites"].as_array().and_then(|s| s.iter().find(|r| r["site"] == site)).unwrap_or(&Value::Null)
}

fn all_sites(page: &Value, f: impl Fn(&Value) -> bool) -> bool {
    page["sites"].as_array().is_some_and(|s| s.len() == 2 && s.iter().all(f))
}

// ---------------------------------------------------------------------------------------------

/// The browser test: the page of a live server with two clients shows the site table and the
/// round counter, and both follow the rounds as they complete; a screenshot is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_in_chromium_follows_a_live_run_with_two_sites() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = study(3, 2, 60);
    s.federation.evaluate_every = 1;
    let live = start_with_dashboard(tmp.path(), &["center_a", "center_b"], s).await;

    // Counters before any round, over the dashboard's own TLS.
    let m0 = metrics(&live).await;
    assert_eq!(m0["fedhcc_rounds_completed_total"], 0.0);
    assert_eq!(m0["fedhcc_round_duration_seconds_count"], 0.0);

    let mut browser = Browser::open(&format!("https://127.0.0.1:{}/?token={TOKEN}", live.dashboard.port())).await;
    let p = browser.wait_for("the site table before anyone joined", |p| all_sites(p, |r| r["connected"] == "no")).await;
    assert_eq!(p["url"], json!(format!("https://127.0.0.1:{}/", live.dashboard.port())), "the token left the URL");
    assert_eq!((p["round"].as_str(), p["completed"].as_str()), (Some("1"), Some("0")));

    let gate = Gate::default();
    let mut clients = Vec::new();
    for (i, site) in ["center_a", "center_b"].into_iter().enumerate() {
        let mut opts = client_options(&live.server, site);
        opts.state_dir = Some(tmp.path().join(format!("state-{site}")));
        let exec = GatedExecutor { gate: gate.clone(), rounds: 3, offset: 0.05 * i as f64, last_round: 0 };
        clients.push(tokio::spawn(fedhcc_client::run(opts, exec, tokio_util::sync::CancellationToken::new())));
    }
    let p = browser
        .wait_for("both sites connected, training round 1", |p| {
            all_sites(p, |r| r["connected"] == "yes") && p["phase"] == "training" && p["completed"] == "0"
        })
        .await;
    assert_eq!(site_row(&p, "center_b")["samples"], "105", "{p:#}");

    // While round 1 is held, each client says what it is doing.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let st = fedhcc_client::status::read(&tmp.path().join("state-center_a")).ok();
        match st {
            Some(st) if st.state == "training" && st.progress.is_some() => break st,
            st => assert!(Instant::now() < deadline, "status.json never showed training progress: {st:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((status.round, status.total_rounds), (1, 3));
    assert_eq!(status.progress.unwrap().total, 2);

    for round in 1..=3u32 {
        gate.open(round);
        let want = round.to_string();
        let p = browser
            .wait_for(&format!("round {round} completed in the counter and the site table"), |p| {
                p["completed"] == want.as_str() && all_sites(p, |r| r["rounds"] == want.as_str())
            })
            .await;
        assert_eq!(p["loss_points"].as_u64(), Some(u64::from(round) * 3), "global + 2 sites per round: {p:#}");
        if round == 1 {
            let m1 = metrics(&live).await;
            assert_eq!(m1["fedhcc_rounds_completed_total"], 1.0);
            assert_eq!(m1["fedhcc_round_duration_seconds_count"], 1.0);
            assert_eq!(m1["fedhcc_aggregation_seconds_count"], 1.0);
            assert!(m1["fedhcc_received_bytes_total"] >= 2.0 * 256.0, "two updates of 64 f32: {m1:?}");
            assert!(m1["fedhcc_sent_bytes_total"] > m0["fedhcc_sent_bytes_total"]);
            assert_eq!(m1["fedhcc_connected_sites"], 2.0);
        }
    }
    // Rounds 1 and 2 were evaluated; round 3's evaluation is held: two AUC points per site.
    let p = browser.wait_for("two evaluations per site", |p| p["auc_points"].as_u64() == Some(4)).await;
    assert!(p["cross_center"].as_str().unwrap().contains("Not available yet"), "{p:#}");
    assert_eq!(
        p["privacy_cells"],
        json!([
            ["Secure aggregation", "off: the server receives each site's update (encrypted in transit by mutual TLS)"],
            ["Differential privacy", "off: no noise is added, no ε is spent"],
        ]),
        "the privacy panel is a table of sentences, not JSON: {p:#}"
    );
    assert!(p["events"].as_u64().unwrap() > 5, "{p:#}");
    assert_eq!(p["external"], json!([]), "the page loads nothing from elsewhere");

    // A cross-center matrix put in the state folder appears as tables: a row per model, a column
    // per site (the study's order), 3 decimals, "–" where a model was not evaluated.
    std::fs::write(
        tmp.path().join("state/cross-center.json"),
        r#"{"metric": "auc", "note": "local-only models and the federated one",
            "rows": [{"trained_on": "center_a", "evaluated_at": {"center_b": 0.64, "center_a": 0.7149}},
                     {"trained_on": "center_b", "evaluated_at": {"center_a": null, "center_b": 0.7}},
                     {"trained_on": "federated", "evaluated_at": {"center_a": 0.73, "center_b": 0.69}}],
            "secondary": [{"metric": "c_index_rfs", "rows": [{"trained_on": "federated",
                           "evaluated_at": {"center_a": 0.66, "center_b": 0.61}}]}]}"#,
    )
    .unwrap();
    let p =
        browser.wait_for("the cross-center tables", |p| p["matrices"].as_array().is_some_and(|m| m.len() == 2)).await;
    assert_eq!(p["matrices"], json!(["AUC", "C-index (RFS)"]));
    let corner = "trained on ↓ · evaluated at →";
    assert_eq!(
        p["matrix_cells"],
        json!([
            [corner, "center_a", "center_b"],
            ["center_a", "0.715", "0.640"],
            ["center_b", "–", "0.700"],
            ["federated", "0.730", "0.690"],
            [corner, "center_a", "center_b"],
            ["federated", "0.660", "0.610"],
        ]),
        "{p:#}"
    );
    assert!(p["cross_center"].as_str().unwrap().contains("local-only models and the federated one"), "{p:#}");

    let (png, w, h) = browser.screenshot().await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    println!("dashboard screenshot: {} ({w}x{h} px)", shot.display());
    browser.close().await;

    gate.open(4);
    for c in clients {
        let out = tokio::time::timeout(WAIT, c).await.expect("client ends").unwrap().expect("client ok");
        assert!(out.finished);
    }
    let mut server = live.server;
    let outcome = server.join().await;
    assert!(outcome.finished);
    assert_eq!(outcome.rounds_completed, 3);
    let st = fedhcc_client::status::read(&tmp.path().join("state-center_b")).unwrap();
    assert_eq!((st.state.as_str(), st.rounds_trained, st.evaluations), ("finished", 3, 3));
}

/// Who gets in: no token → 401 (the page: a login form); a site certificate → 401; the admin
/// certificate or the token → in. `/api/status` is what `fedhcc status --json` prints, and that
/// command works with the admin certificate and is refused with a site certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_access_and_the_status_command_need_the_admin_role() {
    let tmp = tempfile::tempdir().unwrap();
    let live = start_with_dashboard(tmp.path(), &["center_a"], study(2, 1, 60)).await;
    let certs = live.server.certs();
    let site =
        ClientTlsFiles { ca: certs.ca(), cert: certs.site("center_a"), key: certs.site_key("center_a"), crl: None };
    let admin = ClientTlsFiles { ca: certs.ca(), cert: certs.admin("lead"), key: certs.admin_key("lead"), crl: None };

    let r = https_get(&live, "/", &[], None).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("<form") && r.headers["content-security-policy"].contains("default-src 'none'"));
    assert_eq!(https_get(&live, "/api/status", &[], None).await.status, 401);
    assert_eq!(https_get(&live, "/api/status", &[], Some(site.clone())).await.status, 401);
    assert_eq!(https_get(&live, "/metrics", &[], Some(site.clone())).await.status, 401);
    let by_cert = https_get(&live, "/api/status", &[], Some(admin.clone())).await;
    assert_eq!(by_cert.status, 200, "{}", by_cert.body);
    let r = https_get(&live, &format!("/?token={TOKEN}"), &[], None).await;
    assert_eq!(r.status, 303);
    let cookie = r.headers["set-cookie"].split(';').next().unwrap().to_string();
    assert!(r.headers["set-cookie"].contains("HttpOnly"));
    let by_cookie = https_get(&live, "/api/status", &[("Cookie", &cookie)], None).await;
    assert_eq!(by_cookie.status, 200);
    let api: Value = serde_json::from_str(&by_cookie.body).unwrap();
    assert_eq!(api, serde_json::from_str::<Value>(&by_cert.body).unwrap());

    // The CLI over gRPC with the admin certificate prints the same JSON; with a site certificate
    // it is refused and says why.
    let write_admin = |name: &str, tls: &ClientTlsFiles| {
        let p = tmp.path().join(name);
        let cfg = fedhcc_core::config::AdminConfig {
            server: live.server.url(),
            server_name: "localhost".into(),
            tls: tls.clone(),
        };
        std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
        p.display().to_string()
    };
    let (as_admin, as_site) = (write_admin("admin.toml", &admin), write_admin("site-as-admin.toml", &site));
    let cli = tokio::task::spawn_blocking(move || json(&["status", "--config", &as_admin, "--json"])).await.unwrap();
    assert_eq!(cli, api);
    assert_eq!((cli["phase"].as_str(), cli["total_rounds"].as_u64()), (Some("waiting_for_sites"), Some(2)));
    let (ok, _, err) = tokio::task::spawn_blocking(move || fedhcc(&["status", "--config", &as_site])).await.unwrap();
    assert!(!ok);
    assert!(err.contains("admin certificate") && err.contains("center_a"), "{err}");
    let m = metrics(&live).await;
    assert_eq!(m["fedhcc_refused_requests_total{reason=not_admin}"], 1.0);
    live.server.stop().await;
}

/// `fedhcc client status` reads what the client wrote, in text and JSON; `fedhcc client --config`
/// still starts a client (here it fails on the missing file, which shows how it parsed).
#[test]
fn client_status_prints_the_status_file_for_the_site_operator() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("study.toml"), toml::to_string(&study(5, 1, 60)).unwrap()).unwrap();
    let site = tmp.path().join("site.toml");
    std::fs::write(
        &site,
        "site_id = \"center_a\"\nserver = \"https://127.0.0.1:1\"\nserver_name = \"localhost\"\n\
         study = \"study.toml\"\ndata_dir = \"data\"\nstate_dir = \"state\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key.pem\"\n",
    )
    .unwrap();
    let site = site.display().to_string();
    let (ok, _, err) = fedhcc(&["client", "status", "--config", &site]);
    assert!(!ok && err.contains("status.json") && err.contains("has not run"), "{err}");
    let st = fedhcc_client::status::ClientStatus {
        site_id: "center_a".into(),
        state: "training".into(),
        detail: "round 2: training locally (4 epochs)".into(),
        round: 2,
        total_rounds: 5,
        rounds_trained: 1,
        evaluations: 0,
        progress: Some(fedhcc_client::status::Progress { done: 3, total: 4, unit: "epochs".into() }),
        last_error: Some("server unreachable: connection refused".into()),
        last_error_unix: Some(fedhcc_client::status::now_unix()),
        started_unix: 1,
        pid: 1,
        updated_unix: fedhcc_client::status::now_unix(),
    };
    fedhcc_client::status::write(&tmp.path().join("state"), &st).unwrap();
    let (ok, out, err) = fedhcc(&["client", "status", "--config", &site]);
    assert!(ok, "{err}");
    for want in ["Site center_a: training", "progress: 3 of 4 epochs (75%)", "last error", "connection refused"] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let v = json(&["client", "status", "--config", &site, "--json"]);
    assert_eq!(v, serde_json::to_value(&st).unwrap());
    // The client itself still parses as before.
    let (ok, _, err) = fedhcc(&["client", "--config", "/nonexistent/site.toml"]);
    assert!(!ok && err.contains("/nonexistent/site.toml") && err.contains("cannot read"), "{err}");
    let (ok, _, err) = fedhcc(&["client"]);
    assert!(!ok && err.contains("--config"), "{err}");
}
