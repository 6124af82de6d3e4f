//! End-to-end tests: one test binary, a module per feature (ripgrep's layout). Every test runs a
//! real server (the `run(...)` future or the `fedhcc` binary) on loopback with a fresh study CA and
//! real mutual TLS.

mod admin;
mod audit;
mod boundaries;
mod cross_center;
mod dashboard;
mod docs;
mod drills;
mod evaluation;
mod frontdoor;
mod harness;
mod hostile;
mod multimodal;
mod policy;
mod process;
mod provisioning;
mod pytorch_export;
mod report;
mod rounds;
mod secagg;
mod sitedata;
mod stats;
mod strategies;
mod tls;
mod updates;
