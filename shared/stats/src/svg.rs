//! Plots as standalone SVG text (no script, no external font: the generic `sans-serif` family), small
//! enough to embed in an HTML report: ROC curve, Kaplan–Meier curves with numbers at risk, calibration
//! plot, decision curve; overlays of several sites (`roc_curves`, `calibration_series`) and a line chart
//! (`lines`, e.g. training curves).

use crate::binary::{NetBenefit, RocCurve};
use crate::survival::KaplanMeier;
use std::fmt::Write;

const WIDTH: f64 = 640.0;
const PLOT_HEIGHT: f64 = 420.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"];

/// Escapes text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Round tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    mag * if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn ticks(lo: f64, hi: f64, target: f64) -> Vec<f64> {
    ticks_at_least(lo, hi, target, 0.0)
}

/// [`ticks`] with a step of at least `min_step` (1 for counts such as rounds).
fn ticks_at_least(lo: f64, hi: f64, target: f64, min_step: f64) -> Vec<f64> {
    let step = tick_step(hi - lo, target).max(min_step);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn fmt_tick(v: f64) -> String {
    let s = format!("{:.3}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// A plotting frame: data ranges mapped to the plot area, with axes drawn.
struct Frame {
    svg: String,
    x: (f64, f64),
    y: (f64, f64),
    height: f64,
}

impl Frame {
    /// Starts an SVG of `extra` pixels below the plot (tables), with title, axes, ticks and labels.
    fn new(title: &str, x_label: &str, y_label: &str, x: (f64, f64), y: (f64, f64), extra: f64) -> Self {
        Self::with_x_step(title, x_label, y_label, x, y, extra, 0.0)
    }

    /// [`Frame::new`] with x ticks at least `min_x_step` apart.
    fn with_x_step(
        title: &str,
        x_label: &str,
        y_label: &str,
        x: (f64, f64),
        y: (f64, f64),
        extra: f64,
        min_x_step: f64,
    ) -> Self {
        let height = TOP + PLOT_HEIGHT + BOTTOM + extra;
        let mut f = Frame { svg: String::new(), x, y, height };
        let _ = write!(
            f.svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
"#,
            WIDTH / 2.0,
            escape(title)
        );
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, TOP + PLOT_HEIGHT);
        for t in ticks_at_least(x.0, x.1, 6.0, min_x_step) {
            let px = f.px(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{y1}" stroke="#e5e5e5"/><line x1="{px:.1}" y1="{y1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y1 + 5.0,
                y1 + 18.0,
                fmt_tick(t)
            );
        }
        for t in ticks(y.0, y.1, 6.0) {
            let py = f.py(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#e5e5e5"/><line x1="{:.1}" y1="{py:.1}" x2="{x0}" y2="{py:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 5.0,
                x0 - 8.0,
                py + 4.0,
                fmt_tick(t)
            );
        }
        let _ = writeln!(
            f.svg,
            r#"<rect x="{x0}" y="{y0}" width="{}" height="{PLOT_HEIGHT}" fill="none" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            x1 - x0,
            (x0 + x1) / 2.0,
            y1 + 40.0,
            escape(x_label),
            (y0 + y1) / 2.0,
            escape(y_label)
        );
        f
    }

    fn px(&self, v: f64) -> f64 {
        LEFT + (v - self.x.0) / (self.x.1 - self.x.0) * (WIDTH - LEFT - RIGHT)
    }

    fn py(&self, v: f64) -> f64 {
        let v = v.clamp(self.y.0, self.y.1);
        TOP + PLOT_HEIGHT - (v - self.y.0) / (self.y.1 - self.y.0) * PLOT_HEIGHT
    }

    fn polyline(&mut self, points: &[(f64, f64)], color: &str, dashed: bool, width: f64) {
        let pts: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y))).collect();
        let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            self.svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}"{dash}/>"#,
            pts.join(" ")
        );
    }

    fn polygon(&mut self, points: &[(f64, f64)], color: &str, opacity: f64) {
        let pts: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y))).collect();
        let _ = writeln!(
            self.svg,
            r#"<polygon points="{}" fill="{color}" fill-opacity="{opacity}" stroke="none"/>"#,
            pts.join(" ")
        );
    }

    /// Legend in the given corner of the plot area (`bottom_right` or top right).
    fn legend(&mut self, entries: &[(String, &str, bool)], bottom_right: bool) {
        let line_h = 18.0;
        // About 7 px per character at 12 px sans-serif, plus the line sample.
        let chars = entries.iter().map(|(l, _, _)| l.chars().count()).max().unwrap_or(0);
        let box_w = (chars as f64 * 7.0 + 44.0).max(120.0);
        let x = WIDTH - RIGHT - box_w - 4.0;
        let mut y = if bottom_right { TOP + PLOT_HEIGHT - 10.0 - line_h * entries.len() as f64 } else { TOP + 10.0 };
        let _ = writeln!(
            self.svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{box_w:.1}" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#999"/>"##,
            x - 6.0,
            y - 4.0,
            line_h * entries.len() as f64 + 6.0
        );
        for (label, color, dashed) in entries {
            let dash = if *dashed { r#" stroke-dasharray="6 4""# } else { "" };
            let _ = writeln!(
                self.svg,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                y + 8.0,
                x + 24.0,
                y + 8.0,
                x + 30.0,
                y + 12.0,
                escape(label)
            );
            y += line_h;
        }
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, text: &str) {
        let _ = writeln!(self.svg, r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{}</text>"#, escape(text));
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// ROC curve with the chance diagonal; `auc` (with its interval) goes into the legend.
pub fn roc(curve: &RocCurve, auc_label: &str) -> String {
    roc_plot("ROC curve", &[(auc_label.to_owned(), curve)])
}

/// Kaplan–Meier curves (steps) with shaded confidence bands, censoring marks, and the numbers at risk
/// below the plot at each x tick.
pub fn kaplan_meier(curves: &[(String, KaplanMeier)], time_label: &str, subtitle: &str) -> String {
    let t_max = curves.iter().filter_map(|(_, km)| km.time.last().copied()).fold(0.0_f64, f64::max).max(1.0);
    let row_h = 18.0;
    let extra = 28.0 + row_h * curves.len() as f64;
    let title = if subtitle.is_empty() { "Kaplan–Meier".to_owned() } else { format!("Kaplan–Meier: {subtitle}") };
    let mut f = Frame::new(&title, time_label, "Survival probability", (0.0, t_max), (0.0, 1.0), extra);
    let mut legend = Vec::new();
    for (k, (name, km)) in curves.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut upper = Vec::new();
        let mut lower = Vec::new();
        let mut line = Vec::new();
        for i in 0..km.time.len() {
            let next = km.time.get(i + 1).copied().unwrap_or(km.time[i]);
            line.push((km.time[i], km.survival[i]));
            line.push((next, km.survival[i]));
            upper.push((km.time[i], km.ci_high[i]));
            upper.push((next, km.ci_high[i]));
            lower.push((km.time[i], km.ci_low[i]));
            lower.push((next, km.ci_low[i]));
        }
        lower.reverse();
        upper.extend(lower);
        f.polygon(&upper, color, 0.15);
        f.polyline(&line, color, false, 2.0);
        for i in 0..km.time.len() {
            if km.censored[i] > 0 {
                let (x, y) = (f.px(km.time[i]), f.py(km.survival[i]));
                let _ = writeln!(
                    f.svg,
                    r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}"/>"#,
                    y - 4.0,
                    y + 4.0
                );
            }
        }
        legend.push((format!("{name} (n = {})", km.at_risk.first().copied().unwrap_or(0)), color, false));
    }
    f.legend(&legend, false);
    let table_top = TOP + PLOT_HEIGHT + BOTTOM;
    f.text(8.0, table_top + 4.0, "start", "Number at risk");
    for (k, (name, km)) in curves.iter().enumerate() {
        let y = table_top + 22.0 + row_h * k as f64;
        let short: String = name.chars().take(8).collect();
        f.text(8.0, y, "start", &short);
        for t in ticks(0.0, t_max, 6.0) {
            let n = km.time.iter().position(|s| *s >= t).map_or(0, |i| km.at_risk[i]);
            let x = f.px(t);
            f.text(x, y, "middle", &n.to_string());
        }
    }
    let _ = f.height;
    f.finish()
}

/// One point of a calibration plot: a group of patients by predicted risk.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CalibrationBin {
    /// Mean predicted probability in the group.
    pub predicted: f64,
    /// Observed share of positives in the group.
    pub observed: f64,
    /// Patients in the group.
    pub n: usize,
}

