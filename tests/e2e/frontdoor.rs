//! The README's first command, run the way a new user runs it: the real binary, from a fresh working
//! directory, with the default (relative) `--out`, and with a relative `--out` elsewhere. Every path
//! the demo writes into a generated file is absolute or relative to that file, never to the working
//! directory (a demo folder moved away still works).

use crate::harness::FEDHCC_BIN;
use std::path::Path;
use std::process::Command;

/// Runs `fedhcc args…` in `cwd`: (success, stdout, stderr).
fn fedhcc_in(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(FEDHCC_BIN)
        .current_dir(cwd)
        .args(args)
        .env("FEDHCC_LOG", "warn")
        .env_remove("RUST_LOG")
        .output()
        .expect("runs fedhcc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_with_its_default_out_from_a_fresh_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = fedhcc_in(tmp.path(), &["demo", "--model", "clinical"]);
    assert!(ok, "fedhcc demo --model clinical failed from a fresh folder:\n{stdout}\n{stderr}");
    let out = tmp.path().join("demo-out");
    assert!(stdout.contains("Done in"), "{stdout}");
    assert!(stdout.contains("Outputs in demo-out"), "{stdout}");
    for f in [
        "report-clinical/report.html",
        "cross-center-clinical/clinical/cross-center.json",
        "final-clinical.safetensors",
    ] {
        assert!(out.join(f).is_file(), "demo-out/{f} missing:\n{stdout}");
    }
    // The generated study file names the site configurations relative to itself.
    let cc = std::fs::read_to_string(out.join("cross-center-clinical.toml")).unwrap();
    let configs = cc.lines().find(|l| l.starts_with("site_configs")).expect("site_configs");
    assert_eq!(configs, r#"site_configs = ["configs/site-center_a.toml", "configs/site-center_b.toml"]"#, "{cc}");
    // The server's record of its settings and of its checkpoints holds no working-directory path.
    let effective = std::fs::read_to_string(out.join("server-state/effective-config.toml")).unwrap();
    let state_dir = effective.lines().find(|l| l.starts_with("state_dir")).expect("state_dir recorded");
    let recorded = state_dir.split('"').nth(1).unwrap();
    assert!(Path::new(recorded).is_absolute(), "{state_dir}");
    // ... and server.db records the checkpoints by absolute path (the demo's report shows it).
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report-clinical/report.json")).unwrap()).unwrap();
    let file = report["fingerprints"]["final_checkpoint"]["file"].as_str().expect("the final checkpoint");
    assert!(Path::new(file).is_absolute() && Path::new(file).is_file(), "{file}");

    // The whole demo folder, moved away and read from yet another working directory, still works:
    // the study file and the configurations it names are found relative to themselves.
    let moved = tmp.path().join("elsewhere/moved-demo");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&out, &moved).unwrap();
    let other = tempfile::tempdir().unwrap();
    let config = moved.join("cross-center-clinical.toml");
    let (ok, stdout, stderr) =
        fedhcc_in(other.path(), &["study", "--config", config.to_str().unwrap(), "--rounds", "1", "--out", "again"]);
    assert!(ok, "fedhcc study on the moved demo folder failed:\n{stdout}\n{stderr}");
    assert!(other.path().join("again/clinical/cross-center.json").is_file());
    // The report of the moved run verifies its final checkpoint, found under the moved folder.
    let (ok, stdout, stderr) = fedhcc_in(
        other.path(),
        &["report", "--server-state", moved.join("server-state").to_str().unwrap(), "--out", "report"],
    );
    assert!(ok, "fedhcc report on the moved server state failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(other.path().join("report/report.json")).unwrap()).unwrap();
    let check = &report["fingerprints"]["final_checkpoint"];
    assert_eq!(check["verified"], true, "{check}");
}

#[test]
fn image_demo_with_a_relative_out_from_another_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let args =
        ["demo", "--scale", "tiny", "--model", "preop", "--patients", "60", "--rounds", "2", "--out", "../runs/demo"];
    let (ok, stdout, stderr) = fedhcc_in(&cwd, &args);
    assert!(ok, "fedhcc {args:?} failed:\n{stdout}\n{stderr}");
    let out = tmp.path().join("runs/demo");
    assert!(stdout.contains("rounds committed: 2"), "{stdout}");
    for f in
        ["report-preop/report.html", "cross-center-preop/preop/cross-center.json", "validation-preop/validation.json"]
    {
        assert!(out.join(f).is_file(), "{f} missing:\n{stdout}");
    }
    assert!(!cwd.join("demo-out").exists() && std::fs::read_dir(&cwd).unwrap().next().is_none(), "wrote into the cwd");
}
