//! The site-data commands on the real binary: `synth` writes a tiny cohort in the real formats,
//! `data check` reads it (exit code 0 when clean, 3 when it finds an error such as a truncated MRI
//! phase), `preprocess` prepares it, skips one patient's bad files with the reason, and a rerun redoes
//! only what changed.

use crate::harness::{fedhcc, fedhcc_code, json};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A study and a site config pointing at `data` (TLS files are not read by these commands).
fn site_config(dir: &Path, data: &Path) -> PathBuf {
    std::fs::write(
        dir.join("study.toml"),
        "study_id = \"s\"\n[federation]\nrounds = 1\nmin_sites = 1\n[model]\nkind = \"preop\"\n\
         [cohort]\npreset = \"hcc_preoperative\"\n[imaging.mri]\ngrid = [8, 16, 16]\n[imaging.wsi]\nmax_patches = 20\n",
    )
    .unwrap();
    let cfg = dir.join("site.toml");
    std::fs::write(
        &cfg,
        format!(
            "site_id = \"center_a\"\nserver = \"https://127.0.0.1:1\"\nserver_name = \"localhost\"\nstudy = \"study.toml\"\n\
             data_dir = \"{}\"\nstate_dir = \"{}\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            data.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

fn patients(data: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(data.join("mri"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn synth_check_and_preprocess_a_tiny_cohort_skipping_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cohort");
    let (ok, stdout, stderr) =
        fedhcc(&["synth", "--out", out.to_str().unwrap(), "--patients", "16", "--scale", "tiny", "--seed", "5"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("patients/min"), "{stdout}");
    let data = out.join("center_a");
    assert!(data.join("clinical.csv").is_file() && out.join("truth.csv").is_file());
    let ids = patients(&data);
    assert!(ids.len() >= 6, "{ids:?}");
    let cfg = site_config(tmp.path(), &data);
    let cfg = cfg.to_str().unwrap();

    // A clean cohort: every MRI usable, every slide readable; no error, exit code 0.
    let check = json(&["data", "check", "--site-config", cfg, "--json"]);
    let n = check["patients_loaded"].as_u64().unwrap() as usize;
    assert_eq!(n, ids.len());
    assert!(check["label_flow"]["by_reason"].as_array().is_some_and(|r| !r.is_empty()));
    let img = &check["imaging"];
    assert_eq!(img["mri_usable"].as_u64(), Some(n as u64), "{img}");
    assert_eq!(img["slides_readable"], img["slides"]);
    assert_eq!(img["problems"].as_array().map(Vec::len), Some(0), "{img}");
    assert_eq!((check["model"].as_str(), check["errors"].as_u64()), (Some("preop"), Some(0)), "{}", check["findings"]);
    let clean_warnings = check["warnings"].as_u64().unwrap();
    let (code, text, stderr) = fedhcc_code(&["data", "check", "--site-config", cfg]);
    assert_eq!(code, Some(0), "{text}{stderr}");
    assert!(text.contains("Findings: 0 error(s)") && text.contains("Result: no error"), "{text}");

    // Break three patients: a truncated phase, a mask on another grid, an unreadable slide.
    let (bad_phase, bad_mask, bad_slide) = (&ids[0], &ids[1], &ids[2]);
    let phase = data.join("mri").join(bad_phase).join("arterial.nii.gz");
    let bytes = std::fs::read(&phase).unwrap();
    std::fs::write(&phase, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(fixture("mri/standard.nii.gz"), data.join("mri").join(bad_mask).join("mask.nii.gz")).unwrap();
    std::fs::copy(fixture("wsi/unreadable.svs"), data.join("wsi").join(bad_slide).join("second.svs")).unwrap();

    // The errors stop the preop model from training on two patients: exit code 3, named in the JSON …
    let (code, stdout, stderr) = fedhcc_code(&["data", "check", "--site-config", cfg, "--json"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("data check: 2 error(s)"), "{stderr}");
    let check: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let findings = check["findings"].as_array().unwrap();
    let finding = |code: &str| {
        findings.iter().find(|f| f["code"] == code).unwrap_or_else(|| panic!("no {code} finding: {findings:?}"))
    };
    let truncated = finding("phase_unreadable");
    assert_eq!((truncated["severity"].as_str(), truncated["count"].as_u64()), (Some("error"), Some(1)));
    assert_eq!(truncated["patients"], serde_json::json!([bad_phase]));
    assert_eq!(finding("mask_grid")["severity"], "error");
    // … an unreadable slide is a warning (the patient trains on its other slides, and preop uses none) …
    assert_eq!(finding("slide_unreadable")["severity"], "warning");
    assert_eq!(
        (check["errors"].as_u64(), check["warnings"].as_u64()),
        (Some(2), Some(clean_warnings + 1)),
        "{findings:?}"
    );
    // … and in the text, which never prints a value.
    let (code, text, _) = fedhcc_code(&["data", "check", "--site-config", cfg]);
    assert_eq!(code, Some(3), "{text}");
    let line = text.lines().find(|l| l.contains("[mri] phase_unreadable")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.trim_start().starts_with("error") && line.contains(bad_phase.as_str()), "{line}");
    assert!(text.contains("error    phase_unreadable:") && text.contains("Result: 2 error(s)"), "{text}");
    // Under a clinical-only study the same images stop nothing: warnings, exit code 0.
    let study = std::fs::read_to_string(tmp.path().join("study.toml")).unwrap();
    std::fs::write(tmp.path().join("study.toml"), study.replace("kind = \"preop\"", "kind = \"clinical\"")).unwrap();
    let (code, stdout, stderr) = fedhcc_code(&["data", "check", "--site-config", cfg, "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let clinical: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (clinical["errors"].as_u64(), clinical["warnings"].as_u64()),
        (Some(0), Some(clean_warnings + 3)),
        "{stdout}"
    );
    std::fs::write(tmp.path().join("study.toml"), study).unwrap();

    let problems = check["imaging"]["problems"].as_array().unwrap().clone();
    let find = |id: &str, kind: &str| {
        problems
            .iter()
            .find(|p| p["patient"] == id && p["kind"] == kind)
            .unwrap_or_else(|| panic!("{id} {kind}: {problems:?}"))
    };
    assert!(find(bad_phase, "phase_unreadable")["detail"].as_str().unwrap().contains("arterial.nii.gz"));
    find(bad_mask, "mask_grid");
    assert!(find(bad_slide, "slide_unreadable")["detail"].as_str().unwrap().contains("second.svs"));
    assert_eq!(check["imaging"]["mri_usable"].as_u64(), Some(n as u64 - 2));

    let first = json(&["preprocess", "--site-config", cfg, "--json", "--threads", "2"]);
    assert_eq!(first["patients"].as_u64(), Some(n as u64));
    assert_eq!(first["mri_done"].as_u64(), Some(n as u64 - 2), "{first}");
    let failed: Vec<&str> = first["mri_failed"].as_array().unwrap().iter().map(|f| f[0].as_str().unwrap()).collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.contains(&bad_phase.as_str()) && failed.contains(&bad_mask.as_str()), "{failed:?}");
    let slide_failures = first["slides_failed"].as_array().unwrap();
    assert_eq!(slide_failures.len(), 1, "{slide_failures:?}");
    assert_eq!(slide_failures[0][0], bad_slide.as_str());
    assert!(slide_failures[0][1].as_str().unwrap().contains("second.svs"));
    // The bad slide's patient keeps its good slide.
    assert_eq!(first["slides_done"].as_u64(), Some(n as u64));

    let state = tmp.path().join("state/preprocessed");
    assert!(state.join("manifest.json").is_file());
    assert!(!state.join("mri").join(format!("{bad_phase}.crop")).exists());
    assert!(state.join("mri").join(format!("{}.crop", ids[3])).is_file());
    let leftovers: Vec<_> = walk(&state)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".tmp")))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    // Nothing changed: nothing redone; the known failures are reported again.
    let again = json(&["preprocess", "--site-config", cfg, "--json"]);
    assert_eq!(again["mri_done"].as_u64(), Some(0), "{again}");
    assert_eq!(again["mri_reused"].as_u64(), Some(n as u64 - 2));
    assert_eq!(again["slides_done"].as_u64(), Some(0));
    assert_eq!(again["mri_failed"].as_array().map(Vec::len), Some(2));

    // Fix one patient's phase: only that patient is redone.
    std::fs::write(&phase, &bytes).unwrap();
    let fixed = json(&["preprocess", "--site-config", cfg, "--json"]);
    assert_eq!(fixed["mri_done"].as_u64(), Some(1), "{fixed}");
    assert_eq!(fixed["mri_failed"].as_array().map(Vec::len), Some(1));
    assert!(state.join("mri").join(format!("{bad_phase}.crop")).is_file());

    // The text report names the skipped patient and the file.
    let (ok, text, stderr) = fedhcc(&["preprocess", "--site-config", cfg]);
    assert!(ok, "{stderr}");
    assert!(text.contains(&format!("patient {bad_mask}")), "{text}");
}

#[test]
fn preprocess_refuses_bad_settings_and_a_damaged_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cohort");
    let (ok, _, stderr) = fedhcc(&["synth", "--out", out.to_str().unwrap(), "--patients", "4", "--scale", "tiny"]);
    assert!(ok, "{stderr}");
    let data = out.join("center_a");
    let cfg = site_config(tmp.path(), &data);
    let study = std::fs::read_to_string(tmp.path().join("study.toml")).unwrap();
    std::fs::write(tmp.path().join("study.toml"), study.replace("grid = [8, 16, 16]", "grid = [0, 16, 16]")).unwrap();
    let (ok, _, stderr) = fedhcc(&["preprocess", "--site-config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("[imaging.mri]"), "{stderr}");

    std::fs::write(tmp.path().join("study.toml"), study).unwrap();
    let manifest = tmp.path().join("state/preprocessed/manifest.json");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(&manifest, b"{ not json").unwrap();
    let (ok, _, stderr) = fedhcc(&["preprocess", "--site-config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("manifest.json") && stderr.contains("delete it"), "{stderr}");
    assert_eq!(std::fs::read(&manifest).unwrap(), b"{ not json", "a damaged manifest is left for the operator");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
