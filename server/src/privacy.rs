//! The server's view of the study's secure aggregation and differential privacy: what is checked at
//! start (the run keeps its settings, the allow-list fits the fixed point, the ε budget caps the
//! rounds), and ε after each committed round (the privacy part of the status view is in [`crate::status`]).

use crate::ServerError;
use crate::store::Store;
use fedhcc_core::config::StudyConfig;
use fedhcc_core::privacy;

/// The settings a run must keep from its first start, as recorded in the store: `none`, or
/// `secagg(clip=…, scale=…, max_weight=…, max_sites=…)` and `dp(noise_multiplier=…, l2_clip=…,
/// delta=…)`. The ε budget is a stopping rule and may change.
///
/// # Errors
/// Unusable settings (ruled out by the study's validation at load).
pub fn describe(study: &StudyConfig) -> Result<String, ServerError> {
    let f = &study.federation;
    let Some(fp) = privacy::fixed_point(f).map_err(ServerError::Io)? else { return Ok("none".into()) };
    let mut d = format!(
        "secagg(clip={}, scale={}, max_weight={}, max_sites={})",
        fp.clip(),
        fp.scale(),
        fp.max_weight(),
        fp.max_sites()
    );
    if let Some(dp) = &f.dp {
        d.push_str(&format!(
            " + dp(noise_multiplier={}, l2_clip={}, delta={})",
            dp.noise_multiplier, dp.l2_clip, dp.delta
        ));
    }
    Ok(d)
}

/// Checks the privacy settings against the run's history and the allow-list, and returns the
/// rounds to run: the study's, or fewer when the DP budget stops training earlier.
///
/// # Errors
/// Another run's settings in the state folder, more allowed sites than one sum may hold, or
/// unusable settings.
pub fn check_at_start(study: &StudyConfig, store: &Store, allowed_sites: usize) -> Result<u32, ServerError> {
    let description = describe(study)?;
    store.check_privacy(&description)?;
    let f = &study.federation;
    if let Some(fp) = privacy::fixed_point(f).map_err(ServerError::Io)?
        && allowed_sites > fp.max_sites() as usize
    {
        return Err(ServerError::Io(format!(
            "allowed_sites lists {allowed_sites} sites, but secure aggregation is sized for at most {} in one sum; \
             raise [federation.secure_aggregation_params] max_sites in the study",
            fp.max_sites()
        )));
    }
    if f.secure_aggregation {
        tracing::info!(settings = %description, "secure aggregation: the server sees only the sum of the sites' updates");
    }
    let mut rounds = f.rounds;
    if let Some(dp) = &f.dp
        && let Some(allowed) = privacy::dp_rounds_allowed(dp).map_err(ServerError::Io)?
        && allowed < rounds
    {
        tracing::warn!(
            epsilon_budget = dp.epsilon_budget.unwrap_or_default(),
            rounds_allowed = allowed,
            rounds_planned = rounds,
            "differential privacy: the ε budget allows only {allowed} of the {rounds} rounds; training stops after \
             round {allowed}"
        );
        rounds = allowed;
    }
    Ok(rounds)
}

/// ε after committed round `round`, under DP.
pub fn epsilon_for_round(study: &StudyConfig, round: u32) -> Option<f64> {
    let dp = study.federation.dp.as_ref()?;
    match privacy::epsilon_after(dp, round) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "ε could not be computed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_a_run_keeps_name_the_fixed_point_and_the_noise() {
        let study = |extra: &str| -> StudyConfig {
            toml::from_str(&format!("study_id = \"s\"\n[federation]\nrounds = 3\n{extra}")).unwrap()
        };
        assert_eq!(describe(&study("")).unwrap(), "none");
        let d = describe(&study(
            "secure_aggregation = true\n[federation.dp]\nnoise_multiplier = 1.0\nl2_clip = 0.5\ndelta = 1e-5\n",
        ))
        .unwrap();
        assert!(d.starts_with("secagg(clip=5.5, scale=") && d.contains("max_weight=1, max_sites=64"), "{d}");
        assert!(d.ends_with(" + dp(noise_multiplier=1, l2_clip=0.5, delta=0.00001)"), "{d}");
        assert_eq!(epsilon_for_round(&study(""), 3), None);
    }
}
