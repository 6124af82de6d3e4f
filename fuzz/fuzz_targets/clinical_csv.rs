//! A site's `clinical.csv`, read with the postoperative study's columns (a superset of the
//! preoperative ones) and the default outcome rules: header and row problems must be values
//! (`CohortError`, row issues), never panics, whatever the bytes.
#![no_main]

use fedhcc_cohort::{Cohort, CohortSpec, OutcomeConfig};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("fedhcc-fuzz-{}-clinical.csv", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    if std::fs::write(p, data).is_err() {
        return;
    }
    for spec in [CohortSpec::hcc_postoperative(), CohortSpec::hcc_preoperative()] {
        if let Ok(report) = Cohort::load(p, &spec, &OutcomeConfig::default()) {
            let _ = report.cohort.labels();
            let _ = report.excluded_rows();
            assert!(report.cohort.len() <= report.rows_read());
        }
    }
});
