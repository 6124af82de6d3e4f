//! A site's commands that are not the federation client itself: `train` without federation. The
//! site's library code (executors, preprocessing, checks) is the `fedhcc-site` crate.

pub mod train;
