//! The safetensors model file that `fedhcc export` and `fedhcc admin export` write and `fedhcc
//! validate` reads, through the [`safetensors`] crate.
//!
//! One F32 tensor per model tensor, in one of two layouts ([`FileLayout`], recorded in the metadata
//! under `layout`):
//!
//! - `torch` (the default): PyTorch's names and shapes, as burn-store's PyTorch adapter maps a burn
//!   module (`fedhcc_model::torch_tensor`): `Linear` weights `[out, in]`, `GroupNorm` `weight` /
//!   `bias`; a PyTorch module of the same architecture (`scripts/fedhcc_model.py`) loads the file
//!   with `load_state_dict(strict=True)`;
//! - `burn`: fedhcc's own (burn's) names and shapes, `Linear` weights `[in, out]`, `GroupNorm`
//!   `gamma` / `beta`. A file without a `layout` key (written before the key existed) is this layout.
//!
//! The metadata (`__metadata__`, text only) always holds `layout`, `format` (`pt` for the torch
//! layout, `burn` otherwise), `producer` and `fingerprint`: the model's fedhcc layout fingerprint
//! (names and shapes in fedhcc's layout and order), whichever layout the file has. The exporters add
//! the study, run and model description. The safetensors crate orders the tensors by name (the
//! reader maps them back onto the layout the reading side expects, [`SafetensorsFile::to_params`])
//! and writes the metadata keys in no fixed order: two exports of one model hold the same tensors,
//! values and metadata, but their bytes may differ in the order of the metadata's keys.

use anyhow::{Result, bail};
use fedhcc_core::params::{Layout, ParameterSet};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Largest safetensors header accepted (bytes of JSON).
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// How many names a layout mismatch lists before "and N more".
const LISTED: usize = 6;

/// The names and shapes a model file's tensors have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileLayout {
    /// PyTorch's: `[out, in]` Linear weights, `weight`/`bias` for GroupNorm (burn-store's PyTorch
    /// adapter); loads into a PyTorch module with `load_state_dict(strict=True)`.
    Torch,
    /// burn's (fedhcc's own): `[in, out]` Linear weights, GroupNorm `gamma`/`beta`.
    Burn,
}

impl FileLayout {
    /// The name in the metadata and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FileLayout::Torch => "torch",
            FileLayout::Burn => "burn",
        }
    }

    fn other(self) -> Self {
        match self {
            FileLayout::Torch => FileLayout::Burn,
            FileLayout::Burn => FileLayout::Torch,
        }
    }

    /// Where `spec`'s tensor sits in this layout: name, shape, and whether its values are transposed.
    fn place(self, spec: &fedhcc_core::params::TensorSpec) -> fedhcc_model::TorchTensor {
        match self {
            FileLayout::Torch => fedhcc_model::torch_tensor(spec),
            FileLayout::Burn => {
                fedhcc_model::TorchTensor { name: spec.name.clone(), shape: spec.shape.clone(), transposed: false }
            }
        }
    }
}

