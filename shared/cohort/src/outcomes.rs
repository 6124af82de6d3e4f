//! HCC outcomes derived from raw follow-up facts (SCHEMA.md "Follow-up", DESIGN.md "The study it serves").
//!
//! Rules, with `S` = surgery date, `C` = the study cut-off and `H` = the horizon (730 days):
//!
//! - Events after `C` are not observed: a recurrence or death dated after `C` is treated as absent.
//! - Surveillance ends at `min(last_followup_date, C)`, extended to an observed recurrence dated after the
//!   last follow-up; with no `last_followup_date`, at an observed death.
//! - A recurrence on day `H` (= `S + H`) is within the horizon; the window is `[0, H]` days inclusive.
//! - Aggressive (1): first recurrence within `H` beyond Milan. Label 0: first recurrence within `H` within
//!   Milan (`early_within_milan`), first recurrence after `H` (`late_recurrence`), or no recurrence with
//!   surveillance ≥ `H` days (`recurrence_free_2y`).
//! - No recurrence and death before day `H` (`death_before_2y`): unlabelled or 0 by [`DeathPolicy`]. A death
//!   on day `H` itself counts as followed up for `H` days.
//! - No recurrence and surveillance < `H` days without death: unlabelled (`censored_before_2y`).
//! - RFS: first of recurrence or death; TTR: recurrence, censored at death or end of surveillance;
//!   OS: death from any cause. Censored ones end at the end of surveillance.
//! - Milan: one nodule ≤ 5 cm, or 2–3 nodules each ≤ 3 cm (`rec_max_diam_cm` is the largest), with no
//!   macrovascular invasion and no extrahepatic spread; an empty `rec_n_nodules` with a recurrence date means
//!   diffuse, beyond Milan. An empty `rec_macrovascular`/`rec_extrahepatic` counts as absent (the data check
//!   warns about each such recurrence: [`crate::check::RecurrenceExtentMissing`]).

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::cohort::IssueKind;

/// Study-level settings of the outcome derivation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomeConfig {
    /// Follow-up cut-off: nothing after this date is observed (study: 2024-07-30).
    pub cutoff: NaiveDate,
    /// Horizon of the binary label in days (study: 730).
    pub horizon_days: i64,
    /// What a death without recurrence before the horizon becomes.
    pub death_before_horizon: DeathPolicy,
}

impl Default for OutcomeConfig {
    fn default() -> Self {
        OutcomeConfig {
            cutoff: NaiveDate::from_ymd_opt(2024, 7, 30).unwrap_or(NaiveDate::MIN),
            horizon_days: 730,
            death_before_horizon: DeathPolicy::Exclude,
        }
    }
}

/// Label for a death without recurrence before the horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathPolicy {
    /// Unlabelled: kept for survival, excluded from the binary task.
    Exclude,
    /// Label 0.
    Negative,
}

/// Why a patient has the label they have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LabelReason {
    #[serde(rename = "aggressive")]
    Aggressive,
    #[serde(rename = "early_within_milan")]
    EarlyWithinMilan,
    #[serde(rename = "late_recurrence")]
    LateRecurrence,
    #[serde(rename = "recurrence_free_2y")]
    RecurrenceFree2y,
    #[serde(rename = "censored_before_2y")]
    CensoredBefore2y,
    #[serde(rename = "death_before_2y")]
    DeathBefore2y,
}

impl LabelReason {
    /// All reasons, in report order.
    pub const ALL: [LabelReason; 6] = [
        LabelReason::Aggressive,
        LabelReason::EarlyWithinMilan,
        LabelReason::LateRecurrence,
        LabelReason::RecurrenceFree2y,
        LabelReason::CensoredBefore2y,
        LabelReason::DeathBefore2y,
    ];

