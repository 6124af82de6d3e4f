//! The study lead's dashboard: a web page, its JSON and the Prometheus metrics, served over HTTPS
//! (axum over our tokio-rustls acceptor, the server's own certificate, TLS 1.3, HTTP/1.1) on a port
//! of its own, `[dashboard] listen` (127.0.0.1:8443 unless configured).
//!
//! Routes:
//!
//! | path | what | access |
//! |---|---|---|
//! | `/` | the page (HTML; CSS and script under `/assets/`, all embedded in the binary) | token or admin certificate |
//! | `/api/status` | the same JSON as `fedhcc status --json` ([`crate::status_json`]) | token or admin certificate |
//! | `/api/dashboard` | what the page draws ([`dashboard_json`]) | token or admin certificate |
//! | `/metrics` | Prometheus text format ([`crate::metrics`]) | as above, or open with `metrics_public = true` |
//! | `/login` | a form for the token (POST sets the cookie) | open |
//! | `/logout` | clears the cookie | open |
//!
//! **Access.** The token is read from `[dashboard] token_file` (created with 32 random bytes, hex,
//! owner-only, when missing) and may come as the `fedhcc_dashboard` cookie, an
//! `Authorization: Bearer` header (for scrapers), or once as `?token=` on any page, which sets the
//! cookie (HttpOnly, Secure, SameSite=Strict) and redirects to the same page without it, so the
//! token leaves the address bar. Tokens are compared through their SHA-256 digests in constant
//! time. The TLS handshake asks for an optional client certificate from the study CA (revocation
//! list checked): a browser presenting the study lead's admin certificate needs no token; a site
//! certificate grants nothing. Anything else gets 401 (the page: the login form).
//!
//! The page polls `/api/dashboard` every 2 seconds and draws its charts as inline SVG; no request
//! leaves the server, and the content security policy forbids it.
//!
//! Size: the page, its JSON and the Prometheus text, all rendered from the one status view, with
//! the HTTPS listener that serves them. A third of the file is its tests.

use crate::listener::Revocable;
use crate::state::{Shared, lock, now_unix};
use crate::{ServerError, listener, status_json, status_reply};
use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use fedhcc_core::config::DashboardConfig;
use fedhcc_core::pki::{self, PeerIdentity, PkiError, Role, ServerTlsFiles};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

pub mod cross_center;

/// Name of the cookie that carries the token.
pub const COOKIE: &str = "fedhcc_dashboard";
/// Shortest token accepted from a token file.
pub const MIN_TOKEN_LEN: usize = 16;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const LOGIN_HTML: &str = include_str!("dashboard/login.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Everything that applies to every response: no external resource may load, no framing, no
/// caching of study data.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The dashboard, ready to serve: its TLS configuration and the token.
pub struct Dashboard {
    tls: rustls::ServerConfig,
    files: ServerTlsFiles,
    token: String,
    token_path: PathBuf,
    metrics_public: bool,
    /// How often the revocation list is checked (the server's `revocation_check_s`).
    revocation_check: std::time::Duration,
}

impl Dashboard {
    /// Reads (or creates) the token file and builds the TLS configuration.
    ///
    /// # Errors
    /// Unreadable TLS files, or a token file that cannot be read, written or used.
    pub fn prepare(
        cfg: &DashboardConfig,
        tls: &ServerTlsFiles,
        state_dir: &Path,
        revocation_check: std::time::Duration,
    ) -> Result<Self, ServerError> {
        let token_path = cfg.token_path(state_dir);
        let token = load_or_create_token(&token_path)?;
        Ok(Self {
            tls: tls_config(tls)?,
            files: tls.clone(),
            token,
            token_path,
            metrics_public: cfg.metrics_public,
            revocation_check,
        })
    }

    /// Serves the dashboard on `listener` until the server shuts down (tasks on the server's
    /// tracker, stopped by its token).
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub fn spawn(self, listener: TcpListener, shared: Arc<Shared>) -> Result<(), ServerError> {
        let addr = listener.local_addr().map_err(|e| ServerError::Io(format!("dashboard listener: {e}")))?;
        tracing::info!(
            url = %format!("https://{addr}/"),
            token_file = %self.token_path.display(),
            metrics_public = self.metrics_public,
            "dashboard listening (open it with ?token=<the token in the file>, or with the admin certificate)"
        );
        let (tx, rx) = mpsc::channel(16);
        let token = shared.shutdown.clone();
        shared.tracker.spawn(listener::accept_loop_with(
            listener,
            self.tls,
            self.files,
            tls_config,
            self.revocation_check,
            tx,
            token.clone(),
            shared.tracker.clone(),
        ));
        let app =
            router(Arc::clone(&shared), &self.token, self.metrics_public).into_make_service_with_connect_info::<Peer>();
        let listener = TlsListener { rx, local: addr };
        shared.tracker.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(token.clone().cancelled_owned());
            // An open browser connection must not hold the server up after shutdown.
            tokio::select! {
                r = serve.into_future() => if let Err(e) = r { tracing::error!(error = %e, "dashboard stopped") },
                _ = async { token.cancelled().await; tokio::time::sleep(crate::SHUTDOWN_GRACE).await } => {}
            }
        });
        Ok(())
    }
}

