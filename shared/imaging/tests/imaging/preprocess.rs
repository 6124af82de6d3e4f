//! MRI preprocessing: agreement with an independent scipy/nibabel implementation, exact geometry on hand-made
//! volumes (ramps, boxes, flipped and permuted axes), file discovery, bad inputs named in errors, and the crop
//! file's round trip, atomic write and checked read.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use fedhcc_imaging::{
    ImagingError, MriCrop, MriPrepConfig, PatientMriFiles, PhaseSource, StorageType, Volume, find_patient_mri,
    preprocess_mri, read_dicom_series, read_nifti, write_nifti_gz,
};
use serde_json::Value;

use crate::reference::{assert_abs, copy_into, fixture};

// ---------------------------------------------------------------------------------------------------------
// Helpers

fn affine_diag(spacing: [f64; 3], origin: [f64; 3]) -> [[f64; 4]; 4] {
    [
        [spacing[0], 0.0, 0.0, origin[0]],
        [0.0, spacing[1], 0.0, origin[1]],
        [0.0, 0.0, spacing[2], origin[2]],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// A volume whose voxel `(i, j, k)` is `f(i, j, k)`.
fn volume(dims: [usize; 3], affine: [[f64; 4]; 4], f: impl Fn(usize, usize, usize) -> f32) -> Volume {
    let spacing_mm = [0, 1, 2].map(|c| (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt());
    let mut data = Vec::with_capacity(dims.iter().product());
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                data.push(f(i, j, k));
            }
        }
    }
    Volume { dims, spacing_mm, affine, data }
}

/// A 0/1 mask of `like`'s grid, 1 inside the inclusive voxel ranges.
fn box_mask(like: &Volume, [i, j, k]: [[usize; 2]; 3]) -> Volume {
    let inside = |x: usize, r: [usize; 2]| r[0] <= x && x <= r[1];
    volume(like.dims, like.affine, |a, b, c| f32::from(u8::from(inside(a, i) && inside(b, j) && inside(c, k))))
}

fn write(path: &Path, v: &Volume) {
    write_nifti_gz(path, v, StorageType::F32).unwrap_or_else(|e| panic!("{e}"));
}

fn phases(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_string()).collect()
}

fn config(names: &[&str], spacing_mm: [f64; 3], margin_mm: f64, grid: [usize; 3], clip: [f64; 2]) -> MriPrepConfig {
    MriPrepConfig { phases: phases(names), spacing_mm, margin_mm, grid, clip_percentiles: clip }
}

