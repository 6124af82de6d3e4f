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
        privacy: Some(privacy::status(shared)),
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
        "privacy": privacy::status_json(reply.privacy.as_ref()),
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
