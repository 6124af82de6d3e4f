//! A real federation inside this process, for simulations (`fedhcc bench strategies`, `fedhcc study`):
//! the server's `run` future and one client `run` future per site, over mutual TLS on loopback with a
//! study CA made for the simulation, each site training the study's model on its own data with the
//! executor `fedhcc client` would run (FedBN's local-layer keeper included).

use crate::executor::{ClinicalExecutor, site_executor};
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use fedhcc_client::Executor as _;
use fedhcc_core::config::{ServerConfig, StudyConfig};
use fedhcc_core::pki::{CertDir, ClientTlsFiles, ServerTlsFiles};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One site of a simulated federation.
pub struct SimSite {
    /// Its id (its certificate's name in the simulation's CA).
    pub id: String,
    /// Its data folder (`clinical.csv`, `mri/`, `wsi/`).
    pub data_dir: PathBuf,
    /// Its prepared images (a `preprocessed/` folder as `fedhcc preprocess` leaves it), linked
    /// read-only into the site's fresh state folder; `None` for clinical-only models.
    pub prepared: Option<PathBuf>,
}

/// What a simulated run left.
pub struct SimOutcome {
    /// The server's outcome (final checkpoint path, its SHA-256, rounds).
    pub outcome: fedhcc_server::RunOutcome,
    /// Training patients per site.
    pub train_samples: BTreeMap<String, u64>,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// The server's state folder (server.db, checkpoints/, evaluation/).
    pub server_state: PathBuf,
}

/// Links a site's prepared images into a fresh site state folder.
///
/// # Errors
/// No prepared images at `prepared`, or the link cannot be made (not a Unix system).
pub fn link_prepared(prepared: &Path, state: &Path) -> Result<()> {
    if !prepared.is_dir() {
        bail!("{}: no prepared images there (run `fedhcc preprocess` for this site)", prepared.display());
    }
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let link = state.join(crate::preprocess::FOLDER);
    #[cfg(unix)]
    std::os::unix::fs::symlink(std::path::absolute(prepared)?, &link)
        .with_context(|| format!("linking {} to {}", link.display(), prepared.display()))?;
    #[cfg(not(unix))]
    bail!("simulations with images need a Unix system (symbolic links); prepare the images in {}", link.display());
    #[cfg(unix)]
    Ok(())
}

/// Runs `study` over `sites` in this process, in the fresh folder `dir` (server state, site states),
/// with the certificates in `certs` (made by `fedhcc_core::pki::init` for these site ids and server
/// name `localhost`), from the model `seed` initialises. Waits for the run to finish.
///
/// # Errors
/// An unusable study, site data or certificates, or a run that fails or does not finish.
pub async fn run_federation(
    dir: &Path,
    certs: &Path,
    sites: &[SimSite],
    study: &StudyConfig,
    seed: u64,
) -> Result<SimOutcome> {
    let model = StudyModel::from_study(study)?;
    let initial = model.initial_params(seed)?;
    let c = CertDir::new(certs);
    let ids: Vec<String> = sites.iter().map(|s| s.id.clone()).collect();
    let server_state = dir.join("server-state");
    let config = ServerConfig {
        study: dir.join("study.toml"),
        listen: "127.0.0.1:0".into(),
        state_dir: server_state.clone(),
        tls: ServerTlsFiles { ca: c.ca(), cert: c.server(), key: c.server_key(), crl: c.crl() },
        allowed_sites: ids,
        keep_checkpoints: 2,
        dashboard: None,
        revocation_check_s: 60,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = CancellationToken::new();
    let t0 = Instant::now();
    let server = tokio::spawn(fedhcc_server::run(
        listener,
        fedhcc_server::ServerOptions { config, study: study.clone(), initial_model: initial },
        token.clone(),
    ));
    let mut clients = Vec::new();
    let mut train_samples = BTreeMap::new();
    for s in sites {
        // The executor `fedhcc client` would run for this study's model.
        let (backend, state) = (fedhcc_model::BackendKind::default(), dir.join("site-state").join(&s.id));
        if let Some(prepared) = &s.prepared {
            link_prepared(prepared, &state)?;
        }
        let executor = if model.multimodal_config()?.is_some() {
            let inner = crate::mm_executor::MultimodalExecutor::load(&s.data_dir, &state, &model, backend)?;
            site_executor(inner, study, &model, &state)?
        } else {
            site_executor(ClinicalExecutor::load(&s.data_dir, &model, backend)?, study, &model, &state)?
        };
        train_samples.insert(s.id.clone(), executor.num_samples());
        let opts = fedhcc_client::ClientOptions {
            site_id: s.id.clone(),
            study_id: study.study_id.clone(),
            run_id: study.run_id.clone(),
            target: fedhcc_client::ServerTarget {
                url: format!("https://{addr}"),
                server_name: "localhost".into(),
                tls: ClientTlsFiles { ca: c.ca(), cert: c.site(&s.id), key: c.site_key(&s.id), crl: None },
            },
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(60)),
            state_dir: None,
            policy: Default::default(),
        };
        clients.push(tokio::spawn(fedhcc_client::run(opts, executor, token.clone())));
    }
    let outcome = match server.await.context("server task")? {
        Ok(o) => o,
        Err(e) => {
            token.cancel();
            return Err(e).context("the server stopped");
        }
    };
    for c in clients {
        c.await.context("client task")?.context("a site's client failed")?;
    }
    let wall_s = t0.elapsed().as_secs_f64();
    if !outcome.finished {
        bail!("the run did not finish ({} rounds committed)", outcome.rounds_completed);
    }
    Ok(SimOutcome { outcome, train_samples, wall_s, server_state })
}
