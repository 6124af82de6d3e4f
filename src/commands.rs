//! The subcommands that wrap one library call each: certificates, server, client, synthetic
//! cohort, data check.

use crate::executor::ClinicalExecutor;
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_cohort::{CohortError, Finding, Severity};
use fedhcc_core::config::{load_server, load_site};
use fedhcc_core::pki::{self, Role, Validity};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

pub fn certs_init(
    dir: &Path,
    study: &str,
    server_name: &str,
    sites: &[String],
    admin: Option<&str>,
    days: u32,
) -> Result<()> {
    let reg = pki::init(dir, study, server_name, sites, admin, days)?;
    println!("Study CA and certificates for study '{}' written to {}:", reg.study, dir.display());
    for c in &reg.issued {
        println!("  {:<7} {:<24} valid until {}", format!("{:?}", c.role).to_lowercase(), c.name, c.not_after);
    }
    if sites.is_empty() {
        println!(
            "Each site makes its own key: `fedhcc certs request --site ID --out DIR` there, then `fedhcc certs sign \
             --dir {} --csr ID.csr.pem --out site-ID.pem` here. Keep ca.key.pem offline.",
            dir.display()
        );
    } else {
        println!(
            "Give each site its site-<id>.pem, site-<id>.key.pem and ca.pem; keep ca.key.pem offline. The sites' keys \
             were made on this machine: for real sites, use `fedhcc certs request` and `fedhcc certs sign` instead."
        );
    }
    Ok(())
}

/// `fedhcc certs request`: the site's key and its signing request.
pub fn certs_request(out: &Path, w: Who) -> Result<()> {
    let (role, name) = who(w)?;
    let (key, csr) = pki::request(out, role, &name)?;
    println!("Private key written to {} (owner-only; it stays here).", key.display());
    println!(
        "Send {} to the study lead, who signs it with `fedhcc certs sign`; put the certificate they send back, \
         with the study's ca.pem, into this site's [tls] configuration.",
        csr.display()
    );
    Ok(())
}

/// `fedhcc certs sign`: the study CA signs a request; the certificate goes to `out`.
pub fn certs_sign(dir: &Path, csr: &Path, out: &Path, days: u32) -> Result<()> {
    let pem = std::fs::read_to_string(csr).with_context(|| format!("reading the signing request {}", csr.display()))?;
    if out.exists() {
        bail!("{} already exists; refusing to overwrite a certificate", out.display());
    }
    let (c, cert) = pki::sign(dir, &pem, Validity::days(days)).with_context(|| format!("{}", csr.display()))?;
    pki::write_atomic(out, cert.as_bytes(), false)?;
    println!(
        "Signed a {} certificate for '{}' (serial {}), valid until {}, written to {}. Send it to the site with {}.",
        format!("{:?}", c.role).to_lowercase(),
        c.name,
        c.serial_hex,
        c.not_after,
        out.display(),
        pki::CertDir::new(dir).ca().display()
    );
    Ok(())
}

/// Whose certificate a `certs` command is about: `--site`, `--admin` or `--server` (exactly one).
pub struct Who {
    pub site: Option<String>,
    pub admin: Option<String>,
    pub server: Option<String>,
}

fn who(w: Who) -> Result<(Role, String)> {
    match (w.site, w.admin, w.server) {
        (Some(s), None, None) => Ok((Role::Site, s)),
        (None, Some(a), None) => Ok((Role::Admin, a)),
        (None, None, Some(s)) => Ok((Role::Server, s)),
        _ => bail!("name exactly one of --site, --admin or --server"),
    }
}

pub fn certs_issue(dir: &Path, w: Who, days: u32) -> Result<()> {
    let (role, name) = who(w)?;
    let c = pki::issue(dir, role, &name, Validity::days(days))?;
    println!(
        "Issued a {} certificate for '{}' (serial {}), valid until {}.",
        format!("{role:?}").to_lowercase(),
        c.name,
        c.serial_hex,
        c.not_after
    );
    Ok(())
}

