//! The cohort spec: which CSV columns are model inputs, what the binary label is, and which time/event pair
//! is the survival outcome. It is part of the study config (TOML) and is the same at every site, so every
//! site builds the same model layout from it.

use serde::{Deserialize, Serialize};

use crate::error::CohortError;

/// The id column used when [`CohortSpec::id_column`] is not given.
pub const DEFAULT_ID_COLUMN: &str = "patient_id";

/// The pathology columns of SCHEMA.md: known only after resection, so only a postoperative model may
/// take them as inputs (a preoperative model that sees them is trained on the future).
pub const PATHOLOGY_COLUMNS: [&str; 6] =
    ["mvi", "es_grade", "satellite_nodules", "capsule", "margin_mm", "path_max_diam_cm"];

/// A generic description of a cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortSpec {
    /// Model inputs, in model-layout order.
    pub features: Vec<FeatureSpec>,
    /// The binary label.
    pub label: LabelSpec,
    /// The time/event pair of an RFS-like outcome (optional).
    #[serde(default)]
    pub survival: Option<SurvivalSpec>,
    /// The patient id column. `None` means [`DEFAULT_ID_COLUMN`], and if that column is not in the CSV the
    /// patients are named by their CSV row (`row2`, `row3`, ...). A column named here explicitly is required.
    #[serde(default)]
    pub id_column: Option<String>,
}

/// One model input column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub column: String,
    pub kind: FeatureKind,
}

/// How a feature column is read and encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureKind {
    /// A number; with `log`, the model sees `ln(1 + x)` (values must be ≥ 0). Standardised with federated
    /// statistics, plus a missing-value indicator.
    Numeric {
        #[serde(default)]
        log: bool,
    },
    /// 0/1, plus a missing-value indicator.
    Binary,
    /// One of the declared levels (exact text match), one-hot encoded; a missing value is all zeros.
    Categorical { levels: Vec<String> },
}

/// Where the binary label comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LabelSpec {
    /// A 0/1 column; empty = unlabelled.
    Column { column: String },
    /// From a time/event pair: an event at or before the horizon = 1; followed up to or past the horizon
    /// without an event before it = 0; censored before the horizon = unlabelled.
    Horizon { time_column: String, event_column: String, horizon_days: f64 },
    /// Aggressive recurrence within two years, derived from raw HCC follow-up columns
    /// ([`crate::outcomes`]), or taken as it is from an `aggressive_2y` column when the CSV carries one.
    AggressiveRecurrence,
}

/// The time (days) and event (0/1) columns of a survival outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurvivalSpec {
    pub time_column: String,
    pub event_column: String,
}

fn numeric(column: &str, log: bool) -> FeatureSpec {
    FeatureSpec { column: column.to_owned(), kind: FeatureKind::Numeric { log } }
}

fn binary(column: &str) -> FeatureSpec {
    FeatureSpec { column: column.to_owned(), kind: FeatureKind::Binary }
}

fn categorical(column: &str, levels: &[&str]) -> FeatureSpec {
    FeatureSpec {
        column: column.to_owned(),
        kind: FeatureKind::Categorical { levels: levels.iter().map(|l| (*l).to_owned()).collect() },
    }
}

impl CohortSpec {
    /// The HCC study's preoperative clinical feature set (SCHEMA.md), labelled with aggressive recurrence and
    /// with RFS as the survival outcome. Skewed labs and tumour size are log-transformed.
    pub fn hcc_preoperative() -> Self {
        CohortSpec {
            features: vec![
                numeric("age", false),
                categorical("sex", &["M", "F"]),
                binary("hbsag"),
                binary("anti_hcv"),
                numeric("afp", true),
                numeric("pivka2", true),
                numeric("albumin", false),
                numeric("total_bilirubin", true),
                numeric("alt", true),
                numeric("ast", true),
                numeric("ggt", true),
                numeric("platelets", true),
                numeric("inr", false),
                numeric("albi_score", false),
                binary("cirrhosis"),
                numeric("tumor_number", false),
                numeric("tumor_max_diam_cm", true),
                categorical("bclc_stage", &["0", "A"]),
                categorical("mri_contrast_agent", &["gadoxetate", "extracellular"]),
            ],
            label: LabelSpec::AggressiveRecurrence,
            survival: Some(SurvivalSpec { time_column: "rfs_days".to_owned(), event_column: "rfs_event".to_owned() }),
            id_column: None,
        }
    }

    /// [`CohortSpec::hcc_preoperative`] plus the pathology variables of the postoperative model.
    pub fn hcc_postoperative() -> Self {
        let mut spec = Self::hcc_preoperative();
        spec.features.extend([
            categorical("mvi", &["M0", "M1", "M2"]),
            numeric("es_grade", false),
            binary("satellite_nodules"),
            categorical("capsule", &["complete", "incomplete", "absent"]),
            numeric("margin_mm", true),
            numeric("path_max_diam_cm", true),
        ]);
        spec
    }

