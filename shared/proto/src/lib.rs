//! The federation protocol: generated prost messages and tonic client/server for
//! `proto/fedhcc.proto`, plus the limits both ends enforce.
//!
//! Prost types appear only here, in the server's service layer and in the client's transport layer.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedhcc.v1");
}

pub use v1::*;

/// Largest chunk of a model or update, in bytes.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Largest gRPC message either end decodes: one chunk plus framing headroom.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + 64 * 1024;
/// Largest string field accepted in a request (ids, fingerprints, hashes, metric names).
pub const MAX_STRING_LEN: usize = 256;
/// Most metrics in one report.
pub const MAX_METRICS: usize = 64;
/// Most input groups in one statistics report.
pub const MAX_STAT_GROUPS: usize = 8;
/// Most columns in one statistics group.
pub const MAX_STAT_COLUMNS: usize = 4096;
/// Protocol version announced in Join.
pub const PROTOCOL_VERSION: &str = concat!("fedhcc/", env!("CARGO_PKG_VERSION"), "/v1");

impl TaskRef {
    /// A short human-readable form: `round 3 (task r3a1)`.
    pub fn describe(&self) -> String {
        format!("round {} (task {})", self.round, self.task_id)
    }
}