    /// The snake_case name used in CSV files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelReason::Aggressive => "aggressive",
            LabelReason::EarlyWithinMilan => "early_within_milan",
            LabelReason::LateRecurrence => "late_recurrence",
            LabelReason::RecurrenceFree2y => "recurrence_free_2y",
            LabelReason::CensoredBefore2y => "censored_before_2y",
            LabelReason::DeathBefore2y => "death_before_2y",
        }
    }

    /// Parses [`LabelReason::as_str`]'s names.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for LabelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The raw follow-up facts of one patient, as in `clinical.csv`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FollowUp {
    pub surgery_date: NaiveDate,
    pub recurrence_date: Option<NaiveDate>,
    pub rec_n_nodules: Option<u32>,
    pub rec_max_diam_cm: Option<f64>,
    pub rec_macrovascular: Option<bool>,
    pub rec_extrahepatic: Option<bool>,
    pub death_date: Option<NaiveDate>,
    pub last_followup_date: Option<NaiveDate>,
}

/// The derived outcomes of one patient. Times are whole days since surgery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub aggressive_2y: Option<u8>,
    pub label_reason: LabelReason,
    pub rfs_days: i64,
    pub rfs_event: bool,
    pub ttr_days: i64,
    pub ttr_event: bool,
    pub os_days: i64,
    pub os_event: bool,
}

/// Why a patient's follow-up cannot be turned into outcomes; the loader makes it a row issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeIssue {
    pub column: &'static str,
    pub kind: IssueKind,
    pub problem: String,
}

fn issue(column: &'static str, kind: IssueKind, problem: impl Into<String>) -> OutcomeIssue {
    OutcomeIssue { column, kind, problem: problem.into() }
}

impl FollowUp {
    /// Checks that the dates are consistent with each other and with the cut-off.
    ///
    /// # Errors
    ///
    /// The first inconsistency found, naming its column.
    pub fn validate(&self, cfg: &OutcomeConfig) -> Result<(), OutcomeIssue> {
        let s = self.surgery_date;
        if s > cfg.cutoff {
            return Err(issue(
                "surgery_date",
                IssueKind::InconsistentDates,
                format!("is after the follow-up cut-off {}", cfg.cutoff),
            ));
        }
        for (column, date) in [
            ("recurrence_date", self.recurrence_date),
            ("death_date", self.death_date),
            ("last_followup_date", self.last_followup_date),
        ] {
            if date.is_some_and(|d| d < s) {
                return Err(issue(column, IssueKind::BeforeSurgery, "is before surgery_date"));
            }
        }
        if let Some(d) = self.death_date {
            if self.recurrence_date.is_some_and(|r| r > d) {
                return Err(issue("recurrence_date", IssueKind::InconsistentDates, "is after death_date"));
            }
            if self.last_followup_date.is_some_and(|l| l > d) {
                return Err(issue("last_followup_date", IssueKind::InconsistentDates, "is after death_date"));
            }
        }
        if self.recurrence_date.is_none() {
            let details = [
                ("rec_n_nodules", self.rec_n_nodules.is_some()),
                ("rec_max_diam_cm", self.rec_max_diam_cm.is_some()),
                ("rec_macrovascular", self.rec_macrovascular == Some(true)),
                ("rec_extrahepatic", self.rec_extrahepatic == Some(true)),
            ];
            if let Some((column, _)) = details.into_iter().find(|(_, filled)| *filled) {
                return Err(issue(
                    column,
                    IssueKind::InconsistentRecurrence,
                    "describes a recurrence but recurrence_date is empty",
                ));
            }
        }
        if self.last_followup_date.is_none() && self.death_date.is_none_or(|d| d > cfg.cutoff) {
            return Err(issue(
                "last_followup_date",
                IssueKind::MissingValue,
                "is empty and there is no death_date on or before the cut-off",
            ));
        }
        Ok(())
    }

