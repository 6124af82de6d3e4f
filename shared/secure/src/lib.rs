//! Security building blocks for fedhcc (issue #6). No async, no burn, no network: the server and the
//! client call these around their own transport.
//!
//! - [`secagg`]: secure aggregation (pairwise X25519 + HKDF + ChaCha20 masks, fixed point modulo
//!   2^64); sites mask block by block, the server sums masked vectors and decodes only the complete sum.
//! - [`dp`]: per-site L2 clipping, Gaussian noise distributed across sites, Rényi-DP accountant.
//! - [`policy`]: the site's `[policy]` table and the check of every task against it.
//! - [`audit`]: hash-chained JSON-lines log of every message, and its verification.

#![warn(missing_docs)]

pub mod audit;
pub mod dp;
pub mod policy;
pub mod secagg;
