//! Model input: federated standardisation and the design matrix.
//!
//! A site computes [`FeatureStats::local`] on its training rows and sends only per-feature sums, sums of
//! squares and counts (never values); the server [`FeatureStats::merge`]s them and sends the merged stats
//! back; every site then builds its [`DesignMatrix`] with the same means and standard deviations. A count
//! of 1 reveals the value itself, so the site policy's smallest-group rule applies before sending.
//!
//! # Layout
//!
//! Per feature, in spec order:
//! - numeric: `column` (standardised, after `ln(1 + x)` when `log`; missing → 0) and `column__missing`;
//! - binary: `column` (0/1; missing → 0) and `column__missing`;
//! - categorical: `column=level` for each declared level (missing → all zeros).
//!
//! The width depends only on the spec ([`design_width`]), so every site agrees on the model's input layer.

use serde::{Deserialize, Serialize};

use crate::cohort::{Cohort, FeatureValue};
use crate::spec::{CohortSpec, FeatureKind};

/// Why a design matrix or statistics cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DesignError {
    #[error("the cohort was loaded with features {cohort:?} but the spec declares {spec:?}; load it with this spec")]
    SpecMismatch { cohort: Vec<String>, spec: Vec<String> },
    #[error("feature statistics cover {stats:?} but the spec's numeric features are {spec:?}")]
    StatsMismatch { stats: Vec<String>, spec: Vec<String> },
    #[error("row index {row} is out of range for a cohort of {len} patients")]
    RowOutOfRange { row: usize, len: usize },
    #[error("no feature statistics to merge")]
    NothingToMerge,
}

/// Sufficient statistics of the numeric features (after their log transform), one entry per numeric
/// feature in spec order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub columns: Vec<String>,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    pub count: Vec<u64>,
}

/// The numeric features of a spec: (index in spec, column, log).
fn numeric_features(spec: &CohortSpec) -> Vec<(usize, &str, bool)> {
    spec.features
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match f.kind {
            FeatureKind::Numeric { log } => Some((i, f.column.as_str(), log)),
            _ => None,
        })
        .collect()
}

fn check_cohort(cohort: &Cohort, spec: &CohortSpec, rows: &[usize]) -> Result<(), DesignError> {
    let spec_columns = spec.feature_columns();
    if cohort.feature_columns != spec_columns {
        return Err(DesignError::SpecMismatch { cohort: cohort.feature_columns.clone(), spec: spec_columns });
    }
    if let Some(&row) = rows.iter().find(|&&r| r >= cohort.len()) {
        return Err(DesignError::RowOutOfRange { row, len: cohort.len() });
    }
    Ok(())
}

fn transformed(value: &FeatureValue, log: bool) -> Option<f64> {
    match value {
        FeatureValue::Numeric(Some(v)) => Some(if log { v.ln_1p() } else { *v }),
        _ => None,
    }
}

impl FeatureStats {
    /// Statistics of `rows` (indices into `cohort.patients`).
    ///
    /// # Errors
    ///
    /// The cohort was loaded with another spec, or a row index is out of range.
    pub fn local(cohort: &Cohort, spec: &CohortSpec, rows: &[usize]) -> Result<FeatureStats, DesignError> {
        check_cohort(cohort, spec, rows)?;
        let numeric = numeric_features(spec);
        let mut stats = FeatureStats {
            columns: numeric.iter().map(|(_, c, _)| (*c).to_owned()).collect(),
            sum: vec![0.0; numeric.len()],
            sum_sq: vec![0.0; numeric.len()],
            count: vec![0; numeric.len()],
        };
        for &r in rows {
            let patient = &cohort.patients[r];
            for (k, &(i, _, log)) in numeric.iter().enumerate() {
                if let Some(x) = transformed(&patient.features[i], log) {
                    stats.sum[k] += x;
                    stats.sum_sq[k] += x * x;
                    stats.count[k] += 1;
                }
            }
        }
        Ok(stats)
    }

    /// Sums the statistics of several sites, in the order given (fixed order → reproducible sums).
    ///
    /// # Errors
    ///
    /// An empty slice, or statistics over different columns.
    pub fn merge(parts: &[FeatureStats]) -> Result<FeatureStats, DesignError> {
        let first = parts.first().ok_or(DesignError::NothingToMerge)?;
        let mut merged = first.clone();
        for part in &parts[1..] {
            if part.columns != merged.columns {
                return Err(DesignError::StatsMismatch { stats: part.columns.clone(), spec: merged.columns.clone() });
            }
            for k in 0..merged.columns.len() {
                merged.sum[k] += part.sum[k];
                merged.sum_sq[k] += part.sum_sq[k];
                merged.count[k] += part.count[k];
            }
        }
        Ok(merged)
    }

    /// Means; 0 for a feature with no observed value.
    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().zip(&self.count).map(|(s, &n)| if n == 0 { 0.0 } else { s / n as f64 }).collect()
    }

    /// Sample standard deviations (n − 1). A feature with fewer than two values, or no spread, gets 1 so
    /// that standardising never divides by zero.
    pub fn std(&self) -> Vec<f64> {
        self.mean()
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let n = self.count[k] as f64;
                if self.count[k] < 2 {
                    return 1.0;
                }
                let var = ((self.sum_sq[k] - n * m * m) / (n - 1.0)).max(0.0);
                let sd = var.sqrt();
                if sd > 1e-12 { sd } else { 1.0 }
            })
            .collect()
    }
}