/// Calibration plot: observed against predicted risk per group, with the ideal diagonal; `label`
/// (intercept and slope) goes into the legend.
pub fn calibration(bins: &[CalibrationBin], label: &str) -> String {
    let mut f = Frame::new("Calibration", "Predicted probability", "Observed proportion", (0.0, 1.0), (0.0, 1.0), 0.0);
    f.polyline(&[(0.0, 0.0), (1.0, 1.0)], "#999999", true, 1.0);
    let pts: Vec<(f64, f64)> = bins.iter().map(|b| (b.predicted, b.observed)).collect();
    f.polyline(&pts, COLORS[0], false, 1.5);
    for b in bins {
        let (x, y) = (f.px(b.predicted), f.py(b.observed));
        let _ = writeln!(f.svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{}"/>"#, COLORS[0]);
    }
    f.legend(&[(label.to_owned(), COLORS[0], false), ("ideal".into(), "#999999", true)], true);
    f.finish()
}

/// Decision curve: net benefit of the model, of treating all and of treating none.
pub fn decision_curve(points: &[NetBenefit]) -> String {
    let top = points.iter().map(|p| p.model.max(p.treat_all)).fold(0.01_f64, f64::max);
    // A little room below zero, as decision curves are usually drawn: treat-all falls off below it.
    let bottom = (-top / 2.0).clamp(-0.05, -0.01);
    let x_max = points.last().map_or(1.0, |p| p.threshold);
    let mut f = Frame::new(
        "Decision curve",
        "Threshold probability",
        "Net benefit",
        (0.0, x_max.max(0.1)),
        (bottom, top * 1.05),
        0.0,
    );
    let model: Vec<(f64, f64)> = points.iter().map(|p| (p.threshold, p.model)).collect();
    // Treat-all is drawn until it falls below the plot.
    let all: Vec<(f64, f64)> =
        points.iter().take_while(|p| p.treat_all >= bottom).map(|p| (p.threshold, p.treat_all)).collect();
    f.polyline(&[(0.0, 0.0), (x_max, 0.0)], "#555555", true, 1.0);
    if !all.is_empty() {
        f.polyline(&all, COLORS[1], false, 1.5);
    }
    f.polyline(&model, COLORS[0], false, 2.0);
    f.legend(
        &[
            ("model".into(), COLORS[0], false),
            ("treat all".into(), COLORS[1], false),
            ("treat none".into(), "#555555", true),
        ],
        false,
    );
    f.finish()
}

/// ROC curves of several sets of predictions on one plot (e.g. each site and the pooled curve), with
/// the chance diagonal; each entry is (legend label, curve).
pub fn roc_curves(curves: &[(String, &RocCurve)]) -> String {
    roc_plot("ROC curves", curves)
}

/// ROC curves under `title`, each in the next colour, with the chance diagonal.
fn roc_plot(title: &str, curves: &[(String, &RocCurve)]) -> String {
    let mut f = Frame::new(
        title,
        "1 − specificity (false-positive rate)",
        "Sensitivity (true-positive rate)",
        (0.0, 1.0),
        (0.0, 1.0),
        0.0,
    );
    f.polyline(&[(0.0, 0.0), (1.0, 1.0)], "#999999", true, 1.0);
    let mut legend = Vec::new();
    for (k, (label, curve)) in curves.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = curve.fpr.iter().copied().zip(curve.tpr.iter().copied()).collect();
        f.polyline(&pts, color, false, 2.0);
        legend.push((label.clone(), color, false));
    }
    legend.push(("chance".into(), "#999999", true));
    f.legend(&legend, true);
    f.finish()
}

