//! MRI preprocessing: one patient's phases and tumour mask → a fixed-size, tumour-centred, multi-phase crop
//! ([`MriCrop`]), the input of the model's MRI branch.
//!
//! # Pipeline
//!
//! 1. **Files** ([`find_patient_mri`]): in `mri/<patient_id>/`, the mask `mask.nii.gz` or `mask.nii`, and per
//!    configured phase `<phase>.nii.gz`, `<phase>.nii` or a DICOM series folder `<phase>/`. Two candidates for
//!    one phase (or for the mask) are an error rather than a guess; a missing phase is allowed.
//! 2. **Mask**: read as NIfTI; every voxel must be finite; tumour = value ≥ 0.5 (so a mask with values other
//!    than 0/1 is thresholded at 0.5); no tumour voxel is an error. `tumour_volume_ml` = tumour voxels × voxel
//!    volume (|det| of the affine's 3×3 part) on the mask's native grid.
//! 3. **Phases**: each present phase is read (a 4-D NIfTI contributes its first frame; a DICOM series is
//!    stacked by [`read_dicom_series`]) and must be on the mask's grid: same dimensions and every entry of the
//!    affine's top 3×4 equal within 1e-3 mm, else an error naming the phase and both grids ("mask on a different
//!    grid"). A NaN or infinite voxel is an error naming the file and the voxel.
//! 4. **Orientation**: sampling happens in the scan's own voxel axes; the output is then indexed in RAS
//!    orientation. Each output axis (x = R, y = A, z = S) takes the voxel axis whose affine column points most
//!    along it: of the 6 axis permutations, the one with the largest sum of |direction cosine| (first wins a
//!    tie, as for a 45° oblique); the axis is reversed when that cosine is negative. This is nibabel's
//!    `as_closest_canonical` for the usual (near-axis-aligned) scans; permutations (sagittal, coronal
//!    acquisitions) are handled as well as flips. Settings given as x, y, z (`spacing_mm`, `box_size_mm`) and
//!    the output grid (z, y, x) refer to these RAS axes.
//! 5. **Crop box**, per voxel axis (native step `s` = norm of the affine column): the mask's bounding box as
//!    voxel extents `[lo − ½, hi + ½]`, widened by `margin_mm / s` on each side and **clamped to the volume's
//!    extent** `[−½, n − ½]` (no padding: near the edge of the scan the box is smaller on that side, and
//!    `box_size_mm` says what was covered).
//! 6. **Resample to `spacing_mm`** (target step `t`, ratio `r = t / s` native voxels per sample): the box is
//!    divided into `L = round(extent / r)` (at least 1) cells of the target spacing, centred on the box; cell `k`
//!    samples the native coordinate `centre + (k − (L − 1)/2)·r`. This is "resample the volume to the target
//!    spacing on a grid aligned with the box, then crop the box"; a sample within half a voxel of the volume's
//!    edge takes the edge voxel's value (the coordinate is clamped to `[0, n − 1]`). `box_size_mm = L·t`.
//!    Because the grid is centred on the box, a scan stored with an axis reversed gives the same crop.
//! 7. **Resize** the `L` cropped samples to the fixed grid's `G` (trilinear, pixel-centre convention as
//!    `align_corners = false` / `skimage.transform.resize`): output `o` sits at crop coordinate
//!    `(o + ½)·L/G − ½`, clamped to `[0, L − 1]` (edge values repeat).
//! 8. **Normalise** per phase within the crop: clip to the `clip_percentiles` (linear interpolation between
//!    order statistics, numpy's default), then z-score with the mean and population standard deviation of the
//!    clipped crop; a constant crop (std 0) becomes all zeros. A missing phase is all zeros with
//!    `present = false`; a patient with no phase at all is an error.
//!
//! # How steps 5–7 are computed
//!
//! Trilinear interpolation is separable, and both the resampling and the resize are linear along each axis,
//! so "resample, crop, resize" along one axis is a `G × n` matrix (the resize weights times the resampling
//! weights), with at most four non-zero entries per row. [`preprocess_mri`] builds these three small matrices
//! once per patient from the mask's geometry and applies them axis by axis to the native voxels inside the
//! box. The result is *exactly* the two-step pipeline above (not an approximation of it; the test
//! `crop_matches_the_python_reference` checks it against scipy running the two steps literally), and only the
//! crop box is ever interpolated. For a 320×260×80 × 5-phase gzip NIfTI patient, reading the six files is
//! about 85–90 % of the time (`examples/mri_prep_bench.rs`); the rest is the full-volume finiteness and mask
//! scans, the interpolation, and writing the crop.
//!
//! Values are interpolated and normalised in `f64` and stored as `f32`.
//!
//! Size: one pipeline (orientation, resampling, tumour box, per-phase normalisation, crop) whose
//! steps share the geometry types and the rationale written beside each.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dicom::series_files;
use super::{Volume, read_dicom_series, read_nifti};
use crate::ImagingError;

