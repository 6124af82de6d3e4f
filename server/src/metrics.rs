//! Prometheus metrics, written by hand in the text exposition format (version 0.0.4), served at
//! `/metrics` on the dashboard port.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `fedhcc_info{study_id,run_id}` | gauge | always 1 |
//! | `fedhcc_rounds_completed_total` | counter | rounds committed in this run (also those committed before a restart) |
//! | `fedhcc_rounds_planned` | gauge | `federation.rounds` |
//! | `fedhcc_current_round` | gauge | the round being trained (the last one once finished) |
//! | `fedhcc_phase{phase}` | gauge | 1 for the coordinator's phase, 0 for the others |
//! | `fedhcc_round_retries_total` | counter | rounds closed without being committed (retried) |
//! | `fedhcc_round_duration_seconds` | histogram | announcement to commit, per committed round |
//! | `fedhcc_aggregation_seconds` | histogram | folding the updates and writing the checkpoint |
//! | `fedhcc_received_bytes_total`, `fedhcc_sent_bytes_total` | counter | model bytes uploaded by / sent to sites |
//! | `fedhcc_connected_sites`, `fedhcc_allowed_sites` | gauge | sites with an open task stream; the allow-list |
//! | `fedhcc_refused_requests_total{reason}` | counter | refused requests, by [`RefusalReason`] |
//! | `fedhcc_declined_tasks_total` | counter | tasks sites declined under their own site policy |
//!
//! Counters start from zero when the server starts (except the rounds, which come from the store).
//! Every label value comes from a fixed list or a validated id, so the number of series is bounded.

use crate::coordinator::Phase;
use crate::state::{Shared, lock};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// Stale, future or closed task, wrong phase, another study or run, another model layout.
    Precondition,
    /// A second answer to the same task.
    Duplicate,
    /// The site was not selected for the task.
    NotSelected,
    /// A malformed request or payload (sizes, NaN/Inf, layout, missing header).
    Malformed,
    /// The payload's SHA-256 did not match its header.
    Checksum,
    /// An upload stalled.
    Timeout,
    /// A site certificate whose name is not on the allow-list, or not a site certificate.
    NotAllowed,
    /// `Status` (or the dashboard) asked for without the admin role.
    NotAdmin,
    /// A certificate of another study, or without fedhcc's subject fields.
    BadCertificate,
    /// A site joined faster than its rate limit allows ([`crate::ratelimit`]).
    RateLimited,
    /// Anything else.
    Other,
}

impl RefusalReason {
    /// Every reason, in label order.
    pub const ALL: [RefusalReason; 11] = [
        RefusalReason::BadCertificate,
        RefusalReason::Checksum,
        RefusalReason::Duplicate,
        RefusalReason::Malformed,
        RefusalReason::NotAdmin,
        RefusalReason::NotAllowed,
        RefusalReason::NotSelected,
        RefusalReason::Other,
        RefusalReason::Precondition,
        RefusalReason::RateLimited,
        RefusalReason::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Precondition => "precondition",
            RefusalReason::Duplicate => "duplicate",
            RefusalReason::NotSelected => "not_selected",
            RefusalReason::Malformed => "malformed",
            RefusalReason::Checksum => "checksum",
            RefusalReason::Timeout => "timeout",
            RefusalReason::NotAllowed => "not_allowed",
            RefusalReason::NotAdmin => "not_admin",
            RefusalReason::BadCertificate => "bad_certificate",
            RefusalReason::RateLimited => "rate_limited",
            RefusalReason::Other => "other",
        }
    }
}

/// Upper bounds (seconds) of the round-duration buckets.
pub const ROUND_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Upper bounds (seconds) of the aggregation-time buckets.
pub const AGGREGATION_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Clone, Debug, Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative); one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with the given (increasing) bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new(HistogramState { counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }) }
    }

    /// Records one observation; a non-finite one is ignored.
    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        let mut s = lock(&self.state);
        s.counts[i] += 1;
        s.sum += v;
        s.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let s = lock(&self.state).clone();
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += s.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", number(*b));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", number(s.sum));
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

/// The server's counters and histograms. Gauges (sites, round, phase) are read from the shared
/// state when `/metrics` is scraped.
#[derive(Debug)]
pub struct Metrics {
    round_duration: Histogram,
    aggregation: Histogram,
    retries: AtomicU64,
    /// Bytes of tasks already closed; the open task's are in `Shared::bytes_in` / `bytes_out`.
    bytes_in_closed: AtomicU64,
    bytes_out_closed: AtomicU64,
    refused: Mutex<BTreeMap<RefusalReason, u64>>,
    declined: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            round_duration: Histogram::new(ROUND_BUCKETS),
            aggregation: Histogram::new(AGGREGATION_BUCKETS),
            retries: AtomicU64::new(0),
            bytes_in_closed: AtomicU64::new(0),
            bytes_out_closed: AtomicU64::new(0),
            refused: Mutex::new(BTreeMap::new()),
            declined: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A round was committed after `duration_s` (announcement to commit), `aggregate_s` of which
    /// went to aggregation and the checkpoint.
    pub fn round_committed(&self, duration_s: f64, aggregate_s: f64) {
        self.round_duration.observe(duration_s);
        self.aggregation.observe(aggregate_s);
    }