    /// Whether the first recurrence exceeds the Milan criteria.
    ///
    /// # Errors
    ///
    /// When the recurrence description cannot decide it (0 intrahepatic nodules without extrahepatic spread,
    /// or no largest diameter for 1–3 nodules).
    pub fn beyond_milan(&self) -> Result<bool, OutcomeIssue> {
        if self.rec_macrovascular == Some(true) || self.rec_extrahepatic == Some(true) {
            return Ok(true);
        }
        let n = match self.rec_n_nodules {
            None => return Ok(true), // diffuse / uncountable
            Some(0) => {
                return Err(issue(
                    "rec_n_nodules",
                    IssueKind::InconsistentRecurrence,
                    "is 0 but rec_extrahepatic is not 1: the recurrence has no site",
                ));
            }
            Some(n) if n > 3 => return Ok(true),
            Some(n) => n,
        };
        let Some(diam) = self.rec_max_diam_cm else {
            return Err(issue(
                "rec_max_diam_cm",
                IssueKind::MissingValue,
                "is empty; it is needed to decide the Milan criteria for an early recurrence",
            ));
        };
        Ok(if n == 1 { diam > 5.0 } else { diam > 3.0 })
    }

    /// Derives the outcomes (rules in the module docs).
    ///
    /// # Errors
    ///
    /// See [`FollowUp::validate`] and [`FollowUp::beyond_milan`].
    pub fn derive(&self, cfg: &OutcomeConfig) -> Result<Outcome, OutcomeIssue> {
        self.validate(cfg)?;
        let s = self.surgery_date;
        let days = |d: NaiveDate| (d - s).num_days();
        let rec = self.recurrence_date.filter(|r| *r <= cfg.cutoff);
        let death = self.death_date.filter(|d| *d <= cfg.cutoff);
        // End of surveillance; validate() guarantees last_followup_date or an observed death.
        let surveillance_end = match self.last_followup_date {
            Some(l) => l.min(cfg.cutoff).max(rec.unwrap_or(s)),
            None => death.unwrap_or(cfg.cutoff),
        };
        let (aggressive_2y, label_reason) = match (rec, death) {
            (Some(r), _) if days(r) <= cfg.horizon_days => {
                if self.beyond_milan()? {
                    (Some(1), LabelReason::Aggressive)
                } else {
                    (Some(0), LabelReason::EarlyWithinMilan)
                }
            }
            (Some(_), _) => (Some(0), LabelReason::LateRecurrence),
            (None, Some(d)) if days(d) < cfg.horizon_days => match cfg.death_before_horizon {
                DeathPolicy::Exclude => (None, LabelReason::DeathBefore2y),
                DeathPolicy::Negative => (Some(0), LabelReason::DeathBefore2y),
            },
            (None, _) if days(surveillance_end) >= cfg.horizon_days => (Some(0), LabelReason::RecurrenceFree2y),
            (None, _) => (None, LabelReason::CensoredBefore2y),
        };
        let first_event = match (rec, death) {
            (Some(r), Some(d)) => Some(r.min(d)),
            (r, d) => r.or(d),
        };
        let (rfs_days, rfs_event) = match first_event {
            Some(e) => (days(e), true),
            None => (days(surveillance_end), false),
        };
        let (ttr_days, ttr_event) = match (rec, death) {
            (Some(r), _) => (days(r), true),
            (None, Some(d)) => (days(d), false),
            (None, None) => (days(surveillance_end), false),
        };
        let (os_days, os_event) = match death {
            Some(d) => (days(d), true),
            None => (days(surveillance_end), false),
        };
        Ok(Outcome { aggressive_2y, label_reason, rfs_days, rfs_event, ttr_days, ttr_event, os_days, os_event })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("test date")
    }

    fn base() -> FollowUp {
        FollowUp {
            surgery_date: date("2018-01-01"),
            last_followup_date: Some(date("2023-01-01")),
            ..FollowUp::default()
        }
    }

    fn recurrence(days: i64, n: Option<u32>, diam: Option<f64>) -> FollowUp {
        let mut f = base();
        f.recurrence_date = Some(f.surgery_date + chrono::Duration::days(days));
        f.rec_n_nodules = n;
        f.rec_max_diam_cm = diam;
        f.rec_macrovascular = Some(false);
        f.rec_extrahepatic = Some(false);
        f
    }

    fn derive(f: &FollowUp) -> Outcome {
        f.derive(&OutcomeConfig::default()).expect("derivable")
    }

