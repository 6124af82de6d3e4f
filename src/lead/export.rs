//! `fedhcc export`: a checkpoint (the server's `state_dir/checkpoints/*.fhcp`, or what
//! `fedhcc train` writes) → a [safetensors](https://huggingface.co/docs/safetensors) file, so the
//! final model can be used outside fedhcc (PyTorch, numpy, candle, burn).
//!
//! The file ([`crate::lead::model_file`]) is in the PyTorch layout by default (`--layout torch`: what
//! `scripts/fedhcc_model.py` loads with `load_state_dict(strict=True)`), or in burn's
//! (`--layout burn`). Its metadata holds, besides the layout and the fingerprint, the study id, run
//! id and model kind, the model's architecture (`model_config`, JSON) and, for the models with a
//! clinical input, the design matrix's columns (`clinical_columns`) and where the standardised
//! numeric values and their missing indicators sit (`clinical_numeric`).

use crate::lead::model_file::{FileLayout, safetensors_bytes};
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

#[cfg(test)]
mod tests {
    //! The PyTorch modules of `scripts/fedhcc_model.py` against fedhcc's own forward pass, for each
    //! model kind: a model with perturbed weights and set standardisation statistics is written as
    //! `fedhcc export` writes it (torch layout, the same metadata), with raw inputs of a few patients
    //! (missing MRI phases, a patient without MRI, patients without a slide or with an empty one,
    //! bags of different sizes) and the scores fedhcc computes for them. With `FEDHCC_TORCH_PYTHON`
    //! (a Python with numpy, safetensors and torch) `scripts/check_torch_modules.py` loads each file
    //! with `load_state_dict(strict=True)` and must reproduce the scores; torch is not in CI, so
    //! without it only fedhcc's side runs.

    use super::*;
    use crate::lead::model_file::FileLayout;
    use fedhcc_model::{BackendKind, MultimodalDataset, MultimodalSample, PatchBag};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use serde_json::json;