/// Finds and preprocesses `dir` with `cfg`.
fn run(dir: &Path, cfg: &MriPrepConfig) -> Result<MriCrop, ImagingError> {
    let files = find_patient_mri(dir, &cfg.phases)?;
    preprocess_mri(&files, cfg)
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[track_caller]
fn assert_unit_statistics(crop: &MriCrop, phase: usize) {
    let (mean, std) = mean_std(crop.phase(phase).expect("phase exists"));
    assert_abs(&format!("phase {phase} mean"), mean, 0.0, 1e-5);
    assert_abs(&format!("phase {phase} std"), std, 1.0, 1e-5);
}

#[track_caller]
fn assert_names(err: &ImagingError, path: &Path, also: &[&str]) {
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "message does not name {}: {msg}", path.display());
    for s in also {
        assert!(msg.contains(s), "message lacks '{s}': {msg}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Against the independent implementation (tests/reference/mri_crop.py)

fn python_reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/mri_crop.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("mri_crop.json")).expect("valid JSON")
}

fn json_f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn json_range(v: &Value) -> [usize; 2] {
    let r = json_f64s(v);
    [r[0] as usize, r[1] as usize]
}

#[test]
fn crop_matches_the_python_reference() {
    let r = python_reference();
    let c = &r["config"];
    let names: Vec<String> =
        c["phases"].as_array().expect("phases").iter().map(|p| p.as_str().expect("name").into()).collect();
    let grid = json_f64s(&c["grid"]).iter().map(|&g| g as usize).collect::<Vec<_>>();
    let cfg = MriPrepConfig {
        phases: names.clone(),
        spacing_mm: json_f64s(&c["spacing_mm"]).try_into().expect("3 values"),
        margin_mm: c["margin_mm"].as_f64().expect("margin"),
        grid: [grid[0], grid[1], grid[2]],
        clip_percentiles: json_f64s(&c["clip_percentiles"]).try_into().expect("2 values"),
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let anatomical = copy_into(dir.path(), "mri/anatomical.nii");
    std::fs::rename(&anatomical, dir.path().join("arterial.nii")).expect("rename");
    let arterial = read_nifti(&dir.path().join("arterial.nii")).expect("reads");
    let delayed = Volume { data: arterial.data.iter().map(|v| 30000.0 - v).collect(), ..arterial.clone() };
    write(&dir.path().join("delayed.nii.gz"), &delayed);
    let m = &r["mask_box"];
    let mut mask = box_mask(&arterial, [json_range(&m["i"]), json_range(&m["j"]), json_range(&m["k"])]);
    for e in r["mask_extra"].as_array().expect("extras") {
        let [i, j, k] = json_f64s(&e["ijk"]).try_into().expect("ijk");
        let [nx, ny, _] = mask.dims;
        mask.data[i as usize + nx * (j as usize + ny * k as usize)] = e["value"].as_f64().expect("value") as f32;
    }
    write(&dir.path().join("mask.nii.gz"), &mask);

    let crop = run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crop.grid, cfg.grid);
    assert_eq!(crop.phases, names);
    assert_eq!(crop.present, [true, false, true]);
    assert_eq!(crop.data.len(), 3 * cfg.grid.iter().product::<usize>());
    for (i, want) in json_f64s(&r["box_size_mm"]).into_iter().enumerate() {
        assert_abs(&format!("box_size_mm[{i}]"), crop.box_size_mm[i], want, 1e-9);
    }
    assert_abs("tumour volume", crop.tumour_volume_ml, r["tumour_volume_ml"].as_f64().expect("ml"), 1e-9);
    for (p, name) in names.iter().enumerate() {
        let got = crop.phase(p).expect("phase");
        match r["values"].get(name) {
            None => assert!(got.iter().all(|v| *v == 0.0), "absent phase {name} must be zeros"),
            Some(want) => {
                let want = json_f64s(want);
                assert_eq!(got.len(), want.len(), "{name}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_abs(&format!("{name} value {i}"), f64::from(*g), *w, 1e-4);
                }
                assert_unit_statistics(&crop, p);
            }
        }
    }
}

#[test]
fn the_anatomical_fixture_with_default_settings_gives_unit_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let anatomical = copy_into(dir.path(), "mri/anatomical.nii");
    std::fs::rename(&anatomical, dir.path().join("portal_venous.nii")).expect("rename");
    let v = read_nifti(&dir.path().join("portal_venous.nii")).expect("reads");
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[10, 20], [12, 28], [8, 16]]));
    let cfg = MriPrepConfig::default();
    let crop = run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crop.grid, [32, 64, 64]);
    assert_eq!(crop.data.len(), 5 * 32 * 64 * 64);
    assert_eq!(crop.present, [false, false, true, false, false]);
    assert_unit_statistics(&crop, 2);
    for p in [0, 1, 3, 4] {
        assert!(crop.phase(p).expect("phase").iter().all(|x| *x == 0.0), "phase {p}");
    }
    // 11 × 17 × 9 voxels of 2 mm, plus 10 mm each side, in 1 × 1 × 2 mm cells (the box fits in the scan).
    assert_eq!(crop.box_size_mm, [42.0, 54.0, 38.0]);
    assert_abs("tumour volume", crop.tumour_volume_ml, (11 * 17 * 9 * 8) as f64 / 1000.0, 1e-9);
}

// ---------------------------------------------------------------------------------------------------------
// Hand-made volumes

