//! DICOM MR: single slices and series folders assembled into a [`Volume`].
//!
//! Files are parsed with `dicom-object`; native (uncompressed) pixel data is decoded here, so no codec crate
//! is needed. A series folder must hold single-frame MR Image Storage slices of one orientation and size;
//! they are sorted along the slice normal (row × column direction cosines) by their position, and a gap
//! larger than the others (a missing slice) is an error, not a silently stretched volume.

use std::path::{Path, PathBuf};

use dicom_core::{PrimitiveValue, Tag};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, open_file};

use super::Volume;
use crate::ImagingError;

const FORMAT: &str = "DICOM";
/// Relative tolerance on slice gaps and on direction cosines agreeing between slices.
const GEOMETRY_TOLERANCE: f64 = 0.01;
/// How many missing slice positions an error message lists before counting the rest.
const MAX_LISTED_GAPS: usize = 10;

/// Native (uncompressed) transfer syntaxes: implicit VR LE, explicit VR LE, deflated explicit VR LE, explicit
/// VR BE.
const NATIVE_SYNTAXES: [&str; 4] =
    ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"];

/// One single-frame MR slice with the geometry needed to stack it.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomSlice {
    /// The file it came from.
    pub path: PathBuf,
    /// Number of pixel rows (y).
    pub rows: usize,
    /// Number of pixel columns (x).
    pub columns: usize,
    /// `PixelSpacing` as written: `[between rows, between columns]` in mm.
    pub pixel_spacing: [f64; 2],
    /// `ImageOrientationPatient`: row direction cosines then column direction cosines (LPS).
    pub orientation: [f64; 6],
    /// `ImagePositionPatient`: the centre of the first pixel, LPS mm.
    pub position: [f64; 3],
    /// `SliceThickness`, if present.
    pub slice_thickness: Option<f64>,
    /// `SpacingBetweenSlices`, if present.
    pub spacing_between_slices: Option<f64>,
    /// `RescaleSlope`, `RescaleIntercept` (1, 0 when absent).
    pub rescale: (f64, f64),
    /// Rescaled pixel values, row-major (x fastest).
    pub pixels: Vec<f32>,
}

impl DicomSlice {
    fn normal(&self) -> [f64; 3] {
        let o = &self.orientation;
        cross([o[0], o[1], o[2]], [o[3], o[4], o[5]])
    }
}

