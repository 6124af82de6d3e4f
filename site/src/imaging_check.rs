//! The imaging half of `fedhcc data check`: per patient, which MRI phases are there, whether the tumour
//! mask is usable, and whether each slide can be read — with the reason when not.
//!
//! It reads the mask and the phases' geometry, opens each slide and decodes its smallest level (which is
//! what the tissue detector reads first), so a slide that opens but cannot be decoded is caught here
//! rather than halfway through `preprocess`. The report names patient ids and file names, never a value.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use fedhcc_cohort::{Finding, Severity};
use fedhcc_imaging::{PhaseSource, Slide, Volume, find_patient_mri, read_dicom_series, read_nifti};
use serde::Serialize;

use crate::preprocess::{ImagingSection, Modalities, list_slides, safe_id};

/// One problem with one patient's images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageProblem {
    pub patient: String,
    /// `mri` or `wsi`.
    pub modality: String,
    /// A short kind (`mask_missing`, `mask_empty`, `mask_grid`, `phase_unreadable`, `slide_unreadable`, …).
    pub kind: String,
    /// What is wrong, naming the file.
    pub detail: String,
    /// `error` when the study's model uses this modality and so cannot train on the patient (an MRI problem
    /// under the preop or postop model); `warning` otherwise (a slide: the patient trains on its other
    /// slides, or with the slide input marked absent). Set by [`ImagingCheck::set_severities`].
    pub severity: Severity,
}

impl ImageProblem {
    /// How much this problem matters to a model that uses `uses`.
    pub fn severity_for(&self, uses: Modalities) -> Severity {
        if self.modality == "mri" && uses.mri { Severity::Error } else { Severity::Warning }
    }

    /// The finding code of this kind of problem (an unreadable folder is named after its modality).
    fn code(&self) -> String {
        match (self.modality.as_str(), self.kind.as_str()) {
            ("mri", "folder_unreadable") => "mri_folder_unreadable".into(),
            ("wsi", "folder_unreadable") => "slide_folder_unreadable".into(),
            (_, kind) => kind.into(),
        }
    }
}

/// Counts of one configured MRI phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseCount {
    pub phase: String,
    pub present: usize,
    pub missing: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagingCheck {
    /// Patients of the clinical table that were checked.
    pub patients: usize,
    pub mri_folders: usize,
    /// Patients whose MRI (mask and every present phase) is usable.
    pub mri_usable: usize,
    pub phases: Vec<PhaseCount>,
    pub slide_folders: usize,
    pub slides: usize,
    pub slides_readable: usize,
    /// Image folders whose name is not a patient of the clinical table (ignored by training).
    pub folders_without_clinical_row: Vec<String>,
    /// Patients with no `mri/<patient_id>/` folder.
    pub without_mri_folder: Vec<String>,
    /// Patients with no `wsi/<patient_id>/` folder (or no slide in it).
    pub without_slides: Vec<String>,
    pub problems: Vec<ImageProblem>,
    /// What the image models will leave out, and why.
    pub excluded: Vec<String>,
}

fn problem(patient: &str, modality: &str, kind: &str, detail: String) -> ImageProblem {
    ImageProblem {
        patient: patient.into(),
        modality: modality.into(),
        kind: kind.into(),
        detail,
        severity: Severity::Warning,
    }
}

struct PatientResult {
    mri_folder: bool,
    mri_usable: bool,
    phases: Vec<bool>,
    slide_folder: bool,
    slides: usize,
    readable: usize,
    problems: Vec<ImageProblem>,
}

fn same_grid(a: &Volume, b: &Volume) -> bool {
    a.dims == b.dims && a.affine.iter().flatten().zip(b.affine.iter().flatten()).all(|(x, y)| (x - y).abs() <= 1e-3)
}