#[test]
fn a_linear_ramp_is_resampled_into_an_exact_ramp() {
    // Native 0.75 × 0.75 × 2.5 mm, target 1 × 1 × 2 mm; every output axis has at least as many cropped cells as
    // outputs, so no edge value is repeated and trilinear interpolation of a linear function is exact.
    let dims = [48, 40, 24];
    let spacing = [0.75, 0.75, 2.5];
    let slope = [3.0, 5.0, 7.0];
    let v = volume(dims, affine_diag(spacing, [-20.0, 10.0, -30.0]), |i, j, k| {
        (slope[0] * i as f64 + slope[1] * j as f64 + slope[2] * k as f64 + 100.0) as f32
    });
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("ramp.nii.gz"), &v);
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[20, 27], [15, 24], [10, 13]]));
    let cfg = config(&["ramp"], [1.0, 1.0, 2.0], 8.0, [8, 16, 16], [0.0, 100.0]);
    let crop = run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));

    // One output step along axis a covers box_size / grid mm, i.e. box_size / (grid × spacing) native voxels.
    let [gz, gy, gx] = cfg.grid;
    let g = [gx, gy, gz];
    let step: Vec<f64> = (0..3).map(|a| slope[a] * crop.box_size_mm[a] / (g[a] as f64 * spacing[a])).collect();
    let mut want = Vec::new();
    for z in 0..gz {
        for y in 0..gy {
            for x in 0..gx {
                want.push(step[0] * x as f64 + step[1] * y as f64 + step[2] * z as f64);
            }
        }
    }
    let n = want.len() as f64;
    let mean = want.iter().sum::<f64>() / n;
    let std = (want.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / n).sqrt();
    let got = crop.phase(0).expect("phase");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_abs(&format!("ramp value {i}"), f64::from(*g), (w - mean) / std, 1e-5);
    }
}

#[test]
fn a_box_mask_gives_the_expected_box_size_in_mm() {
    // Native spacing = target spacing, so the box is exactly the mask's extent plus the margins.
    let v = volume([64, 64, 30], affine_diag([1.0, 1.0, 2.0], [0.0; 3]), |i, j, k| (i * j + k) as f32);
    let cfg = config(&["t2"], [1.0, 1.0, 2.0], 10.0, [8, 8, 8], [0.5, 99.5]);
    let cases = [
        // 12 × 10 × 5 voxels inside the volume: (12 + 20) × (10 + 20) × (5 × 2 + 20) mm.
        ([[20, 31], [25, 34], [10, 14]], [32.0, 30.0, 30.0]),
        // Against the volume's low x edge: the box is clamped, so x gets the margin on one side only.
        ([[0, 11], [25, 34], [10, 14]], [22.0, 30.0, 30.0]),
        // A single voxel.
        ([[40, 40], [40, 40], [20, 20]], [21.0, 21.0, 22.0]),
    ];
    for (bbox, want) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("t2.nii.gz"), &v);
        let mask = box_mask(&v, bbox);
        write(&dir.path().join("mask.nii.gz"), &mask);
        let crop = run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crop.box_size_mm, want, "mask box {bbox:?}");
        let voxels = bbox.iter().map(|r| r[1] - r[0] + 1).product::<usize>();
        assert_abs("tumour volume", crop.tumour_volume_ml, voxels as f64 * 2.0 / 1000.0, 1e-12);
    }
}

