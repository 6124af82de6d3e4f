//! NIfTI-1/NIfTI-2 files (`.nii`, optionally gzip-compressed): header, dimensions, scaling and the
//! voxel data it promises. Every problem must be an `ImagingError` naming the file, never a panic or
//! an allocation the file's size does not justify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("fedhcc-fuzz-{}.nii", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    if std::fs::write(p, data).is_err() {
        return;
    }
    if let Ok(v) = fedhcc_imaging::volume::read_nifti_frames(p) {
        assert_eq!(v.data.len(), v.dims.iter().product::<usize>() * v.n_frames, "the voxels the header promises");
        let _ = v.frame(0);
    }
});