/// Bumped whenever the pipeline's arithmetic changes, so that [`MriPrepConfig::fingerprint`] changes with it
/// and cached crops are redone.
const PIPELINE_VERSION: u32 = 1;
/// Largest output grid side and number of voxels accepted in the settings (and in crop files).
pub(crate) const MAX_GRID_SIDE: usize = 1024;
pub(crate) const MAX_GRID_VOXELS: usize = 1 << 24;
/// Most phases a study may configure.
pub(crate) const MAX_PHASES: usize = 64;
/// Longest phase name, in bytes.
pub(crate) const MAX_PHASE_NAME: usize = 64;
/// Tolerance on affines (mm) when checking that a phase is on the mask's grid.
const GRID_TOLERANCE_MM: f64 = 1e-3;
/// Mask voxels at or above this value are tumour.
const MASK_THRESHOLD: f32 = 0.5;
const MASK_NAMES: [&str; 2] = ["mask.nii.gz", "mask.nii"];

/// How MRI crops are made: the study's `[imaging.mri]` table (every field optional, unknown keys refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MriPrepConfig {
    /// Phase names, in output order; each is looked for as `<phase>.nii.gz`, `<phase>.nii` or `<phase>/`.
    pub phases: Vec<String>,
    /// Target voxel spacing along x, y, z (RAS axes) in mm.
    pub spacing_mm: [f64; 3],
    /// Margin added around the tumour's bounding box on each side, in mm.
    pub margin_mm: f64,
    /// Output grid as (z, y, x).
    pub grid: [usize; 3],
    /// Lower and upper intensity percentiles (0–100) each phase is clipped to, computed within the crop.
    pub clip_percentiles: [f64; 2],
}

impl Default for MriPrepConfig {
    fn default() -> Self {
        Self {
            phases: ["t1_pre", "arterial", "portal_venous", "delayed", "hepatobiliary"].map(String::from).to_vec(),
            spacing_mm: [1.0, 1.0, 2.0],
            margin_mm: 10.0,
            grid: [32, 64, 64],
            clip_percentiles: [0.5, 99.5],
        }
    }
}

impl MriPrepConfig {
    /// Checks the ranges: 1 to 64 distinct phase names of letters, digits, `_` and `-` (not `mask`), spacing in
    /// (0, 100] mm, margin in [0, 1000] mm, grid sides 1 to 1024 with at most 2^24 voxels, percentiles with
    /// 0 ≤ low < high ≤ 100.
    ///
    /// # Errors
    ///
    /// A sentence naming the setting and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.phases.is_empty() || self.phases.len() > MAX_PHASES {
            return Err(format!("phases: {} listed, 1 to {MAX_PHASES} allowed", self.phases.len()));
        }
        for (i, name) in self.phases.iter().enumerate() {
            check_phase_name(name)?;
            if self.phases[..i].contains(name) {
                return Err(format!("phases: '{name}' is listed twice"));
            }
        }
        if !self.spacing_mm.iter().all(|s| s.is_finite() && *s > 0.0 && *s <= 100.0) {
            return Err(format!("spacing_mm = {:?}: each value must be in (0, 100] mm", self.spacing_mm));
        }
        if !(self.margin_mm.is_finite() && (0.0..=1000.0).contains(&self.margin_mm)) {
            return Err(format!("margin_mm = {}: must be in [0, 1000] mm", self.margin_mm));
        }
        let voxels = self.grid.iter().try_fold(1usize, |acc, &g| acc.checked_mul(g));
        if !self.grid.iter().all(|g| (1..=MAX_GRID_SIDE).contains(g)) || voxels.is_none_or(|v| v > MAX_GRID_VOXELS) {
            return Err(format!(
                "grid = {:?}: each side must be 1 to {MAX_GRID_SIDE}, at most {MAX_GRID_VOXELS} voxels in all",
                self.grid
            ));
        }
        let [lo, hi] = self.clip_percentiles;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi && hi <= 100.0) {
            return Err(format!("clip_percentiles = [{lo}, {hi}]: need 0 ≤ low < high ≤ 100"));
        }
        Ok(())
    }

    /// SHA-256 (lowercase hex) of the settings and the pipeline version: equal fingerprints mean equal crops
    /// from equal inputs, so caches key on it.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("fedhcc-imaging mri-prep v{PIPELINE_VERSION}\n").as_bytes());
        h.update((self.phases.len() as u64).to_le_bytes());
        for p in &self.phases {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        let floats = self.spacing_mm.iter().chain([&self.margin_mm]).chain(&self.clip_percentiles);
        for v in floats {
            h.update(v.to_bits().to_le_bytes());
        }
        for g in self.grid {
            h.update((g as u64).to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// A phase name becomes a file name: letters, digits, `_` and `-` only, so it cannot leave the patient folder.
fn check_phase_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > MAX_PHASE_NAME || !ok_chars {
        return Err(format!(
            "phase name '{name}': use 1 to {MAX_PHASE_NAME} letters, digits, '_' or '-' (it names the phase's file)"
        ));
    }
    if name.eq_ignore_ascii_case("mask") {
        return Err("phase name 'mask' is reserved for the tumour mask".into());
    }
    Ok(())
}

/// Where one phase's image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseSource {
    /// A NIfTI file (`<phase>.nii.gz` or `<phase>.nii`).
    Nifti(PathBuf),
    /// A DICOM series folder (`<phase>/`).
    DicomSeries(PathBuf),
}

impl PhaseSource {
    /// The file or folder.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            Self::Nifti(p) | Self::DicomSeries(p) => p,
        }
    }
}