#[test]
fn flipped_and_permuted_axes_give_the_same_ras_crop() {
    // Scan A is stored in RAS order. Scan B holds the same world image with voxel axis 0 = inferior (z
    // reversed), axis 1 = right (x), axis 2 = posterior (y reversed), as a sagittal-ish acquisition might.
    let [nx, ny, nz] = [30, 26, 14];
    let spacing = [0.9, 0.8, 2.2];
    let origin = [-12.0, 7.0, 40.0];
    let f = |i: usize, j: usize, k: usize| ((i * 7 + j * 13 + k * 29) % 17) as f32 + 0.25 * i as f32 - 0.5 * k as f32;
    let a = volume([nx, ny, nz], affine_diag(spacing, origin), f);
    let a_mask = box_mask(&a, [[9, 17], [6, 15], [4, 8]]);

    let b_affine = [
        [0.0, spacing[0], 0.0, origin[0]],
        [0.0, 0.0, -spacing[1], origin[1] + spacing[1] * (ny - 1) as f64],
        [-spacing[2], 0.0, 0.0, origin[2] + spacing[2] * (nz - 1) as f64],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let to_a = |p: usize, q: usize, s: usize| (q, ny - 1 - s, nz - 1 - p);
    let b = volume([nz, nx, ny], b_affine, |p, q, s| {
        let (i, j, k) = to_a(p, q, s);
        f(i, j, k)
    });
    let b_mask = volume([nz, nx, ny], b_affine, |p, q, s| {
        let (i, j, k) = to_a(p, q, s);
        a_mask.get(i, j, k).expect("inside")
    });

    let cfg = config(&["arterial"], [1.0, 1.0, 2.0], 6.0, [6, 12, 10], [1.0, 99.0]);
    let crops: Vec<MriCrop> = [(&a, &a_mask), (&b, &b_mask)]
        .into_iter()
        .map(|(v, m)| {
            let dir = tempfile::tempdir().expect("tempdir");
            write(&dir.path().join("arterial.nii.gz"), v);
            write(&dir.path().join("mask.nii.gz"), m);
            run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    for a in 0..3 {
        assert_abs(&format!("box size {a}"), crops[1].box_size_mm[a], crops[0].box_size_mm[a], 1e-9);
    }
    assert_abs("tumour volume", crops[1].tumour_volume_ml, crops[0].tumour_volume_ml, 1e-9);
    for (i, (x, y)) in crops[0].data.iter().zip(&crops[1].data).enumerate() {
        assert_abs(&format!("value {i}"), f64::from(*y), f64::from(*x), 1e-5);
    }
    // And the output really runs along +x: A's values grow with i (0.25 per voxel) on average.
    let row_mean = |x: usize| (0..6 * 12).map(|zy| f64::from(crops[0].data[zy * 10 + x])).sum::<f64>() / 72.0;
    assert!(row_mean(9) > row_mean(0), "{} vs {}", row_mean(9), row_mean(0));
}

#[test]
fn a_missing_phase_is_marked_absent_and_zero() {
    let v = volume([20, 20, 10], affine_diag([1.0, 1.0, 2.0], [0.0; 3]), |i, j, k| (i + 2 * j + 3 * k) as f32);
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("hepatobiliary.nii.gz"), &v);
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[5, 10], [5, 10], [3, 5]]));
    let cfg = config(&["arterial", "hepatobiliary", "delayed"], [1.0, 1.0, 2.0], 4.0, [4, 8, 8], [0.5, 99.5]);
    let crop = run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crop.present, [false, true, false]);
    for p in [0, 2] {
        assert!(crop.phase(p).expect("phase").iter().all(|x| *x == 0.0), "phase {p}");
    }
    assert_unit_statistics(&crop, 1);
}

#[test]
fn a_mask_with_values_other_than_0_and_1_is_thresholded_at_one_half() {
    let v = volume([20, 20, 10], affine_diag([1.0, 1.0, 1.0], [0.0; 3]), |i, j, k| (i * j + k) as f32);
    let mut mask = box_mask(&v, [[5, 9], [5, 9], [3, 5]]);
    for x in &mut mask.data {
        *x *= 0.8; // tumour voxels at 0.8, background 0
    }
    mask.data[0] = 0.49; // voxel (0, 0, 0): below the threshold, so it must not widen the box
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("t2.nii.gz"), &v);
    write(&dir.path().join("mask.nii.gz"), &mask);
    let crop = run(dir.path(), &config(&["t2"], [1.0; 3], 0.0, [5, 5, 5], [0.0, 100.0])).expect("runs");
    assert_eq!(crop.box_size_mm, [5.0, 5.0, 3.0]);
    assert_abs("tumour volume", crop.tumour_volume_ml, 0.075, 1e-12);
}

#[test]
fn a_constant_phase_becomes_zeros() {
    let v = volume([12, 12, 6], affine_diag([1.0; 3], [0.0; 3]), |_, _, _| 417.0);
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("t2.nii.gz"), &v);
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[3, 6], [3, 6], [2, 3]]));
    let crop = run(dir.path(), &config(&["t2"], [1.0; 3], 2.0, [4, 4, 4], [0.5, 99.5])).expect("runs");
    assert_eq!(crop.present, [true]);
    assert!(crop.data.iter().all(|x| *x == 0.0));
}

