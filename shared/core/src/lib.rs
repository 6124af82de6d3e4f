//! fedhcc-core: what both the server and the client need and that carries no heavy dependency.
//!
//! - [`aggregation`]: the study's aggregation strategy settings and the FedBN local-layer rule.
//! - [`params`]: parameter sets (named f32 tensors), their fingerprint and payload codec.
//! - [`config`]: study, server, site and admin configuration (raw TOML → validated).
//! - [`privacy`]: secure aggregation and differential privacy settings (fixed point, DP round limit).
//! - [`standardisation`]: federated feature statistics (sums and counts) carried in the model.
//! - [`pki`]: the study certificate authority, site/admin certificates, revocation, and rustls
//!   configurations for both ends of a mutual-TLS connection.

pub mod aggregation;
pub mod config;
pub mod params;
pub mod pki;
pub mod privacy;
pub mod standardisation;
