//! Integration tests of the synthetic cohort's images (`synth_images`), at the `tiny` scale: the files exist
//! and open with fedhcc-imaging's readers, the phases follow the contrast agent, the output is deterministic,
//! and the images carry signal about the latent risk and the grade.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::NaiveDate;
use fedhcc_cohort::CohortError;
use fedhcc_cohort::synth::{self, SiteRows, SynthCohort};
use fedhcc_cohort::synth_images::{ImageSummary, MRI_PHASES, Scale, patient_phantoms, write_site_images};
use fedhcc_imaging::{Slide, read_nifti};

fn cohort(centers: usize, patients: usize, seed: u64) -> SynthCohort {
    let cutoff = NaiveDate::from_ymd_opt(2024, 7, 30).expect("valid date");
    synth::generate(centers, patients, seed, cutoff).expect("generates")
}

fn write_all(dir: &Path, c: &SynthCohort, seed: u64, threads: usize) -> ImageSummary {
    let mut total = ImageSummary::default();
    for site in &c.sites {
        let calls = AtomicUsize::new(0);
        let s =
            write_site_images(&dir.join(&site.center_id), site, &c.truth, Scale::Tiny, seed, threads, &|done, n| {
                assert!(done >= 1 && done <= n && n == site.rows.len());
                calls.fetch_add(1, Ordering::Relaxed);
            })
            .expect("writes images");
        assert_eq!(calls.load(Ordering::Relaxed), site.rows.len());
        total.patients += s.patients;
        total.files += s.files;
        total.bytes += s.bytes;
    }
    total
}

/// Every file under `dir`, relative path → bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("lists") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
                out.insert(rel, std::fs::read(&path).expect("reads"));
            }
        }
    }
    out
}

#[test]
fn tiny_two_center_cohort_is_written_in_the_real_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cohort(2, 20, 3);
    let summary = write_all(dir.path(), &c, 3, 2);
    assert_eq!(summary.patients, 20);
    let written = files(dir.path());
    assert_eq!(summary.files, written.len(), "summary counts every file and nothing else is left");
    assert_eq!(summary.bytes, written.values().map(|b| b.len() as u64).sum::<u64>());

    let mut agents = (0, 0);
    for site in &c.sites {
        for row in &site.rows {
            let mri = dir.path().join(&site.center_id).join("mri").join(&row.patient_id);
            let mask = read_nifti(&mri.join("mask.nii.gz")).expect("mask reads");
            assert!(mask.data.contains(&1.0), "{}: empty mask", row.patient_id);
            assert!(mask.data.iter().all(|&v| v == 0.0 || v == 1.0));
            let gadoxetate = row.mri_contrast_agent == "gadoxetate";
            if gadoxetate {
                agents.0 += 1
            } else {
                agents.1 += 1
            }
            for phase in MRI_PHASES {
                let path = mri.join(format!("{phase}.nii.gz"));
                if phase == "hepatobiliary" && !gadoxetate {
                    assert!(!path.exists(), "{}: extracellular agent with a hepatobiliary phase", row.patient_id);
                    continue;
                }
                let v = read_nifti(&path).expect("phase reads");
                assert_eq!(
                    (v.dims, v.affine),
                    (mask.dims, mask.affine),
                    "{}: {phase} off the mask grid",
                    row.patient_id
                );
                assert_eq!(v.dims, [48, 48, 16]);
                assert!((v.spacing_mm[0] - 2.5).abs() < 1e-6 && (v.spacing_mm[2] - 5.0).abs() < 1e-6);
            }
            let slide =
                Slide::open(&dir.path().join(&site.center_id).join("wsi").join(&row.patient_id).join("slide.tif"))
                    .expect("slide opens");
            assert_eq!((slide.levels()[0].width, slide.levels()[0].height), (768, 512));
            assert!((slide.mpp().expect("mpp") - 0.5).abs() < 1e-6);
        }
    }
    // Both agents occur (center a is mostly gadoxetate, center b mostly extracellular).
    assert!(agents.0 > 0 && agents.1 > 0, "agents {agents:?}");
}

#[test]
fn same_seed_gives_identical_bytes_whatever_the_thread_count() {
    let c = cohort(1, 6, 11);
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    write_all(a.path(), &c, 5, 1);
    write_all(b.path(), &c, 5, 3);
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (path, bytes) in &fa {
        assert!(fb[path] == *bytes, "{} differs between 1 and 3 threads", path.display());
    }
    // Another seed changes the images (but not the file list).
    let d = tempfile::tempdir().expect("tempdir");
    write_all(d.path(), &c, 6, 2);
    let fd = files(d.path());
    assert_eq!(fa.keys().collect::<Vec<_>>(), fd.keys().collect::<Vec<_>>());
    assert!(fa.iter().filter(|(p, b)| fd[*p] != **b).count() > fa.len() / 2);
}