#[test]
fn settings_map_from_the_study_toml_table() {
    let study: toml::Table =
        toml::from_str("[imaging.mri]\nphases = [\"arterial\", \"t2\"]\nmargin_mm = 15.0\ngrid = [16, 32, 32]\n")
            .expect("toml");
    let cfg: MriPrepConfig = study["imaging"]["mri"].clone().try_into().expect("maps");
    assert_eq!(cfg.phases, ["arterial", "t2"]);
    assert_eq!((cfg.margin_mm, cfg.grid), (15.0, [16, 32, 32]));
    assert_eq!((cfg.spacing_mm, cfg.clip_percentiles), ([1.0, 1.0, 2.0], [0.5, 99.5]));
    assert_eq!(cfg.validate(), Ok(()));
    let unknown: Result<MriPrepConfig, _> = toml::from_str("margin = 3.0");
    assert!(unknown.is_err(), "an unknown key must be refused");
}

// ---------------------------------------------------------------------------------------------------------
// Finding the files

#[test]
fn find_patient_mri_finds_nifti_files_and_dicom_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("mask.nii.gz"), b"x").expect("write");
    std::fs::write(d.join("arterial.nii"), b"x").expect("write");
    std::fs::write(d.join("delayed.nii.gz"), b"x").expect("write");
    std::fs::create_dir(d.join("t2")).expect("mkdir");
    std::fs::write(d.join("t2").join("IM2"), b"x").expect("write");
    std::fs::write(d.join("t2").join("IM1"), b"x").expect("write");
    std::fs::write(d.join("t2").join(".DS_Store"), b"x").expect("write");
    let files = find_patient_mri(d, &phases(&["arterial", "portal_venous", "delayed", "t2"])).expect("finds");
    assert_eq!(files.mask, Some(d.join("mask.nii.gz")));
    let expected: Vec<(String, Option<PhaseSource>)> = vec![
        ("arterial".into(), Some(PhaseSource::Nifti(d.join("arterial.nii")))),
        ("portal_venous".into(), None),
        ("delayed".into(), Some(PhaseSource::Nifti(d.join("delayed.nii.gz")))),
        ("t2".into(), Some(PhaseSource::DicomSeries(d.join("t2")))),
    ];
    assert_eq!(files.phases, expected);
    assert_eq!(
        files.input_paths(),
        [d.join("mask.nii.gz"), d.join("arterial.nii"), d.join("delayed.nii.gz"), d.join("t2/IM1"), d.join("t2/IM2")]
    );
}

#[test]
fn two_candidates_for_one_phase_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("arterial.nii"), b"x").expect("write");
    std::fs::create_dir(dir.path().join("arterial")).expect("mkdir");
    let err = find_patient_mri(dir.path(), &phases(&["arterial"])).expect_err("ambiguous");
    assert!(matches!(err, ImagingError::Unusable { .. }), "{err:?}");
    assert_names(&err, dir.path(), &["arterial.nii", "arterial"]);
}

#[test]
fn a_phase_name_that_is_not_a_file_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = find_patient_mri(dir.path(), &phases(&["../arterial"])).expect_err("refused");
    assert!(matches!(err, ImagingError::InvalidRequest { .. }), "{err:?}");
}

#[test]
fn a_patient_without_a_mask_is_refused() {
    let v = volume([10, 10, 5], affine_diag([1.0; 3], [0.0; 3]), |i, _, _| i as f32);
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("t2.nii.gz"), &v);
    let err = run(dir.path(), &config(&["t2"], [1.0; 3], 2.0, [4, 4, 4], [0.5, 99.5])).expect_err("no mask");
    assert_names(&err, dir.path(), &["mask.nii.gz"]);
}

// ---------------------------------------------------------------------------------------------------------
// Bad inputs: every error names the file

