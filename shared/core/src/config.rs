//! Configuration files: study, server, site and admin.
//!
//! Two stages, as in ripgrep: serde reads the TOML as written (`deny_unknown_fields`, defaults for
//! what may be left out), then `load_*` resolves relative paths against the file's own folder and
//! checks ranges. An error names the file and, for TOML syntax, the line and column.
//!
//! The `model` and `cohort` sections of a study are kept as TOML tables here and typed by the crates
//! that own them (`fedhcc-model`, `fedhcc-cohort`), so this crate stays free of both.

use crate::aggregation::{FedBnConfig, ServerOptimizerConfig, TrimmedMeanConfig, check_strategy};
use crate::pki::{ClientTlsFiles, ServerTlsFiles, validate_name};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Self { path: path.to_path_buf(), message: message.into() }
    }
}

/// Reads and parses a TOML file.
///
/// # Errors
/// Unreadable file, or TOML that does not match `T` (with line and column).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(path, e.to_string().trim_end().to_string()))
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."))
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = normalize(&base.join(&*p));
    }
}

/// Removes `.` and `name/..` lexically, so messages show `site/data` rather than
/// `site/configs/../data`.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

/// How the federation runs: rounds, quorum, timeouts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// Training rounds in the run.
    pub rounds: u32,
    /// Fewest sites that must answer for a round to be aggregated (and to start one).
    #[serde(default = "default_min_sites")]
    pub min_sites: usize,
    /// Seconds a round waits for its selected sites before closing with those that answered.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_s: u64,
    /// Evaluate the global model on every site's held-out split every k rounds (0 = only at the end).
    #[serde(default)]
    pub evaluate_every: u32,
    /// Aggregation strategy: `fedavg`, `fedprox`, `fedadam`, `fedyogi`, `fedbn`, `median` or
    /// `trimmed_mean` (see [`crate::aggregation`]).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Secure aggregation (pairwise masking, [`crate::privacy`]): the server learns only the sum of
    /// the sites' updates. Refused with the robust strategies (median, trimmed mean), which need each
    /// update in the clear.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Fixed-point encoding and key exchange of secure aggregation
    /// (`[federation.secure_aggregation_params]`); defaults when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation_params: Option<crate::privacy::SecureAggregationParams>,
    /// Differential privacy (`[federation.dp]`): per-site L2 clipping and Gaussian noise, ε reported
    /// after every round; needs secure aggregation. Off when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<crate::privacy::DpConfig>,
    /// FedAdam / FedYogi settings (`[federation.server_optimizer]`); defaults when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_optimizer: Option<ServerOptimizerConfig>,
    /// Trimmed-mean settings (`[federation.trimmed_mean]`); defaults when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trimmed_mean: Option<TrimmedMeanConfig>,
    /// FedBN settings (`[federation.fedbn]`); defaults when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fedbn: Option<FedBnConfig>,
    /// When the server announces the run's first task: `auto` (default) as soon as `min_sites`
    /// sites are connected, `manual` only after the study lead's `fedhcc admin start`.
    #[serde(default)]
    pub start: StartMode,
    /// The most training patients a site may declare (its FedAvg weight): a join or an update
    /// declaring more is refused, so that no site can outweigh the others by what it claims. Set it
    /// from the sites' data checks (e.g. twice the largest center). Unset: 10⁹.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_site_samples: Option<u64>,
}

impl FederationConfig {
    /// The most training patients a site may declare ([`Self::max_site_samples`], at most 10⁹).
    pub fn site_sample_limit(&self) -> u64 {
        self.max_site_samples.unwrap_or(1_000_000_000).min(1_000_000_000)
    }
}

/// `[federation] start`: whether a fresh run waits for the study lead's start command.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Start as soon as enough sites are connected.
    #[default]
    Auto,
    /// Wait for `fedhcc admin start` (sites may connect meanwhile).
    Manual,
}

fn default_min_sites() -> usize {
    2
}
fn default_round_timeout() -> u64 {
    600
}
fn default_strategy() -> String {
    "fedavg".into()
}

/// Local training hyper-parameters sent with every train task.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    #[serde(default = "default_epochs")]
    pub local_epochs: u32,
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// FedProx proximal term μ (0 = plain local training).
    #[serde(default)]
    pub prox_mu: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: default_epochs(),
            batch_size: default_batch(),
            learning_rate: default_lr(),
            weight_decay: 0.0,
            prox_mu: 0.0,
            seed: default_seed(),
        }
    }
}