/// Calibration plot of several sets of predictions (e.g. each site and pooled): observed against
/// predicted risk per group, with the ideal diagonal; each entry is (legend label, groups).
pub fn calibration_series(series: &[(String, &[CalibrationBin])]) -> String {
    let mut f = Frame::new("Calibration", "Predicted probability", "Observed proportion", (0.0, 1.0), (0.0, 1.0), 0.0);
    f.polyline(&[(0.0, 0.0), (1.0, 1.0)], "#999999", true, 1.0);
    let mut legend = Vec::new();
    for (k, (label, bins)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = bins.iter().map(|b| (b.predicted, b.observed)).collect();
        f.polyline(&pts, color, false, 1.5);
        for b in bins.iter() {
            let (x, y) = (f.px(b.predicted), f.py(b.observed));
            let _ = writeln!(f.svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#);
        }
        legend.push((label.clone(), color, false));
    }
    legend.push(("ideal".into(), "#999999", true));
    f.legend(&legend, true);
    f.finish()
}

/// Line chart with a marker at every point (e.g. training loss per round, one line per site); the y
/// range covers the data with a margin. A series with no point is left out; with no point at all the
/// plot says so.
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let points = || series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let margin = ((y1 - y0) * 0.08).max(1e-3 * y1.abs().max(1.0));
    // Whole-number x values (rounds) get whole-number ticks.
    let whole = points().all(|(x, _)| x.fract() == 0.0);
    let min_step = if whole { 1.0 } else { 0.0 };
    let mut f = Frame::with_x_step(title, x_label, y_label, (x0, x1), (y0 - margin, y1 + margin), 0.0, min_step);
    if points().next().is_none() {
        f.text(WIDTH / 2.0, TOP + PLOT_HEIGHT / 2.0, "middle", "no data");
        return f.finish();
    }
    let mut legend = Vec::new();
    for (k, (label, pts)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[k % COLORS.len()];
        f.polyline(&pts, color, false, 2.0);
        for &(x, y) in &pts {
            let (px, py) = (f.px(x), f.py(y));
            let _ = writeln!(f.svg, r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#);
        }
        legend.push((label.clone(), color, false));
    }
    f.legend(&legend, false);
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 1.0, 6.0), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(ticks(0.0, 1022.0, 5.0), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        assert_eq!(ticks(0.0, 52.0, 8.0), vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0]);
        assert_eq!(fmt_tick(0.6000000000000001), "0.6");
    }

    #[test]
    fn labels_are_escaped() {
        let svg = calibration(&[], "a < b & c");
        assert!(svg.contains("a &lt; b &amp; c"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn overlays_draw_one_line_per_series_and_survive_empty_input() {
        let curve = RocCurve { fpr: vec![0.0, 0.5, 1.0], tpr: vec![0.0, 0.8, 1.0], threshold: vec![] };
        let svg = roc_curves(&[("site <a>".into(), &curve), ("pooled".into(), &curve)]);
        assert_eq!(svg.matches("<polyline").count(), 3, "diagonal + 2 curves");
        assert!(svg.contains("site &lt;a&gt;"));
        let bins = [CalibrationBin { predicted: 0.2, observed: 0.1, n: 5 }];
        assert_eq!(calibration_series(&[("a".into(), &bins[..])]).matches("<circle").count(), 1);
        let chart = lines("Loss", "round", "loss", &[("a".into(), vec![(1.0, 0.7), (2.0, f64::NAN), (3.0, 0.5)])]);
        assert_eq!(chart.matches("<circle").count(), 2, "non-finite points are left out");
        let rounds = lines("Loss", "round", "loss", &[("a".into(), vec![(1.0, 0.7), (3.0, 0.5)])]);
        assert!(!rounds.contains(">1.5<") && rounds.contains(">2<"), "whole rounds get whole ticks");
        let empty = lines("Loss", "round", "loss", &[("a".into(), vec![])]);
        assert!(empty.contains("no data") && empty.ends_with("</svg>\n"));
    }
}