    fn study(dir: &Path, kind: &str, extra: &str) -> StudyModel {
        let preset = if kind == "postop" { "hcc_postoperative" } else { "hcc_preoperative" };
        let path = dir.join(format!("{kind}.toml"));
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            &path,
            format!(
                "study_id = \"s\"\nrun_id = \"r\"\n[federation]\nrounds = 1\n[training]\nseed = 5\n\
                 [model]\nkind = \"{kind}\"\n{extra}\n[cohort]\npreset = \"{preset}\"\n\
                 [imaging.mri]\ngrid = [6, 10, 12]\n"
            ),
        )
        .unwrap();
        StudyModel::from_study(&fedhcc_core::config::load_study(&path).unwrap()).unwrap()
    }

    /// The study's initial model with every weight moved off its initial value and standardisation
    /// statistics set.
    fn perturbed(model: &StudyModel, rng: &mut ChaCha8Rng) -> ParameterSet {
        let params = model.initial_params(5).unwrap();
        let tensors = params
            .tensors()
            .map(|(spec, v)| {
                let values = if spec.name.ends_with(".std") {
                    v.iter().map(|_| rng.random_range(0.5..2.0)).collect()
                } else if spec.name.ends_with(".mean") {
                    v.iter().map(|_| rng.random_range(-1.0..1.0)).collect()
                } else {
                    v.iter().map(|x| x + rng.random_range(-0.3..0.3)).collect()
                };
                (spec.name.clone(), spec.shape.clone(), values)
            })
            .collect();
        ParameterSet::from_tensors(tensors).unwrap()
    }

    /// Raw design-matrix rows: random values, some numeric values missing (value 0, indicator 1).
    fn raw_rows(model: &StudyModel, n: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
        let d = fedhcc_cohort::design_width(&model.spec);
        let positions = fedhcc_cohort::numeric_positions(&model.spec);
        (0..n)
            .map(|i| {
                let mut row: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                for (k, &(value, missing)) in positions.iter().enumerate() {
                    let absent = (i + k) % 4 == 0;
                    row[missing] = if absent { 1.0 } else { 0.0 };
                    if absent {
                        row[value] = 0.0;
                    }
                }
                row
            })
            .collect()
    }

    fn standardised(model: &StudyModel, params: &ParameterSet, row: &[f32]) -> Vec<f32> {
        let (mean, std) = fedhcc_core::standardisation::read(params, fedhcc_site::standardise::CLINICAL).unwrap();
        let mut row = row.to_vec();
        fedhcc_cohort::standardise_row(&fedhcc_cohort::numeric_positions(&model.spec), &mut row, &mean, &std);
        row
    }

    fn write_fixture(dir: &Path, model: &StudyModel, params: &ParameterSet, fixture: serde_json::Value) {
        std::fs::create_dir_all(dir).unwrap();
        let mut metadata = BTreeMap::from([("model_kind".to_string(), model.kind().to_string())]);
        metadata.extend(model_description(model).unwrap());
        let bytes = crate::lead::model_file::safetensors_bytes(params, FileLayout::Torch, &metadata).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        std::fs::write(dir.join("fixture.json"), serde_json::to_vec(&fixture).unwrap()).unwrap();
    }

    fn clinical_fixture(dir: &Path) {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let model = study(dir, "clinical", "hidden = [8, 4]");
        let params = perturbed(&model, &mut rng);
        let raw = raw_rows(&model, 7, &mut rng);
        let x: Vec<f32> = raw.iter().flat_map(|r| standardised(&model, &params, r)).collect();
        let cfg = model.clinical_config().unwrap();
        let y = vec![0.0; raw.len()];
        let data = fedhcc_model::Dataset { x: &x, n: raw.len(), d: cfg.inputs, y: &y };
        let trainable = fedhcc_site::standardise::trainable(&params).unwrap();
        let scores = fedhcc_model::evaluate(&cfg, &trainable, &data, BackendKind::Flex).unwrap().scores;
        write_fixture(dir, &model, &params, json!({ "clinical": raw, "probability": scores }));
    }

    fn multimodal_fixture(dir: &Path, kind: &str, extra: &str) {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let model = study(dir, kind, extra);
        let cfg = model.multimodal_config().unwrap().unwrap();
        let params = perturbed(&model, &mut rng);
        let n = 6;
        let raw = raw_rows(&model, n, &mut rng);
        let (phases, voxels) = (cfg.mri.phases, cfg.mri.voxels());
        let wsi = fedhcc_core::standardisation::read(&params, fedhcc_site::standardise::WSI);
        // Patches per patient: None = no slide, Some(0) = an empty slide (the same for the model).
        let patches = [Some(5), None, Some(1), Some(9), Some(0), Some(3)];
        let (mut samples, mut crops, mut presence, mut bags, mut mask) = (vec![], vec![], vec![], vec![], vec![]);
        let max = 9;
        for i in 0..n {
            let crop: Option<Vec<f32>> =
                (i != 4).then(|| (0..phases * voxels).map(|_| rng.random_range(-2.0..2.0)).collect());
            let present: Vec<bool> =
                (0..phases).map(|p| crop.is_some() && !(i == 2 && p == 1) && !(i == 5 && p == 0)).collect();
            let bag = patches[i].map(|k| PatchBag {
                n: k,
                d: cfg.wsi.features,
                values: (0..k * cfg.wsi.features).map(|_| rng.random_range(-3.0..3.0)).collect(),
            });
            // What the torch modules get: raw inputs, missing phases as they are (the module masks them).
            crops.push(crop.clone().unwrap_or_else(|| vec![0.0; phases * voxels]));
            presence.push(present.iter().map(|&p| if p { 1.0f32 } else { 0.0 }).collect::<Vec<_>>());
            let d = cfg.wsi.features;
            let mut padded = vec![0.0f32; max * d];
            let mut m = vec![false; max];
            if let Some(b) = &bag {
                padded[..b.values.len()].copy_from_slice(&b.values);
                m[..b.n].iter_mut().for_each(|x| *x = true);
            }
            bags.push(padded);
            mask.push(m);
            samples.push(MultimodalSample {
                id: format!("p{i}"),
                crop,
                phase_present: present,
                bag: match (bag, &wsi) {
                    (Some(b), Some((m, s))) => Some(fedhcc_site::standardise::standardise_bag(&b, m, s)),
                    (b, _) => b,
                },
                clinical: standardised(&model, &params, &raw[i]),
                label: None,
                survival: None,
            });
        }
        let trainable = fedhcc_site::standardise::trainable(&params).unwrap();
        let ev =
            fedhcc_model::evaluate_multimodal(&cfg, &trainable, &MultimodalDataset::new(samples), BackendKind::Flex)
                .unwrap();
        let [depth, height, width] = cfg.mri.crop;
        write_fixture(
            dir,
            &model,
            &params,
            json!({
                "crops": crops, "crop_shape": [n, phases, depth, height, width], "presence": presence,
                "clinical": raw, "bags": bags, "bag_shape": [n, max, cfg.wsi.features], "mask": mask,
                "probability": ev.probabilities, "risk": ev.risks,
            }),
        );
    }

    #[test]
    fn the_pytorch_modules_reproduce_fedhccs_forward_pass_of_every_model_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = ["clinical", "preop", "postop"].map(|k| tmp.path().join(k));
        clinical_fixture(&dirs[0]);
        multimodal_fixture(
            &dirs[1],
            "preop",
            "[model.mri]\nchannels = [4, 8]\ngroups = 2\nembed = 6\n[model.clinical]\nhidden = [5]\n[model.fusion]\nhidden = [7]",
        );
        multimodal_fixture(
            &dirs[2],
            "postop",
            "[model.mri]\nchannels = [4]\nembed = 6\nactivation = \"gelu\"\n[model.wsi]\nhidden = 5\nattention = 3\n\
             [model.clinical]\nhidden = []\n[model.fusion]\nhidden = [6, 4]",
        );
        for d in &dirs {
            let f =
                crate::lead::model_file::read_safetensors(&std::fs::read(d.join("model.safetensors")).unwrap(), "m")
                    .unwrap();
            assert!(f.metadata.contains_key("model_config") && f.metadata.contains_key("clinical_numeric"));
        }
        let Ok(python) = std::env::var("FEDHCC_TORCH_PYTHON") else {
            eprintln!(
                "the PyTorch modules were not run: set FEDHCC_TORCH_PYTHON to a Python with numpy, safetensors and \
                 torch (torch is not in CI)"
            );
            return;
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_torch_modules.py");
        let out = std::process::Command::new(&python).arg(&script).args(&dirs).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{stdout}");
        assert!(out.status.success(), "{}:\n{stdout}\n{stderr}", script.display());
    }
}
