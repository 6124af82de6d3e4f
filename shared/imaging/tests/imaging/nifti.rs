//! NIfTI reading against nibabel's numbers, bad-input errors, and the gzip writer's round trip.

use std::io::{Read, Write};

use fedhcc_imaging::{ImagingError, NiftiDatatype, StorageType, Volume, read_nifti, read_nifti_frames, write_nifti_gz};

use crate::reference::{assert_abs, assert_rel, copy_into, f64_of, f64s, fixture, reference, usizes};

fn nifti_references() -> Vec<(String, serde_json::Value)> {
    let all = reference();
    let mri = all["mri"].as_object().expect("mri section").clone();
    let list: Vec<_> =
        mri.into_iter().filter(|(name, _)| name.ends_with(".nii") || name.ends_with(".nii.gz")).collect();
    assert!(list.len() >= 4, "expected the NIfTI fixtures in REFERENCE.json, found {}", list.len());
    list
}

#[test]
fn every_nifti_fixture_matches_nibabel() {
    for (name, r) in nifti_references() {
        let v = read_nifti_frames(&fixture(&format!("mri/{name}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.shape(), usizes(&r["shape"]), "{name}: shape");
        assert_eq!(v.info.version as f64, f64_of(&r, "nifti_version"), "{name}: NIfTI version");
        let (dtype, big) = match r["on_disk_dtype"].as_str().expect("dtype") {
            ">i2" => (NiftiDatatype::I16, true),
            "int16" | "<i2" => (NiftiDatatype::I16, false),
            "uint8" | "|u1" => (NiftiDatatype::U8, v.info.big_endian),
            other => panic!("{name}: dtype {other} not mapped in this test"),
        };
        assert_eq!((v.info.datatype, v.info.big_endian), (dtype, big), "{name}: on-disk dtype");

        let zooms = f64s(&r["zooms"]);
        for (i, z) in zooms.iter().enumerate() {
            let got = if i < 3 { v.spacing_mm[i] } else { v.frame_step.expect("4-D file has a frame step") };
            assert_rel(&format!("{name}: zoom {i}"), got, *z, 1e-6);
        }
        for (row, want_row) in r["affine"].as_array().expect("affine").iter().enumerate() {
            for (col, want) in f64s(want_row).into_iter().enumerate() {
                assert_abs(&format!("{name}: affine[{row}][{col}]"), v.affine[row][col], want, 1e-5);
            }
        }

        let sum: f64 = v.data.iter().map(|&x| f64::from(x)).sum();
        let min = v.data.iter().copied().fold(f32::INFINITY, f32::min);
        let max = v.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_rel(&format!("{name}: scaled sum"), sum, f64_of(&r, "scaled_sum"), 1e-6);
        assert_rel(&format!("{name}: scaled mean"), sum / v.data.len() as f64, f64_of(&r, "scaled_mean"), 1e-6);
        assert_abs(&format!("{name}: scaled min"), f64::from(min), f64_of(&r, "scaled_min"), 1e-6);
        assert_abs(&format!("{name}: scaled max"), f64::from(max), f64_of(&r, "scaled_max"), 1e-6);
        assert_abs(&format!("{name}: first voxel"), f64::from(v.data[0]), f64_of(&r, "first_voxel"), 1e-6);
    }
}

#[test]
fn read_nifti_returns_the_first_frame_of_a_4d_file() {
    let all = read_nifti_frames(&fixture("mri/example4d.nii.gz")).expect("reads");
    let first = read_nifti(&fixture("mri/example4d.nii.gz")).expect("reads");
    assert_eq!(all.n_frames, 2);
    assert_eq!(first.dims, all.dims);
    assert_eq!(first.data.len(), first.n_voxels());
    assert_eq!(Some(first), all.frame(0));
    assert!(all.frame(2).is_none());
}

fn assert_names_file(err: &ImagingError, name: &str) {
    assert!(err.to_string().contains(name), "error does not name {name}: {err}");
}

#[test]
fn corrupt_sizeof_hdr_is_rejected_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_into(dir.path(), "mri/anatomical.nii");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[..4].copy_from_slice(&[0, 0, 1, 2]);
    std::fs::write(&path, bytes).expect("write");
    let err = read_nifti(&path).expect_err("bad sizeof_hdr must fail");
    assert!(matches!(err, ImagingError::InvalidFormat { .. }), "{err:?}");
    assert_names_file(&err, "anatomical.nii");
    assert!(err.to_string().contains("sizeof_hdr"), "{err}");
}

#[test]
fn corrupt_magic_is_rejected_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_into(dir.path(), "mri/anatomical.nii");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[344..348].copy_from_slice(b"xyz\0");
    std::fs::write(&path, bytes).expect("write");
    let err = read_nifti(&path).expect_err("bad magic must fail");
    assert!(matches!(err, ImagingError::InvalidFormat { .. }), "{err:?}");
    assert_names_file(&err, "anatomical.nii");
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn truncated_nii_and_nii_gz_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for rel in ["mri/anatomical.nii", "mri/example4d.nii.gz", "mri/example_nifti2.nii.gz", "mri/standard.nii.gz"] {
        let path = copy_into(dir.path(), rel);
        let bytes = std::fs::read(&path).expect("read");
        for keep in [0, 3, 200.min(bytes.len() - 20), bytes.len() / 2, bytes.len() - 9] {
            std::fs::write(&path, &bytes[..keep]).expect("write");
            let err = read_nifti(&path).expect_err("a truncated file must fail");
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            assert_names_file(&err, &name);
        }
    }
}

#[test]
fn truncated_voxel_data_is_reported_as_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_into(dir.path(), "mri/anatomical.nii");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    let err = read_nifti(&path).expect_err("must fail");
    assert!(matches!(err, ImagingError::Truncated { .. }), "{err:?}");
}