impl fmt::Display for FileLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The safetensors encoding of `params` in `layout`, with `metadata` plus `layout`, `format`,
/// `producer` and `fingerprint` (which the writer sets).
///
/// # Errors
/// A tensor named `__metadata__` (safetensors reserves it), or two tensors that would have one name
/// in this layout.
pub fn safetensors_bytes(
    params: &ParameterSet,
    layout: FileLayout,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(params.layout().specs().len());
    let mut names = BTreeSet::new();
    for (spec, values) in params.tensors() {
        let placed = layout.place(spec);
        if placed.name == "__metadata__" {
            bail!("a tensor is named __metadata__, which safetensors reserves");
        }
        if !names.insert(placed.name.clone()) {
            bail!("two tensors would be named '{}' in the {layout} layout; export with --layout burn", placed.name);
        }
        let values = if placed.transposed {
            fedhcc_model::transpose(values, spec.shape[0], spec.shape[1])
        } else {
            values.to_vec()
        };
        tensors.push((placed.name, placed.shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let mut meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    meta.insert("layout".into(), layout.as_str().into());
    meta.insert("format".into(), if layout == FileLayout::Torch { "pt" } else { "burn" }.into());
    meta.insert("producer".into(), format!("fedhcc {}", env!("CARGO_PKG_VERSION")));
    meta.insert("fingerprint".into(), params.fingerprint().to_hex());
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).map(|v| (name, v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("encoding the model: {e}"))?;
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("encoding the model: {e}"))
}

/// A safetensors model file as read: its metadata, its layout and its tensors by name.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// `__metadata__` (`study_id`, `model_kind`, `fingerprint`, … as the exporters write them).
    pub metadata: BTreeMap<String, String>,
    /// From the metadata's `layout`; `burn` when it has none (files written before the key).
    pub layout: FileLayout,
    /// `(shape, values)` by name.
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Parses a safetensors file of F32 tensors (bounds and offsets checked by the safetensors crate:
/// the tensors must cover the data section end to end, without gaps or overlaps). `file` names it
/// in errors.
///
/// # Errors
/// A truncated file, a header that is not safetensors JSON or too large, another dtype, offsets
/// that do not match the shapes or the data, or an unknown `layout` in the metadata.
pub fn read_safetensors(bytes: &[u8], file: &str) -> Result<SafetensorsFile> {
    use safetensors::SafeTensorError as E;
    let bad = |what: String| anyhow::anyhow!("{file} is not a usable safetensors model: {what}");
    let len = bytes.get(..8).ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len.try_into().map_err(|_| bad("no header length".into()))?);
    if n > MAX_HEADER_BYTES || n > (bytes.len() - 8) as u64 {
        return Err(bad(format!("a header of {n} bytes in a file of {} bytes", bytes.len())));
    }
    let data_bytes = bytes.len() - 8 - n as usize;
    let (n, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            E::InvalidHeader(e) => format!("its header is not UTF-8 text: {e}"),
            E::InvalidHeaderDeserialization(e) | E::JsonError(e) => {
                format!("its header is not JSON in the safetensors form: {e}")
            }
            E::InvalidOffset(name) => {
                format!("tensor '{name}' has data offsets that leave a gap or overlap the tensor before it")
            }
            E::TensorInvalidInfo => "a tensor's data offsets do not match its shape and dtype".into(),
            E::MetadataIncompleteBuffer => format!(
                "its tensors' data offsets do not cover its {data_bytes} bytes of data exactly (the file is truncated \
                 or has bytes appended)"
            ),
            E::ValidationOverflow => "a tensor's shape is too large".into(),
            other => other.to_string(),
        })
    })?;
    let data = &bytes[8 + n..];
    let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let layout = match metadata.get("layout").map(String::as_str) {
        None | Some("burn") => FileLayout::Burn,
        Some("torch") => FileLayout::Torch,
        Some(other) => {
            return Err(bad(format!("its metadata names the layout '{other}' (fedhcc writes torch or burn)")));
        }
    };
    let mut tensors = BTreeMap::new();
    for name in header.offset_keys() {
        let info = header.info(&name).ok_or_else(|| bad(format!("tensor '{name}' has no entry")))?;
        if info.dtype != safetensors::Dtype::F32 {
            return Err(bad(format!("tensor '{name}' is {} (fedhcc models are F32)", info.dtype)));
        }
        let (a, b) = info.data_offsets;
        let raw = data.get(a..b).ok_or_else(|| bad(format!("tensor '{name}' lies outside the data")))?;
        let values = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.insert(name, (info.shape.clone(), values));
    }
    Ok(SafetensorsFile { metadata, layout, tensors })
}

impl SafetensorsFile {
    /// The tensors as a parameter set of `expected` (fedhcc's names, shapes and order), the torch
    /// layout's transposes undone: bit for bit what was exported.
    ///
    /// # Errors
    /// The file's names or shapes are not `expected`'s in its layout: every missing, misshapen and
    /// unexpected tensor (the first few of each) and, when the file fits `expected` in the other
    /// layout, that its metadata names the wrong one.
    pub fn to_params(&self, expected: &Layout) -> Result<ParameterSet, String> {
        match self.map(self.layout, expected) {
            Ok(p) => Ok(p),
            Err(problems) => {
                let hint = if self.map(self.layout.other(), expected).is_ok() {
                    format!(
                        "; the tensors fit in the {} layout, but the file's metadata says {}",
                        self.layout.other(),
                        self.layout
                    )
                } else {
                    String::new()
                };
                Err(format!("{problems}{hint}"))
            }
        }
    }

