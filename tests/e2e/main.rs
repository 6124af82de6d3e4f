//! End-to-end tests: one test binary, a module per feature (ripgrep's layout). Every test runs a
//! real server (the `run(...)` future or the `fedhcc` binary) on loopback with a fresh study CA and
//! real mutual TLS.

mod audit;
mod dashboard;
mod harness;
mod multimodal;
mod process;
mod rounds;
mod sitedata;
mod stats;
mod strategies;
mod tls;
mod updates;
