//! The multimodal models on the real binary: a tiny synthetic cohort with images, `preprocess`,
//! `train --mode local` (preop) and `--mode central` (postop, two sites pooled), `export` to
//! safetensors read back bit-exactly, and `demo --model both` for federated runs of both models
//! over mTLS with the sites' statistics pooled into the model before round 1.

use crate::harness::{fedhcc, json};
use fedhcc_core::params::ParameterSet;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A tiny multimodal study of `kind` in `dir/<kind>.toml` and one site config per center.
fn configs(dir: &Path, cohort: &Path, kind: &str) -> Vec<PathBuf> {
    let preset = if kind == "preop" { "hcc_preoperative" } else { "hcc_postoperative" };
    std::fs::write(
        dir.join(format!("{kind}.toml")),
        format!(
            "study_id = \"mm\"\nrun_id = \"r1\"\n[federation]\nrounds = 2\nmin_sites = 1\n\
             [training]\nlocal_epochs = 1\nbatch_size = 4\nlearning_rate = 0.001\nseed = 3\n\
             [model]\nkind = \"{kind}\"\n[model.mri]\nchannels = [4, 8]\nembed = 8\n[model.wsi]\nhidden = 8\nattention = 4\n\
             max_train_patches = 8\n[model.clinical]\nhidden = [8]\n[model.fusion]\nhidden = [8]\n[model.training]\npatience = 0\n\
             [cohort]\npreset = \"{preset}\"\nval_frac = 0.2\ntest_frac = 0.3\n\
             [imaging.mri]\ngrid = [8, 16, 16]\n[imaging.wsi]\nmax_patches = 12\n"
        ),
    )
    .unwrap();
    ["center_a", "center_b"]
        .iter()
        .map(|c| {
            let cfg = dir.join(format!("site-{c}-{kind}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "site_id = \"{c}\"\nserver = \"https://127.0.0.1:1\"\nserver_name = \"localhost\"\nstudy = \"{kind}.toml\"\n\
                     data_dir = \"{}\"\nstate_dir = \"{}\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
                    cohort.join(c).display(),
                    dir.join("state").join(c).display()
                ),
            )
            .unwrap();
            cfg
        })
        .collect()
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Reads a safetensors file (format: 8-byte LE header length, JSON header, raw data): the
/// metadata and (name, shape, values) in data order.
fn read_safetensors(bytes: &[u8]) -> (serde_json::Map<String, Value>, Tensors) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut meta = serde_json::Map::new();
    let mut tensors = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            meta = v.as_object().unwrap().clone();
            continue;
        }
        assert_eq!(v["dtype"], "F32", "{name}");
        let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
        let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        let values: Vec<f32> =
            data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.push((a, name, shape, values));
    }
    tensors.sort_by_key(|t| t.0);
    let end = tensors.last().map_or(0, |t| t.0 + t.3.len() * 4);
    assert_eq!(end, data.len(), "the data section holds exactly the tensors");
    (meta, tensors.into_iter().map(|(_, n, s, v)| (n, s, v)).collect())
}

