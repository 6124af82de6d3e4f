//! `fedhcc export`: a checkpoint (the server's `state_dir/checkpoints/*.fhcp`, or what
//! `fedhcc train` writes) → a [safetensors](https://huggingface.co/docs/safetensors) file, so the
//! final model can be used outside fedhcc (PyTorch, numpy, candle, burn).
//!
//! The file ([`crate::model_file`]) is in the PyTorch layout by default (`--layout torch`: what
//! `scripts/fedhcc_model.py` loads with `load_state_dict(strict=True)`), or in burn's
//! (`--layout burn`). Its metadata holds, besides the layout and the fingerprint, the study id, run
//! id and model kind, the model's architecture (`model_config`, JSON) and, for the models with a
//! clinical input, the design matrix's columns (`clinical_columns`) and where the standardised
//! numeric values and their missing indicators sit (`clinical_numeric`).

use crate::model_file::{FileLayout, safetensors_bytes};
use crate::study::StudyModel;
use anyhow::{Context, Result, bail};
use clap::Args;
use fedhcc_core::params::ParameterSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `fedhcc export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The checkpoint to convert (`.fhcp`: the server's `checkpoints/` files or `fedhcc train --out`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The study file the model was trained under (checked against the checkpoint's layout; its
    /// study id and model kind go into the file's metadata).
    #[arg(long)]
    pub study: PathBuf,
    /// Where to write the safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor names and shapes: `torch` (PyTorch's: `[out, in]` Linear weights, GroupNorm
    /// `weight`/`bias`; scripts/fedhcc_model.py loads it) or `burn` (fedhcc's own: `[in, out]`,
    /// `gamma`/`beta`). `fedhcc validate` reads both.
    #[arg(long, value_enum, default_value_t = FileLayout::Torch)]
    pub layout: FileLayout,
}

pub fn export(args: &ExportArgs) -> Result<()> {
    let params = read_checkpoint(&args.checkpoint)?;
    let study = fedhcc_core::config::load_study(&args.study)?;
    let model = StudyModel::from_study(&study)?;
    let expected = model.initial_params(study.training.seed)?.fingerprint();
    if expected != params.fingerprint() {
        bail!(
            "{} holds a model with layout {} but {} describes a {} model with layout {}; give the study file the \
             checkpoint was trained under",
            args.checkpoint.display(),
            params.fingerprint().short(),
            args.study.display(),
            model.kind(),
            expected.short()
        );
    }
    let mut metadata = BTreeMap::from([
        ("study_id".to_string(), study.study_id.clone()),
        ("run_id".to_string(), study.run_id.clone()),
        ("model_kind".to_string(), model.kind().to_string()),
    ]);
    metadata.extend(model_description(&model)?);
    let bytes = safetensors_bytes(&params, args.layout, &metadata)?;
    fedhcc_core::pki::write_atomic(&args.out, &bytes, false)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "Exported {} tensors ({} values, {} model, fingerprint {}, {} layout) to {} ({:.2} MB).",
        params.layout().specs().len(),
        params.numel(),
        model.kind(),
        params.fingerprint().short(),
        args.layout,
        args.out.display(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}

/// What someone outside fedhcc needs to rebuild the model: its architecture (`model_config`: the
/// clinical or multimodal configuration as JSON) and its clinical input (`clinical_columns`: the
/// design matrix's column names; `clinical_numeric`: `[value, missing]` column pairs, in the order
/// of `standardise.clinical.mean` / `.std`: a value is standardised when its missing indicator is 0).
///
/// # Errors
/// A study whose multimodal section is inconsistent (already refused when the study was typed).
fn model_description(model: &StudyModel) -> Result<BTreeMap<String, String>> {
    let config = match (model.clinical_config(), model.multimodal_config()?) {
        (Some(c), _) => Some(serde_json::to_string(&c)?),
        (None, Some(m)) => Some(serde_json::to_string(&m)?),
        (None, None) => None,
    };
    let mut out = BTreeMap::new();
    if let Some(config) = config {
        out.insert("model_config".to_string(), config);
        out.insert("clinical_columns".to_string(), serde_json::to_string(&fedhcc_cohort::design_columns(&model.spec))?);
        out.insert(
            "clinical_numeric".to_string(),
            serde_json::to_string(&fedhcc_cohort::numeric_positions(&model.spec))?,
        );
    }
    Ok(out)
}

/// Reads a `.fhcp` checkpoint.
///
/// # Errors
/// The file cannot be opened or is not a complete, consistent parameter payload.
pub fn read_checkpoint(path: &Path) -> Result<ParameterSet> {
    let file = std::fs::File::open(path).with_context(|| format!("opening the checkpoint {}", path.display()))?;
    ParameterSet::read_from(&mut std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a fedhcc checkpoint (or is damaged)", path.display()))
}