/// A patient folder with a good mask on `anatomical.nii`'s grid and that file as phase `arterial`.
fn anatomical_patient() -> (tempfile::TempDir, PathBuf, MriPrepConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let phase = dir.path().join("arterial.nii");
    std::fs::copy(fixture("mri/anatomical.nii"), &phase).expect("copy");
    let v = read_nifti(&phase).expect("reads");
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[10, 20], [12, 28], [8, 16]]));
    let cfg = config(&["arterial"], [2.0, 2.0, 2.0], 4.0, [4, 8, 8], [0.5, 99.5]);
    (dir, phase, cfg)
}

#[test]
fn a_bad_nifti_header_is_named() {
    for (offset, bytes) in [(0usize, [0x12u8, 0x34, 0x56, 0x78]), (344, *b"xyz\0")] {
        let (dir, phase, cfg) = anatomical_patient();
        let mut raw = std::fs::read(&phase).expect("read");
        raw[offset..offset + 4].copy_from_slice(&bytes);
        std::fs::write(&phase, raw).expect("write");
        let err = run(dir.path(), &cfg).expect_err("bad header");
        assert!(matches!(err, ImagingError::InvalidFormat { .. }), "{err:?}");
        assert_names(&err, &phase, &[]);
    }
}

#[test]
fn truncated_phase_data_is_named() {
    let (dir, phase, cfg) = anatomical_patient();
    let raw = std::fs::read(&phase).expect("read");
    std::fs::write(&phase, &raw[..raw.len() / 2]).expect("write");
    let err = run(dir.path(), &cfg).expect_err("truncated");
    assert!(matches!(err, ImagingError::Truncated { .. }), "{err:?}");
    assert_names(&err, &phase, &["truncated"]);
}

#[test]
fn a_mask_on_a_different_grid_is_refused() {
    let (dir, phase, cfg) = anatomical_patient();
    let v = read_nifti(&phase).expect("reads");
    let mask_path = dir.path().join("mask.nii.gz");
    // Shifted by 1 mm, then with other dimensions.
    let mut shifted = box_mask(&v, [[10, 20], [12, 28], [8, 16]]);
    shifted.affine[1][3] += 1.0;
    let smaller = volume([20, 20, 10], v.affine, |_, _, _| 1.0);
    for mask in [shifted, smaller] {
        write(&mask_path, &mask);
        let err = run(dir.path(), &cfg).expect_err("other grid");
        assert!(matches!(err, ImagingError::Unusable { .. }), "{err:?}");
        assert_names(&err, &phase, &["mask on a different grid", "'arterial'", &mask_path.display().to_string()]);
    }
}

#[test]
fn an_empty_mask_is_refused() {
    let (dir, _phase, cfg) = anatomical_patient();
    let mask_path = dir.path().join("mask.nii.gz");
    let v = read_nifti(&mask_path).expect("reads");
    write(&mask_path, &Volume { data: vec![0.3; v.data.len()], ..v });
    let err = run(dir.path(), &cfg).expect_err("empty mask");
    assert!(matches!(err, ImagingError::Unusable { .. }), "{err:?}");
    assert_names(&err, &mask_path, &["no tumour voxel"]);
}

#[test]
fn a_nan_voxel_is_refused() {
    let (dir, phase, cfg) = anatomical_patient();
    let mut v = read_nifti(&phase).expect("reads");
    v.data[3 + 33 * (4 + 41 * 5)] = f32::NAN;
    std::fs::remove_file(&phase).expect("remove");
    let nan_phase = dir.path().join("arterial.nii.gz");
    write(&nan_phase, &v);
    let err = run(dir.path(), &cfg).expect_err("NaN");
    assert!(matches!(err, ImagingError::Unusable { .. }), "{err:?}");
    assert_names(&err, &nan_phase, &["voxel (3, 4, 5) is NaN"]);
}

// ---------------------------------------------------------------------------------------------------------
// DICOM series phases (copies of MR_small.dcm at new positions)

const MR_SMALL_Z0: f64 = 6.6406;
const MR_SMALL_THICKNESS: f64 = 0.8;

