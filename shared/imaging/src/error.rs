//! The crate's one error type: every variant names the file or folder it is about.

use std::path::PathBuf;

/// Why an image could not be read or written.
///
/// Every variant carries the path of the file (or series folder) concerned, so that a caller reporting
/// "slide X cannot be read" and going on with the others can print the message as it is.
#[derive(Debug, thiserror::Error)]
pub enum ImagingError {
    /// The operating system refused to open, read or write the file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid file of the expected format (bad magic, impossible header values).
    #[error("{}: not a valid {format} file: {reason}", path.display())]
    InvalidFormat {
        /// The file concerned.
        path: PathBuf,
        /// The format it was read as (`NIfTI`, `DICOM`, `TIFF`).
        format: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// The file ends before the data its header promises.
    #[error("{}: file is truncated: {reason}", path.display())]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// The file is valid but uses a feature this crate does not read (a compression, a data type, a SOP class).
    #[error("{}: unsupported: {reason}", path.display())]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is unsupported and, where there is one, what to do about it.
        reason: String,
    },
    /// The slices of a DICOM series folder do not form one regular volume.
    #[error("{}: DICOM series is not a regular volume: {reason}", dir.display())]
    Series {
        /// The series folder.
        dir: PathBuf,
        /// Which slices disagree, or where a slice is missing.
        reason: String,
    },
    /// One tile (or strip) of a slide could not be decoded.
    #[error("{}: level {level}, tile {tile} (column {col}, row {row}): {reason}", path.display())]
    Tile {
        /// The slide file.
        path: PathBuf,
        /// Pyramid level (0 = full resolution).
        level: usize,
        /// Index of the tile (or strip) in the level's offset table.
        tile: usize,
        /// Tile column in the level's tile grid.
        col: usize,
        /// Tile row in the level's tile grid.
        row: usize,
        /// What went wrong.
        reason: String,
    },
    /// A request that cannot be served (a level that does not exist, a region too large, a volume whose
    /// fields disagree with each other).
    #[error("{}: invalid request: {reason}", path.display())]
    InvalidRequest {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with the request.
        reason: String,
    },
    /// The file (or folder) is readable but its content cannot be used: an empty tumour mask, a NaN voxel, a
    /// phase on another grid than its mask, two candidate files for one phase.
    #[error("{}: {reason}", path.display())]
    Unusable {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong and, where there is one, what to do about it.
        reason: String,
    },
}

impl ImagingError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, format: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidFormat { path: path.into(), format, reason: reason.into() }
    }

    pub(crate) fn truncated(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Truncated { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Unsupported { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn request(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn unusable(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Unusable { path: path.into(), reason: reason.into() }
    }
}