impl FeatureStats {
    /// Statistics that leave values as they are (mean 0, standard deviation 1): a design matrix
    /// built with them holds the transformed but unstandardised values, ready for
    /// [`standardise_row`] with statistics that arrive later (federated standardisation).
    pub fn identity(spec: &CohortSpec) -> FeatureStats {
        let columns: Vec<String> = numeric_features(spec).iter().map(|(_, c, _)| (*c).to_owned()).collect();
        let n = columns.len();
        FeatureStats { columns, sum: vec![0.0; n], sum_sq: vec![0.0; n], count: vec![0; n] }
    }
}

/// Where the numeric features sit in a design row: `(value column, missing-indicator column)` per
/// numeric feature, in spec order (the order of [`FeatureStats::columns`]).
pub fn numeric_positions(spec: &CohortSpec) -> Vec<(usize, usize)> {
    let mut at = 0;
    let mut out = Vec::new();
    for f in &spec.features {
        match &f.kind {
            FeatureKind::Numeric { .. } => {
                out.push((at, at + 1));
                at += 2;
            }
            FeatureKind::Binary => at += 2,
            FeatureKind::Categorical { levels } => at += levels.len(),
        }
    }
    out
}

/// Standardises a row that was built with [`FeatureStats::identity`]: each observed numeric
/// value becomes `(x − mean) / std`; a missing one stays 0, as [`DesignMatrix::build`] encodes it.
/// `mean` and `std` follow `positions` (from [`numeric_positions`]).
pub fn standardise_row(positions: &[(usize, usize)], row: &mut [f32], mean: &[f32], std: &[f32]) {
    for (k, &(value, missing)) in positions.iter().enumerate() {
        if row[missing] == 0.0 {
            row[value] = (row[value] - mean[k]) / std[k];
        }
    }
}

/// The number of model inputs a spec gives (see the module docs' layout).
pub fn design_width(spec: &CohortSpec) -> usize {
    spec.features
        .iter()
        .map(|f| match &f.kind {
            FeatureKind::Numeric { .. } | FeatureKind::Binary => 2,
            FeatureKind::Categorical { levels } => levels.len(),
        })
        .sum()
}

/// The column names of the layout, `design_width(spec)` of them.
pub fn design_columns(spec: &CohortSpec) -> Vec<String> {
    let mut columns = Vec::with_capacity(design_width(spec));
    for f in &spec.features {
        match &f.kind {
            FeatureKind::Numeric { .. } | FeatureKind::Binary => {
                columns.push(f.column.clone());
                columns.push(format!("{}__missing", f.column));
            }
            FeatureKind::Categorical { levels } => {
                columns.extend(levels.iter().map(|l| format!("{}={l}", f.column)));
            }
        }
    }
    columns
}

/// Model input for a set of rows.
///
/// # Shapes
///
/// `x` is row-major `n × d`; `labels`, `survival` and `patient_rows` have `n` entries; `columns` has `d`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesignMatrix {
    pub x: Vec<f32>,
    pub n: usize,
    pub d: usize,
    pub labels: Vec<Option<f32>>,
    /// (days, event) of the spec's survival outcome, for the Cox head.
    pub survival: Vec<Option<(f64, bool)>>,
    pub columns: Vec<String>,
    /// The cohort indices the rows came from, in order.
    pub patient_rows: Vec<usize>,
}

impl DesignMatrix {
    /// Encodes `rows` (indices into `cohort.patients`) with the given (merged) statistics.
    ///
    /// # Errors
    ///
    /// The cohort was loaded with another spec, the statistics are for other columns, or a row index is out
    /// of range.
    pub fn build(
        cohort: &Cohort,
        spec: &CohortSpec,
        stats: &FeatureStats,
        rows: &[usize],
    ) -> Result<DesignMatrix, DesignError> {
        check_cohort(cohort, spec, rows)?;
        let numeric = numeric_features(spec);
        let numeric_columns: Vec<String> = numeric.iter().map(|(_, c, _)| (*c).to_owned()).collect();
        if stats.columns != numeric_columns {
            return Err(DesignError::StatsMismatch { stats: stats.columns.clone(), spec: numeric_columns });
        }
        let (mean, std) = (stats.mean(), stats.std());
        let d = design_width(spec);
        let mut x = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            let patient = &cohort.patients[r];
            let mut k = 0; // index among numeric features
            for (f, value) in spec.features.iter().zip(&patient.features) {
                match &f.kind {
                    FeatureKind::Numeric { log } => {
                        match transformed(value, *log) {
                            Some(v) => x.extend([((v - mean[k]) / std[k]) as f32, 0.0]),
                            None => x.extend([0.0, 1.0]),
                        }
                        k += 1;
                    }
                    FeatureKind::Binary => match value {
                        FeatureValue::Numeric(Some(v)) => x.extend([*v as f32, 0.0]),
                        _ => x.extend([0.0, 1.0]),
                    },
                    FeatureKind::Categorical { levels } => {
                        let level = match value {
                            FeatureValue::Categorical(Some(v)) => Some(v.as_str()),
                            _ => None,
                        };
                        x.extend(levels.iter().map(|l| if Some(l.as_str()) == level { 1.0 } else { 0.0 }));
                    }
                }
            }
        }
        Ok(DesignMatrix {
            x,
            n: rows.len(),
            d,
            labels: rows.iter().map(|&r| cohort.patients[r].label.map(f32::from)).collect(),
            survival: rows.iter().map(|&r| cohort.patients[r].survival).collect(),
            columns: design_columns(spec),
            patient_rows: rows.to_vec(),
        })
    }

    /// Row `i` of `x`.
    ///
    /// # Panics
    ///
    /// If `i >= n`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
}
