//! The clinical part of the synthetic multi-center HCC cohort (SCHEMA.md columns, DESIGN.md study).
//!
//! Each patient has a latent risk `z ~ N(0, 1)` (plus a small center shift). It raises AFP (through the
//! share of high secretors), PIVKA-II, tumour size and number, microvascular invasion, Edmondson–Steiner
//! grade, satellite nodules and an absent capsule, and it drives recurrence:
//!
//! - two-component hazard: an *early* component (intrahepatic spread; present with probability
//!   `sigmoid(-0.95 + 1.1 z)`, time log-normal with median 300 days) and a *late* de-novo component
//!   (Weibull, shape 1.8, scale 8 years shortened by higher risk); the first recurrence is the earlier one;
//! - the recurrence pattern is beyond Milan with probability `sigmoid(-0.6 + z)` for an early-component
//!   recurrence, `sigmoid(-1.8 + 0.5 z)` for a late one;
//! - death: background hazard 1.2%/year, and after recurrence a median survival of 2.5 years (beyond Milan)
//!   or 6 years (within);
//! - follow-up visits every 90 ± 14 days for two years, then every 180 ± 21 days; a recurrence is diagnosed
//!   at the first visit on or after it; 10% of patients are lost to follow-up at a uniform time within 8
//!   years; nothing after the loss or the cut-off is recorded (administrative censoring).
//!
//! Centers differ in age, aetiology (HBV/HCV), cirrhosis and contrast-agent mix (gadoxetate vs
//! extracellular), and in size (weights 1, 1/1.35, 1/1.7, ...). Surgery dates are uniform over 2012–2021.
//! Values are rounded when drawn, so what is written is exactly what the typed rows hold.

use std::io::Write;
use std::path::Path;

use chrono::{Duration, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::CohortError;
use crate::outcomes::FollowUp;

/// The columns of `clinical.csv`, in SCHEMA.md order.
pub const CLINICAL_COLUMNS: [&str; 36] = [
    "patient_id",
    "center_id",
    "surgery_date",
    "mri_date",
    "age",
    "sex",
    "hbsag",
    "anti_hcv",
    "afp",
    "pivka2",
    "albumin",
    "total_bilirubin",
    "alt",
    "ast",
    "ggt",
    "platelets",
    "inr",
    "albi_score",
    "cirrhosis",
    "tumor_number",
    "tumor_max_diam_cm",
    "bclc_stage",
    "mri_contrast_agent",
    "mvi",
    "es_grade",
    "satellite_nodules",
    "capsule",
    "margin_mm",
    "path_max_diam_cm",
    "recurrence_date",
    "rec_n_nodules",
    "rec_max_diam_cm",
    "rec_macrovascular",
    "rec_extrahepatic",
    "death_date",
    "last_followup_date",
];

/// One synthetic patient, typed; [`ClinicalRow::to_record`] gives the CSV fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ClinicalRow {
    pub patient_id: String,
    pub center_id: String,
    pub surgery_date: NaiveDate,
    pub mri_date: NaiveDate,
    pub age: u32,
    pub sex: String,
    pub hbsag: bool,
    pub anti_hcv: bool,
    pub afp: Option<f64>,
    pub pivka2: Option<f64>,
    pub albumin: f64,
    pub total_bilirubin: f64,
    pub alt: f64,
    pub ast: f64,
    pub ggt: Option<f64>,
    pub platelets: f64,
    pub inr: Option<f64>,
    pub albi_score: f64,
    pub cirrhosis: bool,
    pub tumor_number: u32,
    pub tumor_max_diam_cm: f64,
    pub bclc_stage: String,
    pub mri_contrast_agent: String,
    pub mvi: String,
    pub es_grade: u32,
    pub satellite_nodules: bool,
    pub capsule: String,
    pub margin_mm: f64,
    pub path_max_diam_cm: f64,
    pub recurrence_date: Option<NaiveDate>,
    pub rec_n_nodules: Option<u32>,
    pub rec_max_diam_cm: Option<f64>,
    pub rec_macrovascular: Option<bool>,
    pub rec_extrahepatic: Option<bool>,
    pub death_date: Option<NaiveDate>,
    pub last_followup_date: NaiveDate,
}

/// One center's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRows {
    pub center_id: String,
    pub rows: Vec<ClinicalRow>,
}

/// What the generator knows and the sites do not.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthRow {
    pub patient_id: String,
    pub center_id: String,
    pub latent_risk: f64,
}

/// The generated cohort: one [`SiteRows`] per center and the truth table.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthCohort {
    pub sites: Vec<SiteRows>,
    pub truth: Vec<TruthRow>,
}