fn default_epochs() -> u32 {
    2
}
fn default_batch() -> u32 {
    32
}
fn default_lr() -> f64 {
    1e-2
}
fn default_seed() -> u64 {
    20240730
}

/// The study protocol: identical at the server and every site.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    pub study_id: String,
    #[serde(default = "default_run")]
    pub run_id: String,
    pub federation: FederationConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    /// Model definition, typed by `fedhcc-model`.
    #[serde(default)]
    pub model: toml::Table,
    /// Cohort definition (features, label, outcomes), typed by `fedhcc-cohort`.
    #[serde(default)]
    pub cohort: toml::Table,
    /// Imaging preprocessing (`[imaging.mri]`, `[imaging.wsi]`), typed where the imaging crate is used.
    #[serde(default)]
    pub imaging: toml::Table,
    /// How sites summarise the global model on their held-out split (`[evaluation]`); defaults when
    /// left out.
    #[serde(default)]
    pub evaluation: EvaluationConfig,
}

/// `[evaluation]` of the study: what every site's evaluation summary is made of (federated
/// evaluation, `fedhcc validate`). The minimum cell size is the site's own (`[policy]
/// min_group_size`), not the study's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// The frozen cut-off (`score >= cutoff` is high risk). Absent: each site uses Youden's cut-off
    /// on its own training split, and the evaluation report proposes their weighted mean to freeze
    /// here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<f64>,
    /// Survival times are rounded up to multiples of this many days before they leave a site.
    #[serde(default = "default_time_grid")]
    pub time_grid_days: f64,
    /// Bins of the score histograms on [0, 1] (pooled AUC within about one bin width).
    #[serde(default = "default_histogram_bins")]
    pub histogram_bins: usize,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self { cutoff: None, time_grid_days: default_time_grid(), histogram_bins: default_histogram_bins() }
    }
}

fn default_time_grid() -> f64 {
    30.0
}
fn default_histogram_bins() -> usize {
    1000
}

fn default_run() -> String {
    "run-1".into()
}

/// Reads and checks a study configuration.
///
/// # Errors
/// Unreadable or invalid file, or a value out of range.
pub fn load_study(path: &Path) -> Result<StudyConfig, ConfigError> {
    let cfg: StudyConfig = read_toml(path)?;
    validate_name("study", &cfg.study_id).map_err(|e| ConfigError::new(path, e.to_string()))?;
    validate_name("run", &cfg.run_id).map_err(|e| ConfigError::new(path, e.to_string()))?;
    let f = &cfg.federation;
    if f.rounds == 0 || f.rounds > 100_000 {
        return Err(ConfigError::new(path, format!("federation.rounds = {} (1 to 100000 allowed)", f.rounds)));
    }
    if f.min_sites == 0 {
        return Err(ConfigError::new(path, "federation.min_sites must be at least 1"));
    }
    if f.round_timeout_s == 0 {
        return Err(ConfigError::new(path, "federation.round_timeout_s must be at least 1"));
    }
    if let Some(m) = f.max_site_samples
        && !(1..=1_000_000_000).contains(&m)
    {
        return Err(ConfigError::new(path, format!("federation.max_site_samples = {m} (1 to 1000000000 allowed)")));
    }
    let t = &cfg.training;
    if t.local_epochs == 0 || t.batch_size == 0 || !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
        return Err(ConfigError::new(path, "training: local_epochs, batch_size and learning_rate must be positive"));
    }
    if t.prox_mu < 0.0 || t.weight_decay < 0.0 {
        return Err(ConfigError::new(path, "training: prox_mu and weight_decay must not be negative"));
    }
    check_strategy(&cfg).map_err(|e| ConfigError::new(path, e))?;
    let e = &cfg.evaluation;
    if let Some(c) = e.cutoff
        && !(0.0..=1.0).contains(&c)
    {
        return Err(ConfigError::new(path, format!("evaluation.cutoff = {c}: a predicted probability in [0, 1]")));
    }
    if !(e.time_grid_days >= 1.0 && e.time_grid_days <= 3650.0) {
        return Err(ConfigError::new(
            path,
            format!("evaluation.time_grid_days = {}: 1 to 3650 days allowed", e.time_grid_days),
        ));
    }
    if !(10..=10_000).contains(&e.histogram_bins) {
        return Err(ConfigError::new(
            path,
            format!("evaluation.histogram_bins = {}: 10 to 10000 allowed", e.histogram_bins),
        ));
    }
    Ok(cfg)
}