pub fn certs_revoke(dir: &Path, w: Who) -> Result<()> {
    let (role, name) = who(w)?;
    let n = pki::revoke(dir, role, &name)?;
    let crl = pki::CertDir::new(dir).crl();
    let effect = if role == Role::Server {
        format!("send {} to the sites: a site whose [tls] crl names it refuses that server certificate", crl.display())
    } else {
        format!(
            "copy {} to the server: within its revocation_check_s it refuses them and cuts their open connections",
            crl.display()
        )
    };
    println!("Revoked {n} certificate(s) of '{name}'; {effect}.");
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stopping");
        token.cancel();
    });
}

pub fn server(config: &Path) -> Result<()> {
    let (cfg, study) = load_server(config)?;
    let model = StudyModel::from_study(&study)?;
    let initial = model.initial_params(study.training.seed)?;
    tracing::info!(
        study = %study.study_id, run = %study.run_id, params = initial.numel(),
        fingerprint = %initial.fingerprint(), listen = %cfg.listen, "starting the server"
    );
    let rt = runtime()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
        println!("fedhcc server listening on {}", listener.local_addr()?);
        let token = CancellationToken::new();
        cancel_on_signal(token.clone());
        let out = fedhcc_server::run(
            listener,
            fedhcc_server::ServerOptions { config: cfg, study, initial_model: initial },
            token,
        )
        .await?;
        if out.aborted {
            println!(
                "Run aborted by the study lead after {} committed rounds. Final model: {} (SHA-256 {})",
                out.rounds_completed,
                out.final_checkpoint.display(),
                out.final_sha256
            );
        } else if out.finished {
            println!(
                "Run finished: {} rounds. Final model: {} (SHA-256 {})",
                out.rounds_completed,
                out.final_checkpoint.display(),
                out.final_sha256
            );
        } else {
            println!(
                "Server stopped after {} committed rounds; start it again with the same config to resume.",
                out.rounds_completed
            );
        }
        Ok(())
    })
}

pub fn client(config: &Path) -> Result<()> {
    let (site, study) = load_site(config)?;
    let mut model = StudyModel::from_study(&study)?;
    // Evaluation summaries describe no group smaller than the site's policy allows.
    model.evaluation.min_cell = fedhcc_client::site_policy::min_cell(&site.policy);
    let backend = match &site.backend {
        Some(b) => b.parse().map_err(|e| anyhow::anyhow!("{}: backend: {e}", config.display()))?,
        None => fedhcc_model::BackendKind::default(),
    };
    // The certificate must be this site's: catch a mix-up before the server does.
    let id = pki::peer_identity(&pki::load_certs(&site.tls.cert)?[0])?;
    if id.name != site.site_id || id.role != Role::Site {
        bail!(
            "{}: site_id is '{}' but {} is a {:?} certificate for '{}'",
            config.display(),
            site.site_id,
            site.tls.cert.display(),
            id.role,
            id.name
        );
    }
    let executor = if model.multimodal_config()?.is_some() {
        let inner = crate::mm_executor::MultimodalExecutor::load(&site.data_dir, &site.state_dir, &model, backend)?;
        crate::executor::site_executor(inner, &study, &model, &site.state_dir)?
    } else {
        let inner = ClinicalExecutor::load(&site.data_dir, &model, backend)?;
        crate::executor::site_executor(inner, &study, &model, &site.state_dir)?
    };
    let opts = fedhcc_client::ClientOptions {
        site_id: site.site_id.clone(),
        study_id: study.study_id.clone(),
        run_id: study.run_id.clone(),
        target: fedhcc_client::ServerTarget {
            url: site.server.clone(),
            server_name: site.server_name.clone(),
            tls: site.tls.clone(),
        },
        min_backoff: std::time::Duration::from_millis(500),
        max_backoff: std::time::Duration::from_secs(30),
        give_up_after: None,
        state_dir: Some(site.state_dir.clone()),
        policy: site.policy.clone(),
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let token = CancellationToken::new();
        cancel_on_signal(token.clone());
        let out = fedhcc_client::run(opts, executor, token).await?;
        println!(
            "Site {}: {} rounds trained, {} evaluations, {:.1} MB received, {:.1} MB sent{}",
            site.site_id,
            out.rounds_trained,
            out.evaluations,
            out.bytes_down as f64 / 1e6,
            out.bytes_up as f64 / 1e6,
            if out.finished { "; the run is finished." } else { "; stopped before the end of the run." }
        );
        Ok(())
    })
}

