//! Fixture paths, REFERENCE.json access and tolerance assertions shared by the test modules.

use std::path::PathBuf;

use serde_json::Value;

/// Path of a file under the workspace's `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// The parsed REFERENCE.json.
pub fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("REFERENCE.json")).expect("REFERENCE.json is readable");
    serde_json::from_str(&text).expect("REFERENCE.json is valid JSON")
}

pub fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("REFERENCE.json: {key} is not a number in {v}"))
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().expect("number")).collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    f64s(v).into_iter().map(|x| x as usize).collect()
}

#[track_caller]
pub fn assert_rel(what: &str, got: f64, want: f64, rel: f64) {
    let scale = want.abs().max(1e-12);
    assert!((got - want).abs() <= rel * scale, "{what}: got {got}, reference {want} (relative tolerance {rel})");
}

#[track_caller]
pub fn assert_abs(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, reference {want} (tolerance {tol})");
}

/// Copies a fixture into `dir` and returns the copy's path.
pub fn copy_into(dir: &std::path::Path, rel: &str) -> PathBuf {
    let name = PathBuf::from(rel).file_name().expect("file name").to_owned();
    let dest = dir.join(name);
    std::fs::copy(fixture(rel), &dest).expect("fixture copies");
    dest
}
