//! MRI volumes: the in-memory [`Volume`] and its readers (NIfTI, DICOM series) and writer (gzip NIfTI-1).
//!
//! # Shapes
//!
//! A [`Volume`] holds `dims[0] * dims[1] * dims[2]` voxels in `data`, **x fastest** (the NIfTI / Fortran
//! order): voxel `(i, j, k)` is `data[i + dims[0] * (j + dims[1] * k)]`. `affine` maps voxel indices
//! `(i, j, k, 1)` to RAS+ world coordinates in mm (nibabel's convention, also used for DICOM after the
//! LPS → RAS flip).
//!
//! 4-D inputs (DWI, dynamic series) are read whole with [`read_nifti_frames`] into a [`Volume4`], whose frames
//! are stacked after each other; [`read_nifti`] returns the first frame only, which is what one-volume-per-
//! phase callers want.
//!
//! [`preprocess_mri`] turns one patient's phases and tumour mask into the model's fixed-size, tumour-centred
//! crop ([`MriCrop`], stored with [`MriCrop::write`]); its module documentation describes the pipeline.

mod crop_file;
mod dicom;
mod nifti;
pub mod preprocess;

pub use dicom::{DicomSlice, read_dicom_series, read_dicom_slice};
pub use nifti::{NiftiDatatype, NiftiInfo, StorageType, read_nifti, read_nifti_frames, write_nifti_gz};
pub use preprocess::{MriCrop, MriPrepConfig, PatientMriFiles, PhaseSource, find_patient_mri, preprocess_mri};

/// One 3-D scalar volume with its geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Voxel counts along x, y, z (1 for missing trailing dimensions of a 1-D or 2-D image).
    pub dims: [usize; 3],
    /// Voxel size along x, y, z in mm.
    pub spacing_mm: [f64; 3],
    /// Voxel index → RAS+ world mm (row-major 4×4, last row `[0, 0, 0, 1]`).
    pub affine: [[f64; 4]; 4],
    /// Scaled voxel values (slope and intercept applied), x fastest.
    pub data: Vec<f32>,
}

impl Volume {
    /// Number of voxels `dims` describes.
    #[must_use]
    pub fn n_voxels(&self) -> usize {
        self.dims.iter().product()
    }

    /// The value at voxel `(i, j, k)`, or `None` outside the grid (or if `data` is shorter than `dims` says).
    #[must_use]
    pub fn get(&self, i: usize, j: usize, k: usize) -> Option<f32> {
        let [nx, ny, nz] = self.dims;
        if i >= nx || j >= ny || k >= nz {
            return None;
        }
        self.data.get(i + nx * (j + ny * k)).copied()
    }
}

/// A 4-D volume: `n_frames` 3-D frames on one grid, stored frame after frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume4 {
    /// Voxel counts along x, y, z of each frame.
    pub dims: [usize; 3],
    /// Number of frames (the product of NIfTI dimensions 4 to 7; 1 for a 3-D file).
    pub n_frames: usize,
    /// Voxel size along x, y, z in mm.
    pub spacing_mm: [f64; 3],
    /// `pixdim[4]` as written (the frame interval, in the file's time unit); `None` for a 3-D file.
    pub frame_step: Option<f64>,
    /// Voxel index → RAS+ world mm, shared by all frames.
    pub affine: [[f64; 4]; 4],
    /// Scaled values, x fastest, then y, z, frame.
    pub data: Vec<f32>,
    /// What the file's header said, beyond the geometry.
    pub info: NiftiInfo,
}

impl Volume4 {
    /// The shape as nibabel reports it for 3- to 7-D files: 3 entries for a 3-D file, else 4 (dimensions 4 to 7
    /// flattened into frames). 1-D and 2-D files are padded to 3 entries.
    #[must_use]
    pub fn shape(&self) -> Vec<usize> {
        let mut shape = self.dims.to_vec();
        if self.frame_step.is_some() {
            shape.push(self.n_frames);
        }
        shape
    }

    /// Frame `t` as a [`Volume`], or `None` past the last frame.
    #[must_use]
    pub fn frame(&self, t: usize) -> Option<Volume> {
        let n = self.dims.iter().product::<usize>();
        let start = n.checked_mul(t)?;
        let data = self.data.get(start..start.checked_add(n)?)?.to_vec();
        Some(Volume { dims: self.dims, spacing_mm: self.spacing_mm, affine: self.affine, data })
    }

    /// The first frame, consuming `self` without copying the voxel data.
    #[must_use]
    pub fn into_first_frame(mut self) -> Volume {
        let n = self.dims.iter().product::<usize>();
        self.data.truncate(n);
        Volume { dims: self.dims, spacing_mm: self.spacing_mm, affine: self.affine, data: self.data }
    }
}