/// `fedhcc client status`: what the site's client is doing, from its `status.json`.
pub fn client_status(config: &Path, json: bool) -> Result<()> {
    let (site, _) = load_site(config)?;
    let status = fedhcc_client::status::read(&site.state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text(fedhcc_client::status::now_unix()));
    }
    Ok(())
}

/// `fedhcc synth`: the synthetic multi-center cohort.
#[derive(Args)]
pub struct SynthArgs {
    /// Output folder: one site folder per center, and truth.csv beside them.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of centers.
    #[arg(long, default_value_t = 2)]
    pub centers: usize,
    /// Patients across all centers.
    #[arg(long, default_value_t = 579)]
    pub patients: usize,
    /// Random seed: the same seed writes the same files, byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Image sizes: tiny (tests), small (a quick demo), full (realistic MRI volumes and slides).
    #[arg(long, default_value = "small")]
    pub scale: fedhcc_cohort::synth_images::Scale,
    /// Worker threads for the images (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write clinical.csv only, no images (for the clinical model; seconds instead of minutes).
    #[arg(long)]
    pub clinical_only: bool,
}

pub fn synth(args: &SynthArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let scale = (!args.clinical_only).then_some(args.scale);
    let sites = write_synthetic_site_data(&args.out, args.centers, args.patients, args.seed, scale, args.threads)?;
    let mut bytes = 0;
    for s in &sites {
        println!(
            "{}: {} patients in {} ({} image files, {:.1} MB)",
            s.center_id,
            s.patients,
            args.out.join(&s.center_id).display(),
            s.images.files,
            s.images.bytes as f64 / 1e6
        );
        bytes += s.images.bytes;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n: usize = sites.iter().map(|s| s.patients).sum();
    println!(
        "Wrote {n} patients in {secs:.1} s ({:.0} patients/min, {:.1} MB of images).",
        n as f64 / secs * 60.0,
        bytes as f64 / 1e6
    );
    println!("Latent risk per patient (for evaluation only): {}", args.out.join("truth.csv").display());
    Ok(())
}

/// Writes `out/<center>/clinical.csv` and `out/truth.csv` (no images). Returns (center id, patients).
pub fn write_synthetic_cohort(out: &Path, centers: usize, patients: usize, seed: u64) -> Result<Vec<(String, usize)>> {
    Ok(write_synthetic_site_data(out, centers, patients, seed, None, None)?
        .into_iter()
        .map(|s| (s.center_id, s.patients))
        .collect())
}

/// One center written by [`write_synthetic_site_data`].
pub struct WrittenSite {
    pub center_id: String,
    pub patients: usize,
    pub images: fedhcc_cohort::synth_images::ImageSummary,
}

/// Writes `out/<center>/clinical.csv` (and the images at `scale`, if given) and `out/truth.csv`.
pub fn write_synthetic_site_data(
    out: &Path,
    centers: usize,
    patients: usize,
    seed: u64,
    scale: Option<fedhcc_cohort::synth_images::Scale>,
    threads: Option<usize>,
) -> Result<Vec<WrittenSite>> {
    if centers == 0 || patients < centers {
        bail!("need at least one center and one patient per center (got {centers} centers, {patients} patients)");
    }
    let cutoff = fedhcc_cohort::OutcomeConfig::default().cutoff;
    let cohort = fedhcc_cohort::synth::generate(centers, patients, seed, cutoff)?;
    let threads = threads.unwrap_or_else(default_threads);
    let progress = crate::progress::Progress::new("synth", patients);
    let mut offset = 0;
    let mut written = Vec::new();
    for site in &cohort.sites {
        let dir = out.join(&site.center_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fedhcc_cohort::synth::write_site_csv(site, &dir.join("clinical.csv"))?;
        let images = match scale {
            Some(scale) => fedhcc_cohort::synth_images::write_site_images(
                &dir,
                site,
                &cohort.truth,
                scale,
                seed,
                threads,
                &|done, _| progress.set(offset + done),
            )?,
            None => Default::default(),
        };
        offset += site.rows.len();
        written.push(WrittenSite { center_id: site.center_id.clone(), patients: site.rows.len(), images });
    }
    if scale.is_some() {
        progress.finish();
    }
    fedhcc_cohort::synth::write_truth_csv(&cohort.truth, &out.join("truth.csv"))?;
    Ok(written)
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(2)
}

/// `fedhcc preprocess`.
#[derive(Args)]
pub struct PreprocessArgs {
    /// Site configuration file (see configs/site-tongji.toml).
    #[arg(long)]
    pub site_config: PathBuf,
    /// Prepare only one modality (default: both).
    #[arg(long, value_parser = ["mri", "wsi"])]
    pub only: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn preprocess(args: &PreprocessArgs) -> Result<()> {
    let (site, study) = load_site(&args.site_config)?;
    let model = StudyModel::from_study(&study)?;
    let imaging = crate::preprocess::ImagingSection::from_study(&study)?;
    let csv = site.data_dir.join("clinical.csv");
    let report = fedhcc_cohort::Cohort::load(&csv, &model.spec, &model.cohort.outcomes)?;
    let ids: Vec<String> = report.cohort.patients.iter().map(|p| p.id.clone()).collect();
    let which = crate::preprocess::Modalities {
        mri: args.only.as_deref() != Some("wsi"),
        wsi: args.only.as_deref() != Some("mri"),
    };
    let threads = args.threads.unwrap_or_else(default_threads);
    let s = crate::preprocess::run(&site.data_dir, &site.state_dir, &ids, &imaging, which, threads)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let out = site.state_dir.join(crate::preprocess::FOLDER);
    println!(
        "Preprocessed {} patients of site {} in {:.1} s into {}",
        s.patients,
        site.site_id,
        s.seconds,
        out.display()
    );
    if which.mri {
        println!(
            "  MRI: {} prepared, {} unchanged since the last run, {} without an MRI folder, {} failed",
            s.mri_done,
            s.mri_reused,
            s.mri_missing,
            s.mri_failed.len()
        );
    }
    if which.wsi {
        println!(
            "  slides: {} prepared, {} unchanged, {} failed; {} patients without a slide",
            s.slides_done,
            s.slides_reused,
            s.slides_failed.len(),
            s.patients_without_slides
        );
    }
    if !s.mri_failed.is_empty() || !s.slides_failed.is_empty() {
        println!("Skipped (fix the file and rerun; only these will be redone):");
        for (id, why) in s.mri_failed.iter().chain(&s.slides_failed) {
            println!("  patient {id}: {why}");
        }
    }
    Ok(())
}

/// What `data check --json` prints: the clinical check's keys (absent when `clinical.csv` could not be read),
/// `imaging` when the site has images, then the model checked for, every finding and the totals.
#[derive(serde::Serialize)]
struct FullCheck<'a> {
    #[serde(flatten)]
    clinical: Option<&'a fedhcc_cohort::DataCheck>,
    imaging: Option<&'a crate::imaging_check::ImagingCheck>,
    model: &'a str,
    findings: &'a [Finding],
    errors: usize,
    warnings: usize,
}

/// A site's data check: the clinical table and, when the site has image folders, the images.
pub struct SiteDataCheck {
    /// The site's id.
    pub site_id: String,
    /// The clinical table checked.
    pub csv: PathBuf,
    /// The study's model kind (`clinical`, `preop`, `postop`): what the severities are judged against.
    pub model: &'static str,
    /// Counts, exclusions, label flow (`None`: the table could not be read; the findings say why).
    pub clinical: Option<fedhcc_cohort::DataCheck>,
    /// The image check (`None`: no mri/ or wsi/ folder).
    pub imaging: Option<crate::imaging_check::ImagingCheck>,
    /// Everything found, errors first.
    pub findings: Vec<Finding>,
}

impl SiteDataCheck {
    /// Findings that stop the model from training on a patient or on the site.
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    /// Findings that do not.
    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning).count()
    }

    /// What `data check --json` prints.
    ///
    /// # Errors
    /// Encoding failure.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(&FullCheck {
            clinical: self.clinical.as_ref(),
            imaging: self.imaging.as_ref(),
            model: self.model,
            findings: &self.findings,
            errors: self.errors(),
            warnings: self.warnings(),
        })?)
    }

    /// What `data check` prints: the clinical and image reports, then the findings and the verdict.
    pub fn to_text(&self) -> String {
        let mut out =
            format!("Data check for site {} ({}), {} model\n\n", self.site_id, self.csv.display(), self.model);
        if let Some(c) = &self.clinical {
            out.push_str(&c.to_text());
        }
        match &self.imaging {
            Some(i) => out.push_str(&i.to_text()),
            None if self.clinical.is_some() => out.push_str(&format!(
                "Imaging: no mri/ or wsi/ folder in {}\n",
                self.csv.parent().unwrap_or(&self.csv).display()
            )),
            None => {}
        }
        let (errors, warnings) = (self.errors(), self.warnings());
        out.push_str(&format!("\nFindings: {errors} error(s), {warnings} warning(s)\n"));
        for f in &self.findings {
            out.push_str(&format!("  {:<7}  {}: {}\n", f.severity, f.code, f.message));
            let shown = 20;
            let (list, what) = if f.patients.is_empty() {
                (f.rows.iter().map(ToString::to_string).collect::<Vec<_>>(), "rows")
            } else {
                (f.patients.clone(), "patients")
            };
            if !list.is_empty() {
                let more = list.len().saturating_sub(shown);
                let tail = if more > 0 { format!(" … and {more} more (--json lists all)") } else { String::new() };
                out.push_str(&format!("           {what}: {}{tail}\n", list[..list.len().min(shown)].join(", ")));
            }
        }
        if errors > 0 {
            out.push_str(&format!(
                "Result: {errors} error(s): the {} model cannot train on the patients (or the site) named above until \
                 they are fixed; exit code {}\n",
                self.model,
                crate::EXIT_DATA_ERRORS
            ));
        } else {
            out.push_str(&format!("Result: no error; the {} model can train on this site's data\n", self.model));
        }
        out
    }
}

