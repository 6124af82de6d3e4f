//! Integration tests of `fedhcc-imaging` against the real fixture files and the numbers independent readers
//! (nibabel, pydicom, tifffile) report for them in `tests/fixtures/REFERENCE.json`.

mod dicom;
mod features;
mod nifti;
mod preprocess;
mod reference;
mod slide;
