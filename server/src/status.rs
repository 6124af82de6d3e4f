//! The study lead's status view: rounds, sites, the admin state and privacy, as the `Status` RPC
//! answers it, and the same as JSON for `fedhcc status --json` and the dashboard's `/api/status`.

use crate::state::{Shared, lock};
use crate::{admin, privacy};
use fedhcc_proto as pb;

/// The status view for the study lead.
pub fn status_reply(shared: &Shared) -> pb::StatusReply {
    let (phase, current, total, attempt, selected) = {
        let c = lock(&shared.coord);
        let t = c.current_task();
        (
            c.phase().as_str().to_string(),
            c.current_round(),
            c.total_rounds(),
            t.map(|t| t.attempt).unwrap_or(0),
            t.map(|t| t.selected.clone()).unwrap_or_default(),
        )
    };
    let sites = shared
        .allowed_site_infos()
        .into_iter()
        .map(|(s, i)| pb::SiteStatus {
            selected: selected.contains(&s),
            site_id: s,
            connected: i.connections > 0,
            last_seen_unix: i.last_seen_unix,
            rounds_contributed: i.rounds_contributed,
            last_refusal: i.last_refusal,
            policy_refusal: i.policy_refusal,
        })
        .collect();
    let rounds = lock(&shared.store).rounds().unwrap_or_default();
    let rounds = rounds
        .into_iter()
        .map(|r| {
            let losses: Vec<f64> = r.losses.iter().flatten().copied().collect();
            pb::RoundSummary {
                round: r.round,
                participants: r.participants,
                total_samples: r.samples.iter().sum(),
                mean_train_loss: if losses.is_empty() {
                    f64::NAN
                } else {
                    losses.iter().sum::<f64>() / losses.len() as f64
                },
                duration_s: r.duration_s,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                checkpoint_sha256: r.checkpoint_sha256,
                secure_aggregation: r.secure_aggregation,
                epsilon: r.epsilon,
            }
        })
        .collect();
    pb::StatusReply {
        study_id: shared.study.study_id.clone(),
        run_id: shared.study.run_id.clone(),
        phase,
        current_round: current,
        total_rounds: total,
        attempt,
        sites,
        rounds,
        model_fingerprint: shared.global().map(|g| g.fingerprint().to_hex()).unwrap_or_default(),
        admin: Some(admin::admin_view(shared)),
        privacy: Some(privacy_status(shared)),
    }
}

/// The status view as JSON: what `fedhcc status --json` prints and the dashboard's `/api/status`
/// serves, so both show the same facts. A mean loss that is not a number (no site reported one)
/// is `null`.
pub fn status_json(reply: &pb::StatusReply) -> serde_json::Value {
    serde_json::json!({
        "study_id": reply.study_id, "run_id": reply.run_id, "phase": reply.phase,
        "current_round": reply.current_round, "total_rounds": reply.total_rounds, "attempt": reply.attempt,
        "model_fingerprint": reply.model_fingerprint,
        "admin": admin::admin_json(reply.admin.as_ref()),
        "privacy": privacy_status_json(reply.privacy.as_ref()),
        "sites": reply.sites.iter().map(|s| serde_json::json!({
            "site_id": s.site_id, "connected": s.connected, "last_seen_unix": s.last_seen_unix,
            "rounds_contributed": s.rounds_contributed, "last_refusal": s.last_refusal,
            "selected": s.selected, "policy_refusal": s.policy_refusal})).collect::<Vec<_>>(),
        "rounds": reply.rounds.iter().map(|r| serde_json::json!({
            "round": r.round, "participants": r.participants, "total_samples": r.total_samples,
            "mean_train_loss": if r.mean_train_loss.is_finite() { Some(r.mean_train_loss) } else { None },
            "duration_s": r.duration_s, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "checkpoint_sha256": r.checkpoint_sha256, "secure_aggregation": r.secure_aggregation,
            "epsilon": r.epsilon})).collect::<Vec<_>>(),
    })
}

/// The privacy part of the status view.
pub fn privacy_status(shared: &Shared) -> pb::PrivacyStatus {
    let f = &shared.study.federation;
    let (roster, last_abort, aborted, completed, total) = {
        let c = lock(&shared.coord);
        let roster: Vec<String> =
            c.current_task().and_then(|t| t.roster.as_ref()).map(|r| r.keys().cloned().collect()).unwrap_or_default();
        let (last, n) = c.secure_aggregation_aborts();
        (roster, last.unwrap_or_default().to_string(), n, c.completed_rounds(), c.total_rounds())
    };
    let mut p = pb::PrivacyStatus {
        secure_aggregation: f.secure_aggregation,
        roster,
        last_abort,
        aborted_attempts: aborted,
        ..Default::default()
    };
    if let Some(dp) = &f.dp {
        p.dp = true;
        p.noise_multiplier = dp.noise_multiplier;
        p.l2_clip = dp.l2_clip;
        p.delta = dp.delta;
        p.epsilon = privacy::epsilon_for_round(&shared.study, completed).unwrap_or_default();
        p.epsilon_budget = dp.epsilon_budget.unwrap_or_default();
        p.rounds_allowed = if dp.epsilon_budget.is_some() { total } else { 0 };
    }
    p
}

/// The privacy part of the status JSON (`null` fields where they do not apply).
pub fn privacy_status_json(p: Option<&pb::PrivacyStatus>) -> serde_json::Value {
    let Some(p) = p else { return serde_json::Value::Null };
    let dp = p.dp.then(|| {
        serde_json::json!({
            "noise_multiplier": p.noise_multiplier, "l2_clip": p.l2_clip, "delta": p.delta, "epsilon": p.epsilon,
            "epsilon_budget": (p.epsilon_budget > 0.0).then_some(p.epsilon_budget),
            "rounds_allowed": (p.rounds_allowed > 0).then_some(p.rounds_allowed),
        })
    });
    // Under DP every site has weight 1 (the sensitivity of the sum to one site must not grow with
    // its size): said here, never silently.
    let weighting = if p.dp { "equal" } else { "samples" };
    serde_json::json!({
        "secure_aggregation": p.secure_aggregation,
        "site_weighting": weighting,
        "roster": p.roster,
        "last_abort": (!p.last_abort.is_empty()).then_some(&p.last_abort),
        "aborted_attempts": p.aborted_attempts,
        "dp": dp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_json_leaves_out_what_does_not_apply() {
        assert!(privacy_status_json(None).is_null());
        let plain = privacy_status_json(Some(&pb::PrivacyStatus { secure_aggregation: true, ..Default::default() }));
        assert_eq!(plain["secure_aggregation"], true);
        assert!(plain["dp"].is_null() && plain["last_abort"].is_null());
        let p = pb::PrivacyStatus {
            secure_aggregation: true,
            roster: vec!["a".into(), "b".into()],
            last_abort: "r1a1: secure aggregation: c dropped out".into(),
            aborted_attempts: 1,
            dp: true,
            noise_multiplier: 1.0,
            l2_clip: 0.5,
            delta: 1e-5,
            epsilon: 4.75,
            epsilon_budget: 0.0,
            rounds_allowed: 0,
        };
        let j = privacy_status_json(Some(&p));
        assert_eq!(j["roster"], serde_json::json!(["a", "b"]));
        assert_eq!((j["aborted_attempts"].as_u64(), j["dp"]["epsilon"].as_f64()), (Some(1), Some(4.75)));
        assert!(j["dp"]["epsilon_budget"].is_null() && j["dp"]["rounds_allowed"].is_null(), "no budget: {j}");
        assert!(j["last_abort"].as_str().unwrap().contains("c dropped out"));
    }
}
