//! Times [`preprocess_mri`] on one full-size synthetic patient: 5 phases of 320×260×80 int16 gzip NIfTI
//! (1.2 × 1.2 × 2.5 mm) and a mask with a 45 mm tumour, default settings, crop written to disk.
//!
//! ```text
//! cargo run --release -p fedhcc-imaging --example mri_prep_bench [runs]
//! ```
//!
//! Prints the time to read the six files alone, the time for the whole patient (find, read, check, resample,
//! normalise, write the crop) and the part of it spent writing the crop, as the best and median of `runs`
//! (default 5).

use std::path::Path;
use std::time::{Duration, Instant};

use fedhcc_imaging::{
    MriPrepConfig, StorageType, Volume, find_patient_mri, preprocess_mri, read_nifti, write_nifti_gz,
};

const DIMS: [usize; 3] = [320, 260, 80];
const SPACING: [f64; 3] = [1.2, 1.2, 2.5];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5).max(1);
    let dir = tempfile::tempdir()?;
    let cfg = MriPrepConfig::default();
    write_patient(dir.path(), &cfg.phases)?;
    let out = dir.path().join("P001.crop");

    let mut read_times = Vec::new();
    let mut total_times = Vec::new();
    let mut write_times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        for name in cfg.phases.iter().map(|p| format!("{p}.nii.gz")).chain(["mask.nii.gz".to_string()]) {
            std::hint::black_box(read_nifti(&dir.path().join(name))?);
        }
        read_times.push(t.elapsed());

        let t = Instant::now();
        let files = find_patient_mri(dir.path(), &cfg.phases)?;
        let crop = preprocess_mri(&files, &cfg)?;
        let t_prep = t.elapsed();
        crop.write(&out)?;
        total_times.push(t.elapsed());
        write_times.push(t.elapsed() - t_prep);
        assert!(crop.present.iter().all(|p| *p));
    }
    println!("patient: 5 phases × {}×{}×{} int16 .nii.gz + mask, grid {:?}", DIMS[0], DIMS[1], DIMS[2], cfg.grid);
    println!("reading the 6 files only: {}", summary(&mut read_times));
    println!("whole patient (find + preprocess + write crop): {}", summary(&mut total_times));
    println!("  of which writing the crop (fsync included): {}", summary(&mut write_times));
    Ok(())
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    format!("best {:.1} ms, median {:.1} ms", ms(times[0]), ms(times[times.len() / 2]))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Smooth anatomy-like intensities plus deterministic noise (so that gzip compresses about as well as on
/// real scans), a brighter sphere for the tumour, one intensity scale per phase.
fn write_patient(dir: &Path, phases: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let affine = [
        [-SPACING[0], 0.0, 0.0, 190.0],
        [0.0, -SPACING[1], 0.0, 150.0],
        [0.0, 0.0, SPACING[2], -100.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let centre = [170.0, 120.0, 40.0];
    let radius_mm = 22.5;
    let in_tumour = |i: usize, j: usize, k: usize| {
        let d2: f64 =
            [i, j, k].into_iter().zip(centre).zip(SPACING).map(|((x, c), s)| ((x as f64 - c) * s).powi(2)).sum();
        d2.sqrt() <= radius_mm
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let n: usize = DIMS.iter().product();
    for (p, name) in phases.iter().enumerate() {
        let mut data = Vec::with_capacity(n);
        for k in 0..DIMS[2] {
            for j in 0..DIMS[1] {
                for i in 0..DIMS[0] {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let noise = (state % 64) as f64;
                    let body = 400.0 + 300.0 * ((i as f64 / 40.0).sin() * (j as f64 / 30.0).cos()) + 5.0 * k as f64;
                    let tumour = if in_tumour(i, j, k) { 250.0 * (p + 1) as f64 } else { 0.0 };
                    data.push(((body + tumour) * (1.0 + 0.2 * p as f64) + noise).round() as f32);
                }
            }
        }
        let v = Volume { dims: DIMS, spacing_mm: SPACING, affine, data };
        write_nifti_gz(&dir.join(format!("{name}.nii.gz")), &v, StorageType::I16)?;
    }
    let mut mask = Vec::with_capacity(n);
    for k in 0..DIMS[2] {
        for j in 0..DIMS[1] {
            for i in 0..DIMS[0] {
                mask.push(f32::from(u8::from(in_tumour(i, j, k))));
            }
        }
    }
    let v = Volume { dims: DIMS, spacing_mm: SPACING, affine, data: mask };
    write_nifti_gz(&dir.join("mask.nii.gz"), &v, StorageType::I16)?;
    Ok(())
}
