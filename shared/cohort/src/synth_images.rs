//! The images of the synthetic cohort: for every patient of a site, a preoperative MRI study
//! (`mri/<patient_id>/<phase>.nii.gz` and `mask.nii.gz`) and an H&E slide (`wsi/<patient_id>/slide.tif`),
//! written with the procedural phantoms of [`fedhcc_imaging::synth`] in the formats SCHEMA.md names.
//!
//! # From a clinical row to the phantoms
//!
//! - **MRI**: tumour diameter from `tumor_max_diam_cm`; extra nodules from `tumor_number`; satellites from
//!   `satellite_nodules`; contrast agent from `mri_contrast_agent` (no hepatobiliary file with an
//!   extracellular agent); capsule strength from `capsule`. The latent risk `z` also acts on the image
//!   directly, beyond what the clinical columns say (each with a little patient noise `ε ~ N(0, 1)`):
//!   - heterogeneity and necrosis: `sigmoid(−0.3 + 1.2 z + 0.4 ln(d / 40 mm) + 0.35 ε)`;
//!   - margin irregularity: `sigmoid(−0.7 + 1.1 z + 0.5 [MVI] + 0.35 ε)`;
//!   - capsule (rim): the column's level × `sigmoid(1 − 0.9 z + 0.3 ε)` × 1.6, at most 1;
//!   - arterial enhancement `0.35 + 0.12 grade + 0.1 z + 0.1 ε`, washout `0.15 + 0.06 z + 0.03 (grade − 2)
//!     + 0.04 ε`, both clamped to the phantom's range;
//!   - peritumoral arterial enhancement and hepatobiliary hypointensity (inside the phantom, from `z`).
//! - **Slide**: Edmondson–Steiner grade from `es_grade`, MVI (M0/M1/M2) from `mvi`, latent risk for
//!   within-grade nuclear atypia.
//! - **Center shift** (from `center_id`, deterministic): scanner intensity scale, bias field and noise level;
//!   stain colour vectors and glass colour. `center_a`…`center_d` get four distinct profiles (later letters
//!   reuse them with a small perturbation); the contrast-agent, age and aetiology mix come from the clinical
//!   generator.
//!
//! Each patient's images depend only on the clinical row, the latent risk, the scale and a seed derived from
//! the cohort seed and the patient id, so they are identical whatever the thread count or order.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use fedhcc_imaging::synth::derive_seed;
use fedhcc_imaging::synth::mri::{ContrastAgent, MriPhantom, Phase};
use fedhcc_imaging::synth::slide::{Mvi, SlidePhantom, Stain};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::CohortError;
use crate::synth::{ClinicalRow, SiteRows, TruthRow};

/// The phases of the preoperative MRI study, as file stems (the hepatobiliary one only with gadoxetate).
pub const MRI_PHASES: [&str; 5] = ["t1_pre", "arterial", "portal_venous", "delayed", "hepatobiliary"];

/// Image sizes. Only sizes change with the scale; what the images show does not.
///
/// | scale | MRI grid (voxels) | voxel (mm) | field of view | slide level 0 (px, at 0.5 µm) | tile, levels |
/// |---|---|---|---|---|---|
/// | `tiny` | 48 × 48 × 16 | 2.5 × 2.5 × 5 | 120 × 120 × 80 mm around the tumour | 768 × 512 | 256, 2 (×2) |
/// | `small` | 160 × 130 × 40 | 2.4 × 2.4 × 5 | 384 × 312 × 200 mm (abdomen) | 2048 × 1536 | 256, 3 (×4) |
/// | `full` | 240 × 196 × 56 | 1.6 × 1.6 × 3.6 | 384 × 314 × 202 mm (abdomen) | 4096 × 3072 | 512, 3 (×4) |
///
/// Measured with the crate's `synth_images_bench` example (release build, 2 threads):
///
/// - `small`: about 0.45 CPU-seconds and 4.6 MB per patient (the 579-patient cohort: ~2.6 GB).
/// - `full`: about 1.6 CPU-seconds and 14 MB per patient, so the 579-patient two-center cohort takes about
///   8 minutes on 2 cores and writes ~8 GB, with a peak resident memory under 100 MB (slides are streamed a
///   band at a time). Two thirds of the time is the MRI, most of it gzip; a clinical 320 × 260 × 80 grid at
///   1.2 × 1.2 × 2.5 mm costs about 2.5 times the MRI time and would not fit in 10 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    /// For tests: a tumour-centred MRI crop and a small slide; a 20-patient cohort takes seconds.
    Tiny,
    /// For a quick demo (the default).
    #[default]
    Small,
    /// Realistic MRI volumes and the largest slides the time budget allows.
    Full,
}