    /// A round closed without being committed.
    pub fn round_retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// The bytes a task moved, when the next task replaces it.
    pub fn task_closed(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in_closed.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out_closed.fetch_add(bytes_out, Ordering::Relaxed);
    }

    /// A request was refused.
    pub fn refused(&self, reason: RefusalReason) {
        *lock(&self.refused).entry(reason).or_default() += 1;
    }

    /// A site declined a task under its own policy.
    pub fn declined(&self) {
        self.declined.fetch_add(1, Ordering::Relaxed);
    }

    /// Tasks declined by sites so far.
    pub fn declines(&self) -> u64 {
        self.declined.load(Ordering::Relaxed)
    }

    /// Refusals so far for `reason`.
    pub fn refusals(&self, reason: RefusalReason) -> u64 {
        lock(&self.refused).get(&reason).copied().unwrap_or(0)
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// A sample value as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, plain decimals otherwise).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `/metrics` page for the server's current state.
pub fn render(shared: &Shared) -> String {
    let (phase, completed, planned, current) = {
        let c = lock(&shared.coord);
        (c.phase(), c.completed_rounds(), c.total_rounds(), c.current_round())
    };
    let connected = shared.connected_sites().len();
    let m = &shared.metrics;
    let mut out = String::with_capacity(4096);
    header(&mut out, "fedhcc_info", "The study and run this server coordinates.", "gauge");
    let _ = writeln!(
        out,
        "fedhcc_info{{study_id=\"{}\",run_id=\"{}\"}} 1",
        label(&shared.study.study_id),
        label(&shared.study.run_id)
    );
    sample(&mut out, "fedhcc_rounds_completed_total", "Training rounds committed in this run.", "counter", completed);
    sample(&mut out, "fedhcc_rounds_planned", "Training rounds the study plans (federation.rounds).", "gauge", planned);
    sample(&mut out, "fedhcc_current_round", "The round being trained (the last one once finished).", "gauge", current);
    header(&mut out, "fedhcc_phase", "1 for the coordinator's current phase, 0 for the others.", "gauge");
    for p in [
        Phase::WaitingForSites,
        Phase::Statistics,
        Phase::Training,
        Phase::Aggregating,
        Phase::Evaluating,
        Phase::Finished,
    ] {
        let _ = writeln!(out, "fedhcc_phase{{phase=\"{}\"}} {}", p.as_str(), u8::from(p == phase));
    }
    sample(
        &mut out,
        "fedhcc_round_retries_total",
        "Rounds closed without being committed (too few updates, or aggregation failed); they are retried.",
        "counter",
        m.retries.load(Ordering::Relaxed),
    );
    m.round_duration.write(
        &mut out,
        "fedhcc_round_duration_seconds",
        "Seconds from a round's announcement to its commit, per committed round.",
    );
    m.aggregation.write(
        &mut out,
        "fedhcc_aggregation_seconds",
        "Seconds spent folding a round's updates into the model and writing its checkpoint.",
    );
    let bytes_in = m.bytes_in_closed.load(Ordering::Relaxed) + shared.bytes_in.load(Ordering::Relaxed);
    let bytes_out = m.bytes_out_closed.load(Ordering::Relaxed) + shared.bytes_out.load(Ordering::Relaxed);
    sample(&mut out, "fedhcc_received_bytes_total", "Model update bytes accepted from sites.", "counter", bytes_in);
    sample(&mut out, "fedhcc_sent_bytes_total", "Model bytes sent to sites.", "counter", bytes_out);
    sample(&mut out, "fedhcc_connected_sites", "Allowed sites with an open task stream.", "gauge", connected);
    sample(&mut out, "fedhcc_allowed_sites", "Sites on the allow-list.", "gauge", shared.allowed.len());
    header(&mut out, "fedhcc_refused_requests_total", "Requests refused, by reason.", "counter");
    for r in RefusalReason::ALL {
        let _ = writeln!(out, "fedhcc_refused_requests_total{{reason=\"{}\"}} {}", r.as_str(), m.refusals(r));
    }
    sample(
        &mut out,
        "fedhcc_declined_tasks_total",
        "Tasks sites declined under their own site policy.",
        "counter",
        m.declines(),
    );
    out
}

/// A checker for the Prometheus text format (0.0.4): every line is a `# HELP`/`# TYPE`
/// comment or a sample `name{label="value",…} value`; names and labels are well formed; each
/// sample belongs to a family whose TYPE came first; histograms have increasing cumulative
/// buckets ending in `+Inf` equal to `_count`. Returns (name with labels → value), labels sorted
/// and written `name{k=v,…}` without quotes. Tests use it to check `/metrics`.
///
/// # Errors
/// The first line that breaks the format, with its number.
pub fn parse_text(text: &str) -> Result<BTreeMap<String, f64>, String> {
    fn name_ok(n: &str) -> bool {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    fn value(v: &str) -> Option<f64> {
        match v {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => v.parse().ok(),
        }
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(n), _) if name_ok(n) => {}
                (Some("TYPE"), Some(n), Some(t)) if name_ok(n) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(at("unknown type"));
                    }
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        return Err(at("second TYPE for a family"));
                    }
                }
                _ => return Err(at("malformed comment")),
            }
            continue;
        }
        let (series, v) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let v = value(v).ok_or_else(|| at("value is not a number"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| at("unclosed labels"))?;
                let mut labels = BTreeMap::new();
                let mut s = body;
                while !s.is_empty() {
                    let (k, after) = s.split_once("=\"").ok_or_else(|| at("label without value"))?;
                    if !name_ok(k) || k.starts_with("__") {
                        return Err(at("bad label name"));
                    }
                    let mut val = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            None => return Err(at("unterminated label value")),
                            Some((j, '"')) => break j,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => val.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => val.push(c),
                                _ => return Err(at("bad escape")),
                            },
                            Some((_, c)) => val.push(c),
                        }
                    };
                    labels.insert(k.to_string(), val);
                    s = &after[end + 1..];
                    s = s.strip_prefix(',').unwrap_or(s);
                }
                (n, labels)
            }
        };
        if !name_ok(name) {
            return Err(at("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at("sample before its TYPE"));
        }
        if name.ends_with("_bucket") && family != name {
            let le = labels.get("le").ok_or_else(|| at("bucket without le"))?;
            buckets.entry(family.to_string()).or_default().push((value(le).ok_or_else(|| at("bad le"))?, v));
        }
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        if out.insert(key, v).is_some() {
            return Err(at("duplicate series"));
        }
    }
    for (family, b) in &buckets {
        if !b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
            return Err(format!("{family}: buckets not increasing"));
        }
        let count = out.get(&format!("{family}_count")).ok_or_else(|| format!("{family}: no _count"))?;
        match b.last() {
            Some((le, n)) if le.is_infinite() && n == count => {}
            _ => return Err(format!("{family}: last bucket must be +Inf and equal _count")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_ignore_non_finite_values() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 7.0, f64::NAN] {
            h.observe(v);
        }
        let mut s = String::new();
        h.write(&mut s, "x_seconds", "help");
        let m = parse_text(&s).unwrap();
        assert_eq!(m["x_seconds_bucket{le=1}"], 2.0);
        assert_eq!(m["x_seconds_bucket{le=2}"], 3.0);
        assert_eq!(m["x_seconds_bucket{le=+Inf}"], 4.0);
        assert_eq!((m["x_seconds_sum"], m["x_seconds_count"]), (10.0, 4.0));
    }

    #[test]
    fn the_checker_rejects_what_prometheus_rejects() {
        for bad in [
            "x 1\n",                                                 // no TYPE
            "# TYPE x counter\nx{a=\"1} 1\n",                        // unterminated
            "# TYPE x counter\nx 1\nx 2\n",                          // duplicate
            "# TYPE x counter\n1x 1\n",                              // bad name
            "# TYPE x counter\nx one\n",                             // value
            "# TYPE x gauge\n# TYPE x gauge\n",                      // second TYPE
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_count 3\n", // no +Inf
        ] {
            assert!(parse_text(bad).is_err(), "accepted: {bad}");
        }
        let ok = "# HELP x a \"quoted\" help\n# TYPE x counter\nx{a=\"q\\\"\\\\\\n\",b=\"\"} 1.5e3\n";
        assert_eq!(parse_text(ok).unwrap()["x{a=q\"\\\n,b=}"], 1500.0);
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!((number(f64::INFINITY), number(0.25), number(3.0)), ("+Inf".into(), "0.25".into(), "3".into()));
    }

    #[test]
    fn refusal_reasons_are_listed_once_in_label_order() {
        let labels: Vec<&str> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        let mut sorted = labels.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(labels, sorted);
    }
}
