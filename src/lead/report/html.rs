//! `report.html`: the study report as one self-contained page (inline CSS and SVG, no script, no
//! external reference), for a clinician-statistician; it prints on paper as it shows on screen.
//!
//! Size: one self-contained page (inline CSS and SVG, no script): its layout, styles and figures
//! are one template.

use super::evaluation::{EvaluationSection, Interval, PerformanceRow};
use super::{FlowSection, StudyReport};
use fedhcc_stats::binary::Proportion;
use fedhcc_stats::svg;
use std::collections::BTreeSet;
use std::fmt::Write;

const STYLE: &str = r#"
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1a1a1a;
  max-width: 1060px; margin: 0 auto; padding: 24px 28px 64px; line-height: 1.45; }
header { border-bottom: 3px solid #1f4e79; margin-bottom: 18px; }
h1 { font-size: 1.7em; margin: 0 0 4px; color: #1f4e79; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ccc; padding-bottom: 3px; color: #1f4e79; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.sub { color: #555; margin: 0 0 10px; }
nav ol { columns: 2; padding-left: 1.4em; margin: 6px 0 0; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef3f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci { color: #555; font-size: 0.86em; }
.wide { overflow-x: auto; }
.wide table { font-size: 0.8em; }
.wide th, .wide td { padding: 3px 5px; }
tr.pooled td { font-weight: bold; background: #f7f7f2; }
.headline td, .headline th { font-size: 1.05em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; }
dl.facts dt { font-weight: bold; }
dl.facts dd { margin: 0; }
figure { margin: 14px 0; display: inline-block; vertical-align: top; max-width: 100%; }
figure svg { max-width: 100%; height: auto; border: 1px solid #e2e2e2; }
figcaption { font-size: 0.88em; color: #444; max-width: 640px; }
.note { color: #6b4e00; background: #fff8e1; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 8px 0; }
.ok { color: #1b6e20; font-weight: bold; }
.bad { color: #b00020; font-weight: bold; }
.missing { color: #777; }
code { font-size: 0.9em; word-break: break-all; }
@media print { body { max-width: none; padding: 0; } h2 { break-after: avoid; } figure, table { break-inside: avoid; } }
"#;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG from `fedhcc_stats::svg`, inlined: the namespace declaration is left out, as HTML gives
/// inline `<svg>` its namespace (and the page then holds no URL at all).
fn inline_svg(svg: &str) -> String {
    svg.replacen(r#" xmlns="http://www.w3.org/2000/svg""#, r#" role="img""#, 1)
}

fn figure(out: &mut String, svg: &str, caption: &str) {
    let _ = writeln!(out, "<figure>{}<figcaption>{}</figcaption></figure>", inline_svg(svg), esc(caption));
}

fn f3(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "–".into(),
    }
}

/// An estimate over its interval (two lines, for wide tables).
fn interval_cell(v: Option<Interval>) -> String {
    match v {
        Some(Interval { estimate, ci_low: Some(lo), ci_high: Some(hi) }) => {
            format!("{estimate:.3}<br><span class=\"ci\">{lo:.3}–{hi:.3}</span>")
        }
        Some(i) => format!("{:.3}<br><span class=\"ci\">no interval</span>", i.estimate),
        None => "–".into(),
    }
}

/// A proportion with its counts over its interval (two lines).
fn proportion_cell(p: Option<Proportion>) -> String {
    match p {
        Some(p) => format!(
            "{:.3} ({}/{})<br><span class=\"ci\">{:.3}–{:.3}</span>",
            p.estimate, p.count, p.total, p.ci_low, p.ci_high
        ),
        None => "–".into(),
    }
}

/// Bytes in B, kB or MB.
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

fn interval(v: Option<Interval>) -> String {
    match v {
        Some(Interval { estimate, ci_low: Some(lo), ci_high: Some(hi) }) => {
            format!("{estimate:.3} ({lo:.3}–{hi:.3})")
        }
        Some(i) => format!("{:.3}", i.estimate),
        None => "–".into(),
    }
}

fn count(v: Option<u64>) -> String {
    v.map_or_else(|| "–".into(), |n| n.to_string())
}

fn note(out: &mut String, text: &str) {
    let _ = writeln!(out, r#"<p class="note">{}</p>"#, esc(text));
}

fn performance_rows(out: &mut String, rows: &[&PerformanceRow]) {
    out.push_str(
        "<div class=\"wide\"><table><tr><th>Site</th><th>n</th><th>Positives</th><th>Events</th><th>Cut-off</th>\
         <th>AUC<br><span class=\"ci\">95% CI</span></th><th>Sensitivity</th><th>Specificity</th><th>PPV</th>\
         <th>NPV</th><th>Brier</th><th>Calibration<br>intercept / slope</th><th>C-index</th>\
         <th>HR high vs low<br><span class=\"ci\">95% CI, p</span></th><th>Loss</th></tr>\n",
    );
    for r in rows {
        let class = if r.name == "pooled" { r#" class="pooled""# } else { "" };
        let calibration = r.calibration.map_or("–".into(), |c| format!("{:.3} / {:.3}", c.intercept, c.slope));
        let hr = r.hazard_ratio.map_or("–".into(), |h| {
            format!("{:.2}<br><span class=\"ci\">{:.2}–{:.2}, p = {:.3}</span>", h.hr, h.ci_low, h.ci_high, h.p)
        });
        let cells = [
            count(r.n),
            count(r.n_positive),
            count(r.n_events),
            f3(r.cutoff),
            interval_cell(r.auc),
            proportion_cell(r.sensitivity),
            proportion_cell(r.specificity),
            proportion_cell(r.ppv),
            proportion_cell(r.npv),
            f3(r.brier),
            calibration,
            f3(r.c_index),
            hr,
            f3(r.loss),
        ];
        let _ = write!(out, "<tr{class}><td>{}</td>", esc(&r.name));
        for c in cells {
            let _ = write!(out, "<td class=\"num\">{c}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str(
        "</table></div>\n<p class=\"ci\">Proportions: estimate (count/total) over the 95% Wilson interval. \
        HR: Cox hazard ratio of the high- against the low-risk group (recurrence-free survival).</p>\n",
    );
}

fn row_notes(out: &mut String, rows: &[&PerformanceRow]) {
    let mut items = String::new();
    for r in rows {
        for (key, why) in &r.notes {
            let _ = writeln!(items, "<li><b>{}</b>, {}: {}</li>", esc(&r.name), esc(key), esc(why));
        }
    }
    if !items.is_empty() {
        let _ =
            writeln!(out, "<details open><summary>Why some figures are missing</summary><ul>{items}</ul></details>");
    }
}

/// In words: at which cut-off the cut-off metrics and risk groups are.
fn cutoff_sentence(e: &EvaluationSection) -> String {
    let mut t = match e.cutoff {
        Some(c) => format!("Cut-off metrics and risk groups at score ≥ {c:.3}."),
        None if e.sites.iter().any(|s| s.cutoff.is_some()) => {
            "Cut-off metrics and risk groups at each site's own cut-off (Youden's on its training split, frozen \
             before its held-out patients were scored; see the table)."
                .to_owned()
        }
        None => "No cut-off: no sensitivity, specificity or risk groups.".to_owned(),
    };
    if let Some(p) = e.proposed_cutoff {
        let _ = write!(
            t,
            " Study cut-off to freeze for later evaluations and external validation: {p:.3} (the training-weighted \
             mean of the sites' cut-offs)."
        );
    }
    t
}

fn summary(out: &mut String, r: &StudyReport) {
    out.push_str("<section id=\"summary\"><h2>1. Summary</h2>\n");
    let Some(e) = &r.evaluation else {
        note(out, "The final model was not evaluated at the sites: there are no performance figures.");
        out.push_str("</section>\n");
        return;
    };
    let _ = writeln!(
        out,
        "<p>Performance of the final global model (round {}) on each site's held-out patients, computed at each \
         site; the pooled row combines the sites' summaries. {}</p>",
        e.round.map_or("?".into(), |r| r.to_string()),
        esc(&cutoff_sentence(e))
    );
    out.push_str(
        "<table class=\"headline\"><tr><th></th><th>n</th><th>AUC (95% CI)</th><th>Sensitivity</th>\
         <th>Specificity</th><th>Brier</th><th>C-index</th><th>HR high vs low (95% CI)</th></tr>\n",
    );
    for row in e.sites.iter().chain(&e.pooled) {
        let class = if row.name == "pooled" { r#" class="pooled""# } else { "" };
        let hr = row.hazard_ratio.map_or("–".into(), |h| format!("{:.2} ({:.2}–{:.2})", h.hr, h.ci_low, h.ci_high));
        let _ = writeln!(
            out,
            "<tr{class}><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&row.name),
            count(row.n),
            interval(row.auc),
            f3(row.sensitivity.map(|p| p.estimate)),
            f3(row.specificity.map(|p| p.estimate)),
            f3(row.brier),
            f3(row.c_index),
            hr
        );
    }
    out.push_str("</table>\n");
    match (&e.pooled_unavailable, &e.pooled) {
        (Some(why), _) => note(out, &format!("Pooled figures are unavailable: {why}.")),
        (None, Some(p)) if p.auc.is_none() => {
            note(out, "Some pooled figures are missing (a dash): section 4 says why for each.")
        }
        _ => {}
    }
    out.push_str("</section>\n");
}

fn study(out: &mut String, r: &StudyReport) {
    let s = &r.study;
    let unknown = || "<span class=\"missing\">not in the configuration</span>".to_owned();
    let text = |v: &Option<String>| v.as_deref().map_or_else(unknown, esc);
    out.push_str("<section id=\"study\"><h2>2. Study and run</h2>\n<dl class=\"facts\">\n");
    let mut fact = |k: &str, v: String| {
        let _ = writeln!(out, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    };
    fact("Study", text(&s.study_id));
    fact("Run", esc(&s.run_id));
    fact("Model", text(&s.model_kind));
    fact("Cohort", text(&s.cohort_preset));
    fact("Aggregation strategy", text(&s.strategy));
    fact(
        "Rounds",
        format!(
            "{} committed{}",
            s.rounds_committed,
            s.rounds_planned.map_or(String::new(), |p| format!(" of {p} planned"))
        ),
    );
    fact("Sites", if s.sites.is_empty() { "–".into() } else { esc(&s.sites.join(", ")) });
    fact(
        "Secure aggregation",
        format!(
            "{}; {} of {} committed rounds aggregated securely",
            match s.secure_aggregation {
                Some(true) => "on: the server sees only the sum of the sites' masked updates",
                Some(false) => "off: the server sees each site's update",
                None => "<span class=\"missing\">not in the configuration</span>",
            },
            s.rounds_securely_aggregated,
            s.rounds_committed
        ),
    );
    let dp = match (&s.differential_privacy, s.epsilon_spent) {
        (None, _) if s.secure_aggregation.is_none() => unknown(),
        (None, _) => "off".into(),
        (Some(settings), spent) => {
            let mut t = String::from("on: ");
            if let Some(map) = settings.as_object() {
                let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                t.push_str(&esc(&parts.join(", ")));
            } else {
                t.push_str(&esc(&settings.to_string()));
            }
            match spent {
                Some(eps) => {
                    let _ = write!(t, "; ε spent after the last round: {eps:.3}");
                }
                None => t.push_str("; ε spent: not recorded with the rounds"),
            }
            t
        }
    };
    fact("Differential privacy", dp);
    fact("Configuration", s.config.as_deref().map_or_else(unknown, |c| format!("<code>{}</code>", esc(c))));
    out.push_str(
        "</dl>\n<p>What left each hospital: model weight updates (the difference to the global model), the \
        number of training patients, and aggregate statistics (losses, AUC, counts, score histograms and survival \
        counts by risk group). No patient row, identifier, date, image or individual prediction.</p>\n</section>\n",
    );
}

fn flow(out: &mut String, flow: Option<&FlowSection>) {
    out.push_str("<section id=\"flow\"><h2>3. Participants</h2>\n");
    let Some(f) = flow else {
        note(
            out,
            "Participant flow is missing: the server holds no site's data check. Pass each site's `fedhcc data check \
             --json` output with --data-check SITE=FILE.",
        );
        out.push_str("</section>\n");
        return;
    };
    let sites: Vec<&str> = f.sites.iter().map(|s| s.site.as_str()).collect();
    let _ = write!(out, "<table><tr><th>Stage</th>");
    for s in &sites {
        let _ = write!(out, "<th>{}</th>", esc(s));
    }
    out.push_str("<th>Total</th></tr>\n");
    let mut line = |label: &str, indent: bool, cells: Vec<Option<usize>>| {
        let total: Option<usize> = cells.iter().copied().sum();
        let style = if indent { " style=\"padding-left:2em\"" } else { "" };
        let _ = write!(out, "<tr><td{style}>{}</td>", esc(label));
        for c in cells.iter().copied().chain([total]) {
            let _ = write!(out, "<td class=\"num\">{}</td>", c.map_or("–".into(), |n| n.to_string()));
        }
        out.push_str("</tr>\n");
    };
    line("Patients in clinical.csv", false, f.sites.iter().map(|s| Some(s.patients_read)).collect());
    line("Excluded rows (unusable data)", false, f.sites.iter().map(|s| Some(s.excluded_rows)).collect());
    let kinds: BTreeSet<&String> = f.sites.iter().flat_map(|s| s.exclusion_issues.keys()).collect();
    for k in kinds {
        line(
            &format!("issue: {k}"),
            true,
            f.sites.iter().map(|s| Some(s.exclusion_issues.get(k).copied().unwrap_or(0))).collect(),
        );
    }
    line("Patients loaded", false, f.sites.iter().map(|s| Some(s.patients_loaded)).collect());
    line("Without a binary label", false, f.sites.iter().map(|s| Some(s.unlabelled)).collect());
    let reasons: BTreeSet<&String> = f.sites.iter().flat_map(|s| s.unlabelled_by_reason.keys()).collect();
    for k in reasons {
        line(k, true, f.sites.iter().map(|s| Some(s.unlabelled_by_reason.get(k).copied().unwrap_or(0))).collect());
    }
    line("Labelled: aggressive recurrence (positive)", false, f.sites.iter().map(|s| Some(s.positive)).collect());
    line("Labelled: negative", false, f.sites.iter().map(|s| Some(s.negative)).collect());
    if f.sites.iter().any(|s| s.survival.is_some()) {
        line("With a survival time", false, f.sites.iter().map(|s| s.survival.map(|x| x.0)).collect());
        line("events", true, f.sites.iter().map(|s| s.survival.map(|x| x.1)).collect());
    }
    if f.sites.iter().any(|s| s.without_usable_mri.is_some()) {
        line(
            "Without a usable MRI (left out of the image model)",
            false,
            f.sites.iter().map(|s| s.without_usable_mri).collect(),
        );
    }
    line(
        "Evaluated (held-out split)",
        false,
        f.sites.iter().map(|s| s.evaluated.and_then(|n| usize::try_from(n).ok())).collect(),
    );
    out.push_str(
        "</table>\n<p>Exclusion issues count problems, not rows: one excluded row can have several. The \
        training, validation and held-out splits are drawn from the labelled patients at each site.</p>\n",
    );
    if !f.missing.is_empty() {
        note(out, &format!("No data check was given for {}.", f.missing.join(", ")));
    }
    out.push_str("</section>\n");
}

fn performance(out: &mut String, e: Option<&EvaluationSection>) {
    out.push_str("<section id=\"performance\"><h2>4. Discrimination and calibration</h2>\n");
    let Some(e) = e else {
        note(out, "No evaluation was recorded for this run.");
        out.push_str("</section>\n");
        return;
    };
    let _ = writeln!(
        out,
        "<p>Evaluation task <code>{}</code>. Source: {}.</p>",
        esc(e.task_id.as_deref().unwrap_or("?")),
        esc(&e.source)
    );
    let rows: Vec<&PerformanceRow> = e.sites.iter().chain(&e.pooled).collect();
    performance_rows(out, &rows);
    if let Some(why) = &e.pooled_unavailable {
        note(out, &format!("Pooled figures are unavailable: {why}."));
    }
    row_notes(out, &rows);
    if !e.roc.is_empty() {
        let curves: Vec<(String, &fedhcc_stats::binary::RocCurve)> = e
            .roc
            .iter()
            .map(|c| {
                let auc = rows.iter().find(|r| r.name == c.name).and_then(|r| r.auc);
                (format!("{} (AUC {})", c.name, interval(auc)), &c.curve)
            })
            .collect();
        let pooled = if e.roc.iter().any(|c| c.name == "pooled") { ", and pooled over the sites" } else { "" };
        figure(
            out,
            &svg::roc_curves(&curves),
            &format!("ROC curves of each site that sent a score histogram{pooled} (from the histograms)."),
        );
    }
    if !e.calibration.is_empty() {
        let series: Vec<(String, &[svg::CalibrationBin])> =
            e.calibration.iter().map(|c| (c.name.clone(), c.groups.as_slice())).collect();
        figure(
            out,
            &svg::calibration_series(&series),
            "Calibration: observed share of aggressive recurrence against mean predicted risk, in groups of \
             patients by predicted risk (about one per ten patients, at most ten), from the score histograms \
             (predicted risk at the bins' mid-points).",
        );
    }
    if let Some(nb) = &e.net_benefit {
        figure(
            out,
            &svg::decision_curve(nb),
            "Decision curve (pooled): net benefit of treating by the model's predicted risk against treating all and \
             treating none, over threshold probabilities.",
        );
    }
    if e.roc.is_empty() && e.calibration.is_empty() {
        note(out, "No ROC, calibration or decision curve: no site sent a score histogram.");
    }
    for n in &e.notes {
        note(out, n);
    }
    out.push_str("</section>\n");
}

fn survival(out: &mut String, e: Option<&EvaluationSection>) {
    out.push_str("<section id=\"survival\"><h2>5. Survival by predicted risk group</h2>\n");
    let outcomes = e.map(|e| e.survival.as_slice()).unwrap_or_default();
    if outcomes.is_empty() {
        note(
            out,
            "No Kaplan–Meier curves: no site sent survival counts by risk group (they come with the sites' evaluation \
             summaries).",
        );
    }
    for o in outcomes {
        let name = match o.outcome.to_ascii_lowercase().as_str() {
            "rfs" | "survival" => "Recurrence-free survival".to_owned(),
            "os" => "Overall survival".to_owned(),
            other => other.to_owned(),
        };
        let _ = writeln!(out, "<h3>{}</h3>", esc(&name));
        for n in &o.notes {
            note(out, n);
        }
        let curves = |km: &[super::evaluation::KmGroup]| -> Vec<(String, fedhcc_stats::survival::KaplanMeier)> {
            km.iter().map(|k| (k.group.clone(), k.curve.clone())).collect()
        };
        if !o.km.is_empty() {
            figure(
                out,
                &svg::kaplan_meier(&curves(&o.km), "Days since surgery", &format!("{name} by predicted risk, pooled")),
                "Kaplan–Meier curves by predicted risk group, pooled exactly from the sites' event and at-risk counts \
                 (times on the sites' grid), with 95% pointwise intervals and the numbers at risk below.",
            );
        } else {
            for site in &o.sites {
                figure(
                    out,
                    &svg::kaplan_meier(
                        &curves(&site.km),
                        "Days since surgery",
                        &format!("{name} by predicted risk, {}", site.site),
                    ),
                    &format!(
                        "Kaplan–Meier curves by predicted risk group at {} alone, from its event and at-risk counts, \
                         with 95% pointwise intervals and the numbers at risk below{}.",
                        site.site,
                        site.logrank.as_ref().map_or(String::new(), |l| format!("; log-rank p = {:.4}", l.p))
                    ),
                );
            }
        }
        let mut facts = Vec::new();
        if let Some(l) = &o.logrank {
            facts.push(format!("pooled log-rank χ² = {:.2}, df = {}, p = {:.4}", l.chi2, l.df, l.p));
        }
        if let Some(h) = &o.hazard_ratio {
            facts.push(format!(
                "pooled hazard ratio high vs low risk {:.2} (95% CI {:.2}–{:.2}), Wald p = {:.4}",
                h.hr, h.ci_low, h.ci_high, h.p
            ));
        }
        if !facts.is_empty() {
            let _ = writeln!(out, "<p>{}.</p>", esc(&facts.join("; ")));
        }
    }
    out.push_str("</section>\n");
}

fn training(out: &mut String, r: &StudyReport) {
    out.push_str("<section id=\"training\"><h2>6. Training</h2>\n");
    let t = &r.training;
    let sites: BTreeSet<&String> = t.rounds.iter().flat_map(|rr| rr.sites.iter().map(|s| &s.site)).collect();
    let mut series: Vec<(String, Vec<(f64, f64)>)> = sites
        .iter()
        .map(|site| {
            let pts = t
                .rounds
                .iter()
                .filter_map(|rr| rr.sites.iter().find(|s| &&s.site == site)?.loss.map(|l| (rr.round as f64, l)))
                .collect();
            ((*site).clone(), pts)
        })
        .collect();
    series.push((
        "weighted mean".into(),
        t.rounds.iter().filter_map(|rr| rr.weighted_loss.map(|l| (rr.round as f64, l))).collect(),
    ));
    figure(
        out,
        &svg::lines("Training loss per round", "Round", "Mean training loss", &series),
        "Mean local training loss each site reported per round, and its mean weighted by training patients.",
    );
    let eval_rounds: BTreeSet<u32> = t.evaluations.iter().map(|e| e.round).collect();
    if eval_rounds.len() > 1 {
        let eval_sites: BTreeSet<&String> = t.evaluations.iter().map(|e| &e.site).collect();
        let series: Vec<(String, Vec<(f64, f64)>)> = eval_sites
            .iter()
            .map(|site| {
                let pts = t
                    .evaluations
                    .iter()
                    .filter(|e| &&e.site == site)
                    .filter_map(|e| e.metrics.get("auc").map(|a| (e.round as f64, *a)))
                    .collect();
                ((*site).clone(), pts)
            })
            .collect();
        figure(
            out,
            &svg::lines("Held-out AUC per evaluation", "Round", "AUC", &series),
            "AUC of the global model on each site's held-out patients at every evaluation.",
        );
    }
    out.push_str(
        "<table><tr><th>Round</th><th>Attempt</th><th>Sites (training patients, loss)</th><th>Weighted loss</th>\
         <th>Failures</th><th>Duration (s)</th><th>Aggregation (s)</th><th>Received / sent</th><th>Secure aggregation</th>\
         <th>ε</th></tr>\n",
    );
    for rr in &t.rounds {
        let sites: Vec<String> =
            rr.sites.iter().map(|s| format!("{} ({}, {})", s.site, s.samples, f3(s.loss))).collect();
        let _ = writeln!(
            out,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
             <td class=\"num\">{:.2}</td><td class=\"num\">{:.3}</td><td class=\"num\">{} / {}</td>\
             <td>{}</td><td class=\"num\">{}</td></tr>",
            rr.round,
            rr.attempt,
            esc(&sites.join(", ")),
            f3(rr.weighted_loss),
            if rr.failures.is_empty() { "–".into() } else { esc(&rr.failures.join("; ")) },
            rr.duration_s,
            rr.aggregate_s,
            bytes(rr.bytes_in),
            bytes(rr.bytes_out),
            if rr.secure_aggregation { "yes" } else { "no" },
            f3(rr.epsilon)
        );
    }
    out.push_str("</table>\n</section>\n");
}

fn cross_center(out: &mut String, r: &StudyReport) {
    out.push_str("<section id=\"cross-center\"><h2>7. Cross-center matrix</h2>\n");
    match &r.cross_center {
        None => note(
            out,
            "Not run for this study: the matrix of models trained at one center (or all but one) and evaluated at \
             every center comes from the cross-center study.",
        ),
        Some(m) => {
            if let Some(n) = &m.note {
                let _ = writeln!(out, "<p>{}</p>", esc(n));
            }
            for (metric, rows) in m.matrices() {
                let columns: BTreeSet<&String> = rows.iter().flat_map(|row| row.evaluated_at.keys()).collect();
                let _ = write!(out, "<table><tr><th>Trained on \\ evaluated at ({})</th>", esc(metric));
                for c in &columns {
                    let _ = write!(out, "<th>{}</th>", esc(c));
                }
                out.push_str("</tr>\n");
                for row in rows {
                    let _ = write!(out, "<tr><th>{}</th>", esc(&row.trained_on));
                    for c in &columns {
                        let v = row.evaluated_at.get(*c).copied().flatten();
                        let _ = write!(out, "<td class=\"num\">{}</td>", f3(v));
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</table>\n");
            }
        }
    }
    out.push_str("</section>\n");
}

fn provenance(out: &mut String, r: &StudyReport) {
    let f = &r.fingerprints;
    out.push_str("<section id=\"provenance\"><h2>8. Model and data fingerprints</h2>\n<table>\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    };
    row("fedhcc version", esc(&r.fedhcc_version));
    row("Generated", esc(&r.generated_utc));
    row("Study id (recorded by the server)", f.study_id_recorded.as_deref().map_or("–".into(), esc));
    row("Run id", esc(&r.study.run_id));
    row(
        "Model layout fingerprint",
        f.model_layout.as_deref().map_or("–".into(), |v| format!("<code>{}</code>", esc(v))),
    );
    if let Some(c) = &f.final_checkpoint {
        let status = if c.verified {
            "<span class=\"ok\">verified</span>".to_owned()
        } else {
            format!("<span class=\"bad\">not verified</span>: {}", esc(c.problem.as_deref().unwrap_or("")))
        };
        row(
            &format!("Final checkpoint (round {})", c.round),
            format!("<code>{}</code><br>SHA-256 <code>{}</code> — {status}", esc(&c.file), esc(&c.sha256)),
        );
    }
    for i in &f.inputs {
        row(&i.what, format!("<code>{}</code><br>SHA-256 <code>{}</code>", esc(&i.path), esc(&i.sha256)));
    }
    out.push_str("</table>\n</section>\n");
}

fn methods(out: &mut String, r: &StudyReport) {
    out.push_str("<section id=\"notes\"><h2>9. Notes and missing items</h2>\n");
    if r.notes.is_empty() {
        out.push_str("<p>Nothing is missing.</p>\n");
    } else {
        out.push_str("<ul>\n");
        for n in &r.notes {
            let _ = writeln!(out, "<li>{}</li>", esc(n));
        }
        out.push_str("</ul>\n");
    }
    out.push_str(
        "<h3>Methods</h3>\n<p>Every statistic is computed by fedhcc-stats, checked against scikit-learn, lifelines, \
         scikit-survival and statsmodels. Site figures are computed at each site from its own held-out patients. \
         AUC: Mann–Whitney with DeLong standard error; sensitivity, specificity, PPV and NPV at the study cut-off \
         (score ≥ cut-off is test-positive) with Wilson score intervals; Brier score; calibration intercept and slope \
         by logistic recalibration; Harrell's C for recurrence-free survival. Pooled: AUC with DeLong interval, ROC, \
         calibration groups and net benefit of the binned scores from the sites' merged score histograms (scores in \
         one bin count as tied); proportions from summed counts; Brier as the mean weighted by labelled patients; \
         Kaplan–Meier (Greenwood, log(−log) intervals), log-rank test and the high-vs-low Cox hazard ratio (Efron \
         ties, Wald interval) exactly from the merged event and at-risk counts. All intervals are 95%.</p>\n</section>\n",
    );
}

/// The report page.
pub fn render(r: &StudyReport) -> String {
    let title = format!(
        "Study report: {} — run {}",
        r.study.study_id.as_deref().unwrap_or("(study id unknown)"),
        r.study.run_id
    );
    let mut out = String::with_capacity(256 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{STYLE}</style>\n\
         </head>\n<body>\n<header><h1>{}</h1><p class=\"sub\">Model {} · {} rounds · sites {} · generated {} by fedhcc {}</p>\n",
        esc(&title),
        esc(&title),
        esc(r.study.model_kind.as_deref().unwrap_or("?")),
        r.study.rounds_committed,
        esc(&r.study.sites.join(", ")),
        esc(&r.generated_utc),
        esc(&r.fedhcc_version)
    );
    out.push_str(
        "<nav><ol><li><a href=\"#summary\">Summary</a></li><li><a href=\"#study\">Study and run</a></li>\
         <li><a href=\"#flow\">Participants</a></li><li><a href=\"#performance\">Discrimination and calibration</a></li>\
         <li><a href=\"#survival\">Survival by risk group</a></li><li><a href=\"#training\">Training</a></li>\
         <li><a href=\"#cross-center\">Cross-center matrix</a></li><li><a href=\"#provenance\">Fingerprints</a></li>\
         <li><a href=\"#notes\">Notes and methods</a></li></ol></nav>\n</header>\n<main>\n",
    );
    summary(&mut out, r);
    study(&mut out, r);
    flow(&mut out, r.participant_flow.as_ref());
    performance(&mut out, r.evaluation.as_ref());
    survival(&mut out, r.evaluation.as_ref());
    training(&mut out, r);
    cross_center(&mut out, r);
    provenance(&mut out, r);
    methods(&mut out, r);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_svg_drops_the_namespace_url_and_text_is_escaped() {
        let svg = svg::lines("t", "x", "y", &[("a".into(), vec![(1.0, 1.0)])]);
        assert!(svg.contains("http://"));
        let inlined = inline_svg(&svg);
        assert!(!inlined.contains("http") && inlined.starts_with("<svg role=\"img\""));
        assert_eq!(esc("<b>&\""), "&lt;b&gt;&amp;&quot;");
        assert_eq!(interval(Some(Interval { estimate: 0.5, ci_low: None, ci_high: None })), "0.500");
        assert_eq!(f3(Some(f64::NAN)), "–");
    }
}
