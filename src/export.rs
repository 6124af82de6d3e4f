//! `fedhcc export`: a checkpoint (the server's `state_dir/checkpoints/*.fhcp`, or what
//! `fedhcc train` writes) → a [safetensors](https://huggingface.co/docs/safetensors) file, so the
//! final model can be used outside fedhcc (PyTorch, numpy, candle, burn).
//!
//! The file is written by hand: an 8-byte little-endian header length, a JSON header (one entry
//! per tensor: `dtype` `F32`, `shape`, `data_offsets` into the data section, plus `__metadata__`
//! with the study id, the model kind and the layout fingerprint), padded with spaces to a multiple
//! of 8 bytes, then the raw little-endian f32 values, tensor after tensor in the model's order.

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
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("producer".to_string(), format!("fedhcc {}", env!("CARGO_PKG_VERSION"))),
        ("study_id".to_string(), study.study_id.clone()),
        ("run_id".to_string(), study.run_id.clone()),
        ("model_kind".to_string(), model.kind().to_string()),
        ("fingerprint".to_string(), params.fingerprint().to_hex()),
    ]);
    let bytes = safetensors_bytes(&params, &metadata)?;
    fedhcc_core::pki::write_atomic(&args.out, &bytes, false)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "Exported {} tensors ({} values, {} model, fingerprint {}) to {} ({:.2} MB).",
        params.layout().specs().len(),
        params.numel(),
        model.kind(),
        params.fingerprint().short(),
        args.out.display(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
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

/// The safetensors encoding of `params` with `metadata`.
///
/// # Errors
/// A tensor name that safetensors reserves (`__metadata__`).
pub fn safetensors_bytes(params: &ParameterSet, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut offset = 0usize;
    for (spec, values) in params.tensors() {
        if spec.name == "__metadata__" {
            bail!("a tensor is named __metadata__, which safetensors reserves");
        }
        let end = offset + values.len() * 4;
        header.insert(
            spec.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": spec.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, values) in params.tensors() {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// One tensor read back from a safetensors file.
#[cfg(test)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Parses a safetensors file of F32 tensors (the inverse of [`safetensors_bytes`], written
/// independently from the format's definition), tensors in data-offset order.
#[cfg(test)]
pub fn parse_safetensors(bytes: &[u8]) -> Result<(BTreeMap<String, String>, Vec<Tensor>)> {
    let n = u64::from_le_bytes(bytes.get(..8).context("shorter than 8 bytes")?.try_into()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8 + n).context("header runs past the end")?)?;
    let data = &bytes[8 + n..];
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v)?;
            continue;
        }
        if v["dtype"] != "F32" {
            bail!("{name}: dtype {}", v["dtype"]);
        }
        let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())?;
        let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone())?;
        let raw = data.get(a..b).context("offsets out of range")?;
        if raw.len() != shape.iter().product::<usize>() * 4 {
            bail!("{name}: {} bytes for shape {shape:?}", raw.len());
        }
        let values = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.push((a, Tensor { name, shape, values }));
    }
    tensors.sort_by_key(|(a, _)| *a);
    Ok((metadata, tensors.into_iter().map(|(_, t)| t).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_exact_with_names_shapes_and_metadata() {
        let params = ParameterSet::from_tensors(vec![
            (
                "mri.stages.0.conv.weight".into(),
                vec![2, 1, 3],
                vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e-39, -7.25, 1e30],
            ),
            ("head.bias".into(), vec![1], vec![0.1]),
            ("a.weight".into(), vec![3, 1], vec![f32::MAX, -1.0, 2.0]),
        ])
        .unwrap();
        let meta = BTreeMap::from([("study_id".to_string(), "s1".to_string())]);
        let bytes = safetensors_bytes(&params, &meta).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(hlen % 8, 0);
        assert_eq!(bytes.len(), 8 + hlen + params.numel() * 4);
        let (m, tensors) = parse_safetensors(&bytes).unwrap();
        assert_eq!(m, meta);
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let expected: Vec<&str> = params.tensors().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names, expected, "tensors in the model's order");
        for ((spec, values), t) in params.tensors().zip(&tensors) {
            assert_eq!(t.shape, spec.shape);
            let a: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = t.values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(a, b, "{}", spec.name);
        }
    }
}