/// The dashboard's rustls configuration: the server's certificate, TLS 1.3, HTTP/1.1, and an
/// optional client certificate from the study CA (revocation list checked) so the admin
/// certificate can stand in for the token.
///
/// # Errors
/// Unreadable or invalid files.
pub fn tls_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::load_certs(&files.ca)? {
        roots.add(c).map_err(|e| PkiError::Tls(format!("{}: {e}", files.ca.display())))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .with_crls(pki::load_crls(&files.crl)?)
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(format!("dashboard client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki::load_certs(&files.cert)?, pki::load_key(&files.key)?)
        .map_err(|e| PkiError::Tls(format!("{}: {e}", files.cert.display())))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Reads the dashboard token from `path`, or creates the file with a fresh random token (64 hex
/// digits, owner-only) when it does not exist.
///
/// # Errors
/// The file cannot be read or written, or holds no usable token (at least [`MIN_TOKEN_LEN`]
/// characters of letters, digits and `-_.~+/=`).
pub fn load_or_create_token(path: &Path) -> Result<String, ServerError> {
    let err = |m: String| ServerError::Io(format!("dashboard token file {}: {m}", path.display()));
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() < MIN_TOKEN_LEN {
                return Err(err(format!(
                    "the token is {} characters long; use at least {MIN_TOKEN_LEN} (or delete the file to get a new one)",
                    token.len()
                )));
            }
            if let Some(c) = token.chars().find(|c| !token_char(*c)) {
                return Err(err(format!("the token contains {c:?}; use letters, digits and -_.~+/= only")));
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(m) = std::fs::metadata(path)
                    && m.permissions().mode() & 0o077 != 0
                {
                    tracing::warn!(file = %path.display(), "the dashboard token file is readable by others; chmod 600 it");
                }
            }
            Ok(token.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rustls::crypto::ring::default_provider()
                .secure_random
                .fill(&mut bytes)
                .map_err(|_| err("no random numbers from the operating system".into()))?;
            let token = hex::encode(bytes);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its folder: {e}")))?;
            }
            pki::write_atomic(path, format!("{token}\n").as_bytes(), true).map_err(|e| err(e.to_string()))?;
            tracing::info!(file = %path.display(), "created a new dashboard token");
            Ok(token)
        }
        Err(e) => Err(err(format!("cannot read: {e}"))),
    }
}

fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.~+/=".contains(c)
}

/// Who is on the other end of a dashboard connection: the address, and the identity of the client
/// certificate if one was presented and verified.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub identity: Option<PeerIdentity>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, conn) = stream.io().get_ref().get_ref();
        let identity = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| pki::peer_identity(c).ok());
        Peer { addr: Some(*stream.remote_addr()), identity }
    }
}