/// The aggregation server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The study protocol file.
    pub study: PathBuf,
    /// Address to listen on, e.g. `127.0.0.1:50051` or `[::]:50051`.
    pub listen: String,
    /// Where the database, checkpoints and spooled updates live.
    pub state_dir: PathBuf,
    pub tls: ServerTlsFiles,
    /// Site ids (certificate common names) allowed to join.
    pub allowed_sites: Vec<String>,
    /// Checkpoints kept on disk (the newest; at least 1).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// The study lead's web dashboard and Prometheus metrics (`[dashboard]`); off when the table is
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<DashboardConfig>,
    /// How often (seconds) the revocation list file is checked for changes; a connection whose
    /// certificate it revokes is cut at that check, open or not (1 to 3600, default 60).
    #[serde(default = "default_revocation_check")]
    pub revocation_check_s: u64,
}

fn default_revocation_check() -> u64 {
    60
}

fn default_keep() -> usize {
    3
}

/// `[dashboard]` of the server configuration: a web page and `/metrics` over HTTPS with the
/// server's own certificate, on a port of its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Address to listen on; loopback unless configured otherwise (reach it through an SSH tunnel).
    #[serde(default = "default_dashboard_listen")]
    pub listen: String,
    /// File holding the access token (one line). Created with a fresh random token, readable by the
    /// owner only, when it does not exist. Default: `dashboard.token` in the server's `state_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without the token (for a Prometheus scraper on the same host); the page and
    /// its JSON always need the token or the admin certificate.
    #[serde(default)]
    pub metrics_public: bool,
}

fn default_dashboard_listen() -> String {
    "127.0.0.1:8443".into()
}

impl ServerConfig {
    /// The same configuration with every path absolute (against the working directory, lexically).
    /// The server runs on this, so that what it records (checkpoint paths in `server.db`,
    /// `effective-config.toml`) still holds when it is restarted, or read, from another folder.
    #[must_use]
    pub fn with_absolute_paths(mut self) -> Self {
        let abs = |p: &mut PathBuf| {
            if let Ok(a) = std::path::absolute(&*p) {
                *p = a;
            }
        };
        abs(&mut self.study);
        abs(&mut self.state_dir);
        for p in [&mut self.tls.ca, &mut self.tls.cert, &mut self.tls.key, &mut self.tls.crl] {
            abs(p);
        }
        if let Some(token) = self.dashboard.as_mut().and_then(|d| d.token_file.as_mut()) {
            abs(token);
        }
        self
    }
}

impl DashboardConfig {
    /// The token file, with the default filled in.
    pub fn token_path(&self, state_dir: &Path) -> PathBuf {
        self.token_file.clone().unwrap_or_else(|| state_dir.join("dashboard.token"))
    }
}

/// Reads a server configuration and the study it names.
///
/// # Errors
/// Unreadable or invalid files.
pub fn load_server(path: &Path) -> Result<(ServerConfig, StudyConfig), ConfigError> {
    let mut cfg: ServerConfig = read_toml(path)?;
    let base = base_dir(path);
    for p in
        [&mut cfg.study, &mut cfg.state_dir, &mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key, &mut cfg.tls.crl]
    {
        resolve(&base, p);
    }
    if cfg.allowed_sites.is_empty() {
        return Err(ConfigError::new(path, "allowed_sites is empty: name the sites (certificate names) that may join"));
    }
    for s in &cfg.allowed_sites {
        validate_name("site", s).map_err(|e| ConfigError::new(path, format!("allowed_sites: {e}")))?;
    }
    if cfg.keep_checkpoints == 0 {
        return Err(ConfigError::new(path, "keep_checkpoints must be at least 1"));
    }
    if !(1..=3600).contains(&cfg.revocation_check_s) {
        return Err(ConfigError::new(
            path,
            format!("revocation_check_s = {}: 1 to 3600 seconds allowed", cfg.revocation_check_s),
        ));
    }
    if let Some(d) = &mut cfg.dashboard {
        if let Some(t) = &mut d.token_file {
            resolve(&base, t);
        }
        if d.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                path,
                format!("dashboard.listen = '{}': give an IP address and port, e.g. 127.0.0.1:8443", d.listen),
            ));
        }
    }
    let study = load_study(&cfg.study)?;
    Ok((cfg, study))
}

