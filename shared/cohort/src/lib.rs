//! Cohort data for fedhcc: what a site's `clinical.csv` holds and how it becomes model input.
//!
//! The pipeline, one module per step:
//!
//! - [`spec`]: a [`CohortSpec`] declares the feature columns, the binary label and the survival pair
//!   (deserialised from the study's TOML config).
//! - [`outcomes`]: derives the HCC outcomes (aggressive recurrence within two years, RFS, TTR, OS) from raw
//!   follow-up dates, with an explicit cut-off and horizon.
//! - [`cohort`]: [`Cohort::load`] reads a CSV; a bad row is reported as a [`RowIssue`] and excluded, the rest
//!   goes on. Only an unreadable file, a bad header, a missing required column or an empty file is fatal.
//! - [`design`]: federated standardisation ([`FeatureStats`] carries only sums, sums of squares and counts)
//!   and the [`DesignMatrix`] whose width depends only on the spec.
//! - [`split`]: deterministic stratified train/validation/test [`Splits`].
//! - [`synth`]: the clinical part of the synthetic multi-center HCC cohort.
//! - [`synth_images`]: its MRI studies and H&E slides, per patient, in the real formats.
//! - [`check`]: the [`DataCheck`] report a site operator reads before anything trains, and its [`Finding`]s
//!   (errors that stop training on a patient or the site, warnings that do not).
//!
//! Invariant: no function in this crate logs, and no error or report carries a patient-level value other
//! than the site's own local row messages ([`RowIssue::problem`]); [`DataCheck`] carries none at all (only
//! counts, row numbers, column names and the patient ids its findings name).

pub mod check;
pub mod cohort;
pub mod design;
pub mod error;
pub mod outcomes;
pub mod spec;
pub mod split;
pub mod synth;
pub mod synth_images;

pub use check::{DataCheck, Finding, Severity};
pub use cohort::{Cohort, FeatureValue, IssueKind, LoadReport, Patient, RowIssue};
pub use design::{
    DesignError, DesignMatrix, FeatureStats, design_columns, design_width, numeric_positions, standardise_row,
};
pub use error::CohortError;
pub use outcomes::{DeathPolicy, FollowUp, LabelReason, Outcome, OutcomeConfig};
pub use spec::{CohortSpec, FeatureKind, FeatureSpec, LabelSpec, SurvivalSpec};
pub use split::{SplitError, Splits};
