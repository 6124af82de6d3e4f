//! The dashboard's cross-center panel: `<state_dir>/cross-center.json`, read on each refresh when it
//! is there.
//!
//! The format is the one `fedhcc report` reads (see `src/lead/report.rs`): `{"metric": "auc", "rows":
//! [{"trained_on": "center_a", "evaluated_at": {"center_a": 0.71, "center_b": null}}, …], "note":
//! "…"}` (`null`: not evaluated), with an optional `"secondary"` list of further matrices in the same
//! shape (`{"metric": "c_index_rfs", "rows": […], "note": "…"}`). The file holds aggregate metrics
//! only. One that cannot be read or is not in this shape gives no panel (`null`) and one warning in
//! the server log per problem, never an error on the page or a stopped server.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file's name in the server's state folder.
pub const FILE_NAME: &str = "cross-center.json";
/// The largest file read (bytes); a larger one is refused with a warning.
pub const MAX_BYTES: u64 = 1 << 20;

/// One matrix: a metric of each model (row) at each evaluating site (column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenterMatrix {
    /// The metric in the cells (e.g. `auc`, `c_index_rfs`).
    pub metric: String,
    /// One row per training setting.
    pub rows: Vec<CrossCenterRow>,
    /// What the matrix is (e.g. local-only models, leave-one-center-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One row: what the model was trained on and its metric at each site (`None`: not evaluated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenterRow {
    /// A site, `federated`, `central`, `all but center_b`, …
    pub trained_on: String,
    /// The metric at each evaluating site.
    pub evaluated_at: BTreeMap<String, Option<f64>>,
}

/// `cross-center.json`: the main matrix and any further ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCenterFile {
    /// The main matrix's metric.
    pub metric: String,
    /// The main matrix's rows.
    pub rows: Vec<CrossCenterRow>,
    /// What the main matrix is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Further matrices (other metrics), in the order given.
    #[serde(default)]
    pub secondary: Vec<CrossCenterMatrix>,
}

const SHAPE: &str = "{\"metric\": \"auc\", \"rows\": [{\"trained_on\": \"center_a\", \"evaluated_at\": \
                     {\"center_a\": 0.71, \"center_b\": null}}], \"note\": \"…\", \"secondary\": [optional \
                     matrices of the same shape]}";

/// Reads `path`: `Ok(None)` when there is no such file, the matrices when it is one, and an
/// explanation naming the file otherwise (unreadable, larger than [`MAX_BYTES`], not this shape).
///
/// # Errors
/// As described; the message is written for the server's log.
pub fn read(path: &Path) -> Result<Option<CrossCenterFile>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!(
            "{} is larger than {} KiB; a cross-center matrix is far smaller",
            path.display(),
            MAX_BYTES >> 10
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{} is not a cross-center matrix ({e}); expected {SHAPE}", path.display()))
}

/// The problem last logged per file, so each is logged once (and again after the file was fixed).
pub(super) static WARNED: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());

/// The `cross_center` value of the dashboard JSON for the state folder `state_dir`: the file's
/// matrices, or `null` when it is absent or unusable (logged once per problem).
pub fn dashboard_value(state_dir: &Path) -> serde_json::Value {
    let path = state_dir.join(FILE_NAME);
    let result = read(&path);
    let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match result {
        Ok(Some(file)) => {
            warned.remove(&path);
            serde_json::to_value(&file).unwrap_or(serde_json::Value::Null)
        }
        Ok(None) => {
            warned.remove(&path);
            serde_json::Value::Null
        }
        Err(problem) => {
            if warned.get(&path) != Some(&problem) {
                tracing::warn!(%problem, "dashboard: the cross-center panel stays empty until the file is fixed");
                warned.insert(path, problem);
            }
            serde_json::Value::Null
        }
    }
}