fn check_patient(data_dir: &Path, id: &str, cfg: &ImagingSection) -> PatientResult {
    let mut r = PatientResult {
        mri_folder: false,
        mri_usable: false,
        phases: vec![false; cfg.mri.phases.len()],
        slide_folder: false,
        slides: 0,
        readable: 0,
        problems: Vec::new(),
    };
    let mri_dir = data_dir.join("mri").join(id);
    if mri_dir.is_dir() {
        r.mri_folder = true;
        match find_patient_mri(&mri_dir, &cfg.mri.phases) {
            Err(e) => r.problems.push(problem(id, "mri", "folder_unreadable", e.to_string())),
            Ok(files) => {
                for (i, (_, src)) in files.phases.iter().enumerate() {
                    r.phases[i] = src.is_some();
                }
                let mask = match &files.mask {
                    None => {
                        r.problems.push(problem(
                            id,
                            "mri",
                            "mask_missing",
                            format!("{}: no mask.nii.gz (tumour mask)", mri_dir.display()),
                        ));
                        None
                    }
                    Some(path) => match read_nifti(path) {
                        Err(e) => {
                            r.problems.push(problem(id, "mri", "mask_unreadable", e.to_string()));
                            None
                        }
                        Ok(m) if !m.data.iter().any(|v| *v >= 0.5) => {
                            r.problems.push(problem(
                                id,
                                "mri",
                                "mask_empty",
                                format!("{}: the mask has no tumour voxel (no value ≥ 0.5)", path.display()),
                            ));
                            None
                        }
                        Ok(m) => Some(m),
                    },
                };
                let mut usable = mask.is_some() && r.phases.iter().any(|p| *p);
                if !r.phases.iter().any(|p| *p) {
                    r.problems.push(problem(
                        id,
                        "mri",
                        "no_phase",
                        format!(
                            "{}: none of the study's phases ({}) is there",
                            mri_dir.display(),
                            cfg.mri.phases.join(", ")
                        ),
                    ));
                }
                for (name, src) in &files.phases {
                    let Some(src) = src else { continue };
                    let read = match src {
                        PhaseSource::Nifti(p) => read_nifti(p),
                        PhaseSource::DicomSeries(p) => read_dicom_series(p),
                    };
                    match read {
                        Err(e) => {
                            usable = false;
                            r.problems.push(problem(id, "mri", "phase_unreadable", e.to_string()));
                        }
                        Ok(v) => {
                            if let Some(m) = &mask
                                && !same_grid(&v, m)
                            {
                                usable = false;
                                r.problems.push(problem(
                                    id,
                                    "mri",
                                    "mask_grid",
                                    format!(
                                        "{}: phase {name} is {:?} voxels, the mask {:?} (or their positions differ): \
                                         the mask must be on the phase grid",
                                        mri_dir.display(),
                                        v.dims,
                                        m.dims
                                    ),
                                ));
                            }
                        }
                    }
                }
                r.mri_usable = usable;
            }
        }
    }
    match list_slides(data_dir, id) {
        Err(e) => r.problems.push(problem(id, "wsi", "folder_unreadable", format!("{e:#}"))),
        Ok(slides) => {
            r.slide_folder = data_dir.join("wsi").join(id).is_dir();
            r.slides = slides.len();
            for path in slides {
                let res = Slide::open(&path).and_then(|s| {
                    let last = s.levels().len() - 1;
                    let l = &s.levels()[last];
                    s.read_region(last, 0, 0, l.width.min(512), l.height.min(512)).map(|_| ())
                });
                match res {
                    Ok(()) => r.readable += 1,
                    Err(e) => r.problems.push(problem(id, "wsi", "slide_unreadable", e.to_string())),
                }
            }
        }
    }
    r
}

