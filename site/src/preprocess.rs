//! `fedhcc preprocess`: MRI crops and WSI patch features for every patient of a site, in parallel,
//! resumable, one patient's bad file reported and skipped.
//!
//! Everything goes under the site's state folder:
//!
//! ```text
//! <state_dir>/preprocessed/manifest.json      what was done, from which inputs, with which settings
//! <state_dir>/preprocessed/mri/<patient>.crop  model input: phases × z × y × x (see fedhcc_imaging::MriCrop)
//! <state_dir>/preprocessed/wsi-cache/…        patch features per slide, keyed by slide content and extractor
//! ```
//!
//! A rerun redoes a patient's MRI only when one of its input files (size or modification time) or the MRI
//! settings changed; a slide's features are reused when the slide (size and modification time, else its
//! content hash) and the tiling/extractor settings are unchanged. A patient that failed before is retried
//! only when its inputs changed. The manifest is rewritten atomically as work completes, so an interrupted
//! run loses at most the patients in flight.
//!
//! The manifest holds file names, sizes, hashes, counts and error messages about files — no image or
//! clinical value — but it names patient ids, so it stays on the site like the data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use fedhcc_imaging::{
    FeatureCache, HandcraftedHe, MriCrop, MriPrepConfig, PatchFeatureExtractor, SlideFeatures, TilingConfig,
    find_patient_mri, preprocess_mri,
};
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use fedhcc_core::config::StudyConfig;

/// The folder below the site's state folder.
pub const FOLDER: &str = "preprocessed";
const MANIFEST: &str = "manifest.json";
const MANIFEST_VERSION: u32 = 1;

/// Slide file extensions looked for in `wsi/<patient>/`.
pub const SLIDE_EXTENSIONS: [&str; 3] = ["svs", "tif", "tiff"];

/// Which modalities to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modalities {
    pub mri: bool,
    pub wsi: bool,
}

/// One input file as seen when it was used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub bytes: u64,
    pub mtime_ns: u128,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let mtime_ns = meta.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(Self { path: path.to_path_buf(), bytes: meta.len(), mtime_ns })
    }
}

/// Outcome of one patient's MRI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MriEntry {
    /// `ok`, `missing` (no `mri/<patient>/` folder) or `failed`.
    pub status: String,
    pub settings: String,
    #[serde(default)]
    pub inputs: Vec<FileStamp>,
    /// Relative to the preprocessed folder.
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Phase → present, in the configured order.
    #[serde(default)]
    pub phases_present: Vec<(String, bool)>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Outcome of one slide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlideEntry {
    pub input: FileStamp,
    /// `ok` or `failed`.
    pub status: String,
    pub settings: String,
    #[serde(default)]
    pub cache_file: Option<PathBuf>,
    #[serde(default)]
    pub patches: usize,
    #[serde(default)]
    pub error: Option<String>,
}