    fn map(&self, layout: FileLayout, expected: &Layout) -> Result<ParameterSet, String> {
        let (mut missing, mut misshapen, mut used) = (Vec::new(), Vec::new(), BTreeSet::new());
        let mut out = Vec::with_capacity(expected.specs().len());
        for spec in expected.specs() {
            let placed = layout.place(spec);
            let Some((shape, values)) = self.tensors.get(&placed.name) else {
                missing.push(format!("'{}'", placed.name));
                continue;
            };
            used.insert(placed.name.clone());
            if *shape != placed.shape {
                misshapen.push(format!("'{}' is {shape:?}, not {:?}", placed.name, placed.shape));
                continue;
            }
            let values =
                if placed.transposed { fedhcc_model::transpose(values, shape[0], shape[1]) } else { values.clone() };
            out.push((spec.name.clone(), spec.shape.clone(), values));
        }
        let extra: Vec<String> = self.tensors.keys().filter(|k| !used.contains(*k)).map(|k| format!("'{k}'")).collect();
        if missing.is_empty() && misshapen.is_empty() && extra.is_empty() {
            return ParameterSet::from_tensors(out).map_err(|e| e.to_string());
        }
        let list = |what: &str, v: &[String]| {
            let more = if v.len() > LISTED { format!(" and {} more", v.len() - LISTED) } else { String::new() };
            format!("{what} {}{more}", v[..v.len().min(LISTED)].join(", "))
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(list("missing", &missing));
        }
        if !misshapen.is_empty() {
            parts.push(list("misshapen", &misshapen));
        }
        if !extra.is_empty() {
            parts.push(list("not in the model", &extra));
        }
        Err(format!("in the {layout} layout, tensors {}", parts.join("; ")))
    }

    /// Tensors in the file.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of each kind of tensor: a conv weight (5-D), a GroupNorm's scale and shift, Linear
    /// weights (2-D) and biases, a standardisation tensor; awkward values included.
    fn model() -> ParameterSet {
        ParameterSet::from_tensors(vec![
            (
                "mri.stages.0.conv.weight".into(),
                vec![2, 1, 1, 1, 3],
                vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e-39, -7.25, 1e30],
            ),
            ("mri.stages.0.conv.bias".into(), vec![2], vec![0.5, -0.5]),
            ("mri.stages.0.norm.gamma".into(), vec![2], vec![1.0, 2.0]),
            ("mri.stages.0.norm.beta".into(), vec![2], vec![0.0, -1.0]),
            ("layers.0.weight".into(), vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ("layers.0.bias".into(), vec![3], vec![0.25, -0.0, f32::MAX]),
            ("layers.1.weight".into(), vec![3, 1], vec![f32::MAX, -1.0, 2.0]),
            ("layers.1.bias".into(), vec![1], vec![0.1]),
            ("standardise.clinical.mean".into(), vec![2], vec![10.0, 20.0]),
        ])
        .unwrap()
    }

    fn bits(p: &ParameterSet) -> Vec<u32> {
        p.values().iter().map(|v| v.to_bits()).collect()
    }

    /// What `fedhcc export` wrote before this module (by hand, burn layout, no `layout` key, the
    /// tensors in the model's order): such files must stay readable.
    fn old_export(params: &ParameterSet, metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
        let mut offset = 0usize;
        for (spec, values) in params.tensors() {
            let end = offset + values.len() * 4;
            header.insert(
                spec.name.clone(),
                serde_json::json!({ "dtype": "F32", "shape": spec.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(params.values().iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn torch_layout_has_pytorch_names_and_shapes_and_reads_back_bit_for_bit() {
        let meta = BTreeMap::from([("study_id".to_string(), "s1".to_string())]);
        let bytes = safetensors_bytes(&model(), FileLayout::Torch, &meta).unwrap();
        // Read independently, with the crate alone: PyTorch's names, [out, in] Linear weights.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "layers.0.bias",
                "layers.0.weight",
                "layers.1.bias",
                "layers.1.weight",
                "mri.stages.0.conv.bias",
                "mri.stages.0.conv.weight",
                "mri.stages.0.norm.bias",
                "mri.stages.0.norm.weight",
                "standardise.clinical.mean",
            ]
        );
        let w = st.tensor("layers.0.weight").unwrap();
        assert_eq!(w.shape(), [3, 2]);
        let w: Vec<f32> = w.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(w, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0], "row j of the PyTorch weight is output j");
        assert_eq!(st.tensor("mri.stages.0.conv.weight").unwrap().shape(), [2, 1, 1, 1, 3]);
        assert_eq!(st.tensor("mri.stages.0.norm.weight").unwrap().shape(), [2]);

        let f = read_safetensors(&bytes, "m.safetensors").unwrap();
        assert_eq!(f.layout, FileLayout::Torch);
        assert_eq!(f.metadata["layout"], "torch");
        assert_eq!(f.metadata["format"], "pt");
        assert_eq!(f.metadata["study_id"], "s1");
        assert_eq!(f.metadata["fingerprint"], model().fingerprint().to_hex());
        let back = f.to_params(model().layout()).unwrap();
        assert_eq!(back.layout(), model().layout(), "fedhcc's names, shapes and order");
        assert_eq!(bits(&back), bits(&model()));
    }

    #[test]
    fn burn_layout_reads_back_bit_for_bit_and_files_from_before_the_layout_key_too() {
        let meta = BTreeMap::from([("study_id".to_string(), "s1".to_string())]);
        let bytes = safetensors_bytes(&model(), FileLayout::Burn, &meta).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("layers.0.weight").unwrap().shape(), [2, 3]);
        assert!(st.tensor("mri.stages.0.norm.gamma").is_ok());
        let f = read_safetensors(&bytes, "m").unwrap();
        assert_eq!((f.layout, f.metadata["format"].as_str()), (FileLayout::Burn, "burn"));
        assert_eq!(bits(&f.to_params(model().layout()).unwrap()), bits(&model()));

        let old_meta = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("fingerprint".to_string(), model().fingerprint().to_hex()),
        ]);
        let old = read_safetensors(&old_export(&model(), &old_meta), "old.safetensors").unwrap();
        assert_eq!(old.layout, FileLayout::Burn, "no layout key: burn's");
        let back = old.to_params(model().layout()).unwrap();
        assert_eq!((back.layout(), bits(&back)), (model().layout(), bits(&model())));
    }