    #[test]
    fn early_recurrence_beyond_milan_is_aggressive() {
        let o = derive(&recurrence(200, Some(1), Some(6.0)));
        assert_eq!((o.aggressive_2y, o.label_reason), (Some(1), LabelReason::Aggressive));
        assert_eq!((o.rfs_days, o.rfs_event, o.ttr_days, o.ttr_event), (200, true, 200, true));
        assert_eq!((o.os_days, o.os_event), ((date("2023-01-01") - date("2018-01-01")).num_days(), false));
        for beyond in [
            recurrence(100, Some(4), Some(1.0)),
            recurrence(100, Some(2), Some(3.5)),
            recurrence(100, None, None),
            FollowUp { rec_macrovascular: Some(true), ..recurrence(100, Some(1), Some(1.0)) },
            FollowUp { rec_extrahepatic: Some(true), ..recurrence(100, Some(0), None) },
        ] {
            assert_eq!(derive(&beyond).label_reason, LabelReason::Aggressive, "{beyond:?}");
        }
    }

    #[test]
    fn early_recurrence_within_milan_is_negative() {
        for within in [recurrence(300, Some(1), Some(5.0)), recurrence(300, Some(3), Some(3.0))] {
            let o = derive(&within);
            assert_eq!((o.aggressive_2y, o.label_reason), (Some(0), LabelReason::EarlyWithinMilan));
        }
    }

    #[test]
    fn recurrence_on_day_730_is_within_the_horizon_and_day_731_is_late() {
        assert_eq!(derive(&recurrence(730, None, None)).label_reason, LabelReason::Aggressive);
        let late = derive(&recurrence(731, None, None));
        assert_eq!((late.aggressive_2y, late.label_reason), (Some(0), LabelReason::LateRecurrence));
    }

    #[test]
    fn recurrence_free_with_two_years_follow_up_is_negative() {
        let o = derive(&base());
        assert_eq!((o.aggressive_2y, o.label_reason), (Some(0), LabelReason::RecurrenceFree2y));
        assert!(!o.rfs_event && !o.os_event && !o.ttr_event);
        let exactly = FollowUp { last_followup_date: Some(date("2018-01-01") + chrono::Duration::days(730)), ..base() };
        assert_eq!(derive(&exactly).label_reason, LabelReason::RecurrenceFree2y);
    }

    #[test]
    fn short_follow_up_without_recurrence_is_unlabelled() {
        let f = FollowUp { last_followup_date: Some(date("2019-06-01")), ..base() };
        let o = derive(&f);
        assert_eq!((o.aggressive_2y, o.label_reason), (None, LabelReason::CensoredBefore2y));
        assert_eq!((o.rfs_days, o.rfs_event), ((date("2019-06-01") - date("2018-01-01")).num_days(), false));
    }

    #[test]
    fn death_before_two_years_follows_the_policy() {
        let f =
            FollowUp { death_date: Some(date("2019-01-01")), last_followup_date: Some(date("2018-12-01")), ..base() };
        let o = derive(&f);
        assert_eq!((o.aggressive_2y, o.label_reason), (None, LabelReason::DeathBefore2y));
        assert_eq!((o.rfs_days, o.rfs_event, o.os_days, o.os_event), (365, true, 365, true));
        assert_eq!((o.ttr_days, o.ttr_event), (365, false));
        let negative = OutcomeConfig { death_before_horizon: DeathPolicy::Negative, ..OutcomeConfig::default() };
        let o = f.derive(&negative).expect("derivable");
        assert_eq!((o.aggressive_2y, o.label_reason), (Some(0), LabelReason::DeathBefore2y));
    }

    #[test]
    fn death_after_recurrence_keeps_the_recurrence_label() {
        let mut f = recurrence(100, Some(1), Some(2.0));
        f.death_date = Some(date("2018-12-01"));
        f.last_followup_date = Some(date("2018-11-15"));
        let o = derive(&f);
        assert_eq!(o.label_reason, LabelReason::EarlyWithinMilan);
        assert_eq!((o.rfs_days, o.ttr_days, o.os_days, o.os_event), (100, 100, 334, true));
    }