/// What exists on disk for one patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientMriFiles {
    /// `mri/<patient_id>/`.
    pub patient_dir: PathBuf,
    /// The tumour mask, if there is one.
    pub mask: Option<PathBuf>,
    /// Every requested phase, in the requested order, with its source if present.
    pub phases: Vec<(String, Option<PhaseSource>)>,
}

/// Looks in `patient_dir` for the tumour mask and each of `phases` (see the [module docs](self)).
///
/// # Errors
///
/// [`ImagingError::Io`] if the folder cannot be listed, [`ImagingError::InvalidRequest`] for a phase name that
/// cannot be a file name, [`ImagingError::Unusable`] when a phase (or the mask) has two candidates (e.g.
/// `arterial.nii.gz` and `arterial/`), [`ImagingError::Unsupported`] for a mask given as a DICOM folder.
pub fn find_patient_mri(patient_dir: &Path, phases: &[String]) -> Result<PatientMriFiles, ImagingError> {
    let meta = std::fs::metadata(patient_dir).map_err(|e| ImagingError::io(patient_dir, e))?;
    if !meta.is_dir() {
        return Err(ImagingError::request(patient_dir, "not a folder; expected mri/<patient_id>/"));
    }
    for name in phases {
        check_phase_name(name).map_err(|e| ImagingError::request(patient_dir, e))?;
    }
    let mask = single(patient_dir, "the tumour mask", &MASK_NAMES.map(|n| (n.to_string(), Kind::File)))?;
    if mask.is_none() && kind_of(&patient_dir.join("mask"))? == Some(Kind::Folder) {
        return Err(ImagingError::unsupported(
            patient_dir.join("mask"),
            "a tumour mask as a DICOM folder; convert it to mask.nii.gz (e.g. with dcm2niix) on the phases' grid",
        ));
    }
    let mut found = Vec::with_capacity(phases.len());
    for name in phases {
        let candidates =
            [(format!("{name}.nii.gz"), Kind::File), (format!("{name}.nii"), Kind::File), (name.clone(), Kind::Folder)];
        let source = single(patient_dir, &format!("phase '{name}'"), &candidates)?.map(|(path, kind)| match kind {
            Kind::File => PhaseSource::Nifti(path),
            Kind::Folder => PhaseSource::DicomSeries(path),
        });
        found.push((name.clone(), source));
    }
    Ok(PatientMriFiles { patient_dir: patient_dir.to_path_buf(), mask: mask.map(|(p, _)| p), phases: found })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Folder,
}

fn kind_of(path: &Path) -> Result<Option<Kind>, ImagingError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(Some(Kind::Folder)),
        Ok(m) if m.is_file() => Ok(Some(Kind::File)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImagingError::io(path, e)),
    }
}

/// The one candidate of `what` that exists with the expected kind, `None` if none, an error if several.
fn single(dir: &Path, what: &str, candidates: &[(String, Kind)]) -> Result<Option<(PathBuf, Kind)>, ImagingError> {
    let mut hits = Vec::new();
    for (name, kind) in candidates {
        let path = dir.join(name);
        if kind_of(&path)? == Some(*kind) {
            hits.push((path, *kind));
        }
    }
    if hits.len() > 1 {
        let names: Vec<String> = hits.iter().map(|(p, _)| file_label(p)).collect();
        return Err(ImagingError::unusable(
            dir,
            format!("{what} is there more than once ({}); keep one and move the others away", names.join(", ")),
        ));
    }
    Ok(hits.pop())
}

fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

impl PatientMriFiles {
    /// Every file the crop is made from (the mask, each NIfTI phase, each file of each DICOM series folder),
    /// for change detection. A series folder that cannot be listed is returned as the folder itself, so that a
    /// caller stamping the files meets the problem instead of missing an input.
    #[must_use]
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.mask.iter().cloned().collect();
        for (_, source) in &self.phases {
            match source {
                None => {}
                Some(PhaseSource::Nifti(p)) => paths.push(p.clone()),
                Some(PhaseSource::DicomSeries(dir)) => match series_files(dir) {
                    Ok(files) => paths.extend(files),
                    Err(_) => paths.push(dir.clone()),
                },
            }
        }
        paths
    }
}

/// The model input for one patient.
///
/// # Shapes
///
/// `data` holds `phases.len() × grid[0] × grid[1] × grid[2]` values: phase, then z, y, x with x fastest,
/// in RAS orientation (x index increasing towards the patient's right, y anterior, z superior; see the
/// [module docs](self)), each present phase z-scored within the crop, absent phases all zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct MriCrop {
    /// Output grid as (z, y, x).
    pub grid: [usize; 3],
    /// Phase names, in the configured order.
    pub phases: Vec<String>,
    /// One flag per phase; an absent phase is all zeros in `data`.
    pub present: Vec<bool>,
    /// Phases × z × y × x, x fastest.
    pub data: Vec<f32>,
    /// Tumour volume from the mask on its native grid, in ml.
    pub tumour_volume_ml: f64,
    /// Physical size of the crop box along x, y, z (RAS axes), in mm.
    pub box_size_mm: [f64; 3],
}

impl MriCrop {
    /// Values per phase (`grid[0] * grid[1] * grid[2]`).
    #[must_use]
    pub fn phase_len(&self) -> usize {
        self.grid.iter().product()
    }

    /// The values of phase `i` (z, y, x; x fastest), or `None` past the last phase.
    #[must_use]
    pub fn phase(&self, i: usize) -> Option<&[f32]> {
        let n = self.phase_len();
        self.data.get(i.checked_mul(n)?..i.checked_add(1)?.checked_mul(n)?)
    }
}

/// Makes one patient's crop (see the [module docs](self) for every step).
///
/// # Errors
///
/// [`ImagingError::InvalidRequest`] for settings that do not [validate](MriPrepConfig::validate) or `files`
/// found for other phases than `cfg.phases`; [`ImagingError::Unusable`] for a missing or empty mask, no
/// present phase, a phase on a different grid than the mask, a NaN/infinite voxel or a degenerate affine;
/// any reading error of [`read_nifti`] or [`read_dicom_series`], naming the file.
pub fn preprocess_mri(files: &PatientMriFiles, cfg: &MriPrepConfig) -> Result<MriCrop, ImagingError> {
    let dir = &files.patient_dir;
    cfg.validate().map_err(|e| ImagingError::request(dir, format!("MRI preprocessing settings: {e}")))?;
    let mut sources = Vec::with_capacity(cfg.phases.len());
    for name in &cfg.phases {
        let entry = files.phases.iter().find(|(n, _)| n == name).ok_or_else(|| {
            ImagingError::request(dir, format!("the files were looked up without phase '{name}' of the settings"))
        })?;
        sources.push(entry.1.as_ref());
    }
    if sources.iter().all(Option::is_none) {
        return Err(ImagingError::unusable(
            dir,
            format!(
                "none of the phases {} is there (as <phase>.nii.gz, <phase>.nii or a DICOM folder <phase>/)",
                cfg.phases.join(", ")
            ),
        ));
    }
    let mask_path = files.mask.as_deref().ok_or_else(|| {
        ImagingError::unusable(dir, "no tumour mask: expected mask.nii.gz or mask.nii on the phases' grid")
    })?;

    let mask = read_nifti(mask_path)?;
    check_voxels(mask_path, &mask)?;
    let geometry = Geometry::of(mask_path, &mask)?;
    let (bbox, tumour_voxels) = tumour_box(&mask).ok_or_else(|| {
        ImagingError::unusable(mask_path, "the mask has no tumour voxel (no value ≥ 0.5); segment the tumour first")
    })?;
    let tumour_volume_ml = tumour_voxels as f64 * geometry.voxel_volume_mm3 / 1000.0;
    let plan = Plan::new(&geometry, mask.dims, bbox, cfg);
    // Only the mask's grid is needed from here on; free its voxels before the phases are read.
    let mask = Volume { data: Vec::new(), ..mask };

    let n = plan.output_len();
    let mut data = vec![0f32; n * cfg.phases.len()];
    let mut present = vec![false; cfg.phases.len()];
    for (p, source) in sources.into_iter().enumerate() {
        let Some(source) = source else { continue };
        let (name, path) = (&cfg.phases[p], source.path());
        let volume = match source {
            PhaseSource::Nifti(path) => read_nifti(path)?,
            PhaseSource::DicomSeries(dir) => read_dicom_series(dir)?,
        };
        check_same_grid(name, path, &volume, mask_path, &mask)?;
        check_voxels(path, &volume)?;
        let mut values = plan.sample(&volume);
        normalise(&mut values, cfg.clip_percentiles);
        for (d, v) in data[p * n..(p + 1) * n].iter_mut().zip(&values) {
            *d = *v as f32;
        }
        present[p] = true;
    }
    Ok(MriCrop {
        grid: cfg.grid,
        phases: cfg.phases.clone(),
        present,
        data,
        tumour_volume_ml,
        box_size_mm: plan.box_size_mm,
    })
}

