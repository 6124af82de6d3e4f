//! Developer and evaluation tools: `bench` (training, strategies, drills, round overhead), `demo`,
//! and the in-process federation both run (`simulation`).

pub mod bench;
pub mod demo;
pub mod simulation;
