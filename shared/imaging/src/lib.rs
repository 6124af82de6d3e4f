//! Readers (and small writers) for the study's imaging formats, in pure Rust.
//!
//! - [`volume`]: MRI volumes. NIfTI-1/NIfTI-2 (`.nii`, `.nii.gz`, either byte order) read with nibabel's
//!   header interpretation, single-frame MR DICOM series folders, and a gzip NIfTI-1 writer for the synthetic
//!   cohort generator; MRI preprocessing ([`preprocess_mri`]) into tumour-centred multi-phase crops.
//! - [`synth`]: procedural MRI and H&E phantoms for the synthetic cohort, written through the streaming
//!   JPEG pyramid writer ([`write_jpeg_pyramid_tiff`]) and [`write_nifti_gz`].
//! - [`slide`]: whole-slide images. Aperio SVS and generic pyramidal TIFF (tiled or stripped levels; JPEG with
//!   shared tables, deflate, LZW, uncompressed), region reads that decode only the tiles they touch, a
//!   saturation + Otsu tissue mask, a deflate-tiled pyramid writer, tiling at a target resolution
//!   ([`plan_tiles`]), patch features ([`HandcraftedHe`], [`extract_slide_features`]) and a content-keyed
//!   feature cache ([`FeatureCache`]).
//!
//! # Invariants
//!
//! - Nothing that a file contains can panic this crate: every malformed, truncated or unsupported input gives
//!   an [`ImagingError`] whose message names the file (or folder) and what is wrong with it.
//! - Allocation sizes taken from a file are checked against the file's length (or a fixed cap) before memory
//!   is reserved, so a corrupt header cannot ask for terabytes.
//! - Volumes are `f32`, x fastest, with their voxel → RAS+ world (mm) affine; slides are RGB8, row-major.

mod error;
pub mod slide;
pub mod synth;
pub mod volume;

pub use error::ImagingError;
pub use slide::{Compression, Level, Slide, SlideFormat, TissueMask, tissue_mask, write_pyramid_tiff};
pub use slide::{
    FeatureCache, HANDCRAFTED_HE_NAME, HandcraftedHe, PatchFeatureExtractor, SlideFeatures, TilePlan, TilingConfig,
    extract_slide_features, file_sha256, plan_tiles,
};
pub use slide::{JpegPyramid, RegionSource, write_jpeg_pyramid_tiff};
pub use volume::{
    DicomSlice, NiftiDatatype, NiftiInfo, StorageType, Volume, Volume4, read_dicom_series, read_dicom_slice,
    read_nifti, read_nifti_frames, write_nifti_gz,
};
pub use volume::{MriCrop, MriPrepConfig, PatientMriFiles, PhaseSource, find_patient_mri, preprocess_mri};