impl Scale {
    fn mri_grid(self) -> ([usize; 3], [f64; 3], bool) {
        match self {
            Scale::Tiny => ([48, 48, 16], [2.5, 2.5, 5.0], true),
            Scale::Small => ([160, 130, 40], [2.4, 2.4, 5.0], false),
            Scale::Full => ([240, 196, 56], [1.6, 1.6, 3.6], false),
        }
    }

    /// (width, height, tile, levels, downsample)
    fn slide(self) -> (u32, u32, u32, usize, u32) {
        match self {
            Scale::Tiny => (768, 512, 256, 2, 2),
            Scale::Small => (2048, 1536, 256, 3, 4),
            Scale::Full => (4096, 3072, 512, 3, 4),
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scale::Tiny => "tiny",
            Scale::Small => "small",
            Scale::Full => "full",
        })
    }
}

impl FromStr for Scale {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiny" => Ok(Scale::Tiny),
            "small" => Ok(Scale::Small),
            "full" => Ok(Scale::Full),
            other => Err(format!("unknown image scale '{other}'; use tiny, small or full")),
        }
    }
}

/// What [`write_site_images`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageSummary {
    /// Patients whose images were written.
    pub patients: usize,
    /// Files written (phases, masks and slides).
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A center's imaging equipment: MRI scanner and stain.
struct CenterImaging {
    gain: f64,
    bias: [f64; 4],
    noise: f64,
    stain: Stain,
}