/// `data` matches `dims` and holds only finite values.
fn check_voxels(path: &Path, v: &Volume) -> Result<(), ImagingError> {
    if v.data.len() != v.n_voxels() {
        return Err(ImagingError::request(
            path,
            format!("volume holds {} values but its dimensions {:?} need {}", v.data.len(), v.dims, v.n_voxels()),
        ));
    }
    if let Some(i) = v.data.iter().position(|x| !x.is_finite()) {
        let [nx, ny, _] = v.dims;
        let what = if v.data[i].is_nan() { "NaN" } else { "infinite" };
        return Err(ImagingError::unusable(
            path,
            format!(
                "voxel ({}, {}, {}) is {what}; every voxel must be a finite number (re-export the image)",
                i % nx,
                (i / nx) % ny,
                i / (nx * ny)
            ),
        ));
    }
    Ok(())
}

fn check_same_grid(name: &str, path: &Path, v: &Volume, mask_path: &Path, mask: &Volume) -> Result<(), ImagingError> {
    let affine_close = v.affine[..3]
        .iter()
        .flatten()
        .zip(mask.affine[..3].iter().flatten())
        .all(|(a, b)| (a - b).abs() <= GRID_TOLERANCE_MM);
    if v.dims == mask.dims && affine_close {
        return Ok(());
    }
    Err(ImagingError::unusable(
        path,
        format!(
            "phase '{name}' is {} with affine {}, the mask {} is {} with affine {}: mask on a different grid. \
             Resample the mask onto the phases' grid (every phase and the mask must share one grid)",
            dims_label(v.dims),
            affine_label(&v.affine),
            mask_path.display(),
            dims_label(mask.dims),
            affine_label(&mask.affine)
        ),
    ))
}

fn dims_label([x, y, z]: [usize; 3]) -> String {
    format!("{x}×{y}×{z} voxels")
}

fn affine_label(a: &[[f64; 4]; 4]) -> String {
    let rows: Vec<String> =
        a[..3].iter().map(|r| format!("[{:.3}, {:.3}, {:.3}, {:.3}]", r[0], r[1], r[2], r[3])).collect();
    format!("[{}]", rows.join(", "))
}

/// Inclusive voxel bounding box `[lo, hi]` per voxel axis of the tumour, and its voxel count.
fn tumour_box(mask: &Volume) -> Option<([[usize; 2]; 3], usize)> {
    let [nx, ny, _] = mask.dims;
    let mut bbox = [[usize::MAX, 0]; 3];
    let mut count = 0usize;
    for (i, _) in mask.data.iter().enumerate().filter(|(_, v)| **v >= MASK_THRESHOLD) {
        let idx = [i % nx, (i / nx) % ny, i / (nx * ny)];
        for (b, x) in bbox.iter_mut().zip(idx) {
            b[0] = b[0].min(x);
            b[1] = b[1].max(x);
        }
        count += 1;
    }
    (count > 0).then_some((bbox, count))
}

/// What the mask's affine says about its voxel axes.
struct Geometry {
    /// Native voxel size along each voxel axis (affine column norms), mm.
    step_mm: [f64; 3],
    /// For output axis x (R), y (A), z (S): the voxel axis it comes from and whether it runs backwards.
    axes: [(usize, bool); 3],
    voxel_volume_mm3: f64,
}

