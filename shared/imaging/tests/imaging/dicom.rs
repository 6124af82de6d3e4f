//! DICOM: the MR fixture against pydicom, synthetic series (sorting, missing slices), DICOM-SEG rejection.

use std::path::Path;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use fedhcc_imaging::{ImagingError, read_dicom_series, read_dicom_slice};

use crate::reference::{assert_rel, copy_into, f64_of, f64s, fixture, reference};

#[test]
fn mr_small_matches_pydicom() {
    let r = &reference()["mri"]["MR_small.dcm"];
    let s = read_dicom_slice(&fixture("mri/MR_small.dcm")).expect("reads");
    assert_eq!(s.rows as f64, f64_of(r, "rows"));
    assert_eq!(s.columns as f64, f64_of(r, "columns"));
    assert_eq!(s.pixel_spacing.to_vec(), f64s(&r["pixel_spacing"]));
    assert_eq!(s.rescale, (f64_of(r, "rescale_slope"), f64_of(r, "rescale_intercept")));
    let (slope, intercept) = s.rescale;
    let raw_sum: f64 = s.pixels.iter().map(|&p| (f64::from(p) - intercept) / slope).sum();
    assert_rel("raw pixel sum", raw_sum, f64_of(r, "raw_pixel_sum"), 1e-9);
}

#[test]
fn a_deflated_explicit_vr_slice_reads_as_the_same_slice() {
    // MR_small.dcm re-encoded by pydicom in Deflated Explicit VR Little Endian
    // (tests/fixtures/scripts/make_deflated_dicom.py): every number must be the same.
    let plain = read_dicom_slice(&fixture("mri/MR_small.dcm")).expect("reads");
    let deflated = read_dicom_slice(&fixture("mri/MR_small_deflated.dcm")).expect("reads the deflated file");
    assert_eq!(deflated.pixels, plain.pixels);
    assert_eq!((deflated.rows, deflated.columns), (plain.rows, plain.columns));
    assert_eq!(deflated.pixel_spacing, plain.pixel_spacing);
    assert_eq!(deflated.rescale, plain.rescale);
    assert_eq!(deflated.position, plain.position);
}

#[test]
fn a_folder_with_one_slice_reads_as_a_one_slice_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_into(dir.path(), "mri/MR_small.dcm");
    let s = read_dicom_slice(&fixture("mri/MR_small.dcm")).expect("reads");
    let v = read_dicom_series(dir.path()).expect("reads");
    assert_eq!(v.dims, [s.columns, s.rows, 1]);
    assert_eq!(v.data, s.pixels);
    assert_eq!(v.spacing_mm[..2], [s.pixel_spacing[1], s.pixel_spacing[0]]);
}

#[test]
fn dicom_seg_is_rejected_as_an_unsupported_sop_class() {
    let r = &reference()["mri"]["liver_1frame.dcm"];
    assert_eq!(r["sop_class"], "Segmentation Storage");
    let err = read_dicom_slice(&fixture("mri/liver_1frame.dcm")).expect_err("SEG is not an MR image");
    assert!(matches!(err, ImagingError::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("liver_1frame.dcm") && msg.contains("Segmentation"), "{msg}");
}

const ROWS: u16 = 6;
const COLS: u16 = 5;
const SLICE_GAP: f64 = 2.5;

/// Writes slice `k` of a synthetic axial-oblique series: every pixel stores `100 * k + pixel index`.
fn write_slice(path: &Path, k: usize) {
    // Rotated 30° about z: row direction (cos, sin, 0), column direction (−sin, cos, 0), normal +z.
    let (sin, cos) = 30f64.to_radians().sin_cos();
    let origin = [10.0, -20.0, 30.0 + SLICE_GAP * k as f64];
    let pixels: Vec<u16> = (0..ROWS * COLS).map(|i| 100 * k as u16 + i).collect();
    let ds = |v: String| PrimitiveValue::from(v);
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(uids::MR_IMAGE_STORAGE)),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(format!("2.25.{}", 4242 + k))),
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("MR")),
        DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            ds(format!("{}\\{}\\{}", origin[0], origin[1], origin[2])),
        ),
        DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds(format!("{cos}\\{sin}\\0\\{}\\{cos}\\0", -sin))),
        DataElement::new(tags::SLICE_THICKNESS, VR::DS, ds(format!("{SLICE_GAP}"))),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(ROWS)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(COLS)),
        DataElement::new(tags::PIXEL_SPACING, VR::DS, ds("0.7\\0.5".into())),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(tags::RESCALE_INTERCEPT, VR::DS, ds("-10".into())),
        DataElement::new(tags::RESCALE_SLOPE, VR::DS, ds("2".into())),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    obj.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .expect("meta")
        .write_to_file(path)
        .expect("writes DICOM");
}

