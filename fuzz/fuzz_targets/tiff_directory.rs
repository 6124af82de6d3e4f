//! TIFF / SVS slides: the image file directories (offsets, counts, tag types, BigTIFF), the pyramid
//! built from them, and a small region of every level (tile decoding: none, deflate, LZW, JPEG with
//! shared tables). Every problem must be an `ImagingError`, never a panic or an unbounded
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("fedhcc-fuzz-{}.tiff", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    if std::fs::write(p, data).is_err() {
        return;
    }
    if let Ok(slide) = fedhcc_imaging::Slide::open(p) {
        let _ = (slide.mpp(), slide.description(), slide.format());
        for (i, level) in slide.levels().iter().enumerate() {
            let (w, h) = (level.width.min(16), level.height.min(16));
            if w > 0 && h > 0 {
                let _ = slide.read_region(i, 0, 0, w as u32, h as u32);
            }
        }
    }
});
