//! Times the synthetic cohort's image writer: patients per minute, bytes per patient, peak memory.
//!
//! ```text
//! cargo run --release -p fedhcc-cohort --example synth_images_bench -- SCALE PATIENTS THREADS OUT_DIR
//! cargo run --release -p fedhcc-cohort --example synth_images_bench -- full 40 2 /tmp/synth-full
//! ```
//!
//! Two centers, seed 7; OUT_DIR is written (and left) for inspection. Peak memory is the process's
//! high-water resident set (`VmHWM` from /proc/self/status, Linux only).

use std::time::Instant;

use fedhcc_cohort::synth;
use fedhcc_cohort::synth_images::{ImageSummary, Scale, write_site_images};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [scale, patients, threads, out] = args.as_slice() else {
        return Err("usage: synth_images_bench SCALE PATIENTS THREADS OUT_DIR".into());
    };
    let scale: Scale = scale.parse()?;
    let (patients, threads): (usize, usize) = (patients.parse()?, threads.parse()?);
    let out = std::path::PathBuf::from(out);
    let cutoff = chrono::NaiveDate::from_ymd_opt(2024, 7, 30).ok_or("date")?;
    let cohort = synth::generate(2, patients, 7, cutoff)?;
    let start = Instant::now();
    let mut total = ImageSummary::default();
    for site in &cohort.sites {
        let dir = out.join(&site.center_id);
        std::fs::create_dir_all(&dir)?;
        let s = write_site_images(&dir, site, &cohort.truth, scale, 7, threads, &|_, _| {})?;
        total.patients += s.patients;
        total.files += s.files;
        total.bytes += s.bytes;
    }
    let secs = start.elapsed().as_secs_f64();
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM")).map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into());
    let per_patient = secs / total.patients as f64;
    println!(
        "scale {scale}, {threads} threads: {} patients, {} files, {:.1} MB in {secs:.1} s",
        total.patients,
        total.files,
        total.bytes as f64 / 1e6
    );
    println!(
        "{:.1} patients/min, {:.2} s and {:.2} MB per patient, peak RSS {peak} kB; 579 patients: ~{:.0} s, {:.1} GB",
        60.0 / per_patient,
        per_patient,
        total.bytes as f64 / 1e6 / total.patients as f64,
        579.0 * per_patient,
        579.0 * total.bytes as f64 / 1e9 / total.patients as f64
    );
    Ok(())
}