fn b(v: bool) -> String {
    if v { "1" } else { "0" }.to_owned()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl ClinicalRow {
    /// The fields in [`CLINICAL_COLUMNS`] order; missing values are empty.
    pub fn to_record(&self) -> Vec<String> {
        vec![
            self.patient_id.clone(),
            self.center_id.clone(),
            self.surgery_date.to_string(),
            self.mri_date.to_string(),
            self.age.to_string(),
            self.sex.clone(),
            b(self.hbsag),
            b(self.anti_hcv),
            opt(self.afp),
            opt(self.pivka2),
            self.albumin.to_string(),
            self.total_bilirubin.to_string(),
            self.alt.to_string(),
            self.ast.to_string(),
            opt(self.ggt),
            self.platelets.to_string(),
            opt(self.inr),
            self.albi_score.to_string(),
            b(self.cirrhosis),
            self.tumor_number.to_string(),
            self.tumor_max_diam_cm.to_string(),
            self.bclc_stage.clone(),
            self.mri_contrast_agent.clone(),
            self.mvi.clone(),
            self.es_grade.to_string(),
            b(self.satellite_nodules),
            self.capsule.clone(),
            self.margin_mm.to_string(),
            self.path_max_diam_cm.to_string(),
            opt(self.recurrence_date),
            opt(self.rec_n_nodules),
            opt(self.rec_max_diam_cm),
            opt(self.rec_macrovascular.map(b)),
            opt(self.rec_extrahepatic.map(b)),
            opt(self.death_date),
            self.last_followup_date.to_string(),
        ]
    }

    /// The raw follow-up facts, for [`FollowUp::derive`].
    pub fn follow_up(&self) -> FollowUp {
        FollowUp {
            surgery_date: self.surgery_date,
            recurrence_date: self.recurrence_date,
            rec_n_nodules: self.rec_n_nodules,
            rec_max_diam_cm: self.rec_max_diam_cm,
            rec_macrovascular: self.rec_macrovascular,
            rec_extrahepatic: self.rec_extrahepatic,
            death_date: self.death_date,
            last_followup_date: Some(self.last_followup_date),
        }
    }
}

/// Per-center differences (case mix and imaging protocol).
struct CenterProfile {
    age_mean: f64,
    hbsag: f64,
    anti_hcv: f64,
    cirrhosis: f64,
    gadoxetate: f64,
    risk_shift: f64,
}

fn profile(center: usize) -> CenterProfile {
    let p = |age_mean, hbsag, anti_hcv, cirrhosis, gadoxetate, risk_shift| CenterProfile {
        age_mean,
        hbsag,
        anti_hcv,
        cirrhosis,
        gadoxetate,
        risk_shift,
    };
    match center % 4 {
        0 => p(52.0, 0.90, 0.02, 0.68, 0.80, 0.0),
        1 => p(57.0, 0.82, 0.05, 0.61, 0.25, 0.1),
        2 => p(54.0, 0.86, 0.03, 0.64, 0.55, -0.1),
        _ => p(50.0, 0.91, 0.02, 0.66, 0.40, 0.05),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Draws from the random source in a fixed order, so a seed gives the same cohort.
struct Draw(ChaCha8Rng);

impl Draw {
    fn normal(&mut self) -> f64 {
        self.0.sample(StandardNormal)
    }
    fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
    fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }
    fn int(&mut self, low: i64, high_inclusive: i64) -> i64 {
        self.0.random_range(low..=high_inclusive)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
    /// Log-normal with the given median and log-sd, clamped, rounded.
    fn log_normal(&mut self, median: f64, sd: f64, low: f64, high: f64, decimals: i32) -> f64 {
        round_to((median.ln() + sd * self.normal()).exp().clamp(low, high), decimals)
    }
    /// Correlated standard normal: `rho · z + sqrt(1 − rho²) · e`.
    fn correlated(&mut self, z: f64, rho: f64) -> f64 {
        rho * z + (1.0 - rho * rho).sqrt() * self.normal()
    }
    /// Exponential with the given median.
    fn exponential(&mut self, median: f64) -> f64 {
        -(1.0 - self.uniform()).ln() * median / std::f64::consts::LN_2
    }
}

/// The first recurrence as described at diagnosis.
struct RecurrencePattern {
    n_nodules: Option<u32>,
    max_diam_cm: Option<f64>,
    macrovascular: bool,
    extrahepatic: bool,
}

fn recurrence_pattern(d: &mut Draw, beyond: bool) -> RecurrencePattern {
    let pattern = |n, diam, macrovascular, extrahepatic| RecurrencePattern {
        n_nodules: n,
        max_diam_cm: diam,
        macrovascular,
        extrahepatic,
    };
    if !beyond {
        return if d.chance(0.7) {
            pattern(Some(1), Some(round_to(d.range(0.8, 5.0), 1)), false, false)
        } else {
            pattern(Some(d.int(2, 3) as u32), Some(round_to(d.range(0.8, 3.0), 1)), false, false)
        };
    }
    let u = d.uniform();
    if u < 0.2 {
        pattern(None, Some(round_to(d.range(1.0, 4.0), 1)), false, false) // diffuse
    } else if u < 0.45 {
        pattern(Some(d.int(4, 8) as u32), Some(round_to(d.range(0.8, 4.0), 1)), false, false)
    } else if u < 0.65 {
        pattern(Some(1), Some(round_to(d.range(5.1, 12.0), 1)), false, false)
    } else if u < 0.8 {
        pattern(Some(d.int(2, 3) as u32), Some(round_to(d.range(3.1, 6.0), 1)), false, false)
    } else if u < 0.9 {
        pattern(Some(d.int(1, 3) as u32), Some(round_to(d.range(1.0, 6.0), 1)), true, false)
    } else {
        let n = d.int(0, 2) as u32;
        let diam = if n == 0 { None } else { Some(round_to(d.range(0.8, 4.0), 1)) };
        pattern(Some(n), diam, d.chance(0.2), true)
    }
}

/// Visit days after surgery up to `until` (inclusive): every 90 ± 14 days for two years, then 180 ± 21.
fn visit_days(d: &mut Draw, until: i64) -> Vec<i64> {
    let mut visits = vec![0];
    let mut t = 0;
    loop {
        t += if t < 730 { 90 + d.int(-14, 14) } else { 180 + d.int(-21, 21) };
        if t > until {
            return visits;
        }
        visits.push(t);
    }
}

fn center_sizes(centers: usize, total: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..centers).map(|k| 1.0 / (1.0 + 0.35 * k as f64)).collect();
    let sum: f64 = weights.iter().sum();
    let mut sizes: Vec<usize> = weights.iter().map(|w| ((total as f64) * w / sum).floor() as usize).collect();
    let mut k = 0;
    while sizes.iter().sum::<usize>() < total {
        sizes[k % centers] += 1;
        k += 1;
    }
    sizes
}

/// Generates `patients_total` patients over `centers` centers (see the module docs).
///
/// # Errors
///
/// [`CohortError::InvalidArgument`] unless `1 ≤ centers ≤ 26`, `patients_total ≥ centers`, and the cut-off is
/// after the last surgery date (2021-12-31).
pub fn generate(
    centers: usize,
    patients_total: usize,
    seed: u64,
    cutoff: NaiveDate,
) -> Result<SynthCohort, CohortError> {
    let first_surgery = NaiveDate::from_ymd_opt(2012, 1, 1).unwrap_or(NaiveDate::MIN);
    let last_surgery = NaiveDate::from_ymd_opt(2021, 12, 31).unwrap_or(NaiveDate::MIN);
    if !(1..=26).contains(&centers) || patients_total < centers {
        return Err(CohortError::InvalidArgument(format!(
            "need 1 to 26 centers and at least one patient per center; got {centers} centers, {patients_total} patients"
        )));
    }
    if cutoff <= last_surgery {
        return Err(CohortError::InvalidArgument(format!(
            "the cut-off {cutoff} must be after the last surgery date {last_surgery}"
        )));
    }
    let mut d = Draw(ChaCha8Rng::seed_from_u64(seed));
    let surgery_span = (last_surgery - first_surgery).num_days();
    let mut sites = Vec::with_capacity(centers);
    let mut truth = Vec::with_capacity(patients_total);
    for (k, size) in center_sizes(centers, patients_total).into_iter().enumerate() {
        let letter = char::from(b'a' + k as u8);
        let center_id = format!("center_{letter}");
        let prof = profile(k);
        let mut rows = Vec::with_capacity(size);
        for i in 0..size {
            let patient_id = format!("{}{:04}", letter.to_ascii_uppercase(), i + 1);
            let z = d.normal() + prof.risk_shift;
            let row =
                patient(&mut d, &prof, z, patient_id.clone(), center_id.clone(), first_surgery, surgery_span, cutoff);
            rows.push(row);
            truth.push(TruthRow { patient_id, center_id: center_id.clone(), latent_risk: z });
        }
        sites.push(SiteRows { center_id, rows });
    }
    Ok(SynthCohort { sites, truth })
}

#[allow(clippy::too_many_arguments)]
fn patient(
    d: &mut Draw,
    prof: &CenterProfile,
    z: f64,
    patient_id: String,
    center_id: String,
    first_surgery: NaiveDate,
    surgery_span: i64,
    cutoff: NaiveDate,
) -> ClinicalRow {
    let surgery_date = first_surgery + Duration::days(d.int(0, surgery_span));
    let mri_gap = if d.chance(0.04) {
        d.int(32, 75) // too long before surgery: the data check flags it
    } else if d.chance(0.01) {
        -d.int(1, 5) // after surgery: flagged too
    } else {
        d.int(1, 28)
    };
    let mri_date = surgery_date - Duration::days(mri_gap);
    let age = (prof.age_mean + 11.0 * d.normal()).round().clamp(18.0, 85.0) as u32;
    let sex = if d.chance(0.85) { "M" } else { "F" }.to_owned();
    let hbsag = d.chance(prof.hbsag);
    let anti_hcv = d.chance(prof.anti_hcv);
    let cirrhosis = d.chance(prof.cirrhosis);
    let cirr = if cirrhosis { 1.0 } else { 0.0 };

    let high_afp = d.chance(sigmoid(logit(0.22) + 0.7 * z));
    let afp =
        if high_afp { d.log_normal(2000.0, 1.4, 0.5, 60500.0, 1) } else { d.log_normal(10.0, 1.3, 0.5, 60500.0, 1) };
    let afp = if d.chance(0.02) { None } else { Some(afp) };
    let pivka2 = d.log_normal(150.0 * (0.5 * z).exp(), 1.4, 5.0, 75000.0, 1);
    let pivka2 = if d.chance(0.08) { None } else { Some(pivka2) };
    let albumin = round_to((42.0 - cirr + 4.0 * d.normal()).clamp(25.0, 55.0), 1);
    let total_bilirubin = d.log_normal(13.5 * (0.1 * cirr).exp(), 0.35, 3.0, 80.0, 1);
    let alt = d.log_normal(40.0, 0.6, 5.0, 1000.0, 1);
    let ast = d.log_normal(37.0 * (0.1 * cirr).exp(), 0.5, 5.0, 1000.0, 1);
    let ggt = d.log_normal(55.0 * (0.2 * z).exp(), 0.7, 5.0, 2000.0, 1);
    let ggt = if d.chance(0.03) { None } else { Some(ggt) };
    let platelets = d.log_normal(140.0 * (-0.15 * cirr).exp(), 0.4, 30.0, 600.0, 0);
    let inr = round_to((1.02 + 0.03 * cirr + 0.08 * d.normal()).clamp(0.8, 1.5), 2);
    let inr = if d.chance(0.02) { None } else { Some(inr) };
    let albi_score = round_to(0.66 * total_bilirubin.log10() - 0.085 * albumin, 3);

    let multiple = d.chance(sigmoid(logit(0.14) + 0.5 * z));
    let tumor_number = if multiple { if d.chance(0.7) { 2 } else { 3 } } else { 1 };
    let tumor_max_diam_cm = if multiple {
        d.log_normal(2.2 * (0.1 * z).exp(), 0.25, 0.8, 3.0, 1)
    } else {
        d.log_normal(4.0 * (0.3 * z).exp(), 0.45, 0.8, 15.0, 1)
    };
    let bclc_stage = if tumor_number == 1 && tumor_max_diam_cm <= 2.0 { "0" } else { "A" }.to_owned();
    let mri_contrast_agent = if d.chance(prof.gadoxetate) { "gadoxetate" } else { "extracellular" }.to_owned();

    let w = d.correlated(z, 0.7);
    let mvi = if w < 0.2533 {
        "M0"
    } else if w < 1.2816 {
        "M1"
    } else {
        "M2"
    }
    .to_owned();
    let w = d.correlated(z, 0.55);
    let es_grade = if w < -1.6449 {
        1
    } else if w < 0.0 {
        2
    } else if w < 1.2816 {
        3
    } else {
        4
    };
    let satellite_nodules = d.chance(sigmoid(logit(0.14) + 0.8 * z));
    let w = d.correlated(z, 0.4);
    let capsule = if w < -0.1257 {
        "complete"
    } else if w < 0.6745 {
        "incomplete"
    } else {
        "absent"
    }
    .to_owned();
    let margin_mm = d.log_normal(10.0, 0.7, 0.5, 60.0, 1);
    let path_max_diam_cm = round_to((tumor_max_diam_cm * (0.1 * d.normal()).exp()).max(0.5), 1);

    // Outcome process, in days after surgery.
    let early = d.chance(sigmoid(-0.95 + 1.1 * z));
    let t_early = (300f64.ln() + 0.6 * d.normal()).exp().max(30.0);
    let late_scale = 8.0 * 365.25 * (-0.3 * z / 1.8).exp();
    let t_late = late_scale * (-(1.0 - d.uniform()).ln()).powf(1.0 / 1.8);
    let (t_rec, from_early) = if early && t_early < t_late { (t_early, true) } else { (t_late, false) };
    let beyond = d.chance(if from_early { sigmoid(-0.6 + z) } else { sigmoid(-1.8 + 0.5 * z) });
    let pattern = recurrence_pattern(d, beyond);
    let t_death_background = d.exponential(365.25 * std::f64::consts::LN_2 / 0.012);
    let t_death_after_rec = t_rec + d.exponential(365.25 * if beyond { 2.5 } else { 6.0 });
    let t_death = t_death_background.min(t_death_after_rec).ceil() as i64;
    let t_dropout = if d.chance(0.10) { d.int(0, (8.0 * 365.25) as i64) } else { i64::MAX };

    let end = t_dropout.min((cutoff - surgery_date).num_days());
    let visits = visit_days(d, end);
    let rec_visit = visits.iter().copied().find(|&v| v as f64 >= t_rec);
    let rec_day = rec_visit.filter(|&v| v <= t_death);
    let death_day = Some(t_death).filter(|&t| t <= end);
    let last_day = death_day.unwrap_or_else(|| visits.last().copied().unwrap_or(0));
    let day = |t: i64| surgery_date + Duration::days(t);

    ClinicalRow {
        patient_id,
        center_id,
        surgery_date,
        mri_date,
        age,
        sex,
        hbsag,
        anti_hcv,
        afp,
        pivka2,
        albumin,
        total_bilirubin,
        alt,
        ast,
        ggt,
        platelets,
        inr,
        albi_score,
        cirrhosis,
        tumor_number,
        tumor_max_diam_cm,
        bclc_stage,
        mri_contrast_agent,
        mvi,
        es_grade,
        satellite_nodules,
        capsule,
        margin_mm,
        path_max_diam_cm,
        recurrence_date: rec_day.map(day),
        rec_n_nodules: rec_day.and(pattern.n_nodules),
        rec_max_diam_cm: rec_day.and(pattern.max_diam_cm),
        rec_macrovascular: rec_day.map(|_| pattern.macrovascular),
        rec_extrahepatic: rec_day.map(|_| pattern.extrahepatic),
        death_date: death_day.map(day),
        last_followup_date: day(last_day),
    }
}

/// Writes `path` atomically: a temporary file in the same folder, synced, then renamed over `path`.
fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<(), CohortError> {
    let write_err = |source: std::io::Error| CohortError::Write { path: path.to_owned(), source };
    let name = path
        .file_name()
        .ok_or_else(|| write_err(std::io::Error::other("the path has no file name")))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp); // best effort; the error that matters is `e`
        return Err(write_err(e));
    }
    Ok(())
}