impl Geometry {
    fn of(path: &Path, v: &Volume) -> Result<Self, ImagingError> {
        let a = &v.affine;
        let col = |c: usize| [a[0][c], a[1][c], a[2][c]];
        let step_mm = [0, 1, 2].map(|c| col(c).iter().map(|x| x * x).sum::<f64>().sqrt());
        let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
        let voxel_volume_mm3 = det.abs();
        if !(step_mm.iter().all(|s| s.is_finite() && *s > 0.0) && voxel_volume_mm3.is_finite())
            || voxel_volume_mm3 <= 1e-9 * step_mm.iter().product::<f64>()
        {
            return Err(ImagingError::unusable(
                path,
                format!("affine {} is degenerate (zero voxel size or collinear axes)", affine_label(a)),
            ));
        }
        const PERMUTATIONS: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let cosine = |world: usize, voxel: usize| a[world][voxel] / step_mm[voxel];
        let score = |p: &[usize; 3]| (0..3).map(|w| cosine(w, p[w]).abs()).sum::<f64>();
        let mut best = PERMUTATIONS[0];
        for p in &PERMUTATIONS[1..] {
            if score(p) > score(&best) {
                best = *p;
            }
        }
        let axes = [0, 1, 2].map(|w| (best[w], cosine(w, best[w]) < 0.0));
        Ok(Self { step_mm, axes, voxel_volume_mm3 })
    }
}

/// One output sample along one axis: weights for the native voxels `start..start + weights.len()`.
struct Row {
    start: usize,
    weights: Vec<f64>,
}

/// The composed "resample, crop, resize" weights along one voxel axis.
struct AxisPlan {
    rows: Vec<Row>,
    /// Native voxels the rows touch: `lo..hi`.
    lo: usize,
    hi: usize,
}

impl AxisPlan {
    /// `n` native voxels of `step` mm, target `target` mm, tumour voxels `lo..=hi`, `g` outputs, reversed if
    /// `flip`. Returns the plan and the crop's length in mm.
    fn new(
        n: usize,
        step: f64,
        target: f64,
        margin_mm: f64,
        [lo, hi]: [usize; 2],
        g: usize,
        flip: bool,
    ) -> (Self, f64) {
        let last = (n - 1) as f64;
        let r = target / step;
        let m = margin_mm / step;
        let a = (lo as f64 - 0.5 - m).max(-0.5);
        let b = (hi as f64 + 0.5 + m).min(last + 0.5);
        let len = ((b - a) / r).round().max(1.0);
        let first = (a + b) / 2.0 - (len - 1.0) / 2.0 * r;

        let mut rows = Vec::with_capacity(g);
        let mut pairs: Vec<(usize, f64)> = Vec::with_capacity(4);
        for o in 0..g {
            let o = if flip { g - 1 - o } else { o };
            let u = ((o as f64 + 0.5) * len / g as f64 - 0.5).clamp(0.0, len - 1.0);
            let u0 = u.floor();
            let fu = u - u0;
            pairs.clear();
            for (k, wk) in [(u0, 1.0 - fu), ((u0 + 1.0).min(len - 1.0), fu)] {
                let x = (first + k * r).clamp(0.0, last);
                let x0 = x.floor();
                let fx = x - x0;
                for (i, w) in [(x0, wk * (1.0 - fx)), ((x0 + 1.0).min(last), wk * fx)] {
                    if w != 0.0 {
                        pairs.push((i as usize, w));
                    }
                }
            }
            let start = pairs.iter().map(|p| p.0).min().unwrap_or(0);
            let end = pairs.iter().map(|p| p.0 + 1).max().unwrap_or(start + 1);
            let mut weights = vec![0.0; end - start];
            for &(i, w) in &pairs {
                weights[i - start] += w;
            }
            rows.push(Row { start, weights });
        }
        let lo = rows.iter().map(|r| r.start).min().unwrap_or(0);
        let hi = rows.iter().map(|r| r.start + r.weights.len()).max().unwrap_or(lo + 1);
        (Self { rows, lo, hi }, len * target)
    }
}

/// The per-axis weights for one patient, from the mask's geometry.
struct Plan {
    /// Indexed by voxel axis; each axis' rows are already in RAS output order.
    axes: [AxisPlan; 3],
    /// Voxel axis of output x, y, z.
    voxel_axis_of: [usize; 3],
    box_size_mm: [f64; 3],
}