/// `fedhcc data check` ran to the end and found errors: `main` exits with [`crate::EXIT_DATA_ERRORS`].
#[derive(Debug)]
pub struct DataErrorsFound {
    pub errors: usize,
    pub warnings: usize,
}

impl std::fmt::Display for DataErrorsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "data check: {} error(s) and {} warning(s): the model cannot train on some patients or on this site \
             until the errors are fixed (see the findings)",
            self.errors, self.warnings
        )
    }
}

impl std::error::Error for DataErrorsFound {}

/// Image checks already made, reused when the same patients of the same data folder are checked again
/// under the same `[imaging]` settings (the demo checks each site once per model).
#[derive(Default)]
pub struct ImagingChecks(Vec<(ImagingInputs, crate::imaging_check::ImagingCheck)>);

/// What an image check depends on: the data folder, the patients, the study's `[imaging]` table.
type ImagingInputs = (PathBuf, Vec<String>, toml::Table);

/// Runs a site's data check (what `fedhcc data check` prints).
///
/// # Errors
/// Invalid configuration. An unusable clinical table is not an error but a finding.
pub fn run_data_check(site_config: &Path) -> Result<SiteDataCheck> {
    run_data_check_cached(site_config, &mut ImagingChecks::default())
}

/// The finding code of a clinical table that cannot be used at all, or `None` for an error that is not
/// about the table (an invalid spec: a configuration error).
fn table_error_code(e: &CohortError) -> Option<&'static str> {
    match e {
        CohortError::Read { .. } => Some("clinical_table_unreadable"),
        CohortError::BadHeader { .. } => Some("clinical_header_unusable"),
        CohortError::MissingColumns { .. } => Some("missing_columns"),
        CohortError::Empty { .. } => Some("clinical_table_empty"),
        _ => None,
    }
}

