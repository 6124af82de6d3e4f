//! The fatal errors of this crate. Row-level problems are not errors: they are
//! [`RowIssue`](crate::RowIssue)s collected in a [`LoadReport`](crate::LoadReport).

use std::path::PathBuf;

/// A failure that stops a whole operation (loading one file, writing one file, an invalid spec).
#[derive(Debug, thiserror::Error)]
pub enum CohortError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}; check that the file exists and is readable by this user")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The header row is unusable (duplicate or empty column name, not UTF-8).
    #[error("{path}: row 1 (header): {problem}")]
    BadHeader { path: PathBuf, problem: String },
    /// Columns the spec needs are not in the header.
    #[error(
        "{path}: row 1 (header): missing required column{} {} ({needed_for}); add {} or change the cohort spec",
        if columns.len() == 1 { "" } else { "s" },
        quoted(columns),
        if columns.len() == 1 { "it" } else { "them" }
    )]
    MissingColumns {
        path: PathBuf,
        columns: Vec<String>,
        /// What needs each missing column, e.g. "afp: feature; surgery_date: label (raw follow-up)".
        needed_for: String,
    },
    /// The file has no header or no data row.
    #[error("{path}: {problem}")]
    Empty { path: PathBuf, problem: String },
    /// The cohort spec is inconsistent (checked before any file is read).
    #[error("invalid cohort spec: {0}")]
    InvalidSpec(String),
    /// A caller passed an argument outside its documented range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Writing or checking a synthetic image failed (the message names the file).
    #[error("{0}")]
    Image(#[from] fedhcc_imaging::ImagingError),
    /// Writing a file (or renaming its temporary file into place) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn quoted(columns: &[String]) -> String {
    columns.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ")
}