impl Plan {
    fn new(geometry: &Geometry, dims: [usize; 3], bbox: [[usize; 2]; 3], cfg: &MriPrepConfig) -> Self {
        let [gz, gy, gx] = cfg.grid;
        let out_len = [gx, gy, gz];
        let mut box_size_mm = [0.0; 3];
        let mut voxel_axis_of = [0; 3];
        let mut slots: [Option<AxisPlan>; 3] = [None, None, None];
        for (w, &(v, flip)) in geometry.axes.iter().enumerate() {
            let (plan, size) = AxisPlan::new(
                dims[v],
                geometry.step_mm[v],
                cfg.spacing_mm[w],
                cfg.margin_mm,
                bbox[v],
                out_len[w],
                flip,
            );
            box_size_mm[w] = size;
            voxel_axis_of[w] = v;
            slots[v] = Some(plan);
        }
        // `axes` is a permutation, so every slot is filled exactly once.
        let axes = slots.map(|s| s.unwrap_or(AxisPlan { rows: Vec::new(), lo: 0, hi: 1 }));
        Self { axes, voxel_axis_of, box_size_mm }
    }

    fn output_len(&self) -> usize {
        self.axes.iter().map(|a| a.rows.len()).product()
    }

    /// The crop of `v` (on the mask's grid, checked by the caller) in output order: z, y, x, x fastest.
    fn sample(&self, v: &Volume) -> Vec<f64> {
        let [nx, ny, _] = v.dims;
        let [ax, ay, az] = &self.axes;
        let (gx, gy, gz) = (ax.rows.len(), ay.rows.len(), az.rows.len());
        let (ny_box, nz_box) = (ay.hi - ay.lo, az.hi - az.lo);

        // Along voxel x, for every native (y, z) of the box.
        let mut t1 = vec![0.0; nz_box * ny_box * gx];
        for (kz, k) in (az.lo..az.hi).enumerate() {
            for (jy, j) in (ay.lo..ay.hi).enumerate() {
                let line = &v.data[(k * ny + j) * nx..(k * ny + j + 1) * nx];
                let dst = &mut t1[(kz * ny_box + jy) * gx..(kz * ny_box + jy + 1) * gx];
                for (d, row) in dst.iter_mut().zip(&ax.rows) {
                    *d = row.weights.iter().zip(&line[row.start..]).map(|(w, x)| w * f64::from(*x)).sum();
                }
            }
        }
        // Along voxel y.
        let mut t2 = vec![0.0; nz_box * gy * gx];
        for kz in 0..nz_box {
            for (oy, row) in ay.rows.iter().enumerate() {
                let dst = &mut t2[(kz * gy + oy) * gx..(kz * gy + oy + 1) * gx];
                for (i, w) in row.weights.iter().enumerate() {
                    let jy = row.start + i - ay.lo;
                    axpy(dst, *w, &t1[(kz * ny_box + jy) * gx..(kz * ny_box + jy + 1) * gx]);
                }
            }
        }
        // Along voxel z.
        let plane = gy * gx;
        let mut t3 = vec![0.0; gz * plane];
        for (oz, row) in az.rows.iter().enumerate() {
            let dst = &mut t3[oz * plane..(oz + 1) * plane];
            for (i, w) in row.weights.iter().enumerate() {
                let kz = row.start + i - az.lo;
                axpy(dst, *w, &t2[kz * plane..(kz + 1) * plane]);
            }
        }
        self.to_ras(t3, [gx, gy, gz])
    }

    /// Reorders a voxel-axis-ordered crop (x fastest) into output order (S, A, R; R fastest). Flips are already
    /// in the rows.
    fn to_ras(&self, crop: Vec<f64>, g: [usize; 3]) -> Vec<f64> {
        if self.voxel_axis_of == [0, 1, 2] {
            return crop;
        }
        let stride = [1, g[0], g[0] * g[1]];
        let [vr, va, vs] = self.voxel_axis_of;
        let mut out = Vec::with_capacity(crop.len());
        for s in 0..g[vs] {
            for a in 0..g[va] {
                for r in 0..g[vr] {
                    out.push(crop[r * stride[vr] + a * stride[va] + s * stride[vs]]);
                }
            }
        }
        out
    }
}

fn axpy(dst: &mut [f64], w: f64, src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += w * s;
    }
}