    /// The id column to look for (see [`CohortSpec::id_column`]).
    pub fn id_column_name(&self) -> &str {
        self.id_column.as_deref().unwrap_or(DEFAULT_ID_COLUMN)
    }

    /// The feature column names, in layout order.
    pub fn feature_columns(&self) -> Vec<String> {
        self.features.iter().map(|f| f.column.clone()).collect()
    }

    /// The feature columns that are [`PATHOLOGY_COLUMNS`], in layout order.
    pub fn pathology_columns(&self) -> Vec<&str> {
        self.features.iter().map(|f| f.column.as_str()).filter(|c| PATHOLOGY_COLUMNS.contains(c)).collect()
    }

    /// Checks what serde cannot: at least one feature, no duplicate feature column, non-empty and unique
    /// categorical levels, a positive finite horizon, no empty column name.
    ///
    /// # Errors
    ///
    /// [`CohortError::InvalidSpec`] naming the offending column.
    pub fn validate(&self) -> Result<(), CohortError> {
        let invalid = |msg: String| Err(CohortError::InvalidSpec(msg));
        if self.features.is_empty() {
            return invalid("no features declared".to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.features {
            if f.column.trim().is_empty() {
                return invalid("a feature has an empty column name".to_owned());
            }
            if !seen.insert(f.column.as_str()) {
                return invalid(format!("feature column '{}' is declared twice", f.column));
            }
            if let FeatureKind::Categorical { levels } = &f.kind {
                if levels.is_empty() {
                    return invalid(format!("categorical feature '{}' declares no levels", f.column));
                }
                let mut lv = std::collections::HashSet::new();
                for l in levels {
                    if l.trim().is_empty() || l.trim() != l {
                        return invalid(format!(
                            "categorical feature '{}' has an empty level or one with surrounding spaces",
                            f.column
                        ));
                    }
                    if !lv.insert(l.as_str()) {
                        return invalid(format!("categorical feature '{}' declares level '{l}' twice", f.column));
                    }
                }
            }
        }
        let mut names: Vec<&str> = Vec::new();
        match &self.label {
            LabelSpec::Column { column } => names.push(column),
            LabelSpec::Horizon { time_column, event_column, horizon_days } => {
                if !(horizon_days.is_finite() && *horizon_days > 0.0) {
                    return invalid(format!(
                        "label horizon_days must be a positive number of days, got {horizon_days}"
                    ));
                }
                names.extend([time_column.as_str(), event_column.as_str()]);
            }
            LabelSpec::AggressiveRecurrence => {}
        }
        if let Some(s) = &self.survival {
            names.extend([s.time_column.as_str(), s.event_column.as_str()]);
        }
        if let Some(id) = &self.id_column {
            names.push(id);
        }
        if names.iter().any(|n| n.trim().is_empty()) {
            return invalid("a label, survival or id column name is empty".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcc_specs_are_valid() {
        CohortSpec::hcc_preoperative().validate().expect("preoperative spec");
        CohortSpec::hcc_postoperative().validate().expect("postoperative spec");
        assert_eq!(CohortSpec::hcc_preoperative().features.len(), 19);
        assert!(CohortSpec::hcc_preoperative().pathology_columns().is_empty());
        assert_eq!(CohortSpec::hcc_postoperative().pathology_columns(), PATHOLOGY_COLUMNS);
    }

    #[test]
    fn parses_from_toml_with_defaults() {
        let text = r#"
            features = [
                { column = "age", kind = { type = "numeric" } },
                { column = "afp", kind = { type = "numeric", log = true } },
                { column = "cirrhosis", kind = { type = "binary" } },
                { column = "bclc_stage", kind = { type = "categorical", levels = ["0", "A"] } },
            ]
            label = { type = "horizon", time_column = "time", event_column = "status", horizon_days = 365.0 }
            survival = { time_column = "time", event_column = "status" }
        "#;
        let spec: CohortSpec = toml::from_str(text).expect("parses");
        assert_eq!(spec.id_column, None);
        assert_eq!(spec.id_column_name(), "patient_id");
        assert_eq!(spec.features[0].kind, FeatureKind::Numeric { log: false });
        assert_eq!(spec.features[1].kind, FeatureKind::Numeric { log: true });
        spec.validate().expect("valid");

        let aggressive: CohortSpec = toml::from_str(
            "features = [{ column = \"age\", kind = { type = \"numeric\" } }]\nlabel = { type = \"aggressive_recurrence\" }",
        )
        .expect("parses");
        assert_eq!(aggressive.label, LabelSpec::AggressiveRecurrence);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_specs() {
        let unknown = "features = []\nlabel = { type = \"aggressive_recurrence\" }\nlabels = 1";
        assert!(toml::from_str::<CohortSpec>(unknown).is_err());
        let empty: CohortSpec =
            toml::from_str("features = []\nlabel = { type = \"aggressive_recurrence\" }").expect("parses");
        assert!(empty.validate().is_err());
        let mut dup = CohortSpec::hcc_preoperative();
        dup.features.push(numeric("age", false));
        let err = dup.validate().expect_err("duplicate").to_string();
        assert!(err.contains("'age'"), "{err}");
    }
}