/// The finished TLS connections of the accept loop, as an axum listener.
pub struct TlsListener {
    rx: mpsc::Receiver<Result<Revocable<TlsStream<TcpStream>>, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Revocable<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(Ok(s)) => {
                    let Ok(addr) = s.get_ref().get_ref().0.peer_addr() else { continue };
                    return (s, addr);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "dashboard connection failed"),
                // The accept loop ended (shutdown): nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The token's digest and who else may enter.
struct Auth {
    digest: [u8; 32],
    study_id: String,
}

impl Auth {
    /// Constant-time comparison of the digests, so the time taken says nothing about the token.
    fn token_ok(&self, presented: &str) -> bool {
        let d = Sha256::digest(presented.as_bytes());
        let diff = d.iter().zip(self.digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    /// The request carries the token (cookie or bearer header) or comes with the admin
    /// certificate of this study.
    fn allows(&self, headers: &HeaderMap, peer: Option<&Peer>) -> bool {
        let admin = peer
            .and_then(|p| p.identity.as_ref())
            .is_some_and(|id| id.role == Role::Admin && id.study == self.study_id);
        admin
            || bearer(headers).is_some_and(|t| self.token_ok(t))
            || cookie(headers, COOKIE).is_some_and(|t| self.token_ok(&t))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn form_value(encoded: &[u8], key: &str) -> Option<String> {
    form_urlencoded::parse(encoded).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    auth: Arc<Auth>,
}

/// The dashboard's routes for `shared`, with `token` as the access token. `metrics_public` serves
/// `/metrics` without it. (Public so tests can drive it without TLS; [`Dashboard::spawn`] serves it.)
pub fn router(shared: Arc<Shared>, token: &str, metrics_public: bool) -> Router {
    let auth =
        Arc::new(Auth { digest: Sha256::digest(token.as_bytes()).into(), study_id: shared.study.study_id.clone() });
    let state = AppState { shared, auth };
    let mut protected = Router::new()
        .route("/", get(page))
        .route("/api/status", get(api_status))
        .route("/api/dashboard", get(api_dashboard));
    let mut open = Router::new()
        .route("/login", get(login_page).post(login).layer(DefaultBodyLimit::max(4096)))
        .route("/logout", get(logout))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }));
    if metrics_public {
        open = open.route("/metrics", get(metrics));
    } else {
        protected = protected.route("/metrics", get(metrics));
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(state.clone(), guard));
    protected
        .merge(open)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
        .layer(middleware::map_response(security_headers))
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Lets a request through when it is allowed; turns `?token=` into the cookie; answers 401 otherwise.
async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(t) = req.uri().query().and_then(|q| form_value(q.as_bytes(), "token")) {
        return if st.auth.token_ok(&t) {
            with_cookie(req.uri().path(), &t)
        } else {
            tracing::warn!("dashboard: wrong token in the address");
            unauthorized(req.uri().path(), "That token is not the dashboard's token.")
        };
    }
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| &c.0);
    if st.auth.allows(req.headers(), peer) { next.run(req).await } else { unauthorized(req.uri().path(), "") }
}

/// 401: the login form for the page, a short text for the API and metrics.
fn unauthorized(path: &str, message: &str) -> Response {
    if path == "/" {
        (StatusCode::UNAUTHORIZED, html_headers(), login_html(message)).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"fedhcc dashboard\"")],
            "the dashboard needs its token (cookie, Authorization: Bearer, or ?token=) or the admin certificate\n",
        )
            .into_response()
    }
}

fn login_html(message: &str) -> String {
    LOGIN_HTML.replace("{{MESSAGE}}", message)
}

fn html_headers() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

/// 303 to `path` with the token cookie set.
fn with_cookie(path: &str, token: &str) -> Response {
    // The token holds only cookie-safe characters (checked when it was read).
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict");
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            let location = if path.starts_with('/') && !path.starts_with("//") { path } else { "/" };
            let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, location.to_string())]).into_response();
            res.headers_mut().insert(header::SET_COOKIE, v);
            res
        }
        Err(_) => (StatusCode::BAD_REQUEST, "the token cannot be stored in a cookie\n").into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    (html_headers(), INDEX_HTML).into_response()
}

async fn login_page() -> Response {
    (html_headers(), login_html("")).into_response()
}

async fn login(State(st): State<AppState>, body: Bytes) -> Response {
    match form_value(&body, "token") {
        Some(t) if st.auth.token_ok(t.trim()) => with_cookie("/", t.trim()),
        _ => {
            tracing::warn!("dashboard: wrong token at the login form");
            (StatusCode::UNAUTHORIZED, html_headers(), login_html("That token is not the dashboard's token."))
                .into_response()
        }
    }
}

async fn logout() -> Response {
    let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("fedhcc_dashboard=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
    );
    res
}

/// Runs `f` (which reads the store) off the async threads and answers with its JSON.
async fn json_of(shared: Arc<Shared>, f: fn(&Shared) -> serde_json::Value) -> Response {
    match tokio::task::spawn_blocking(move || f(&shared)).await {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard: building the status failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "the status could not be built; see the server log\n").into_response()
        }
    }
}