/// Copies `MR_small.dcm` as slice `k` of a series (position, instance number and UIDs changed).
fn write_mr_small_copy(dest: &Path, k: usize) {
    let mut obj = dicom_object::open_file(fixture("mri/MR_small.dcm")).expect("opens MR_small.dcm");
    let z = MR_SMALL_Z0 + MR_SMALL_THICKNESS * k as f64;
    let uid = format!("2.25.987654321{k}");
    obj.put(DataElement::new(
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        PrimitiveValue::from(format!("-83.9063\\-91.2\\{z:.4}")),
    ));
    obj.put(DataElement::new(tags::SLICE_LOCATION, VR::DS, PrimitiveValue::from(format!("{:.4}", z - MR_SMALL_Z0))));
    obj.put(DataElement::new(tags::INSTANCE_NUMBER, VR::IS, PrimitiveValue::from(format!("{}", k + 1))));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.clone())));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = uid);
    obj.write_to_file(dest).expect("writes DICOM");
}

fn write_mr_small_series(dir: &Path, slices: &[usize]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for &k in slices {
        write_mr_small_copy(&dir.join(format!("MR{:03}.dcm", 100 - k)), k);
    }
}

#[test]
fn a_dicom_series_phase_is_preprocessed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let series = dir.path().join("t1_pre");
    write_mr_small_series(&series, &[0, 1, 2, 3, 4, 5]);
    let v = read_dicom_series(&series).expect("reads");
    assert_eq!(v.dims, [64, 64, 6]);
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[20, 40], [24, 44], [2, 3]]));
    let cfg = config(&["t1_pre", "t2"], [0.5, 0.5, 1.0], 2.0, [4, 16, 16], [0.5, 99.5]);
    let files = find_patient_mri(dir.path(), &cfg.phases).expect("finds");
    assert_eq!(files.input_paths().len(), 1 + 6);
    let crop = preprocess_mri(&files, &cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crop.present, [true, false]);
    assert_unit_statistics(&crop, 0);
}

#[test]
fn a_dicom_series_with_a_missing_slice_names_the_missing_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let series = dir.path().join("arterial");
    write_mr_small_series(&series, &[0, 1, 3, 4, 5]);
    let v = volume([64, 64, 6], affine_diag([0.3125, 0.3125, 0.8], [0.0; 3]), |_, _, _| 1.0);
    write(&dir.path().join("mask.nii.gz"), &v);
    let err = run(dir.path(), &config(&["arterial"], [1.0; 3], 2.0, [4, 4, 4], [0.5, 99.5])).expect_err("gap");
    assert!(matches!(err, ImagingError::Series { .. }), "{err:?}");
    let missing_z = MR_SMALL_Z0 + 2.0 * MR_SMALL_THICKNESS;
    // Slice 2 is missing: 1.600 mm gap, expected at z = 8.2406 mm along the +z normal (LPS z = RAS z).
    assert_names(
        &err,
        &series,
        &["gap of 1.600 mm", "missing", &format!("{missing_z:.3} mm"), "-83.906\\-91.200\\8.241"],
    );
}

// ---------------------------------------------------------------------------------------------------------
// The crop file

fn small_crop() -> MriCrop {
    let grid = [2, 3, 4];
    let mut data: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    data.extend([0.0; 24]);
    MriCrop {
        grid,
        phases: phases(&["arterial", "delayed"]),
        present: vec![true, false],
        data,
        tumour_volume_ml: 12.5,
        box_size_mm: [40.0, 38.5, 30.0],
    }
}

#[test]
fn a_crop_file_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("P001.crop");
    let crop = small_crop();
    crop.write(&path).expect("writes");
    assert_eq!(MriCrop::read(&path).expect("reads"), crop);
    // Overwriting replaces it whole; no temporary file stays behind.
    let other = MriCrop { tumour_volume_ml: 1.0, ..crop };
    other.write(&path).expect("writes");
    assert_eq!(MriCrop::read(&path).expect("reads"), other);
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["P001.crop"]);
}

