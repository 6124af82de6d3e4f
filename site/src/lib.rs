//! fedhcc-site: a hospital's side of a study, as a library (the `fedhcc` binary's site commands,
//! `fedhcc study`'s simulation and the tests all use it).
//!
//! - [`study`]: the study model (`StudyModel`: kind, layout, initial weights, the executor it needs).
//! - [`executor`]: `ClinicalExecutor` (the clinical table), `site_executor` (a site's policy around
//!   any executor); [`mm_executor`]: `MultimodalExecutor` (MRI crops, slide features, clinical).
//! - [`standardise`]: federated standardisation (a site's feature sums, the pooled statistics applied).
//! - [`site_evaluation`]: a site's evaluation summary of a global model.
//! - [`preprocess`]: MRI crops and slide features prepared once per site; [`imaging_check`]: the
//!   imaging part of `fedhcc data check`.
//! - [`train`]: training without federation (`fit`, `Trainer`, pooled sites).
//! - [`progress`]: progress lines for long jobs.

pub mod clinical;
pub mod executor;
pub mod imaging_check;
pub mod mm_executor;
pub mod preprocess;
pub mod progress;
pub mod site_evaluation;
pub mod standardise;
pub mod study;
pub mod train;