/// Reads one single-frame MR slice.
///
/// # Errors
///
/// [`ImagingError::InvalidFormat`] if the file is not DICOM or lacks a required attribute,
/// [`ImagingError::Unsupported`] for another SOP class (DICOM-SEG masks included), a compressed transfer
/// syntax, multi-frame or colour data, and [`ImagingError::Truncated`] if the pixel data is short.
pub fn read_dicom_slice(path: &Path) -> Result<DicomSlice, ImagingError> {
    let obj = open_file(path).map_err(|e| ImagingError::invalid(path, FORMAT, e.to_string()))?;

    let sop_class = string(path, &obj, tags::SOP_CLASS_UID)?
        .unwrap_or_else(|| obj.meta().media_storage_sop_class_uid().trim_end_matches(['\0', ' ']).to_string());
    if sop_class != uids::MR_IMAGE_STORAGE {
        let name = match sop_class.as_str() {
            uids::SEGMENTATION_STORAGE => "Segmentation Storage (DICOM-SEG)",
            uids::ENHANCED_MR_IMAGE_STORAGE => "Enhanced MR Image Storage (multi-frame)",
            uids::CT_IMAGE_STORAGE => "CT Image Storage",
            _ => "not an MR image",
        };
        return Err(ImagingError::unsupported(
            path,
            format!(
                "SOP class {sop_class} ({name}); only single-frame MR Image Storage ({}) is read. \
                 Convert masks and multi-frame images to NIfTI (e.g. with dcm2niix)",
                uids::MR_IMAGE_STORAGE
            ),
        ));
    }
    let syntax = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    if !NATIVE_SYNTAXES.contains(&syntax.as_str()) {
        return Err(ImagingError::unsupported(
            path,
            format!("compressed transfer syntax {syntax}; decompress the series first (e.g. `gdcmconv --raw`)"),
        ));
    }

    let rows = required_uint(path, &obj, tags::ROWS, "Rows")?;
    let columns = required_uint(path, &obj, tags::COLUMNS, "Columns")?;
    let samples = uint(path, &obj, tags::SAMPLES_PER_PIXEL)?.unwrap_or(1);
    let frames = string(path, &obj, tags::NUMBER_OF_FRAMES)?.and_then(|s| s.trim().parse::<usize>().ok()).unwrap_or(1);
    if samples != 1 || frames != 1 {
        return Err(ImagingError::unsupported(
            path,
            format!("{samples} samples per pixel and {frames} frames; only single-frame greyscale slices are read"),
        ));
    }
    let bits_allocated = required_uint(path, &obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let bits_stored = uint(path, &obj, tags::BITS_STORED)?.unwrap_or(bits_allocated);
    let signed = uint(path, &obj, tags::PIXEL_REPRESENTATION)?.unwrap_or(0) == 1;
    if !matches!(bits_allocated, 8 | 16 | 32) || bits_stored == 0 || bits_stored > bits_allocated {
        return Err(ImagingError::unsupported(
            path,
            format!("BitsAllocated {bits_allocated} / BitsStored {bits_stored}; expected 8, 16 or 32 bits"),
        ));
    }

    let pixel_spacing = floats(path, &obj, tags::PIXEL_SPACING)?
        .filter(|v| v.len() >= 2 && v[0] > 0.0 && v[1] > 0.0)
        .map(|v| [v[0], v[1]])
        .ok_or_else(|| missing(path, "PixelSpacing (two positive values)"))?;
    let orientation = floats(path, &obj, tags::IMAGE_ORIENTATION_PATIENT)?
        .filter(|v| v.len() == 6)
        .map(|v| std::array::from_fn(|i| v[i]))
        .ok_or_else(|| missing(path, "ImageOrientationPatient (six values)"))?;
    let position = floats(path, &obj, tags::IMAGE_POSITION_PATIENT)?
        .filter(|v| v.len() == 3)
        .map(|v| std::array::from_fn(|i| v[i]))
        .ok_or_else(|| missing(path, "ImagePositionPatient (three values)"))?;
    let first =
        |tag| -> Result<Option<f64>, ImagingError> { Ok(floats(path, &obj, tag)?.and_then(|v| v.first().copied())) };
    let slope = first(tags::RESCALE_SLOPE)?.unwrap_or(1.0);
    let intercept = first(tags::RESCALE_INTERCEPT)?.unwrap_or(0.0);

    let width = bits_allocated / 8;
    let n = rows.checked_mul(columns).filter(|n| n.saturating_mul(width) <= 1 << 31).ok_or_else(|| {
        ImagingError::invalid(path, FORMAT, format!("{rows}×{columns} pixels is not a plausible slice"))
    })?;
    let bytes = pixel_bytes(path, &obj)?;
    if bytes.len() < n * width {
        return Err(ImagingError::truncated(
            path,
            format!(
                "pixel data holds {} bytes, {rows}×{columns} pixels of {bits_allocated} bits need {}",
                bytes.len(),
                n * width
            ),
        ));
    }
    let mask = if bits_stored >= 32 { u32::MAX } else { (1u32 << bits_stored) - 1 };
    let pixels = bytes
        .chunks_exact(width)
        .take(n)
        .map(|c| {
            let word = c.iter().rev().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) & mask;
            let value = if signed && bits_stored < 32 && word & (1 << (bits_stored - 1)) != 0 {
                f64::from(word) - f64::from(mask) - 1.0
            } else if signed && bits_stored == 32 {
                f64::from(word as i32)
            } else {
                f64::from(word)
            };
            (value * slope + intercept) as f32
        })
        .collect();

    Ok(DicomSlice {
        path: path.to_path_buf(),
        rows,
        columns,
        pixel_spacing,
        orientation,
        position,
        slice_thickness: first(tags::SLICE_THICKNESS)?,
        spacing_between_slices: first(tags::SPACING_BETWEEN_SLICES)?,
        rescale: (slope, intercept),
        pixels,
    })
}