fn center_imaging(center_id: &str) -> CenterImaging {
    let letter = center_id.strip_prefix("center_").filter(|s| s.len() == 1).and_then(|s| s.chars().next());
    let index = match letter {
        Some(c @ 'a'..='z') => (c as u8 - b'a') as usize,
        _ => (derive_seed(0, center_id) % 1024) as usize,
    };
    let mut c = match index % 4 {
        0 => CenterImaging { gain: 1.0, bias: [0.12, -0.08, 0.05, 0.06], noise: 0.022, stain: Stain::reference() },
        1 => CenterImaging {
            gain: 1.35,
            bias: [-0.16, 0.10, -0.06, -0.10],
            noise: 0.030,
            stain: Stain { hematoxylin: [0.66, 0.76, 0.32], eosin: [0.12, 0.90, 0.42], background: [236, 238, 246] },
        },
        2 => CenterImaging {
            gain: 0.8,
            bias: [0.05, 0.16, 0.10, 0.0],
            noise: 0.026,
            stain: Stain { hematoxylin: [0.48, 0.68, 0.52], eosin: [0.28, 0.72, 0.62], background: [247, 242, 236] },
        },
        _ => CenterImaging {
            gain: 1.15,
            bias: [-0.05, -0.13, 0.0, 0.12],
            noise: 0.020,
            stain: Stain { hematoxylin: [0.60, 0.70, 0.45], eosin: [0.18, 0.85, 0.50], background: [240, 240, 240] },
        },
    };
    if index >= 4 {
        // Later centers: the same four profiles, perturbed.
        let h = derive_seed(1, center_id);
        let u = |k: u32| ((h >> (8 * k)) & 0xFF) as f64 / 255.0 - 0.5;
        c.gain *= 1.0 + 0.3 * u(0);
        c.noise *= 1.0 + 0.3 * u(1);
        c.bias = c.bias.map(|b| (b * (1.0 + u(2))).clamp(-0.5, 0.5));
        c.stain.eosin = c.stain.eosin.map(|e| (e * (1.0 + 0.2 * u(3))).clamp(0.0, 1.5));
    }
    c
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The MRI and slide phantoms of one patient (see the module docs for the mapping). `seed` is the cohort's
/// image seed; the patient's own seed is derived from it and the patient id.
///
/// # Errors
///
/// [`CohortError::InvalidArgument`] naming the patient when `es_grade`, `mvi`, `mri_contrast_agent`,
/// `capsule` or the tumour size is not a value the generator writes, or the latent risk is not finite.
pub fn patient_phantoms(
    row: &ClinicalRow,
    latent_risk: f64,
    scale: Scale,
    seed: u64,
) -> Result<(MriPhantom, SlidePhantom), CohortError> {
    let bad = |column: &str| {
        CohortError::InvalidArgument(format!(
            "patient {}: {column} is not a value the synthetic images support",
            row.patient_id
        ))
    };
    let z = latent_risk;
    if !z.is_finite() {
        return Err(bad("latent_risk"));
    }
    let grade = u8::try_from(row.es_grade).ok().filter(|g| (1..=4).contains(g)).ok_or_else(|| bad("es_grade"))?;
    let mvi = match row.mvi.as_str() {
        "M0" => Mvi::M0,
        "M1" => Mvi::M1,
        "M2" => Mvi::M2,
        _ => return Err(bad("mvi")),
    };
    let agent = match row.mri_contrast_agent.as_str() {
        "gadoxetate" => ContrastAgent::Gadoxetate,
        "extracellular" => ContrastAgent::Extracellular,
        _ => return Err(bad("mri_contrast_agent")),
    };
    let capsule = match row.capsule.as_str() {
        "complete" => 0.9,
        "incomplete" => 0.5,
        "absent" => 0.1,
        _ => return Err(bad("capsule")),
    };
    if !(row.tumor_max_diam_cm.is_finite() && row.tumor_max_diam_cm > 0.0) {
        return Err(bad("tumor_max_diam_cm"));
    }
    let patient_seed = derive_seed(seed, &row.patient_id);
    let mut rng = ChaCha8Rng::seed_from_u64(patient_seed);
    let mut eps = || -> f64 { StandardNormal.sample(&mut rng) };
    let diameter = (row.tumor_max_diam_cm * 10.0).clamp(5.0, 200.0);
    let g = f64::from(grade);
    let invaded = if mvi == Mvi::M0 { 0.0 } else { 1.0 };
    let heterogeneity = sigmoid(-0.3 + 1.2 * z + 0.4 * (diameter / 40.0).ln() + 0.35 * eps());
    let margin_irregularity = sigmoid(-0.7 + 1.1 * z + 0.5 * invaded + 0.35 * eps());
    let rim = (capsule * sigmoid(1.0 - 0.9 * z + 0.3 * eps()) * 1.6).clamp(0.0, 1.0);
    let arterial_enhancement = (0.35 + 0.12 * g + 0.1 * z + 0.1 * eps()).clamp(0.05, 1.5);
    let washout = (0.15 + 0.06 * z + 0.03 * (g - 2.0) + 0.04 * eps()).clamp(0.0, 0.5);
    let center = center_imaging(&row.center_id);
    let (dims, spacing_mm, centre_on_tumour) = scale.mri_grid();
    let mri = MriPhantom {
        dims,
        spacing_mm,
        centre_on_tumour,
        tumour_diameter_mm: diameter,
        latent_risk: z,
        arterial_enhancement,
        washout,
        rim,
        heterogeneity,
        margin_irregularity,
        extra_nodules: row.tumor_number.saturating_sub(1).min(8),
        satellites: row.satellite_nodules,
        scanner_gain: center.gain,
        bias_field: center.bias,
        noise: center.noise,
        agent,
        phases: Phase::ALL.to_vec(),
        seed: derive_seed(patient_seed, "mri"),
    };
    let (width, height, tile, levels, downsample) = scale.slide();
    let slide = SlidePhantom {
        width,
        height,
        mpp: 0.5,
        tile,
        levels,
        downsample,
        quality: 80,
        grade,
        mvi,
        latent_risk: z,
        stain: center.stain,
        seed: derive_seed(patient_seed, "slide"),
    };
    Ok((mri, slide))
}

/// A patient id that is safe as a folder name (letters, digits, `-`, `_`, `.`; not `.` or `..`).
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Writes the images of every patient of `site` under `site_dir`: `mri/<id>/<phase>.nii.gz` for the
/// phases of [`MRI_PHASES`] the patient's contrast agent has, `mri/<id>/mask.nii.gz`, and
/// `wsi/<id>/slide.tif`. Patients are written in parallel on `threads` threads (at least one);
/// `progress(done, total)` is called from those threads after each patient. Every file is written under a
/// temporary name and renamed into place when complete.
///
/// # Errors
///
/// [`CohortError::InvalidArgument`] when a patient has no row in `truth`, an id is not a safe folder name, or
/// a row holds a value the images do not support (see [`patient_phantoms`]) — checked for every patient
/// before anything is written; [`CohortError::Write`] when a folder cannot be created; [`CohortError::Image`]
/// when an image cannot be written. The first error stops the other threads after their current patient.
pub fn write_site_images(
    site_dir: &Path,
    site: &SiteRows,
    truth: &[TruthRow],
    scale: Scale,
    seed: u64,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<ImageSummary, CohortError> {
    let risk: std::collections::HashMap<&str, f64> =
        truth.iter().map(|t| (t.patient_id.as_str(), t.latent_risk)).collect();
    let mut jobs = Vec::with_capacity(site.rows.len());
    for row in &site.rows {
        if !safe_id(&row.patient_id) {
            return Err(CohortError::InvalidArgument(format!(
                "patient id '{}' cannot be used as a folder name (letters, digits, '-', '_', '.')",
                row.patient_id
            )));
        }
        let z = risk.get(row.patient_id.as_str()).copied().ok_or_else(|| {
            CohortError::InvalidArgument(format!("patient {} has no latent risk in the truth table", row.patient_id))
        })?;
        jobs.push((row, patient_phantoms(row, z, scale, seed)?));
    }

    let total = jobs.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let summary = Mutex::new(ImageSummary::default());
    let first_error: Mutex<Option<(usize, CohortError)>> = Mutex::new(None);
    let worker = || {
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((row, (mri, slide))) = jobs.get(i) else { break };
            match write_patient(site_dir, &row.patient_id, mri, slide) {
                Ok((files, bytes)) => {
                    if let Ok(mut s) = summary.lock() {
                        s.patients += 1;
                        s.files += files;
                        s.bytes += bytes;
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    if let Ok(mut slot) = first_error.lock() {
                        // Keep the error of the earliest patient, so the message does not depend on timing.
                        if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                            *slot = Some((i, e));
                        }
                    }
                }
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.clamp(1, total.max(1)) {
            scope.spawn(worker);
        }
        worker();
    });
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    Ok(summary.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Writes one patient's MRI study and slide; returns (files, bytes).
fn write_patient(
    site_dir: &Path,
    id: &str,
    mri: &MriPhantom,
    slide: &SlidePhantom,
) -> Result<(usize, u64), CohortError> {
    let mkdir = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|source| CohortError::Write { path: dir.to_path_buf(), source })
    };
    let mri_dir = site_dir.join("mri").join(id);
    mkdir(&mri_dir)?;
    let written = mri.write(&mri_dir)?;
    let wsi_dir = site_dir.join("wsi").join(id);
    mkdir(&wsi_dir)?;
    let slide_bytes = slide.write(&wsi_dir.join("slide.tif"), &mut |_, _| {})?;
    Ok((written.files.len() + 1, written.bytes + slide_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_parses_and_prints() {
        for s in [Scale::Tiny, Scale::Small, Scale::Full] {
            assert_eq!(s.to_string().parse::<Scale>(), Ok(s));
        }
        assert_eq!(" FULL ".parse::<Scale>(), Ok(Scale::Full));
        assert!("huge".parse::<Scale>().unwrap_err().contains("tiny, small or full"));
        assert_eq!(Scale::default(), Scale::Small);
    }

    #[test]
    fn centers_differ_in_scanner_and_stain() {
        let (a, b) = (center_imaging("center_a"), center_imaging("center_b"));
        assert!((a.gain - b.gain).abs() > 0.2);
        assert_ne!(a.stain, b.stain);
        let (e, e2) = (center_imaging("center_e"), center_imaging("center_e"));
        assert_eq!(e.gain, e2.gain);
        assert!(center_imaging("hospital-x").gain > 0.0);
    }

    #[test]
    fn unsafe_ids_are_refused() {
        for id in ["", ".", "..", "a/b", "a\\b", "ü"] {
            assert!(!safe_id(id), "{id:?}");
        }
        assert!(safe_id("A0001") && safe_id("site-1_p.2"));
    }
}
