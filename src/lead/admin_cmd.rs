//! `fedhcc admin --config admin.toml <command>`: the study lead's commands to a running server over
//! the admin RPCs, with the admin certificate: start (a run with `[federation] start = "manual"`),
//! pause, resume, abort, allow / disallow a site, export the current model.

use crate::lead::model_file::FileLayout;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedhcc_core::config::load_admin;
use fedhcc_core::params::ParameterSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `fedhcc admin`.
#[derive(Args)]
pub struct AdminArgs {
    /// Admin configuration file (see configs/admin.toml): the server's address and the study
    /// lead's admin certificate.
    #[arg(long)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Start a run that waits for the study lead (`[federation] start = "manual"` in the study file).
    Start,
    /// Announce no new task; a round in flight may finish and commit. Outlives a server restart.
    Pause,
    /// Go on after a pause: the task that was due is announced.
    Resume,
    /// End the run now: the task in flight is dropped and the last committed model is final. The
    /// run cannot be resumed (train again under another run_id).
    Abort,
    /// Add a site to the allow-list (it needs a certificate from `fedhcc certs issue --site`).
    Allow {
        /// The site id (its certificate's name).
        site: String,
    },
    /// Remove a site from the allow-list: its connections are refused from now on (until `allow`).
    Disallow {
        /// The site id (its certificate's name).
        site: String,
    },
    /// Save the current global model (the last committed round): a `.fhcp` checkpoint, or a
    /// safetensors file when `--out` ends in `.safetensors`.
    Export {
        /// Where to write the model.
        #[arg(long)]
        out: PathBuf,
        /// The safetensors file's tensor names and shapes: `torch` (PyTorch's) or `burn` (fedhcc's
        /// own), as `fedhcc export --layout`. `fedhcc export --study` also records the model's
        /// architecture, which scripts/fedhcc_model.py needs for the multimodal models.
        #[arg(long, value_enum, default_value_t = FileLayout::Torch)]
        layout: FileLayout,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

pub fn run(args: &AdminArgs) -> Result<()> {
    use fedhcc_client::transport::RunControl;
    let admin = load_admin(&args.config)?;
    let target = fedhcc_client::ServerTarget {
        url: admin.server.clone(),
        server_name: admin.server_name.clone(),
        tls: admin.tls.clone(),
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = fedhcc_client::transport::Admin::open(&target)
            .await
            .with_context(|| format!("reaching the server at {}", admin.server))?;
        let refused = |e: fedhcc_client::TransportError| match e.refused() {
            Some((_, reason)) => anyhow::anyhow!("the server refused: {reason}"),
            None => anyhow::Error::from(e),
        };
        let reply = match &args.command {
            AdminCommand::Export { out, layout } => return export(&mut c, out, *layout).await,
            AdminCommand::Allow { site } | AdminCommand::Disallow { site } => {
                let allowed = matches!(args.command, AdminCommand::Allow { .. });
                c.set_site_access(site, allowed).await.map_err(refused)?
            }
            AdminCommand::Start | AdminCommand::Pause | AdminCommand::Resume | AdminCommand::Abort => {
                let command = match args.command {
                    AdminCommand::Start => RunControl::Start,
                    AdminCommand::Pause => RunControl::Pause,
                    AdminCommand::Resume => RunControl::Resume,
                    _ => RunControl::Abort,
                };
                c.control(command).await.map_err(refused)?
            }
        };
        println!("{}", reply.message);
        println!("run: {}, phase: {}", reply.run_control, reply.phase.replace('_', " "));
        Ok(())
    })
}

/// Receives the model into a temporary file beside `out` while hashing it, checks its length,
/// SHA-256 and layout against the header, then renames it into place (or converts it).
async fn export(c: &mut fedhcc_client::transport::Admin, out: &Path, layout: FileLayout) -> Result<()> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = PartFile(dir.join(format!(".{name}.{}.part", std::process::id())));
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp.0).with_context(|| format!("creating {}", tmp.0.display()))?,
    );
    let header = match c.export(|chunk| file.write_all(chunk)).await {
        Ok(h) => h,
        Err(fedhcc_client::TransportError::Sink(e)) => {
            return Err(anyhow::Error::from(e).context(format!("writing into {}", dir.display())));
        }
        Err(e) => match e.refused() {
            Some((_, reason)) => bail!("the server refused: {reason}"),
            None => return Err(anyhow::Error::from(e).context("receiving the model; try again")),
        },
    };
    let file = file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.0.display()))?;
    file.sync_all().with_context(|| format!("writing {}", tmp.0.display()))?;
    drop(file);
    let params = crate::lead::export::read_checkpoint(&tmp.0)?;
    if params.fingerprint().to_hex() != header.model_fingerprint {
        bail!("the model's layout differs from the one the server announced");
    }
    let safetensors = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        write_safetensors(&params, &header, layout, out)?;
    } else {
        std::fs::rename(&tmp.0, out).with_context(|| format!("writing {}", out.display()))?;
    }
    println!(
        "Exported the model of round {} (study {}, run {}): {} values, layout {}, SHA-256 of the checkpoint {}, to {}{}",
        header.round,
        header.study_id,
        header.run_id,
        params.numel(),
        params.fingerprint().short(),
        header.sha256,
        out.display(),
        if safetensors { format!(" (safetensors, {layout} layout)") } else { String::new() }
    );
    Ok(())
}

/// A partly received file, removed unless it was renamed into place.
struct PartFile(PathBuf);

impl Drop for PartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The same file as `fedhcc export` writes ([`crate::lead::model_file`]), with what the server's header
/// says of the model (its fingerprint was checked against the tensors above).
fn write_safetensors(
    params: &ParameterSet,
    header: &fedhcc_client::transport::Exported,
    layout: FileLayout,
    out: &Path,
) -> Result<()> {
    let metadata = std::collections::BTreeMap::from([
        ("study_id".to_string(), header.study_id.clone()),
        ("run_id".to_string(), header.run_id.clone()),
        ("round".to_string(), header.round.to_string()),
        ("checkpoint_sha256".to_string(), header.sha256.clone()),
    ]);
    let bytes = crate::lead::model_file::safetensors_bytes(params, layout, &metadata)?;
    fedhcc_core::pki::write_atomic(out, &bytes, false).with_context(|| format!("writing {}", out.display()))
}