    #[test]
    fn events_after_the_cutoff_are_not_observed() {
        let mut f = FollowUp {
            surgery_date: date("2023-01-01"),
            recurrence_date: Some(date("2024-08-15")),
            rec_n_nodules: None,
            death_date: Some(date("2024-09-01")),
            last_followup_date: Some(date("2024-09-01")),
            ..FollowUp::default()
        };
        let o = derive(&f);
        let to_cutoff = (date("2024-07-30") - date("2023-01-01")).num_days();
        assert_eq!((o.aggressive_2y, o.label_reason), (None, LabelReason::CensoredBefore2y));
        assert_eq!((o.rfs_days, o.rfs_event, o.os_days, o.os_event), (to_cutoff, false, to_cutoff, false));
        // A recurrence on the cut-off date itself is observed.
        f.recurrence_date = Some(date("2024-07-30"));
        let o = derive(&f);
        assert_eq!((o.label_reason, o.rfs_days, o.rfs_event), (LabelReason::Aggressive, to_cutoff, true));
        // A long-followed patient whose recurrence is after the cut-off is recurrence-free at 2 years.
        let old = FollowUp {
            surgery_date: date("2015-01-01"),
            recurrence_date: Some(date("2024-12-01")),
            last_followup_date: Some(date("2025-01-01")),
            ..FollowUp::default()
        };
        let o = derive(&old);
        assert_eq!((o.label_reason, o.rfs_event), (LabelReason::RecurrenceFree2y, false));
        assert_eq!(o.rfs_days, (date("2024-07-30") - date("2015-01-01")).num_days());
    }

    #[test]
    fn inconsistent_follow_up_names_the_column() {
        let cfg = OutcomeConfig::default();
        let before = FollowUp { recurrence_date: Some(date("2017-12-31")), ..base() };
        assert_eq!(before.derive(&cfg).expect_err("before surgery").column, "recurrence_date");
        let after_death = FollowUp {
            death_date: Some(date("2019-01-01")),
            last_followup_date: Some(date("2019-01-01")),
            ..recurrence(400, Some(1), Some(1.0))
        };
        assert_eq!(after_death.derive(&cfg).expect_err("after death").kind, IssueKind::InconsistentDates);
        let no_diam = recurrence(100, Some(2), None);
        assert_eq!(no_diam.derive(&cfg).expect_err("no diameter").column, "rec_max_diam_cm");
        // The diameter is not needed for a late recurrence.
        assert!(recurrence(900, Some(2), None).derive(&cfg).is_ok());
        let no_contact = FollowUp { last_followup_date: None, ..base() };
        assert_eq!(no_contact.derive(&cfg).expect_err("no follow-up").column, "last_followup_date");
        let details_without_date = FollowUp { rec_n_nodules: Some(2), ..base() };
        assert_eq!(details_without_date.derive(&cfg).expect_err("details").kind, IssueKind::InconsistentRecurrence);
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let cfg: OutcomeConfig = toml::from_str("death_before_horizon = \"negative\"").expect("parses");
        assert_eq!(cfg.cutoff, date("2024-07-30"));
        assert_eq!((cfg.horizon_days, cfg.death_before_horizon), (730, DeathPolicy::Negative));
        let cfg: OutcomeConfig = toml::from_str("cutoff = \"2020-01-31\"\nhorizon_days = 365").expect("parses");
        assert_eq!((cfg.cutoff, cfg.horizon_days), (date("2020-01-31"), 365));
        assert!(toml::from_str::<OutcomeConfig>("horizon = 1").is_err());
    }

    #[test]
    fn label_reasons_serialize_snake_case() {
        let names: Vec<String> =
            LabelReason::ALL.iter().map(|r| serde_json::to_string(r).expect("serializes")).collect();
        assert_eq!(
            names,
            [
                "\"aggressive\"",
                "\"early_within_milan\"",
                "\"late_recurrence\"",
                "\"recurrence_free_2y\"",
                "\"censored_before_2y\"",
                "\"death_before_2y\""
            ]
        );
        for r in LabelReason::ALL {
            assert_eq!(LabelReason::parse(r.as_str()), Some(r));
        }
    }
}