/// A site's client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// This site's id; must equal the common name of its certificate.
    pub site_id: String,
    /// The server's address, e.g. `https://study.example.org:50051`.
    pub server: String,
    /// The name the server's certificate carries (checked by TLS).
    pub server_name: String,
    /// The study protocol file (the same file the server uses).
    pub study: PathBuf,
    /// The site's data folder (`clinical.csv`, `mri/`, `wsi/`).
    pub data_dir: PathBuf,
    /// Where the client keeps its status and local outputs.
    pub state_dir: PathBuf,
    pub tls: ClientTlsFiles,
    /// Compute backend for local training: `flex` (default, fast CPU), `ndarray` (CPU), `cuda`.
    #[serde(default)]
    pub backend: Option<String>,
    /// What this site lets the server ask of it (`[policy]`, see [`fedhcc_secure::policy`]):
    /// checked by the client before every task. Defaults when the table is left out.
    #[serde(default)]
    pub policy: fedhcc_secure::policy::SitePolicy,
}

/// Reads a site configuration and the study it names.
///
/// # Errors
/// Unreadable or invalid files.
pub fn load_site(path: &Path) -> Result<(SiteConfig, StudyConfig), ConfigError> {
    let mut cfg: SiteConfig = read_toml(path)?;
    let base = base_dir(path);
    for p in
        [&mut cfg.study, &mut cfg.data_dir, &mut cfg.state_dir, &mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key]
    {
        resolve(&base, p);
    }
    if let Some(crl) = &mut cfg.tls.crl {
        resolve(&base, crl);
    }
    validate_name("site", &cfg.site_id).map_err(|e| ConfigError::new(path, e.to_string()))?;
    if !(cfg.server.starts_with("https://")) {
        return Err(ConfigError::new(path, format!("server = '{}': must start with https://", cfg.server)));
    }
    cfg.policy.validate().map_err(|e| ConfigError::new(path, format!("[policy]: {e}")))?;
    let study = load_study(&cfg.study)?;
    Ok((cfg, study))
}

/// A study lead's admin tool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub server: String,
    pub server_name: String,
    pub tls: ClientTlsFiles,
}

