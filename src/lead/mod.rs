//! The study lead's and external validator's commands: the study report, the cross-center study,
//! `validate` and `export` of a model file, `admin` over the Admin RPCs, `status`, `stats`,
//! `audit verify`.

pub mod admin_cmd;
pub mod audit_cmd;
pub mod cross_center;
pub mod export;
pub mod model_file;
pub mod report;
pub mod stats_cmd;
pub mod status;
pub mod validate;