/// Reads every file of `dir` (not recursing; names starting with `.` skipped) as one MR series and stacks
/// the slices into a [`Volume`].
///
/// Slices are sorted by their position along the slice normal. `spacing_mm` is `[column spacing, row
/// spacing, slice gap]`; the affine maps `(column, row, slice)` to RAS+ mm (DICOM's LPS with x and y negated).
/// A single slice gets `SpacingBetweenSlices`, else `SliceThickness`, else 1 mm as its third spacing.
///
/// # Errors
///
/// Any error of [`read_dicom_slice`] for the first bad file; [`ImagingError::Series`] if the folder is
/// empty, if slices differ in size, spacing or orientation, if two slices share a position, or if the gaps
/// between neighbouring slices are not uniform (a missing slice), naming the gap and listing where the
/// missing slices would be (mm along the slice normal and the `ImagePositionPatient` they would have).
pub fn read_dicom_series(dir: &Path) -> Result<Volume, ImagingError> {
    let series_err = |reason: String| ImagingError::Series { dir: dir.to_path_buf(), reason };
    let files = series_files(dir)?;
    if files.is_empty() {
        return Err(series_err("the folder holds no files".into()));
    }
    let slices = files.iter().map(|p| read_dicom_slice(p)).collect::<Result<Vec<_>, _>>()?;

    let reference = &slices[0];
    let normal = reference.normal();
    for s in &slices[1..] {
        let same_grid = s.rows == reference.rows && s.columns == reference.columns;
        let same_spacing = s.pixel_spacing.iter().zip(&reference.pixel_spacing).all(|(a, b)| close(*a, *b));
        let same_orientation =
            s.orientation.iter().zip(&reference.orientation).all(|(a, b)| (a - b).abs() <= GEOMETRY_TOLERANCE);
        if !(same_grid && same_spacing && same_orientation) {
            return Err(series_err(format!(
                "{} is {}×{} at {:?} mm oriented {:?}, but {} is {}×{} at {:?} mm oriented {:?}",
                file_name(&s.path),
                s.rows,
                s.columns,
                s.pixel_spacing,
                s.orientation,
                file_name(&reference.path),
                reference.rows,
                reference.columns,
                reference.pixel_spacing,
                reference.orientation
            )));
        }
    }

    let mut ordered: Vec<(f64, &DicomSlice)> = slices.iter().map(|s| (dot(s.position, normal), s)).collect();
    ordered.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: Vec<f64> = ordered.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let mut sorted_gaps = gaps.clone();
    sorted_gaps.sort_by(f64::total_cmp);
    let slice_gap = if let Some(&smallest) = sorted_gaps.first() {
        if smallest <= 1e-3 {
            let i = gaps.iter().position(|&g| g == smallest).unwrap_or(0);
            return Err(series_err(format!(
                "{} and {} share the position {:.3} mm along the slice normal (duplicate or second series?)",
                file_name(&ordered[i].1.path),
                file_name(&ordered[i + 1].1.path),
                ordered[i].0
            )));
        }
        let irregular: Vec<usize> =
            (0..gaps.len()).filter(|&i| (gaps[i] - smallest).abs() > GEOMETRY_TOLERANCE * smallest + 1e-3).collect();
        if let Some(&i) = irregular.first() {
            let g = gaps[i];
            let missing = (g / smallest).round() - 1.0;
            let mut reason = format!(
                "gap of {g:.3} mm between {} (at {:.3} mm) and {} (at {:.3} mm) where the other slices are \
                 {smallest:.3} mm apart: {} missing",
                file_name(&ordered[i].1.path),
                ordered[i].0,
                file_name(&ordered[i + 1].1.path),
                ordered[i + 1].0,
                if missing >= 1.0 {
                    format!("about {missing} slice(s) are")
                } else {
                    "spacing is irregular, slices are".into()
                }
            );
            let positions = missing_positions(&ordered, &irregular, smallest, normal);
            if !positions.is_empty() {
                reason.push_str("; missing slice position(s) along the slice normal: ");
                reason.push_str(&positions.join(", "));
            }
            return Err(series_err(reason));
        }
        (ordered[ordered.len() - 1].0 - ordered[0].0) / gaps.len() as f64
    } else {
        reference.spacing_between_slices.or(reference.slice_thickness).filter(|s| *s > 0.0).unwrap_or(1.0)
    };

    // Slice direction from the actual positions (robust to gantry tilt); the normal for a single slice.
    let first = ordered[0].1;
    let k_step = if let Some(last) = ordered.last().filter(|_| ordered.len() > 1) {
        let n = (ordered.len() - 1) as f64;
        std::array::from_fn(|i| (last.1.position[i] - first.position[i]) / n)
    } else {
        normal.map(|v| v * slice_gap)
    };
    let [row_spacing, col_spacing] = reference.pixel_spacing;
    let o = reference.orientation;
    let lps_cols = [
        [o[0] * col_spacing, o[1] * col_spacing, o[2] * col_spacing],
        [o[3] * row_spacing, o[4] * row_spacing, o[5] * row_spacing],
        k_step,
    ];
    let mut affine = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    for (r, sign) in [-1.0, -1.0, 1.0].into_iter().enumerate() {
        for c in 0..3 {
            affine[r][c] = sign * lps_cols[c][r];
        }
        affine[r][3] = sign * first.position[r];
    }

    let mut data = Vec::with_capacity(reference.pixels.len() * ordered.len());
    for (_, s) in &ordered {
        data.extend_from_slice(&s.pixels);
    }
    Ok(Volume {
        dims: [reference.columns, reference.rows, ordered.len()],
        spacing_mm: [col_spacing, row_spacing, slice_gap],
        affine,
        data,
    })
}