/// Reads an admin configuration.
///
/// # Errors
/// Unreadable or invalid file.
pub fn load_admin(path: &Path) -> Result<AdminConfig, ConfigError> {
    let mut cfg: AdminConfig = read_toml(path)?;
    let base = base_dir(path);
    for p in [&mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key] {
        resolve(&base, p);
    }
    if let Some(crl) = &mut cfg.tls.crl {
        resolve(&base, crl);
    }
    if !(cfg.server.starts_with("https://")) {
        return Err(ConfigError::new(path, format!("server = '{}': must start with https://", cfg.server)));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_ranges_are_reported_with_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("study.toml");
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 3\nmin_site = 2\n").unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("study.toml") && e.contains("min_site"), "{e}");
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 0\n").unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("federation.rounds = 0"), "{e}");
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 3\nmax_site_samples = 0\n").unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("federation.max_site_samples = 0"), "{e}");
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 3\nmax_site_samples = 300\n").unwrap();
        assert_eq!(load_study(&p).unwrap().federation.site_sample_limit(), 300);
    }

    #[test]
    fn the_evaluation_table_has_defaults_and_checked_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("study.toml");
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 3\n").unwrap();
        assert_eq!(load_study(&p).unwrap().evaluation, EvaluationConfig::default());
        std::fs::write(
            &p,
            "study_id = \"s\"\n[federation]\nrounds = 3\n[evaluation]\ncutoff = 0.4\ntime_grid_days = 7\n",
        )
        .unwrap();
        let e = load_study(&p).unwrap().evaluation;
        assert_eq!((e.cutoff, e.time_grid_days, e.histogram_bins), (Some(0.4), 7.0, 1000));
        for (table, needle) in [
            ("cutoff = 1.5", "evaluation.cutoff"),
            ("time_grid_days = 0", "evaluation.time_grid_days"),
            ("histogram_bins = 100000", "evaluation.histogram_bins"),
            ("bins = 10", "bins"),
        ] {
            std::fs::write(&p, format!("study_id = \"s\"\n[federation]\nrounds = 3\n[evaluation]\n{table}\n")).unwrap();
            let e = load_study(&p).unwrap_err().to_string();
            assert!(e.contains("study.toml") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn strategy_tables_parse_and_are_checked_with_the_file_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("study.toml");
        std::fs::write(
            &p,
            "study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"fedadam\"\n\
             [federation.server_optimizer]\nlr = 0.1\ntau = 0.01\n",
        )
        .unwrap();
        let s = load_study(&p).unwrap();
        assert_eq!(s.federation.start, StartMode::Auto, "a run starts by itself unless told otherwise");
        let o = s.federation.server_optimizer.unwrap();
        assert_eq!((o.lr, o.beta1, o.beta2, o.tau), (0.1, 0.9, 0.99, 0.01));
        std::fs::write(&p, "study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"fedprox\"\n").unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("study.toml") && e.contains("training.prox_mu > 0"), "{e}");
        std::fs::write(
            &p,
            "study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"median\"\n[federation.trimmed_mean]\ntrim_fraction = 0.2\n",
        )
        .unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("[federation.trimmed_mean] is only used by trimmed_mean"), "{e}");
        std::fs::write(
            &p,
            "study_id = \"s\"\n[federation]\nrounds = 3\nstrategy = \"trimmed_mean\"\n[federation.trimmed_mean]\ntrim_fractio = 0.2\n",
        )
        .unwrap();
        let e = load_study(&p).unwrap_err().to_string();
        assert!(e.contains("trim_fractio"), "{e}");
    }

    #[test]
    fn the_dashboard_table_is_optional_and_its_paths_and_address_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("study.toml"), "study_id = \"s\"\n[federation]\nrounds = 3\n").unwrap();
        let p = tmp.path().join("server.toml");
        let base = "study = \"study.toml\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"state\"\nallowed_sites = [\"a\"]\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"s.pem\"\nkey = \"s.key.pem\"\ncrl = \"crl.pem\"\n";
        std::fs::write(&p, base).unwrap();
        assert_eq!(load_server(&p).unwrap().0.dashboard, None, "off without the table");
        std::fs::write(&p, format!("{base}[dashboard]\n")).unwrap();
        let d = load_server(&p).unwrap().0.dashboard.unwrap();
        assert_eq!((d.listen.as_str(), d.metrics_public), ("127.0.0.1:8443", false));
        assert_eq!(d.token_path(&tmp.path().join("state")), tmp.path().join("state/dashboard.token"));
        std::fs::write(&p, format!("{base}[dashboard]\ntoken_file = \"t/tok\"\nmetrics_public = true\n")).unwrap();
        let d = load_server(&p).unwrap().0.dashboard.unwrap();
        assert_eq!(d.token_path(Path::new("x")), tmp.path().join("t/tok"));
        std::fs::write(&p, format!("{base}[dashboard]\nlisten = \"localhost\"\n")).unwrap();
        let e = load_server(&p).unwrap_err().to_string();
        assert!(e.contains("server.toml") && e.contains("dashboard.listen"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("study.toml"), "study_id = \"s\"\n[federation]\nrounds = 3\n").unwrap();
        let p = tmp.path().join("site.toml");
        std::fs::write(
            &p,
            "site_id = \"a\"\nserver = \"https://127.0.0.1:1\"\nserver_name = \"x\"\nstudy = \"study.toml\"\n\
             data_dir = \"data\"\nstate_dir = \"state\"\n[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key.pem\"\n",
        )
        .unwrap();
        let (site, study) = load_site(&p).unwrap();
        assert_eq!(site.data_dir, tmp.path().join("data"));
        assert_eq!(site.tls.ca, tmp.path().join("ca.pem"));
        assert_eq!(study.federation.min_sites, 2);
        assert_eq!(site.policy, fedhcc_secure::policy::SitePolicy::default(), "no [policy]: the defaults");
    }

    #[test]
    fn the_site_policy_table_is_parsed_and_checked_with_the_file_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("study.toml"), "study_id = \"s\"\n[federation]\nrounds = 3\n").unwrap();
        let p = tmp.path().join("site.toml");
        let base = "site_id = \"a\"\nserver = \"https://127.0.0.1:1\"\nserver_name = \"x\"\nstudy = \"study.toml\"\n\
                    data_dir = \"data\"\nstate_dir = \"state\"\n[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key.pem\"\n";
        std::fs::write(
            &p,
            format!("{base}[policy]\nmax_rounds = 4\nmin_group_size = 20\naccepted_tasks = [\"train\"]\n"),
        )
        .unwrap();
        let policy = load_site(&p).unwrap().0.policy;
        assert_eq!((policy.max_rounds, policy.min_group_size), (Some(4), 20));
        assert_eq!(policy.accepted_tasks, [fedhcc_secure::policy::TaskKind::Train]);
        std::fs::write(&p, format!("{base}[policy]\nmax_rounds = 0\n")).unwrap();
        let e = load_site(&p).unwrap_err().to_string();
        assert!(e.contains("site.toml") && e.contains("[policy]") && e.contains("max_rounds"), "{e}");
        std::fs::write(&p, format!("{base}[policy]\nmax_round = 3\n")).unwrap();
        let e = load_site(&p).unwrap_err().to_string();
        assert!(e.contains("site.toml") && e.contains("max_round"), "{e}");
    }
}
