//! `fedhcc status --config admin.toml [--json]`: the running server's status for the study lead
//! (the `Status` RPC, admin certificate), printed as the dashboard's JSON or as text read from it.

use anyhow::{Context, Result};
use fedhcc_core::config::load_admin;
use std::path::Path;

pub fn status(config: &Path, json: bool) -> Result<()> {
    let admin = load_admin(config)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let reply = rt.block_on(async {
        let target = fedhcc_client::ServerTarget {
            url: admin.server.clone(),
            server_name: admin.server_name.clone(),
            tls: admin.tls.clone(),
        };
        let mut c = fedhcc_client::transport::Connection::open(&target).await?;
        Ok::<_, anyhow::Error>(c.status().await?)
    })?;
    // The same JSON as the dashboard's /api/status; the text below is read from it.
    let v = fedhcc_server::status_json(&reply);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", status_text(&v));
    Ok(())
}

/// `fedhcc status` as text, from the status JSON.
fn status_text(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let num = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_default();
    let list = |v: &serde_json::Value, k: &str| -> Vec<String> {
        v[k].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Study {}  run {}  phase {}  round {}/{}",
        text(v, "study_id"),
        text(v, "run_id"),
        text(v, "phase"),
        num(v, "current_round"),
        num(v, "total_rounds")
    );
    let _ = writeln!(out, "\n{:<20} {:<10} {:>8}  last refusal", "site", "connected", "rounds");
    let sites = v["sites"].as_array().cloned().unwrap_or_default();
    for s in &sites {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8}  {}",
            text(s, "site_id"),
            if s["connected"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            num(s, "rounds_contributed"),
            text(s, "last_refusal")
        );
    }
    let declined: Vec<_> = sites.iter().filter(|s| !text(s, "policy_refusal").is_empty()).collect();
    if !declined.is_empty() {
        let _ = writeln!(out, "\nTasks declined by a site's own policy (last per site):");
        for s in declined {
            let _ = writeln!(out, "  {:<20} {}", text(s, "site_id"), text(s, "policy_refusal"));
        }
    }
    admin_text(&mut out, &v["admin"]);
    privacy_text(&mut out, &v["privacy"]);
    let _ =
        writeln!(out, "\n{:>5}  {:<28} {:>8} {:>10} {:>8}", "round", "participants", "samples", "mean loss", "seconds");
    for r in v["rounds"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:>5}  {:<28} {:>8} {:>10.4} {:>8.2}",
            num(r, "round"),
            list(r, "participants").join(","),
            num(r, "total_samples"),
            r["mean_train_loss"].as_f64().unwrap_or(f64::NAN),
            r["duration_s"].as_f64().unwrap_or_default()
        );
    }
    out
}

/// The study lead's part of `fedhcc status`: the run's control state, removed sites and the recent
/// admin actions (nothing when the server sent none).
fn admin_text(out: &mut String, a: &serde_json::Value) {
    use std::fmt::Write as _;
    if a.is_null() {
        return;
    }
    let control = a["run_control"].as_str().unwrap_or_default();
    if control != "running" {
        let _ = writeln!(out, "Run control: {}", control.replace('_', " "));
    }
    let removed: Vec<&str> = a["removed_sites"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
    if !removed.is_empty() {
        let _ = writeln!(out, "Removed from the allow-list: {}", removed.join(", "));
    }
    let actions = a["recent_actions"].as_array().cloned().unwrap_or_default();
    if !actions.is_empty() {
        let _ = writeln!(out, "\nadmin actions");
        for x in &actions {
            let unix = x["unix"].as_i64().unwrap_or_default();
            let when = chrono::DateTime::from_timestamp(unix, 0)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| unix.to_string());
            let field = |k: &str| x[k].as_str().unwrap_or_default().to_string();
            let _ = writeln!(out, "  {when}  {:<10} {:<9} {}", field("admin"), field("action"), field("detail"));
        }
    }
}

/// The status's secure aggregation and DP lines (nothing when the server sent none).
fn privacy_text(out: &mut String, p: &serde_json::Value) {
    use std::fmt::Write as _;
    if p.is_null() {
        return;
    }
    if p["secure_aggregation"].as_bool().unwrap_or(false) {
        let _ = writeln!(out, "\nSecure aggregation: on (the server sees only the sum of the sites' masked updates)");
        let roster: Vec<&str> = p["roster"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
        if !roster.is_empty() {
            let _ = writeln!(out, "  roster of the task now running: {}", roster.join(", "));
        }
        let aborted = p["aborted_attempts"].as_u64().unwrap_or_default();
        if aborted > 0 {
            let last = p["last_abort"].as_str().unwrap_or_default();
            let _ = writeln!(out, "  attempts aborted and restarted: {aborted}; last: {last}");
        }
    } else {
        let _ = writeln!(out, "\nSecure aggregation: off (updates travel in the clear over mutual TLS)");
    }
    let dp = &p["dp"];
    if !dp.is_null() {
        let f = |k: &str| dp[k].as_f64().unwrap_or_default();
        let budget = match dp["epsilon_budget"].as_f64() {
            Some(b) => format!(
                " of a budget of {b} (training stops after round {})",
                dp["rounds_allowed"].as_u64().unwrap_or_default()
            ),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "Differential privacy: ε = {:.3} (δ = {}){budget}; noise multiplier {}, L2 clip {}",
            f("epsilon"),
            f("delta"),
            f("noise_multiplier"),
            f("l2_clip")
        );
        let _ = writeln!(
            out,
            "  every site counts equally in the model under differential privacy (not by its number of patients)"
        );
    }
}