fn oblique_volume() -> Volume {
    let mut v = read_nifti(&fixture("mri/example4d.nii.gz")).expect("reads");
    v.data.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 1000) as f32 * 0.25 - 50.0);
    v
}

#[test]
fn write_nifti_gz_round_trips_float32_and_int16() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = oblique_volume();
    let f32_path = dir.path().join("vol.nii.gz");
    write_nifti_gz(&f32_path, &v, StorageType::F32).expect("writes");
    let back = read_nifti_frames(&f32_path).expect("reads back");
    assert_eq!(back.info.datatype, NiftiDatatype::F32);
    assert_eq!(back.dims, v.dims);
    assert_eq!(back.data, v.data);
    for r in 0..4 {
        for c in 0..4 {
            assert_abs(&format!("affine[{r}][{c}]"), back.affine[r][c], v.affine[r][c], 1e-4);
        }
    }

    let i16_path = dir.path().join("vol_i16.nii.gz");
    write_nifti_gz(&i16_path, &v, StorageType::I16).expect("writes");
    let back = read_nifti(&i16_path).expect("reads back");
    let rounded: Vec<f32> = v.data.iter().map(|x| x.round()).collect();
    assert_eq!(back.data, rounded);
}

/// The writer's qform (quaternion) must describe the same grid as its sform: zero the sform code and the
/// reader falls back to the qform.
#[test]
fn written_qform_agrees_with_the_sform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = oblique_volume();
    let path = dir.path().join("vol.nii.gz");
    write_nifti_gz(&path, &v, StorageType::F32).expect("writes");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("open")).read_to_end(&mut raw).expect("gunzip");
    raw[254..256].copy_from_slice(&0i16.to_le_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).expect("gzip");
    let qform_only = dir.path().join("qform_only.nii.gz");
    std::fs::write(&qform_only, gz.finish().expect("gzip")).expect("write");

    let back = read_nifti(&qform_only).expect("reads");
    for r in 0..4 {
        for c in 0..4 {
            // The quaternion is single precision and the fixture's affine is orthogonal only to ~1e-4.
            assert_abs(&format!("qform affine[{r}][{c}]"), back.affine[r][c], v.affine[r][c], 1e-3);
        }
    }
}

#[test]
fn int16_storage_refuses_values_it_cannot_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = oblique_volume();
    v.data[7] = 1e6;
    let path = dir.path().join("big.nii.gz");
    let err = write_nifti_gz(&path, &v, StorageType::I16).expect_err("must refuse");
    assert!(err.to_string().contains("voxel 7"), "{err}");
}