#[test]
fn preprocess_train_local_and_central_then_export() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tmp.path().join("cohort");
    let (ok, _, stderr) =
        fedhcc(&["synth", "--out", cohort.to_str().unwrap(), "--patients", "24", "--scale", "tiny", "--seed", "11"]);
    assert!(ok, "{stderr}");
    let pre = configs(tmp.path(), &cohort, "preop");
    let post = configs(tmp.path(), &cohort, "postop");
    let model = tmp.path().join("preop-local.fhcp");

    // Nothing prepared yet: the operator is told what to run.
    let (ok, _, stderr) =
        fedhcc(&["train", "--site-config", pre[0].to_str().unwrap(), "--out", model.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("fedhcc preprocess"), "{stderr}");

    for cfg in &pre {
        let s = json(&["preprocess", "--site-config", cfg.to_str().unwrap(), "--json", "--threads", "2"]);
        assert!(s["mri_done"].as_u64().unwrap() >= 8, "{s}");
    }

    // One site alone, the preoperative model.
    let local = json(&[
        "train",
        "--mode",
        "local",
        "--site-config",
        pre[0].to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(local["model"], "preop");
    assert_eq!(local["rounds"], 2);
    assert_eq!(local["history"].as_array().unwrap().len(), 2);
    for round in local["history"].as_array().unwrap() {
        assert!(round["train_loss"].as_f64().unwrap().is_finite(), "{round}");
    }
    let test = &local["test"];
    assert!(test["n"].as_u64().unwrap() >= 2, "{test}");
    assert!(test["metrics"]["loss"].as_f64().unwrap().is_finite(), "{test}");
    for k in ["auc", "c_index"] {
        if let Some(v) = test["metrics"][k].as_f64() {
            assert!((0.0..=1.0).contains(&v), "{k} {v}");
        }
    }
    let checkpoint = std::fs::read(&model).unwrap();
    let params = ParameterSet::decode(&checkpoint).unwrap();
    assert_eq!(params.fingerprint().to_hex(), local["fingerprint"].as_str().unwrap());
    assert!(params.layout().specs().iter().any(|s| s.name.starts_with("mri.")), "an MRI branch");
    assert!(!params.layout().specs().iter().any(|s| s.name.starts_with("wsi.")), "no WSI branch in preop");

    // Export (default: PyTorch's layout): names, shapes and every bit, plus the metadata.
    let st = tmp.path().join("model.safetensors");
    let export = |study: &str, out: &Path, extra: &[&str]| {
        let (study, out) = (tmp.path().join(study), out.to_str().unwrap().to_owned());
        let args =
            ["export", "--checkpoint", model.to_str().unwrap(), "--study", study.to_str().unwrap(), "--out", &out];
        fedhcc(&[&args[..], extra].concat())
    };
    let (ok, stdout, stderr) = export("preop.toml", &st, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Exported"), "{stdout}");
    let (meta, tensors) = read_safetensors(&std::fs::read(&st).unwrap());
    assert_eq!(meta["study_id"], "mm");
    assert_eq!(meta["model_kind"], "preop");
    assert_eq!(meta["layout"], "torch");
    assert_eq!(meta["fingerprint"].as_str().unwrap(), params.fingerprint().to_hex());
    let config: Value = serde_json::from_str(meta["model_config"].as_str().unwrap()).unwrap();
    assert_eq!(config["kind"], "preop");
    assert!(config["mri"]["groups"].as_u64().is_some() && config["mri"]["activation"].is_string(), "{config}");
    assert_eq!(tensors.len(), params.layout().specs().len());
    let by_name: std::collections::HashMap<&str, (&Vec<usize>, &Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), (s, v))).collect();
    for (spec, values) in params.tensors() {
        // PyTorch's names: GroupNorm weight / bias; Linear weights [out, in]; the rest as burn has them.
        let name = spec.name.replace(".norm.gamma", ".norm.weight").replace(".norm.beta", ".norm.bias");
        let (shape, read) = by_name.get(name.as_str()).unwrap_or_else(|| panic!("{name} not in the file"));
        let expected: Vec<f32> = match spec.shape[..] {
            [rows, cols] if spec.name.ends_with(".weight") => {
                assert_eq!(**shape, vec![cols, rows], "{name}");
                (0..rows * cols).map(|k| values[(k % rows) * cols + k / rows]).collect()
            }
            _ => {
                assert_eq!(**shape, spec.shape, "{name}");
                values.to_vec()
            }
        };
        assert!(expected.iter().zip(read.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
    }
    assert!(by_name.contains_key("mri.stages.0.norm.weight") && by_name.contains_key("mri.embed.weight"));
    // --layout burn: fedhcc's own names and shapes, bit for bit.
    let burn = tmp.path().join("burn.safetensors");
    let (ok, _, stderr) = export("preop.toml", &burn, &["--layout", "burn"]);
    assert!(ok, "{stderr}");
    let (meta, tensors) = read_safetensors(&std::fs::read(&burn).unwrap());
    assert_eq!(meta["layout"], "burn");
    let by_name: std::collections::HashMap<&str, (&Vec<usize>, &Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), (s, v))).collect();
    for (spec, values) in params.tensors() {
        let (shape, read) = by_name[spec.name.as_str()];
        assert_eq!(*shape, spec.shape);
        assert!(values.iter().zip(read.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{} differs", spec.name);
    }
    // A study describing another model is refused.
    let (ok, _, stderr) = export("postop.toml", &tmp.path().join("x.safetensors"), &[]);
    assert!(!ok && stderr.contains("layout"), "{stderr}");

    // Both sites pooled, the postoperative model (everything was prepared above: a rerun reuses it).
    for cfg in &post {
        let s = json(&["preprocess", "--site-config", cfg.to_str().unwrap(), "--json", "--threads", "2"]);
        assert!(s["mri_reused"].as_u64().unwrap() >= 8 && s["slides_reused"].as_u64().unwrap() >= 8, "{s}");
    }
    let central = json(&[
        "train",
        "--mode",
        "central",
        "--site-config",
        post[0].to_str().unwrap(),
        "--site-config",
        post[1].to_str().unwrap(),
        "--out",
        tmp.path().join("postop-central.fhcp").to_str().unwrap(),
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(central["model"], "postop");
    assert_eq!(central["sites"], serde_json::json!(["center_a", "center_b"]));
    assert!(central["train_samples"].as_u64().unwrap() > local["train_samples"].as_u64().unwrap(), "{central}");
    let post_params = ParameterSet::decode(&std::fs::read(tmp.path().join("postop-central.fhcp")).unwrap()).unwrap();
    assert!(post_params.layout().specs().iter().any(|s| s.name.starts_with("wsi.")), "a WSI branch in postop");

    // --mode local with two sites is refused.
    let (ok, _, stderr) = fedhcc(&[
        "train",
        "--site-config",
        pre[0].to_str().unwrap(),
        "--site-config",
        pre[1].to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("exactly one"), "{stderr}");
}

/// The standardisation tensors of a checkpoint, by name.
fn standardisation(path: &Path) -> Vec<(String, Vec<f32>)> {
    let p = ParameterSet::decode(&std::fs::read(path).unwrap()).unwrap();
    p.tensors().filter(|(s, _)| s.name.starts_with("standardise.")).map(|(s, v)| (s.name.clone(), v.to_vec())).collect()
}

#[test]
fn demo_trains_both_models_federated_with_pooled_standardisation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let (ok, stdout, stderr) = fedhcc(&[
        "demo",
        "--model",
        "both",
        "--scale",
        "tiny",
        "--patients",
        "40",
        "--rounds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("rounds committed: 2").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("held-out evaluation").count(), 2, "{stdout}");
    // Each model's run ends with its study report; the image models' participant flow counts the
    // patients without a usable MRI (the image check is made once per site, reused for postop).
    for kind in ["preop", "postop"] {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("report-{kind}/report.json"))).unwrap()).unwrap();
        assert_eq!(report["study"]["model_kind"], kind);
        // ... and its cross-center study, in the report.
        assert!(out.join(format!("cross-center-{kind}/{kind}/cross-center.json")).exists());
        assert_eq!(report["cross_center"]["rows"].as_array().map(Vec::len), Some(6), "{kind}");
        let flow = report["participant_flow"]["sites"].as_array().unwrap();
        assert!(flow.iter().all(|s| s["without_usable_mri"].as_u64() == Some(0)), "{flow:?}");
    }
    // The postoperative model pools the slide patch features too.
    let postop = std::fs::read_dir(out.join("server-state-postop/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("round-00002.fhcp"))
        .expect("the postop model's last checkpoint");
    let names: Vec<String> = standardisation(&postop).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["standardise.clinical.mean", "standardise.clinical.std", "standardise.wsi.mean", "standardise.wsi.std"]
    );
    let dir = out.join("server-state-preop/checkpoints");
    let find = |suffix: &str| -> PathBuf {
        let found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        assert_eq!(found.len(), 1, "{suffix}: {found:?}");
        found[0].clone()
    };
    let (r1, r2) = (find("round-00001.fhcp"), find("round-00002.fhcp"));
    // The server pooled the sites' sums before round 1: the statistics are set ...
    let pooled = standardisation(&r1);
    assert_eq!(
        pooled.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["standardise.clinical.mean", "standardise.clinical.std"]
    );
    assert!(pooled[1].1.iter().all(|&s| s > 0.0), "pooled standard deviations are set: {pooled:?}");
    assert!(pooled[0].1.iter().any(|&m| m != 0.0), "pooled means are set: {pooled:?}");
    // ... never trained (every update's delta is exactly 0 there) ...
    assert_eq!(standardisation(&r2), pooled);
    // ... and equal to the pooling `train --mode central` does from the same sites' data.
    let cfg = out.join("configs-preop");
    let central = tmp.path().join("central.fhcp");
    let ids = tmp.path().join("test-ids.txt");
    let (a, b) = (cfg.join("site-center_a.toml"), cfg.join("site-center_b.toml"));
    let central_train = |more: &[&str]| {
        let mut args = vec!["train", "--mode", "central", "--site-config", a.to_str().unwrap()];
        args.extend(["--site-config", b.to_str().unwrap()]);
        args.extend(more);
        fedhcc(&args)
    };
    let (ok, so, se) =
        central_train(&["--rounds", "1", "--out", central.to_str().unwrap(), "--test-ids", ids.to_str().unwrap()]);
    assert!(ok, "{so}\n{se}");
    assert_eq!(standardisation(&central), pooled, "federated and central pooling agree bit for bit");
    let listed = std::fs::read_to_string(&ids).unwrap();
    assert!(!listed.is_empty() && listed.lines().all(|l| l.starts_with('A') || l.starts_with('B')), "{listed}");
    // The federated model is evaluated on the same pooled test patients with --rounds 0.
    let same = tmp.path().join("same.fhcp");
    let (ok, so, se) =
        central_train(&["--init", r2.to_str().unwrap(), "--rounds", "0", "--out", same.to_str().unwrap(), "--json"]);
    assert!(ok, "{so}\n{se}");
    let v: Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(v["rounds"], 0);
    assert_eq!(std::fs::read(&same).unwrap(), std::fs::read(&r2).unwrap());
    assert!(v["test"]["n"].as_u64().unwrap() as usize == listed.lines().count(), "{v}");
}