impl ImagingCheck {
    /// Checks the images of `patients` (the clinical table's ids) under `data_dir`, on `threads` threads.
    pub fn run(data_dir: &Path, patients: &[String], cfg: &ImagingSection, threads: usize) -> ImagingCheck {
        let ids: Vec<&String> = patients.iter().filter(|id| safe_id(id)).collect();
        let results: Mutex<BTreeMap<usize, PatientResult>> = Mutex::new(BTreeMap::new());
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, 64) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = ids.get(i) else { break };
                        let r = check_patient(data_dir, id, cfg);
                        if let Ok(mut m) = results.lock() {
                            m.insert(i, r);
                        }
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_default();
        let mut check = ImagingCheck {
            patients: ids.len(),
            mri_folders: 0,
            mri_usable: 0,
            phases: cfg.mri.phases.iter().map(|p| PhaseCount { phase: p.clone(), present: 0, missing: 0 }).collect(),
            slide_folders: 0,
            slides: 0,
            slides_readable: 0,
            folders_without_clinical_row: Vec::new(),
            without_mri_folder: Vec::new(),
            without_slides: Vec::new(),
            problems: Vec::new(),
            excluded: Vec::new(),
        };
        for (i, r) in results {
            if !r.mri_folder {
                check.without_mri_folder.push(ids[i].clone());
            }
            if r.slides == 0 {
                check.without_slides.push(ids[i].clone());
            }
            check.mri_folders += usize::from(r.mri_folder);
            check.mri_usable += usize::from(r.mri_usable);
            for (c, present) in check.phases.iter_mut().zip(&r.phases) {
                if *present {
                    c.present += 1;
                } else if r.mri_folder {
                    c.missing += 1;
                }
            }
            check.slide_folders += usize::from(r.slide_folder);
            check.slides += r.slides;
            check.slides_readable += r.readable;
            check.problems.extend(r.problems);
        }
        for bad in patients.iter().filter(|id| !safe_id(id)) {
            check.problems.push(problem(
                &format!("row with an unusable id ({} characters)", bad.chars().count()),
                "mri",
                "unusable_id",
                "patient ids must be letters, digits, '-', '_' or '.' to name image folders".into(),
            ));
        }
        let known: std::collections::BTreeSet<&str> = patients.iter().map(String::as_str).collect();
        for sub in ["mri", "wsi"] {
            if let Ok(rd) = std::fs::read_dir(data_dir.join(sub)) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.path().is_dir() && !known.contains(name.as_str()) {
                        check.folders_without_clinical_row.push(format!("{sub}/{name}"));
                    }
                }
            }
        }
        check.folders_without_clinical_row.sort();
        let no_mri = check.patients - check.mri_usable;
        if no_mri > 0 && check.mri_folders > 0 {
            check.excluded.push(format!(
                "{no_mri} patient(s) without a usable MRI (no folder, no mask, or a problem below) are left out of \
                 the preoperative and postoperative models; the clinical-only model keeps them"
            ));
        }
        let no_slide = check.patients - check.slide_folders;
        if no_slide > 0 && check.slide_folders > 0 {
            check.excluded.push(format!(
                "{no_slide} patient(s) have no slide folder: the postoperative model uses them with its slide \
                 branch marked absent"
            ));
        }
        check
    }

    /// Sets each problem's severity for a model that uses `uses` (the check itself does not depend on the
    /// model, so one check serves several models).
    pub fn set_severities(&mut self, uses: Modalities) {
        for p in &mut self.problems {
            p.severity = p.severity_for(uses);
        }
    }

    /// The findings for the study's `model` (`clinical`, `preop`, `postop`), which uses `uses`: one per kind
    /// of problem with the patients concerned, patients without an MRI folder (an error when the model
    /// uses MRI), patients without a slide (a warning for the postoperative model), and image folders
    /// with no clinical row (a warning).
    pub fn findings(&self, model: &str, uses: Modalities) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut groups: BTreeMap<(Severity, String), Vec<&ImageProblem>> = BTreeMap::new();
        for p in &self.problems {
            groups.entry((p.severity_for(uses), p.code())).or_default().push(p);
        }
        for ((severity, code), problems) in groups {
            let mut patients: Vec<String> = Vec::new();
            if code != "unusable_id" {
                for p in &problems {
                    if !patients.contains(&p.patient) {
                        patients.push(p.patient.clone());
                    }
                }
            }
            let count = if code == "unusable_id" { problems.len() } else { patients.len() };
            let what = match code.as_str() {
                "mask_missing" => "no tumour mask (mask.nii.gz) in the MRI folder",
                "mask_unreadable" => "the tumour mask cannot be read",
                "mask_empty" => "the tumour mask marks no tumour voxel",
                "mask_grid" => "the tumour mask is not on the grid of an MRI phase",
                "phase_unreadable" => "an MRI phase cannot be read (a truncated or damaged file)",
                "no_phase" => "none of the study's MRI phases is in the MRI folder",
                "mri_folder_unreadable" => "the MRI folder cannot be read",
                "slide_unreadable" => "a slide cannot be read (a truncated or damaged file)",
                "slide_folder_unreadable" => "the slide folder cannot be read",
                "unusable_id" => "the patient id cannot name an image folder (letters, digits, '-', '_', '.' only)",
                _ => "an image problem",
            };
            let effect = match (severity, code.starts_with("slide")) {
                (Severity::Error, _) => format!("left out of the {model} model until it is fixed"),
                (Severity::Warning, true) if uses.wsi => {
                    "the postoperative model uses the patient's other slides, or none".to_owned()
                }
                (Severity::Warning, _) => format!("the {model} model does not use these images"),
            };
            let message =
                format!("{what}: {count} patient(s), {effect}; each file and reason is under the image problems");
            out.push(Finding { count, ..Finding::about(severity, &code, patients, message) });
        }
        if uses.mri && !self.without_mri_folder.is_empty() {
            let n = self.without_mri_folder.len();
            out.push(Finding::about(
                Severity::Error,
                "mri_missing",
                self.without_mri_folder.clone(),
                format!("{n} patient(s) have no mri/<patient_id>/ folder: they are left out of the {model} model"),
            ));
        }
        if uses.wsi && !self.without_slides.is_empty() {
            let n = self.without_slides.len();
            out.push(Finding::about(
                Severity::Warning,
                "slides_missing",
                self.without_slides.clone(),
                format!(
                    "{n} patient(s) have no slide in wsi/<patient_id>/: the {model} model uses them with its slide \
                     input marked absent"
                ),
            ));
        }
        if !self.folders_without_clinical_row.is_empty() {
            let n = self.folders_without_clinical_row.len();
            out.push(Finding::about(
                Severity::Warning,
                "folder_without_clinical_row",
                self.folders_without_clinical_row.clone(),
                format!(
                    "{n} image folder(s) are named after no patient of clinical.csv (a typo in the id, or a \
                     patient excluded from the table): training ignores them"
                ),
            ));
        }
        out
    }

    /// The plain-text report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "Imaging: {} patients; MRI folders {}, usable MRI {}; slide folders {}, slides {} ({} readable)",
            self.patients, self.mri_folders, self.mri_usable, self.slide_folders, self.slides, self.slides_readable
        ));
        if self.mri_folders > 0 {
            line("MRI phases present (of the patients with an MRI folder):".to_owned());
            for p in &self.phases {
                line(format!("  {:<16} present {:>5}  missing {:>5}", p.phase, p.present, p.missing));
            }
        }
        if !self.folders_without_clinical_row.is_empty() {
            line(format!(
                "Image folders with no row in clinical.csv (ignored): {}",
                self.folders_without_clinical_row.join(", ")
            ));
        }
        if self.problems.is_empty() {
            line("Image problems: none".to_owned());
        } else {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for p in &self.problems {
                *kinds.entry(&p.kind).or_insert(0) += 1;
            }
            line(format!(
                "Image problems ({}): {}",
                self.problems.len(),
                kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
            ));
            for p in &self.problems {
                line(format!("  {:<7}  patient {} [{}] {}: {}", p.severity, p.patient, p.modality, p.kind, p.detail));
            }
        }
        for e in &self.excluded {
            line(format!("Excluded: {e}"));
        }
        out
    }
}