fn write_csv(path: &Path, header: &[&str], records: impl Iterator<Item = Vec<String>>) -> Result<(), CohortError> {
    write_atomic(path, |file| {
        let mut writer = csv::Writer::from_writer(std::io::BufWriter::new(file));
        writer.write_record(header)?;
        for record in records {
            writer.write_record(&record)?;
        }
        writer.flush()?;
        let mut inner = writer.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?;
        inner.flush()
    })
}

/// Writes one site's `clinical.csv` (SCHEMA.md column names, [`CLINICAL_COLUMNS`] order).
///
/// # Errors
///
/// [`CohortError::Write`] when the file or its temporary file cannot be written or renamed.
pub fn write_site_csv(site: &SiteRows, path: &Path) -> Result<(), CohortError> {
    write_csv(path, &CLINICAL_COLUMNS, site.rows.iter().map(ClinicalRow::to_record))
}

/// Writes the truth table: `patient_id,center_id,latent_risk`.
///
/// # Errors
///
/// [`CohortError::Write`] as for [`write_site_csv`].
pub fn write_truth_csv(truth: &[TruthRow], path: &Path) -> Result<(), CohortError> {
    write_csv(
        path,
        &["patient_id", "center_id", "latent_risk"],
        truth.iter().map(|t| vec![t.patient_id.clone(), t.center_id.clone(), format!("{:.6}", t.latent_risk)]),
    )
}