/// The files [`read_dicom_series`] reads from `dir`: regular files whose names do not start with `.`, sorted.
pub(crate) fn series_files(dir: &Path) -> Result<Vec<PathBuf>, ImagingError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ImagingError::io(dir, e))? {
        let entry = entry.map_err(|e| ImagingError::io(dir, e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().map_err(|e| ImagingError::io(entry.path(), e))?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Where the slices missing from the `irregular` gaps would be, as "<mm along the normal> mm
/// (ImagePositionPatient x\\y\\z)", at most [`MAX_LISTED_GAPS`] entries then a count of the rest.
fn missing_positions(ordered: &[(f64, &DicomSlice)], irregular: &[usize], step: f64, normal: [f64; 3]) -> Vec<String> {
    let mut listed = Vec::new();
    let mut more = 0f64;
    for &i in irregular {
        let (start, slice) = ordered[i];
        // Slices that fit in the gap; computed, not counted, since positions come from the files.
        let missing = ((ordered[i + 1].0 - start) / step).round() - 1.0;
        let shown = missing.min((MAX_LISTED_GAPS - listed.len()) as f64).max(0.0) as usize;
        more += (missing - shown as f64).max(0.0);
        for j in 1..=shown {
            let d = step * j as f64;
            let p = slice.position;
            listed.push(format!(
                "{:.3} mm (ImagePositionPatient {:.3}\\{:.3}\\{:.3})",
                start + d,
                p[0] + d * normal[0],
                p[1] + d * normal[1],
                p[2] + d * normal[2]
            ));
        }
    }
    if more > 0.0 {
        listed.push(format!("and {more} more"));
    }
    listed
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= GEOMETRY_TOLERANCE * a.abs().max(b.abs())
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

fn missing(path: &Path, what: &str) -> ImagingError {
    ImagingError::invalid(path, FORMAT, format!("missing or malformed {what}"))
}

fn is_empty(e: &dicom_object::mem::InMemElement) -> bool {
    matches!(e.value().primitive(), Some(PrimitiveValue::Empty))
        || e.to_str().is_ok_and(|s| s.trim_matches(['\0', ' ']).is_empty())
}

fn string(path: &Path, obj: &DefaultDicomObject, tag: Tag) -> Result<Option<String>, ImagingError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) => e
            .to_str()
            .map(|s| Some(s.trim_end_matches(['\0', ' ']).to_string()))
            .map_err(|err| ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
        Ok(None) => Ok(None),
        Err(err) => Err(ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
    }
}

fn floats(path: &Path, obj: &DefaultDicomObject, tag: Tag) -> Result<Option<Vec<f64>>, ImagingError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if is_empty(e) => Ok(None),
        Ok(Some(e)) => e
            .to_multi_float64()
            .map(Some)
            .map_err(|err| ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
        Ok(None) => Ok(None),
        Err(err) => Err(ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
    }
}

fn uint(path: &Path, obj: &DefaultDicomObject, tag: Tag) -> Result<Option<usize>, ImagingError> {
    match obj.element_opt(tag) {
        Ok(Some(e)) if is_empty(e) => Ok(None),
        Ok(Some(e)) => e
            .to_int::<u32>()
            .map(|v| Some(v as usize))
            .map_err(|err| ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
        Ok(None) => Ok(None),
        Err(err) => Err(ImagingError::invalid(path, FORMAT, format!("attribute {tag}: {err}"))),
    }
}

fn required_uint(path: &Path, obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<usize, ImagingError> {
    uint(path, obj, tag)?.filter(|&v| v > 0).ok_or_else(|| missing(path, name))
}

/// Pixel data as little-endian bytes, whatever integer type `dicom-object` decoded it into.
fn pixel_bytes(path: &Path, obj: &DefaultDicomObject) -> Result<Vec<u8>, ImagingError> {
    let element = obj
        .element_opt(tags::PIXEL_DATA)
        .map_err(|e| ImagingError::invalid(path, FORMAT, format!("PixelData: {e}")))?
        .ok_or_else(|| missing(path, "PixelData"))?;
    let value = element.value().primitive().ok_or_else(|| {
        ImagingError::unsupported(path, "PixelData is encapsulated (compressed); decompress the series first")
    })?;
    Ok(match value {
        PrimitiveValue::U8(b) => b.to_vec(),
        PrimitiveValue::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => {
            return Err(ImagingError::unsupported(path, format!("PixelData with VR {:?}", element.vr())));
        }
    })
}
