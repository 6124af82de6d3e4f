//! Why a statistic could not be computed.

/// Why a statistic could not be computed: bad input (a value that is not a number, lengths that
/// differ) or data on which the statistic is not defined (one class only, no events). Rows are
/// numbered from 1 in the order the values were given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// A value is NaN or infinite (or otherwise out of its domain, e.g. a negative time).
    #[error("{what} in row {row} is {value}: {expected}")]
    BadValue {
        /// Which input (e.g. "score", "time").
        what: &'static str,
        /// 1-based row.
        row: usize,
        /// The offending value, as text.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// Two inputs that must be paired have different lengths.
    #[error("{what}: {got} values where {expected} were expected")]
    LengthMismatch {
        /// Which input.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length it must have.
        expected: usize,
    },
    /// The statistic is not defined on these data (the reason says why).
    #[error("{statistic} is not defined here: {reason}")]
    Undefined {
        /// Which statistic.
        statistic: &'static str,
        /// Why, in words for a reader of the report.
        reason: String,
    },
    /// A site summary was refused by the minimum-cell rule.
    #[error("{what}: group '{group}' has {count}, fewer than the minimum cell size {min_cell}")]
    SmallCell {
        /// Which summary.
        what: &'static str,
        /// The group (label class or risk group).
        group: String,
        /// Its count.
        count: u64,
        /// The site policy's minimum.
        min_cell: u64,
    },
    /// Summaries that cannot be merged (different bin counts, for example).
    #[error("cannot merge {what}: {reason}")]
    Incompatible {
        /// Which summary.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl StatsError {
    /// Shorthand for [`StatsError::Undefined`].
    pub(crate) fn undefined(statistic: &'static str, reason: impl Into<String>) -> Self {
        Self::Undefined { statistic, reason: reason.into() }
    }
}