/// Everything known about one patient.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientEntry {
    #[serde(default)]
    pub mri: Option<MriEntry>,
    /// Empty when the patient has no slide.
    #[serde(default)]
    pub slides: Vec<SlideEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub patients: BTreeMap<String, PatientEntry>,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`; an absent file is an empty manifest.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed (the message says how to start over).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is damaged; delete it to redo the preprocessing from scratch", path.display())
                })?;
                if m.version != MANIFEST_VERSION {
                    bail!(
                        "{} was written by another fedhcc version (format {}, this one reads {MANIFEST_VERSION}); \
                         delete it to redo the preprocessing",
                        path.display(),
                        m.version
                    );
                }
                Ok(m)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Manifest { version: MANIFEST_VERSION, patients: BTreeMap::new() })
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        fedhcc_core::pki::write_atomic(&dir.join(MANIFEST), &bytes, false)
            .with_context(|| format!("writing {}", dir.join(MANIFEST).display()))
    }
}

/// The site's preprocessed outputs, for training and evaluation.
pub struct Preprocessed {
    dir: PathBuf,
    manifest: Manifest,
}

impl Preprocessed {
    /// Opens `<state_dir>/preprocessed`.
    ///
    /// # Errors
    /// A damaged manifest.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join(FOLDER);
        Ok(Self { manifest: Manifest::load(&dir)?, dir })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The patient's MRI crop, if it was prepared with `settings`.
    ///
    /// # Errors
    /// The crop file is missing or damaged (rerun `fedhcc preprocess`).
    pub fn mri(&self, patient: &str, settings: &str) -> Result<Option<MriCrop>> {
        let Some(e) = self.manifest.patients.get(patient).and_then(|p| p.mri.as_ref()) else { return Ok(None) };
        match (&e.output, e.status.as_str()) {
            (Some(out), "ok") if e.settings == settings => {
                Ok(Some(MriCrop::read(&self.dir.join(out)).context("rerun `fedhcc preprocess` for this patient")?))
            }
            _ => Ok(None),
        }
    }

    /// The patient's patch features over all readable slides, prepared with `settings`.
    ///
    /// # Errors
    /// A feature file is missing or damaged.
    pub fn wsi(&self, patient: &str, settings: &str) -> Result<Vec<SlideFeatures>> {
        let Some(p) = self.manifest.patients.get(patient) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for s in &p.slides {
            if let (Some(file), "ok") = (&s.cache_file, s.status.as_str())
                && s.settings == settings
            {
                out.push(SlideFeatures::read(&self.dir.join(file)).context("rerun `fedhcc preprocess`")?);
            }
        }
        Ok(out)
    }
}

/// The feature extractor named in the study config.
///
/// # Errors
/// An unknown name.
pub fn extractor(name: &str) -> Result<Box<dyn PatchFeatureExtractor>> {
    let he = HandcraftedHe;
    if name == he.name() {
        return Ok(Box::new(he));
    }
    bail!("study [imaging] extractor = '{name}': this version offers '{}'", he.name())
}

/// The settings fingerprint recorded with each output.
pub fn mri_settings(cfg: &MriPrepConfig) -> String {
    cfg.fingerprint()
}

/// The WSI settings fingerprint: tiling settings plus extractor name and version.
pub fn wsi_settings(cfg: &TilingConfig, ex: &dyn PatchFeatureExtractor) -> String {
    FeatureCache::key("", cfg, ex)
}

/// What a run did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub patients: usize,
    pub mri_done: usize,
    pub mri_reused: usize,
    pub mri_missing: usize,
    pub mri_failed: Vec<(String, String)>,
    pub slides_done: usize,
    pub slides_reused: usize,
    pub slides_failed: Vec<(String, String)>,
    pub patients_without_slides: usize,
    pub seconds: f64,
}

/// Checks that a patient id can name a folder and a file.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The slides in `wsi/<patient>/`, sorted by name.
///
/// # Errors
/// The folder exists but cannot be listed.
pub fn list_slides(data_dir: &Path, patient: &str) -> Result<Vec<PathBuf>> {
    let dir = data_dir.join("wsi").join(patient);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut slides = Vec::new();
    for entry in rd {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && ext.is_some_and(|e| SLIDE_EXTENSIONS.contains(&e.as_str())) {
            slides.push(path);
        }
    }
    slides.sort();
    Ok(slides)
}

/// Runs the preprocessing for `patients` (ids from the site's clinical table).
///
/// # Errors
/// Only what stops the whole run: an unusable output folder, bad settings, a damaged manifest. A patient's
/// bad file is recorded in the summary and the manifest, and the others go on.
pub fn run(
    data_dir: &Path,
    state_dir: &Path,
    patients: &[String],
    imaging: &ImagingSection,
    which: Modalities,
    threads: usize,
) -> Result<Summary> {
    imaging.mri.validate().map_err(|e| anyhow::anyhow!("study [imaging.mri]: {e}"))?;
    imaging.wsi.validate().map_err(|e| anyhow::anyhow!("study [imaging.wsi]: {e}"))?;
    let ex = extractor(&imaging.extractor)?;
    let out = state_dir.join(FOLDER);
    std::fs::create_dir_all(out.join("mri")).with_context(|| format!("creating {}", out.join("mri").display()))?;
    let cache = FeatureCache::new(&out.join("wsi-cache"))?;
    let mut manifest = Manifest::load(&out)?;
    // Patients no longer in the table keep their entries (and files) until the operator removes them.
    let ids: Vec<&String> = patients.iter().filter(|id| safe_id(id)).collect();
    if ids.len() < patients.len() {
        bail!(
            "{} patient id(s) contain characters other than letters, digits, '-', '_' and '.', so they cannot name \
             image folders; fix the ids in clinical.csv",
            patients.len() - ids.len()
        );
    }
    let mri_key = mri_settings(&imaging.mri);
    let wsi_key = wsi_settings(&imaging.wsi, ex.as_ref());
    let started = Instant::now();
    let shared = Mutex::new((&mut manifest, Summary { patients: ids.len(), ..Summary::default() }, Instant::now()));
    let next = AtomicUsize::new(0);
    let progress = Progress::new("preprocess", ids.len());
    let threads = threads.clamp(1, 64).min(ids.len().max(1));
    let fatal: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&id) = ids.get(i) else { break };
                    if fatal.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    let previous = shared.lock().ok().and_then(|g| g.0.patients.get(id).cloned()).unwrap_or_default();
                    let mut entry = previous.clone();
                    let mut ok = true;
                    let mut tally = Summary::default();
                    if which.mri {
                        let e =
                            mri_patient(data_dir, &out, id, &imaging.mri, &mri_key, previous.mri.as_ref(), &mut tally);
                        ok &= e.status != "failed";
                        entry.mri = Some(e);
                    }
                    if which.wsi {
                        let slides = wsi_patient(
                            data_dir,
                            &out,
                            &cache,
                            id,
                            &imaging.wsi,
                            ex.as_ref(),
                            &wsi_key,
                            &previous.slides,
                            &mut tally,
                        );
                        ok &= slides.iter().all(|s| s.status == "ok");
                        entry.slides = slides;
                    }
                    progress.tick(ok);
                    let Ok(mut g) = shared.lock() else { break };
                    let (m, s, last_save) = &mut *g;
                    m.patients.insert(id.clone(), entry);
                    merge(s, tally);
                    if last_save.elapsed().as_secs_f64() > 2.0 {
                        if let Err(e) = m.save(&out) {
                            if let Ok(mut f) = fatal.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                        *last_save = Instant::now();
                    }
                }
            });
        }
    });
    progress.finish();
    let (m, mut summary, _) = shared.into_inner().map_err(|_| anyhow::anyhow!("a preprocessing worker crashed"))?;
    m.save(&out)?;
    if let Some(e) = fatal.into_inner().ok().flatten() {
        return Err(e);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn merge(into: &mut Summary, s: Summary) {
    into.mri_done += s.mri_done;
    into.mri_reused += s.mri_reused;
    into.mri_missing += s.mri_missing;
    into.mri_failed.extend(s.mri_failed);
    into.slides_done += s.slides_done;
    into.slides_reused += s.slides_reused;
    into.slides_failed.extend(s.slides_failed);
    into.patients_without_slides += s.patients_without_slides;
}

fn stamps(paths: &[PathBuf]) -> std::io::Result<Vec<FileStamp>> {
    paths.iter().map(|p| FileStamp::of(p)).collect()
}

fn mri_patient(
    data_dir: &Path,
    out: &Path,
    id: &str,
    cfg: &MriPrepConfig,
    key: &str,
    previous: Option<&MriEntry>,
    tally: &mut Summary,
) -> MriEntry {
    let failed = |inputs: Vec<FileStamp>, msg: String, tally: &mut Summary| {
        tally.mri_failed.push((id.to_string(), msg.clone()));
        MriEntry {
            status: "failed".into(),
            settings: key.to_string(),
            inputs,
            output: None,
            phases_present: Vec::new(),
            error: Some(msg),
        }
    };
    let dir = data_dir.join("mri").join(id);
    if !dir.is_dir() {
        tally.mri_missing += 1;
        return MriEntry {
            status: "missing".into(),
            settings: key.to_string(),
            inputs: Vec::new(),
            output: None,
            phases_present: Vec::new(),
            error: None,
        };
    }
    let files = match find_patient_mri(&dir, &cfg.phases) {
        Ok(f) => f,
        Err(e) => return failed(Vec::new(), e.to_string(), tally),
    };
    let inputs = match stamps(&files.input_paths()) {
        Ok(s) => s,
        Err(e) => return failed(Vec::new(), format!("{}: {e}", dir.display()), tally),
    };
    let rel = PathBuf::from("mri").join(format!("{id}.crop"));
    if let Some(p) = previous
        && p.settings == key
        && p.inputs == inputs
        && (p.status == "failed" || p.output.as_ref().is_some_and(|o| out.join(o).is_file()))
    {
        if p.status == "failed" {
            tally.mri_failed.push((id.to_string(), p.error.clone().unwrap_or_default()));
        } else {
            tally.mri_reused += 1;
        }
        return p.clone();
    }
    let crop = match preprocess_mri(&files, cfg) {
        Ok(c) => c,
        Err(e) => return failed(inputs, e.to_string(), tally),
    };
    if let Err(e) = crop.write(&out.join(&rel)) {
        return failed(inputs, e.to_string(), tally);
    }
    tally.mri_done += 1;
    MriEntry {
        status: "ok".into(),
        settings: key.to_string(),
        inputs,
        output: Some(rel),
        phases_present: crop.phases.iter().cloned().zip(crop.present.iter().copied()).collect(),
        error: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn wsi_patient(
    data_dir: &Path,
    out: &Path,
    cache: &FeatureCache,
    id: &str,
    cfg: &TilingConfig,
    ex: &dyn PatchFeatureExtractor,
    key: &str,
    previous: &[SlideEntry],
    tally: &mut Summary,
) -> Vec<SlideEntry> {
    let slides = match list_slides(data_dir, id) {
        Ok(s) => s,
        Err(e) => {
            tally.slides_failed.push((id.to_string(), format!("{e:#}")));
            return Vec::new();
        }
    };
    if slides.is_empty() {
        tally.patients_without_slides += 1;
    }
    let mut entries = Vec::new();
    for path in slides {
        let input = match FileStamp::of(&path) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{}: {e}", path.display());
                tally.slides_failed.push((id.to_string(), msg.clone()));
                let input = FileStamp { path, bytes: 0, mtime_ns: 0 };
                entries.push(SlideEntry {
                    input,
                    status: "failed".into(),
                    settings: key.into(),
                    cache_file: None,
                    patches: 0,
                    error: Some(msg),
                });
                continue;
            }
        };
        if let Some(p) = previous.iter().find(|p| p.input == input && p.settings == key)
            && (p.status == "failed" || p.cache_file.as_ref().is_some_and(|f| out.join(f).is_file()))
        {
            if p.status == "failed" {
                tally.slides_failed.push((id.to_string(), p.error.clone().unwrap_or_default()));
            } else {
                tally.slides_reused += 1;
            }
            entries.push(p.clone());
            continue;
        }
        match cache.get_or_compute(&path, cfg, ex, &mut |_, _| {}) {
            Ok((features, cached)) => {
                if cached {
                    tally.slides_reused += 1;
                } else {
                    tally.slides_done += 1;
                }
                let file = cache.path_for(&FeatureCache::key(&features.slide_sha256, cfg, ex));
                let rel = file.strip_prefix(out).map(Path::to_path_buf).unwrap_or(file);
                entries.push(SlideEntry {
                    input,
                    status: "ok".into(),
                    settings: key.into(),
                    cache_file: Some(rel),
                    patches: features.n(),
                    error: None,
                });
            }
            Err(e) => {
                tally.slides_failed.push((id.to_string(), e.to_string()));
                entries.push(SlideEntry {
                    input,
                    status: "failed".into(),
                    settings: key.into(),
                    cache_file: None,
                    patches: 0,
                    error: Some(e.to_string()),
                });
            }
        }
    }
    entries
}

/// `[imaging]`: how MRI crops and slide patch features are prepared at each site. Every site must use
/// the same settings, which is why they live in the study file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagingSection {
    /// Patch feature extractor for slides (`he-handcrafted`: stain and texture features, no weights to download).
    #[serde(default = "default_extractor")]
    pub extractor: String,
    #[serde(default)]
    pub mri: MriPrepConfig,
    #[serde(default)]
    pub wsi: TilingConfig,
}

fn default_extractor() -> String {
    "he-handcrafted".into()
}

impl Default for ImagingSection {
    fn default() -> Self {
        Self { extractor: default_extractor(), mri: MriPrepConfig::default(), wsi: TilingConfig::default() }
    }
}

impl ImagingSection {
    /// Types the study's `[imaging]` table (defaults when absent).
    ///
    /// # Errors
    /// Unknown keys or values out of range.
    pub fn from_study(study: &StudyConfig) -> Result<Self> {
        let s: ImagingSection =
            toml::Value::Table(study.imaging.clone()).try_into().context("study [imaging] section")?;
        s.mri.validate().map_err(|e| anyhow::anyhow!("study [imaging.mri]: {e}"))?;
        s.wsi.validate().map_err(|e| anyhow::anyhow!("study [imaging.wsi]: {e}"))?;
        Ok(s)
    }
}