async fn api_status(State(st): State<AppState>) -> Response {
    json_of(st.shared, |s| status_json(&status_reply(s))).await
}

async fn api_dashboard(State(st): State<AppState>) -> Response {
    json_of(st.shared, dashboard_json).await
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render(&st.shared))
        .into_response()
}

/// Everything the page draws: `status` (exactly `/api/status`), what each site announced at join,
/// each committed round with every site's training loss, the evaluation reports (AUC, C-index, …
/// per site and round), the event log, secure aggregation and DP (`privacy`, as in the status;
/// `null` when the study uses neither), and the cross-center matrices of
/// `<state_dir>/cross-center.json` (`cross_center`, see [`cross_center`]; `null` when there is no
/// usable file).
pub fn dashboard_json(shared: &Shared) -> serde_json::Value {
    use serde_json::json;
    let status = status_json(&status_reply(shared));
    let completed = lock(&shared.coord).completed_rounds();
    let sites: Vec<serde_json::Value> = shared
        .allowed_site_infos()
        .into_iter()
        .map(|(s, i)| {
            json!({
                "site_id": s,
                "client_version": i.client_version,
                "samples": i.samples,
                "refusals": i.refusals,
            })
        })
        .collect();
    let (rounds, evaluations, store_error) = {
        let store = lock(&shared.store);
        let rounds = store.rounds();
        let evals = store.evaluations();
        let error = rounds.as_ref().err().or(evals.as_ref().err()).map(ToString::to_string);
        (rounds.unwrap_or_default(), evals.unwrap_or_default(), error)
    };
    if let Some(e) = &store_error {
        tracing::error!(error = %e, "dashboard: reading the round records failed");
    }
    let rounds: Vec<serde_json::Value> = rounds
        .iter()
        .map(|r| {
            let losses: serde_json::Map<String, serde_json::Value> =
                r.participants.iter().zip(&r.losses).map(|(s, l)| (s.clone(), json!(l))).collect();
            let samples: serde_json::Map<String, serde_json::Value> =
                r.participants.iter().zip(&r.samples).map(|(s, n)| (s.clone(), json!(n))).collect();
            json!({
                "round": r.round,
                "attempt": r.attempt,
                "losses": losses,
                "samples": samples,
                "failures": r.failures.iter().map(|(s, why)| json!({"site_id": s, "reason": why})).collect::<Vec<_>>(),
                "duration_s": r.duration_s,
                "aggregate_s": r.aggregate_s,
                "committed_unix": r.committed_unix,
                "secure_aggregation": r.secure_aggregation,
                "epsilon": r.epsilon,
            })
        })
        .collect();
    // Pooled AUC per evaluation task, from the sites' score histograms.
    let pooled_evaluations = crate::evaluation::pooled_aucs(&evaluations);
    let evaluations: Vec<serde_json::Value> = evaluations
        .iter()
        .map(|e| {
            let metrics: serde_json::Map<String, serde_json::Value> =
                e.metrics.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"round": e.round, "site_id": e.site, "samples": e.samples, "metrics": metrics})
        })
        .collect();
    let f = &shared.study.federation;
    json!({
        "status": status,
        "rounds_completed": completed,
        "strategy": f.strategy,
        "min_sites": f.min_sites,
        "evaluate_every": f.evaluate_every,
        "round_timeout_s": f.round_timeout_s,
        "sites": sites,
        "rounds": rounds,
        "evaluations": evaluations,
        "pooled_evaluations": pooled_evaluations,
        "events": shared.events.recent(),
        "cross_center": cross_center::dashboard_value(&shared.state_dir),
        // Secure aggregation and DP (ε spent, budget, last aborted attempt); null when neither is on.
        "privacy": if f.secure_aggregation || f.dp.is_some() {
            crate::status::privacy_status_json(Some(&crate::status::privacy_status(shared)))
        } else {
            serde_json::Value::Null
        },
        "store_error": store_error,
        "generated_unix": now_unix(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RefusalReason;
    use crate::state::SiteInfo;
    use crate::store::{EvaluationRecord, RoundRecord};
    use axum::body::Body;
    use tower::ServiceExt;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn shared(dir: &Path) -> Arc<Shared> {
        crate::state::test_shared(dir, mpsc::unbounded_channel().0)
    }

    async fn call(app: &Router, req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn get_req(uri: &str) -> axum::http::request::Builder {
        axum::http::Request::builder().uri(uri)
    }

    #[tokio::test]
    async fn without_the_token_pages_answer_401_and_the_page_is_a_login_form() {
        let tmp = tempfile::tempdir().unwrap();
        let app = router(shared(tmp.path()), TOKEN, false);
        for path in ["/api/status", "/api/dashboard", "/metrics"] {
            let (code, h, _) = call(&app, get_req(path).body(Body::empty()).unwrap()).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
            assert!(h.contains_key(header::WWW_AUTHENTICATE), "{path}");
        }
        let (code, h, body) = call(&app, get_req("/").body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(body.contains("<form") && body.contains("name=\"token\""), "{body}");
        assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("default-src 'none'"));
        let wrong = get_req("/api/status").header("authorization", "Bearer 0123456789abcdef0123456789abcdeX");
        assert_eq!(call(&app, wrong.body(Body::empty()).unwrap()).await.0, StatusCode::UNAUTHORIZED);
        let (code, _, _) = call(&app, get_req("/?token=nope").body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        // Static assets carry no study data.
        let (code, h, body) = call(&app, get_req("/assets/app.js").body(Body::empty()).unwrap()).await;
        assert_eq!(
            (code, h[header::CONTENT_TYPE].to_str().unwrap()),
            (StatusCode::OK, "text/javascript; charset=utf-8")
        );
        assert!(body.contains("/api/dashboard"));
        assert_eq!(call(&app, get_req("/nothing").body(Body::empty()).unwrap()).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_token_in_the_address_or_the_form_becomes_an_http_only_cookie() {
        let tmp = tempfile::tempdir().unwrap();
        let app = router(shared(tmp.path()), TOKEN, false);
        let (code, h, _) = call(&app, get_req(&format!("/?token={TOKEN}")).body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/");
        let set = h[header::SET_COOKIE].to_str().unwrap();
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        let cookie = set.split(';').next().unwrap().to_string();
        let (code, _, body) = call(&app, get_req("/").header("cookie", &cookie).body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("id=\"sites\"") && body.contains("/assets/app.js"), "{body}");

        let form = |t: &str| {
            axum::http::Request::post("/login")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(format!("token={t}")))
                .unwrap()
        };
        let (code, h, _) = call(&app, form(TOKEN)).await;
        assert_eq!(code, StatusCode::SEE_OTHER);
        assert!(h[header::SET_COOKIE].to_str().unwrap().starts_with(&format!("{COOKIE}={TOKEN};")));
        let (code, _, body) = call(&app, form("wrong-token-wrong-token")).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(body.contains("not the dashboard's token"), "{body}");
        let (code, h, _) = call(&app, get_req("/logout").body(Body::empty()).unwrap()).await;
        assert_eq!(code, StatusCode::SEE_OTHER);
        assert!(h[header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    }

    #[tokio::test]
    async fn the_admin_certificate_of_this_study_stands_in_for_the_token_and_a_site_certificate_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let app = router(shared(tmp.path()), TOKEN, false);
        let with = |role: Role, study: &str| {
            let id = PeerIdentity { name: "lead".into(), role, study: study.into(), not_after_unix: 0 };
            let mut req = get_req("/api/status").body(Body::empty()).unwrap();
            req.extensions_mut().insert(ConnectInfo(Peer { addr: None, identity: Some(id) }));
            req
        };
        assert_eq!(call(&app, with(Role::Admin, "s")).await.0, StatusCode::OK);
        assert_eq!(call(&app, with(Role::Site, "s")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&app, with(Role::Admin, "other-study")).await.0, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn api_status_is_the_status_json_and_the_dashboard_json_has_losses_evaluations_and_events() {
        let tmp = tempfile::tempdir().unwrap();
        let sh = shared(tmp.path());
        sh.sites.lock().unwrap().insert(
            "a".into(),
            SiteInfo { connections: 1, client_version: "fedhcc/1".into(), samples: 120, ..Default::default() },
        );
        let rec: RoundRecord = serde_json::from_value(serde_json::json!({
            "round": 1, "attempt": 1, "task_id": "r1a1", "participants": ["a", "b"], "samples": [120, 80],
            "losses": [0.5, null], "failures": [], "duration_s": 1.5, "aggregate_s": 0.01, "bytes_in": 10,
            "bytes_out": 20, "checkpoint": "c", "checkpoint_sha256": "x", "committed_unix": 1,
        }))
        .unwrap();
        sh.store.lock().unwrap().commit_round(&rec).unwrap();
        let ev = EvaluationRecord {
            round: 1,
            task_id: "e1a1".into(),
            site: "b".into(),
            samples: 30,
            metrics: vec![("auc".into(), 0.75), ("c_index".into(), 0.66)],
            summary: None,
        };
        sh.store.lock().unwrap().record_evaluation(&ev).unwrap();
        sh.refused(Some("b"), RefusalReason::Duplicate, "a second update for r1a1");
        let app = router(Arc::clone(&sh), TOKEN, false);
        let auth = |p: &str| get_req(p).header("authorization", format!("Bearer {TOKEN}")).body(Body::empty()).unwrap();

        let (code, h, body) = call(&app, auth("/api/status")).await;
        assert_eq!((code, h[header::CONTENT_TYPE].to_str().unwrap()), (StatusCode::OK, "application/json"));
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, status_json(&status_reply(&sh)));
        assert_eq!(status["rounds"][0]["mean_train_loss"], 0.5);
        assert_eq!(status["sites"][1]["last_refusal"], "a second update for r1a1");

        let (code, _, body) = call(&app, auth("/api/dashboard")).await;
        assert_eq!(code, StatusCode::OK);
        let d: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(d["status"], status);
        assert_eq!(d["rounds"][0]["losses"], serde_json::json!({"a": 0.5, "b": null}));
        assert_eq!(d["evaluations"][0]["metrics"]["c_index"], 0.66);
        assert_eq!(d["sites"][0]["client_version"], "fedhcc/1");
        assert_eq!((d["sites"][0]["samples"].as_u64(), d["sites"][1]["refusals"].as_u64()), (Some(120), Some(1)));
        assert_eq!(d["events"][0]["kind"], "refusal");
        assert!(d["cross_center"].is_null() && d["privacy"].is_null());
    }

    #[tokio::test]
    async fn metrics_parse_as_prometheus_text_and_move_with_the_server() {
        let tmp = tempfile::tempdir().unwrap();
        let sh = shared(tmp.path());
        let app = router(Arc::clone(&sh), TOKEN, true);
        let scrape = || async {
            let (code, h, body) = call(&app, get_req("/metrics").body(Body::empty()).unwrap()).await;
            assert_eq!(code, StatusCode::OK, "metrics_public: no token needed");
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
            crate::metrics::parse_text(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
        };
        let before = scrape().await;
        assert_eq!(before["fedhcc_rounds_planned"], 3.0);
        assert_eq!(before["fedhcc_phase{phase=waiting_for_sites}"], 1.0);
        assert_eq!(before["fedhcc_refused_requests_total{reason=duplicate}"], 0.0);
        assert_eq!(before["fedhcc_info{run_id=run-1,study_id=s}"], 1.0);
        sh.metrics.round_committed(2.5, 0.02);
        sh.refused(Some("a"), RefusalReason::Duplicate, "again");
        sh.bytes_in.store(100, std::sync::atomic::Ordering::Relaxed);
        sh.metrics.task_closed(1000, 50);
        let after = scrape().await;
        assert_eq!(after["fedhcc_round_duration_seconds_count"], 1.0);
        assert_eq!(after["fedhcc_round_duration_seconds_bucket{le=5}"], 1.0);
        assert_eq!(after["fedhcc_round_duration_seconds_bucket{le=2}"], 0.0);
        assert_eq!(after["fedhcc_aggregation_seconds_sum"], 0.02);
        assert_eq!(after["fedhcc_refused_requests_total{reason=duplicate}"], 1.0);
        assert_eq!((after["fedhcc_received_bytes_total"], after["fedhcc_sent_bytes_total"]), (1100.0, 50.0));
        // Without metrics_public the token is needed.
        let closed = router(sh, TOKEN, false);
        assert_eq!(call(&closed, get_req("/metrics").body(Body::empty()).unwrap()).await.0, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_token_file_is_created_owner_only_then_reused_and_a_bad_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("sub/dashboard.token");
        let t = load_or_create_token(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(load_or_create_token(&p).unwrap(), t);
        std::fs::write(&p, "short\n").unwrap();
        let e = load_or_create_token(&p).unwrap_err().to_string();
        assert!(e.contains("dashboard.token") && e.contains("at least 16"), "{e}");
        std::fs::write(&p, "0123456789abcdef;0123\n").unwrap();
        let e = load_or_create_token(&p).unwrap_err().to_string();
        assert!(e.contains("';'"), "{e}");
    }

    #[test]
    fn the_cross_center_file_is_passed_on_when_present_and_null_when_absent_or_malformed() {
        let tmp = tempfile::tempdir().unwrap();
        let sh = shared(tmp.path());
        let path = tmp.path().join(cross_center::FILE_NAME);
        let warned = || cross_center::WARNED.lock().unwrap().get(&path).cloned();
        assert!(dashboard_json(&sh)["cross_center"].is_null(), "no file: no panel");
        assert_eq!(cross_center::read(&path), Ok(None));

        std::fs::write(
            &path,
            r#"{"metric": "auc", "note": "local-only models and the federated one",
                "rows": [{"trained_on": "a", "evaluated_at": {"a": 0.71, "b": null}},
                         {"trained_on": "federated", "evaluated_at": {"a": 0.74, "b": 0.6875}}],
                "secondary": [{"metric": "c_index_rfs", "rows": [{"trained_on": "a", "evaluated_at": {"b": 0.61}}]}]}"#,
        )
        .unwrap();
        let cc = dashboard_json(&sh)["cross_center"].clone();
        assert_eq!(
            (cc["metric"].as_str(), cc["note"].as_str()),
            (Some("auc"), Some("local-only models and the federated one"))
        );
        assert_eq!(cc["rows"][0], serde_json::json!({"trained_on": "a", "evaluated_at": {"a": 0.71, "b": null}}));
        assert_eq!(cc["rows"][1]["evaluated_at"]["b"], 0.6875);
        assert_eq!(cc["secondary"][0]["metric"], "c_index_rfs");
        assert_eq!(cc["secondary"][0]["rows"][0]["evaluated_at"], serde_json::json!({"b": 0.61}));
        // The report's own format (no secondary matrices) is read as it is.
        std::fs::write(&path, r#"{"metric": "auc", "rows": []}"#).unwrap();
        assert_eq!(
            dashboard_json(&sh)["cross_center"],
            serde_json::json!({"metric": "auc", "rows": [], "secondary": []})
        );

        let too_large = format!("{{\"metric\": \"auc\", \"rows\": [], \"note\": \"{}\"}}", "x".repeat(1 << 20));
        for (bad, says) in [
            ("{\"metric\": \"auc\", \"rows\": [", "EOF"),
            ("[1, 2, 3]", "expected"),
            (r#"{"metric": "auc"}"#, "missing field `rows`"),
            (r#"{"metric": "auc", "rows": [{"trained_on": "a", "evaluated_at": {"b": "0.7"}}]}"#, "invalid type"),
            (r#"{"metric": "auc", "rows": [], "colums": []}"#, "unknown field `colums`"),
            (
                r#"{"metric": "auc", "rows": [], "secondary": [{"metric": "c", "rows": [], "x": 1}]}"#,
                "unknown field `x`",
            ),
            (too_large.as_str(), "larger than 1024 KiB"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = cross_center::read(&path).unwrap_err();
            assert!(e.contains(&path.display().to_string()) && e.contains(says), "{says}: {e}");
            assert!(dashboard_json(&sh)["cross_center"].is_null(), "{e}");
            assert_eq!(warned(), Some(e), "logged once per problem");
        }
        // A folder in its place cannot be read either; a fixed file clears the warning.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(cross_center::read(&path).is_err());
        assert!(dashboard_json(&sh)["cross_center"].is_null());
        std::fs::remove_dir(&path).unwrap();
        assert!(dashboard_json(&sh)["cross_center"].is_null());
        assert_eq!(warned(), None);
    }

    #[test]
    fn tokens_are_compared_whole() {
        let auth = Auth { digest: Sha256::digest(TOKEN.as_bytes()).into(), study_id: "s".into() };
        assert!(auth.token_ok(TOKEN));
        assert!(!auth.token_ok(&TOKEN[..31]));
        assert!(!auth.token_ok(&format!("{TOKEN}0")));
        assert!(!auth.token_ok(""));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("x=1; fedhcc_dashboard=abc; y=2"));
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
    }
}