    #[test]
    fn a_file_that_does_not_fit_is_refused_naming_the_tensors() {
        let bytes = safetensors_bytes(&model(), FileLayout::Torch, &BTreeMap::new()).unwrap();
        let f = read_safetensors(&bytes, "m").unwrap();
        let other = ParameterSet::from_tensors(vec![
            ("layers.0.weight".into(), vec![2, 4], vec![0.0; 8]),
            ("layers.0.bias".into(), vec![3], vec![0.0; 3]),
            ("layers.2.bias".into(), vec![1], vec![0.0]),
        ])
        .unwrap();
        let e = f.to_params(other.layout()).unwrap_err();
        assert!(e.contains("missing 'layers.2.bias'"), "{e}");
        assert!(e.contains("misshapen 'layers.0.weight' is [3, 2], not [4, 2]"), "{e}");
        assert!(e.contains("not in the model 'layers.1.bias', 'layers.1.weight'"), "{e}");
        assert!(e.contains("torch layout"), "{e}");

        // A torch file whose layout key was lost reads as burn's: refused, with the hint.
        let mut meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
        meta.remove("layout");
        let relabelled = {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            safetensors::serialize(st.tensors(), Some(meta)).unwrap()
        };
        let e = read_safetensors(&relabelled, "m").unwrap().to_params(model().layout()).unwrap_err();
        assert!(e.contains("fit in the torch layout, but the file's metadata says burn"), "{e}");
    }

    #[test]
    fn refuses_damaged_files_with_the_reason_and_never_panics() {
        let meta = BTreeMap::from([("fingerprint".to_string(), model().fingerprint().to_hex())]);
        let good = safetensors_bytes(&model(), FileLayout::Torch, &meta).unwrap();
        let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(good[8..8 + hlen].to_vec()).unwrap();
        let with_header = |h: &str| {
            let mut h = h.as_bytes().to_vec();
            h.resize(hlen, b' ');
            let mut out = good[..8].to_vec();
            out.extend(h);
            out.extend(&good[8 + hlen..]);
            out
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..5].to_vec(), "shorter"),
            (good[..good.len() - 4].to_vec(), "data offsets do not cover"),
            (
                {
                    let mut b = good.clone();
                    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                "header of",
            ),
            (with_header(&header.replace("F32", "I32")), "is I32"),
            (with_header(&header.replacen("[3,2]", "[3,3]", 1)), "data offsets do not match"),
            (with_header(&header.replacen("{", "[", 1)), "not JSON"),
            (with_header(&header.replace("\"torch\"", "\"keras\"")), "layout 'keras'"),
            ([good.clone(), vec![0; 4]].concat(), "cover"),
        ];
        for (bytes, needle) in cases {
            let e = read_safetensors(&bytes, "m.safetensors").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("m.safetensors") && e.contains(needle), "'{needle}' not in: {e}");
        }
        // Every truncation is an error, not a panic.
        for k in 0..good.len() {
            assert!(read_safetensors(&good[..k], "m").is_err(), "{k} bytes accepted");
        }
    }

    #[test]
    fn names_that_collide_in_a_layout_or_that_safetensors_reserves_are_refused() {
        let clash = ParameterSet::from_tensors(vec![
            ("norm.gamma".into(), vec![2], vec![1.0; 2]),
            ("norm.weight".into(), vec![2], vec![1.0; 2]),
        ])
        .unwrap();
        let e = safetensors_bytes(&clash, FileLayout::Torch, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("'norm.weight'"), "{e}");
        assert!(safetensors_bytes(&clash, FileLayout::Burn, &BTreeMap::new()).is_ok());
        let reserved = ParameterSet::from_tensors(vec![("__metadata__".into(), vec![1], vec![0.0])]).unwrap();
        assert!(safetensors_bytes(&reserved, FileLayout::Burn, &BTreeMap::new()).is_err());
    }
}