/// [`run_data_check`], reusing an image check of `cache` made on the same inputs.
///
/// # Errors
/// As [`run_data_check`].
pub fn run_data_check_cached(site_config: &Path, cache: &mut ImagingChecks) -> Result<SiteDataCheck> {
    let (site, study) = load_site(site_config)?;
    let model = StudyModel::from_study(&study)?;
    let kind = model.kind();
    let uses = crate::preprocess::Modalities { mri: matches!(kind, "preop" | "postop"), wsi: kind == "postop" };
    let csv = site.data_dir.join("clinical.csv");
    let mut findings = Vec::new();
    let report = match fedhcc_cohort::Cohort::load(&csv, &model.spec, &model.cohort.outcomes) {
        Ok(r) => Some(r),
        Err(e) => match table_error_code(&e) {
            Some(code) => {
                findings.push(Finding::new(
                    Severity::Error,
                    code,
                    0,
                    format!("{e}: this site cannot train until clinical.csv is fixed"),
                ));
                None
            }
            None => return Err(e.into()),
        },
    };
    let clinical = report.as_ref().map(|r| fedhcc_cohort::DataCheck::run(r, &model.spec));
    if let Some(c) = &clinical {
        findings.extend(c.findings());
    }
    let has_images = site.data_dir.join("mri").is_dir() || site.data_dir.join("wsi").is_dir();
    let imaging = match &report {
        Some(report) if has_images => {
            let cfg = crate::preprocess::ImagingSection::from_study(&study)?;
            let ids: Vec<String> = report.cohort.patients.iter().map(|p| p.id.clone()).collect();
            let key = (site.data_dir.clone(), ids, study.imaging.clone());
            let mut check = match cache.0.iter().find(|(k, _)| *k == key) {
                Some((_, check)) => check.clone(),
                None => {
                    let check =
                        crate::imaging_check::ImagingCheck::run(&site.data_dir, &key.1, &cfg, default_threads());
                    cache.0.push((key, check.clone()));
                    check
                }
            };
            check.set_severities(uses);
            findings.extend(check.findings(kind, uses));
            Some(check)
        }
        Some(report) if uses.mri => {
            findings.push(Finding::new(
                Severity::Error,
                "mri_missing",
                report.cohort.patients.len(),
                format!(
                    "{} has no mri/ folder: the {kind} model needs each patient's MRI (mri/<patient_id>/), so this \
                     site cannot train it",
                    site.data_dir.display()
                ),
            ));
            None
        }
        _ => None,
    };
    findings.sort_by_key(|f| f.severity);
    Ok(SiteDataCheck { site_id: site.site_id, csv, model: kind, clinical, imaging, findings })
}

/// `fedhcc data check`: prints the check; an error found is [`DataErrorsFound`] (exit code 3).
///
/// # Errors
/// Invalid configuration, or [`DataErrorsFound`].
pub fn data_check(site_config: &Path, json: bool) -> Result<()> {
    let checked = run_data_check(site_config)?;
    if json {
        println!("{}", checked.to_json()?);
    } else {
        print!("{}", checked.to_text());
    }
    match checked.errors() {
        0 => Ok(()),
        errors => Err(DataErrorsFound { errors, warnings: checked.warnings() }.into()),
    }
}