/// Pearson correlation.
fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    sxy / (sxx * syy).sqrt()
}

/// Share of tissue pixels (saturated) that are nuclear (dark and haematoxylin-blue).
fn nuclear_fraction(rgb: &[u8]) -> f64 {
    let (mut tissue, mut nuclear) = (0.0, 0.0);
    for px in rgb.chunks_exact(3) {
        let (r, g, b) = (i32::from(px[0]), i32::from(px[1]), i32::from(px[2]));
        if r.max(g).max(b) - r.min(g).min(b) < 25 {
            continue;
        }
        tissue += 1.0;
        if (r + g + b) / 3 < 150 && b > r {
            nuclear += 1.0;
        }
    }
    nuclear / tissue
}

#[test]
fn images_carry_signal_about_latent_risk_and_grade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cohort(1, 40, 21);
    write_all(dir.path(), &c, 21, 2);
    let site = &c.sites[0];
    let risk: BTreeMap<&str, f64> = c.truth.iter().map(|t| (t.patient_id.as_str(), t.latent_risk)).collect();
    let (mut z, mut heterogeneity) = (Vec::new(), Vec::new());
    let mut by_grade: BTreeMap<bool, Vec<f64>> = BTreeMap::new();
    for row in &site.rows {
        let mri = dir.path().join(&site.center_id).join("mri").join(&row.patient_id);
        let mask = read_nifti(&mri.join("mask.nii.gz")).expect("mask");
        let pv = read_nifti(&mri.join("portal_venous.nii.gz")).expect("portal venous");
        // Coefficient of variation of the tumour's portal-venous signal (gain and bias cancel).
        let t: Vec<f64> =
            pv.data.iter().zip(&mask.data).filter(|(_, m)| **m == 1.0).map(|(v, _)| f64::from(*v)).collect();
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        let sd = (t.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / t.len() as f64).sqrt();
        z.push(risk[row.patient_id.as_str()]);
        heterogeneity.push(sd / mean);

        let slide = Slide::open(&dir.path().join(&site.center_id).join("wsi").join(&row.patient_id).join("slide.tif"))
            .expect("slide");
        let rgb = slide.read_region(0, 0, 0, 768, 512).expect("reads");
        by_grade.entry(row.es_grade >= 3).or_default().push(nuclear_fraction(&rgb));
    }
    let r = correlation(&z, &heterogeneity);
    assert!(r > 0.4, "correlation of tumour heterogeneity with latent risk {r:.3}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (low, high) = (mean(&by_grade[&false]), mean(&by_grade[&true]));
    assert!(high > 1.5 * low, "nuclear fraction grade 1-2 {low:.3}, grade 3-4 {high:.3}");
}

#[test]
fn bad_rows_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cohort(1, 3, 2);
    let mut site: SiteRows = c.sites[0].clone();
    site.rows[1].es_grade = 7;
    let err = write_site_images(dir.path(), &site, &c.truth, Scale::Tiny, 1, 2, &|_, _| {}).expect_err("refused");
    assert!(matches!(err, CohortError::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains(&site.rows[1].patient_id) && !err.to_string().contains('7'), "{err}");
    assert!(!dir.path().join("mri").exists());

    let mut site = c.sites[0].clone();
    site.rows[0].patient_id = "../escape".into();
    assert!(write_site_images(dir.path(), &site, &c.truth, Scale::Tiny, 1, 1, &|_, _| {}).is_err());
    // A patient without a latent risk.
    let err =
        write_site_images(dir.path(), &c.sites[0], &c.truth[1..], Scale::Tiny, 1, 1, &|_, _| {}).expect_err("refused");
    assert!(err.to_string().contains("truth"), "{err}");
    // The phantoms of a valid row are within the imaging crate's ranges at every scale.
    for scale in [Scale::Tiny, Scale::Small, Scale::Full] {
        let (mri, slide) = patient_phantoms(&c.sites[0].rows[0], c.truth[0].latent_risk, scale, 1).expect("maps");
        assert_eq!(mri.phases.len(), 5);
        assert!(slide.width >= 768);
    }
}