#[test]
fn a_truncated_or_garbage_crop_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("P001.crop");
    small_crop().write(&path).expect("writes");
    let good = std::fs::read(&path).expect("read");

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 5].to_vec(), "truncated"),
        (good[..30].to_vec(), "truncated"),
        (good[..3].to_vec(), "truncated"),
        (Vec::new(), "truncated"),
        (b"this is not a crop file at all, just some text".to_vec(), "magic"),
        ([good.as_slice(), &[0, 0, 0, 0]].concat(), "after the values"),
        ([&good[..8], &7u32.to_le_bytes()[..], &good[12..]].concat(), "version 7"),
        ([&good[..12], &0u32.to_le_bytes()[..], &good[16..]].concat(), "0 phases"),
        ([&good[..16], &100_000u32.to_le_bytes()[..], &good[20..]].concat(), "grid"),
    ];
    for (bytes, what) in cases {
        std::fs::write(&path, &bytes).expect("write");
        let err = MriCrop::read(&path).expect_err(what);
        assert_names(&err, &path, &[what]);
    }
    // A value that is not finite, and an absent phase holding values.
    let header = good.len() - 48 * 4;
    for (index, value, what) in [(0, f32::NAN, "not finite"), (30, 1.0, "marked absent")] {
        let mut bad = good.clone();
        bad[header + 4 * index..header + 4 * index + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &bad).expect("write");
        let err = MriCrop::read(&path).expect_err(what);
        assert_names(&err, &path, &[what]);
    }
    let missing = dir.path().join("absent.crop");
    assert_names(&MriCrop::read(&missing).expect_err("no file"), &missing, &[]);
}

#[test]
fn writing_a_crop_where_it_cannot_go_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let crop = small_crop();
    let listing = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        v.sort();
        v
    };

    // The "folder" is a regular file: nothing can be created in it.
    let not_a_folder = dir.path().join("not-a-folder");
    std::fs::write(&not_a_folder, b"x").expect("write");
    let target = not_a_folder.join("P001.crop");
    let err = crop.write(&target).expect_err("cannot write");
    assert!(matches!(err, ImagingError::Io { .. }), "{err:?}");
    assert_names(&err, &target, &[]);

    // A folder that does not exist.
    let target = dir.path().join("no-such-folder").join("P001.crop");
    assert_names(&crop.write(&target).expect_err("cannot write"), &target, &[]);

    // The whole crop is written to a temporary file, but the final rename fails (a non-empty folder holds the
    // name): the temporary file must be gone and the folder unchanged.
    let blocked = dir.path().join("P002.crop");
    std::fs::create_dir(&blocked).expect("mkdir");
    std::fs::write(blocked.join("keep"), b"x").expect("write");
    let err = crop.write(&blocked).expect_err("rename fails");
    assert_names(&err, &blocked, &[]);
    assert_eq!(listing(dir.path()), ["P002.crop", "not-a-folder"]);
    assert_eq!(listing(&blocked), ["keep"]);
}

#[test]
fn a_crop_whose_fields_disagree_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("P001.crop");
    let mut crop = small_crop();
    crop.data.pop();
    let err = crop.write(&path).expect_err("inconsistent");
    assert!(matches!(err, ImagingError::InvalidRequest { .. }), "{err:?}");
    assert!(!path.exists());
}

#[test]
fn files_looked_up_for_other_phases_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = PatientMriFiles {
        patient_dir: dir.path().to_path_buf(),
        mask: Some(dir.path().join("mask.nii.gz")),
        phases: vec![("t2".into(), None)],
    };
    let err =
        preprocess_mri(&files, &config(&["arterial"], [1.0; 3], 2.0, [4, 4, 4], [0.5, 99.5])).expect_err("mismatch");
    assert!(matches!(err, ImagingError::InvalidRequest { .. }), "{err:?}");
    assert_names(&err, dir.path(), &["'arterial'"]);
}

#[test]
fn a_patient_without_any_phase_is_refused() {
    let v = volume([10, 10, 5], affine_diag([1.0; 3], [0.0; 3]), |i, _, _| i as f32);
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("mask.nii.gz"), &box_mask(&v, [[2, 4], [2, 4], [1, 2]]));
    let err =
        run(dir.path(), &config(&["arterial", "t2"], [1.0; 3], 2.0, [4, 4, 4], [0.5, 99.5])).expect_err("no phase");
    assert!(matches!(err, ImagingError::Unusable { .. }), "{err:?}");
    assert_names(&err, dir.path(), &["none of the phases arterial, t2"]);
}
