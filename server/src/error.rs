//! The one error that stops the server ([`crate::run`]); a misbehaving site never causes one.

use crate::{store, strategy::StrategyError};

/// A failure that stops the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] fedhcc_core::pki::PkiError),
    #[error("the initial model does not match the checkpoints in the state folder: {0}")]
    Model(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(String),
    #[error("aggregation strategy: {0}")]
    Strategy(#[from] StrategyError),
    #[error("{0}")]
    Audit(#[from] fedhcc_secure::audit::AuditError),
}