/// Clips to the percentiles and z-scores in place; a constant crop becomes zeros.
fn normalise(values: &mut [f64], [p_lo, p_hi]: [f64; 2]) {
    if values.is_empty() {
        return;
    }
    let mut scratch = values.to_vec();
    let lo = percentile(&mut scratch, p_lo);
    let hi = percentile(&mut scratch, p_hi);
    let n = values.len() as f64;
    for v in values.iter_mut() {
        *v = v.clamp(lo, hi);
    }
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    // Rounding leaves a constant crop with a std of ~1e-16 × its mean, not 0.
    let constant = std <= 1e-9 * mean.abs().max(f64::MIN_POSITIVE);
    for v in values.iter_mut() {
        *v = if constant { 0.0 } else { (*v - mean) / std };
    }
}

/// numpy's default (`linear`) percentile `q` of `values` (reordered; finite values only).
fn percentile(values: &mut [f64], q: f64) -> f64 {
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let k = (pos.floor() as usize).min(values.len() - 1);
    let frac = pos - k as f64;
    let (_, &mut at_k, above) = values.select_nth_unstable_by(k, f64::total_cmp);
    if frac == 0.0 || above.is_empty() {
        return at_k;
    }
    let next = above.iter().copied().fold(f64::INFINITY, f64::min);
    at_k + (next - at_k) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([4, 1, 3, 2, 10], [0, 12.5, 50, 90, 100]) = [1, 1.5, 3, 7.6, 10]
        for (q, want) in [(0.0, 1.0), (12.5, 1.5), (50.0, 3.0), (90.0, 7.6), (100.0, 10.0)] {
            let mut v = [4.0, 1.0, 3.0, 2.0, 10.0];
            assert!((percentile(&mut v, q) - want).abs() < 1e-12, "q = {q}");
        }
    }

    #[test]
    fn a_constant_crop_normalises_to_zeros() {
        let mut v = vec![1234.5; 10];
        normalise(&mut v, [0.5, 99.5]);
        assert!(v.iter().all(|x| *x == 0.0), "{v:?}");
    }

    #[test]
    fn normalised_values_have_mean_0_and_std_1() {
        let mut v: Vec<f64> = (0..1000).map(|i| f64::from(i).sqrt()).collect();
        normalise(&mut v, [0.0, 100.0]);
        let mean = v.iter().sum::<f64>() / 1000.0;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12, "{mean} {var}");
    }

    #[test]
    fn identity_resample_without_margin_keeps_the_box() {
        // 1 mm voxels, 1 mm target, tumour voxels 3..=6, no margin, output = box length: the rows pick the
        // native voxels one to one.
        let (plan, size) = AxisPlan::new(10, 1.0, 1.0, 0.0, [3, 6], 4, false);
        assert_eq!(size, 4.0);
        for (o, row) in plan.rows.iter().enumerate() {
            assert_eq!((row.start, row.weights.as_slice()), (3 + o, &[1.0][..]));
        }
        let (flipped, _) = AxisPlan::new(10, 1.0, 1.0, 0.0, [3, 6], 4, true);
        assert_eq!(flipped.rows.iter().map(|r| r.start).collect::<Vec<_>>(), [6, 5, 4, 3]);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let ok = MriPrepConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            MriPrepConfig { phases: vec![], ..ok.clone() },
            MriPrepConfig { phases: vec!["../x".into()], ..ok.clone() },
            MriPrepConfig { phases: vec!["a".into(), "a".into()], ..ok.clone() },
            MriPrepConfig { phases: vec!["mask".into()], ..ok.clone() },
            MriPrepConfig { spacing_mm: [1.0, 0.0, 1.0], ..ok.clone() },
            MriPrepConfig { margin_mm: f64::NAN, ..ok.clone() },
            MriPrepConfig { grid: [0, 64, 64], ..ok.clone() },
            MriPrepConfig { grid: [1024, 1024, 1024], ..ok.clone() },
            MriPrepConfig { clip_percentiles: [50.0, 50.0], ..ok.clone() },
            MriPrepConfig { clip_percentiles: [-1.0, 50.0], ..ok.clone() },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn the_fingerprint_changes_with_every_setting() {
        let base = MriPrepConfig::default();
        let f = base.fingerprint();
        assert_eq!(f.len(), 64);
        assert_eq!(f, MriPrepConfig::default().fingerprint());
        let variants = [
            MriPrepConfig { phases: vec!["t1_pre".into()], ..base.clone() },
            MriPrepConfig { spacing_mm: [1.0, 1.0, 2.5], ..base.clone() },
            MriPrepConfig { margin_mm: 10.5, ..base.clone() },
            MriPrepConfig { grid: [32, 64, 32], ..base.clone() },
            MriPrepConfig { clip_percentiles: [1.0, 99.5], ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.fingerprint(), f, "{v:?}");
        }
    }
}