/// File names deliberately in a different order than the slice positions.
fn write_series(dir: &Path, slices: &[usize]) {
    for &k in slices {
        write_slice(&dir.join(format!("IM{:04}", (k * 7919) % 10_000)), k);
    }
}

#[test]
fn synthetic_series_is_sorted_along_the_slice_normal() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_series(dir.path(), &[2, 0, 3, 1]);
    let v = read_dicom_series(dir.path()).expect("reads");
    assert_eq!(v.dims, [COLS as usize, ROWS as usize, 4]);
    assert_eq!(v.spacing_mm, [0.5, 0.7, SLICE_GAP]);
    let n = usize::from(ROWS * COLS);
    for k in 0..4 {
        // Rescaled: 2 * (100 k + i) − 10.
        assert_eq!(v.data[k * n], (200 * k) as f32 - 10.0, "slice {k} first pixel");
        assert_eq!(v.get(4, 5, k), Some((2 * (100 * k + 5 * 5 + 4)) as f32 - 10.0));
    }
    // RAS = LPS with x and y negated: origin (−10, 20, 30); columns step along −(cos, sin) × 0.5 mm.
    let (sin, cos) = 30f64.to_radians().sin_cos();
    let want = [
        [-cos * 0.5, sin * 0.7, 0.0, -10.0],
        [-sin * 0.5, -cos * 0.7, 0.0, 20.0],
        [0.0, 0.0, SLICE_GAP, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for (r, (got_row, want_row)) in v.affine.iter().zip(&want).enumerate() {
        for (c, (got, want)) in got_row.iter().zip(want_row).enumerate() {
            assert!((got - want).abs() < 1e-9, "affine[{r}][{c}] = {got}, expected {want}");
        }
    }
}

#[test]
fn a_missing_middle_slice_is_reported_with_its_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_series(dir.path(), &[0, 1, 3, 4]);
    let err = read_dicom_series(dir.path()).expect_err("slice 2 is missing");
    assert!(matches!(err, ImagingError::Series { .. }), "{err:?}");
    let msg = err.to_string();
    let folder = dir.path().display().to_string();
    assert!(msg.contains(&folder) && msg.contains("gap of 5.000 mm") && msg.contains("missing"), "{msg}");
    // Where slice 2 would be: 30 + 2 × 2.5 mm along the normal (+z), origin (10, −20) in plane.
    assert!(msg.contains("35.000 mm (ImagePositionPatient 10.000\\-20.000\\35.000)"), "{msg}");
}

#[test]
fn a_non_dicom_file_in_a_series_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_series(dir.path(), &[0, 1]);
    std::fs::write(dir.path().join("notes.txt"), "not an image").expect("write");
    let err = read_dicom_series(dir.path()).expect_err("must fail");
    assert!(err.to_string().contains("notes.txt"), "{err}");
}

#[test]
fn an_empty_folder_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = read_dicom_series(dir.path()).expect_err("must fail");
    assert!(matches!(err, ImagingError::Series { .. }), "{err:?}");
}
