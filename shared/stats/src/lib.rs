//! Statistics a clinical prediction study reports (TRIPOD+AI), computed from predictions and outcomes.
//!
//! - [`binary`]: ROC AUC with DeLong standard error, paired DeLong test, stratified bootstrap, Youden
//!   cut-off, sensitivity/specificity/PPV/NPV with Wilson intervals, Brier score, calibration intercept
//!   and slope, decision-curve net benefit, ROC points.
//! - [`survival`]: Harrell's and Uno's C, Kaplan–Meier with log(−log) Greenwood intervals, log-rank test
//!   for two or more groups, univariable Cox regression (Efron ties), cumulative/dynamic time-dependent AUC.
//! - [`pooled`]: mergeable site summaries that hold no patient-level value (score histograms, event and
//!   at-risk counts per time and group), from which pooled Kaplan–Meier and log-rank are exact and the AUC
//!   is closely approximated; a minimum-cell rule.
//! - [`federated`]: what a site reports about a model on its held-out split (its own figures and the
//!   summaries above, under the minimum cell), the server's checks of that report, and the pooling.
//! - [`predictions`] reads a predictions CSV, [`report`] computes every statistic for it (`fedhcc stats`),
//!   [`svg`] draws the plots.
//!
//! Every statistic is checked against a reference implementation (scikit-learn, scikit-survival,
//! lifelines, statsmodels, dcurves, MLstatkit) on real data: see `tests/reference.rs` and
//! `scripts/stats_reference.py`. Nothing here does IO except reading from a caller-supplied reader.

pub mod binary;
mod error;
pub mod federated;
mod numeric;
pub mod pooled;
pub mod predictions;
pub mod report;
pub mod survival;
pub mod svg;

pub use error::StatsError;

/// Result of a statistic: the value, or why it is not defined on these data.
pub type Result<T> = std::result::Result<T, StatsError>;
