//! Integration tests of fedhcc-cohort: loading real and hand-made CSVs, the synthetic cohort, the design
//! matrix and the data check, through the public API only.

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use fedhcc_cohort::synth::{self, SynthCohort};
use fedhcc_cohort::{
    Cohort, CohortError, CohortSpec, DataCheck, DesignMatrix, FeatureKind, FeatureSpec, FeatureStats, Finding,
    IssueKind, LabelReason, LabelSpec, LoadReport, OutcomeConfig, Severity, Splits, SurvivalSpec, design_width,
};

const LUNG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/clinical/lung_multi_institution.csv");

fn cutoff() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 7, 30).expect("valid date")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test csv");
    path
}

fn load(path: &Path, spec: &CohortSpec) -> LoadReport {
    Cohort::load(path, spec, &OutcomeConfig::default()).expect("loads")
}

mod hand_made {
    use super::*;

    fn small_spec() -> CohortSpec {
        CohortSpec {
            features: vec![
                FeatureSpec { column: "afp".into(), kind: FeatureKind::Numeric { log: true } },
                FeatureSpec { column: "cirrhosis".into(), kind: FeatureKind::Binary },
                FeatureSpec {
                    column: "bclc_stage".into(),
                    kind: FeatureKind::Categorical { levels: vec!["0".into(), "A".into()] },
                },
            ],
            label: LabelSpec::AggressiveRecurrence,
            survival: Some(SurvivalSpec { time_column: "rfs_days".into(), event_column: "rfs_event".into() }),
            id_column: None,
        }
    }

    const HEADER: &str = "patient_id,afp,cirrhosis,bclc_stage,surgery_date,recurrence_date,rec_n_nodules,\
                          rec_max_diam_cm,rec_macrovascular,rec_extrahepatic,death_date,last_followup_date,extra";

    /// One valid row per label reason, then one bad row per problem kind.
    fn csv_text() -> String {
        [
            HEADER,
            "P01,12.5,1,A,2018-01-01,2018-06-01,,,0,0,,2020-05-01,x", // 2 aggressive (diffuse)
            "P02,3,0,0,2018-01-01,2018-06-01,1,2.0,0,0,,2023-05-01,x", // 3 early within Milan
            "P03,,1,A,2018-01-01,2021-01-01,2,1.5,0,0,,2023-05-01,",  // 4 late recurrence
            "P04,8,,A,2018-01-01,,,,,,,2023-05-01,",                  // 5 recurrence free
            "P05,8,0,,2018-01-01,,,,,,,2019-01-01,",                  // 6 censored before 2y
            "P06,8,0,A,2018-01-01,,,,,,2019-03-01,2019-02-01,",       // 7 death before 2y
            "P07,abc,0,A,2018-01-01,,,,,,,2023-05-01,",               // 8 wrong type
            "P08,8,0,A,2023-02-30,,,,,,,2023-05-01,",                 // 9 impossible date
            "P09,8,0,A,2018-01-01,2017-06-01,1,1.0,0,0,,2023-05-01,", // 10 recurrence before surgery
            "P10,8,0,B,2018-01-01,,,,,,,2023-05-01,",                 // 11 unknown level
            "P01,8,0,A,2018-01-01,,,,,,,2023-05-01,",                 // 12 duplicate id
            "P12,8,2,A,2018-01-01,,,,,,,2023-05-01,",                 // 13 not 0/1
            "P13,8,0,A,2018-01-01,,,,,,",                             // 14 too few fields
            "P14,-1,0,A,2018-01-01,,,,,,,2023-05-01,",                // 15 negative log feature
            "P15,8,0,A,2018-01-01,,,,,,2017-01-01,2023-05-01,",       // 16 death before surgery
        ]
        .join("\n")
            + "\n"
    }

    fn issue_at(report: &LoadReport, row: usize) -> (&str, IssueKind) {
        let issue = report.issues.iter().find(|i| i.row == row).unwrap_or_else(|| panic!("no issue at row {row}"));
        (issue.column.as_str(), issue.kind)
    }

    #[test]
    fn bad_rows_are_reported_by_row_and_column_and_the_rest_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "clinical.csv", &csv_text());
        let report = load(&path, &small_spec());
        let ids: Vec<&str> = report.cohort.patients.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["P01", "P02", "P03", "P04", "P05", "P06"]);
        assert_eq!(issue_at(&report, 8), ("afp", IssueKind::NotANumber));
        assert_eq!(issue_at(&report, 9), ("surgery_date", IssueKind::InvalidDate));
        assert_eq!(issue_at(&report, 10), ("recurrence_date", IssueKind::BeforeSurgery));
        assert_eq!(issue_at(&report, 11), ("bclc_stage", IssueKind::UnknownLevel));
        assert_eq!(issue_at(&report, 12), ("patient_id", IssueKind::DuplicateId));
        assert_eq!(issue_at(&report, 13), ("cirrhosis", IssueKind::NotZeroOne));
        assert_eq!(issue_at(&report, 14), ("*", IssueKind::MalformedRow));
        assert_eq!(issue_at(&report, 15), ("afp", IssueKind::Negative));
        assert_eq!(issue_at(&report, 16), ("death_date", IssueKind::BeforeSurgery));
        assert_eq!(report.excluded_rows(), (8..=16).collect::<Vec<_>>());
        assert_eq!(report.rows_read(), 15);
        let message = report.issues[0].to_string();
        assert_eq!(message, "row 8, column afp (patient P07): 'abc' is not a number");
        let dup = report.issues.iter().find(|i| i.row == 12).expect("duplicate");
        assert!(dup.problem.contains("row 2"), "{}", dup.problem);
    }

    #[test]
    fn derives_every_label_reason_from_raw_follow_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "clinical.csv", &csv_text());
        let cohort = load(&path, &small_spec()).cohort;
        let got: Vec<(Option<u8>, Option<LabelReason>)> =
            cohort.patients.iter().map(|p| (p.label, p.label_reason)).collect();
        assert_eq!(
            got,
            [
                (Some(1), Some(LabelReason::Aggressive)),
                (Some(0), Some(LabelReason::EarlyWithinMilan)),
                (Some(0), Some(LabelReason::LateRecurrence)),
                (Some(0), Some(LabelReason::RecurrenceFree2y)),
                (None, Some(LabelReason::CensoredBefore2y)),
                (None, Some(LabelReason::DeathBefore2y)),
            ]
        );
        assert_eq!(cohort.patients[0].survival, Some((151.0, true)));
        assert_eq!(cohort.patients[5].survival, Some((424.0, true)));
        assert_eq!(cohort.patients[5].os, Some((424.0, true)));
        assert_eq!(cohort.patients[3].features[1], fedhcc_cohort::FeatureValue::Numeric(None));
    }

    #[test]
    fn carried_outcome_columns_are_used_as_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "patient_id,afp,cirrhosis,bclc_stage,aggressive_2y,label_reason,rfs_days,rfs_event\n\
                    A1,5,1,A,1,aggressive,100,1\n\
                    A2,5,1,A,,censored_before_2y,300,0\n\
                    A3,5,1,A,0,bogus,900,0\n\
                    A4,5,1,A,0,recurrence_free_2y,-3,0\n";
        let path = write(dir.path(), "carried.csv", text);
        let report = load(&path, &small_spec());
        assert_eq!(report.cohort.labels(), [Some(1), None]);
        assert_eq!(report.cohort.patients[0].survival, Some((100.0, true)));
        assert_eq!(report.issues.len(), 2);
        assert_eq!((report.issues[0].row, report.issues[0].column.as_str()), (4, "label_reason"));
        assert_eq!((report.issues[1].row, report.issues[1].column.as_str()), (5, "rfs_days"));
        assert_eq!(report.issues[1].kind, IssueKind::Negative);
    }

    #[test]
    fn missing_required_column_is_fatal_and_names_column_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            write(dir.path(), "no_afp.csv", "patient_id,cirrhosis,bclc_stage,aggressive_2y,rfs_days,rfs_event\n");
        let err = Cohort::load(&path, &small_spec(), &OutcomeConfig::default()).expect_err("fatal");
        match &err {
            CohortError::MissingColumns { columns, .. } => assert_eq!(columns, &["afp"]),
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("no_afp.csv") && text.contains("'afp'") && text.contains("feature"), "{text}");
    }

    #[test]
    fn bad_header_empty_and_unreadable_files_are_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = small_spec();
        let cfg = OutcomeConfig::default();
        let dup = write(dir.path(), "dup.csv", "patient_id,afp,afp\nP1,1,2\n");
        let err = Cohort::load(&dup, &spec, &cfg).expect_err("duplicate header");
        assert!(matches!(err, CohortError::BadHeader { .. }), "{err}");
        assert!(err.to_string().contains("'afp'") && err.to_string().contains("dup.csv"), "{err}");
        let empty = write(dir.path(), "empty.csv", "");
        assert!(matches!(Cohort::load(&empty, &spec, &cfg), Err(CohortError::Empty { .. })));
        let header_only = write(dir.path(), "header.csv", &format!("{HEADER}\n"));
        assert!(matches!(Cohort::load(&header_only, &spec, &cfg), Err(CohortError::Empty { .. })));
        let missing = dir.path().join("nope.csv");
        let err = Cohort::load(&missing, &spec, &cfg).expect_err("unreadable");
        assert!(matches!(err, CohortError::Read { .. }) && err.to_string().contains("nope.csv"), "{err}");
    }

    #[test]
    fn data_check_counts_without_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "clinical.csv", &csv_text());
        let spec = small_spec();
        let report = load(&path, &spec);
        let check = DataCheck::run(&report, &spec);
        assert_eq!((check.patients_read, check.patients_loaded, check.excluded.rows), (15, 6, 9));
        let flow = &check.label_flow;
        assert_eq!((flow.total, flow.positive, flow.negative, flow.unlabelled), (6, 1, 3, 2));
        let death = flow.by_reason.iter().find(|r| r.reason == "death_before_2y").expect("reason row");
        assert_eq!((death.label.as_str(), death.count), ("unlabelled", 1));
        let rfs = check.survival.as_ref().expect("rfs");
        assert_eq!((rfs.with_time, rfs.events), (6, 4));
        let afp = check.missingness.iter().find(|m| m.column == "afp").expect("afp");
        assert_eq!(afp.missing, 1);
        let text = check.to_text();
        assert!(text.contains("row 8, column afp: not_a_number"), "{text}");
        assert!(!text.contains("abc") && !text.contains("P07") && !text.contains("12.5"), "{text}");
        let json = serde_json::to_string(&check).expect("serialises");
        assert!(!json.contains("abc") && !json.contains("P07"), "{json}");

        // Every excluded row is an error, one finding per kind of problem, naming rows, never values.
        let findings = check.findings();
        let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
        assert_eq!(errors.len(), 8, "{findings:?}");
        assert_eq!(errors.iter().map(|f| f.count).sum::<usize>(), 9);
        let nan = findings.iter().find(|f| f.code == "not_a_number").expect("not_a_number");
        assert_eq!((nan.rows.as_slice(), nan.patients.len()), (&[8][..], 0));
        assert!(nan.message.contains("afp"), "{}", nan.message);
        let before = findings.iter().find(|f| f.code == "before_surgery").expect("before_surgery");
        assert_eq!(before.rows, [10, 16]);
        let json = serde_json::to_string(&findings).expect("serialises");
        assert!(!json.contains("abc") && !json.contains("P07") && !json.contains("2017"), "{json}");
    }

    /// A recurrence that leaves `rec_macrovascular` or `rec_extrahepatic` empty is read as "absent" and
    /// loads, but the check warns, with the patients' ids and counts (never a value).
    #[test]
    fn a_recurrence_without_its_extent_is_a_warning_naming_the_patients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = [
            HEADER,
            "P01,3,0,0,2018-01-01,2018-06-01,1,2.0,,0,,2023-05-01,x", // early within Milan, macrovascular empty
            "P02,3,0,0,2018-01-01,2018-06-01,1,2.0,0,,,2023-05-01,x", // early within Milan, extrahepatic empty
            "P03,3,0,0,2018-01-01,2021-01-01,2,1.5,,,,2023-05-01,",   // late recurrence, both empty
            "P04,8,,A,2018-01-01,,,,,,,2023-05-01,",                  // no recurrence: nothing to say
            "P05,3,0,0,2018-01-01,2018-06-01,1,2.0,0,0,,2023-05-01,x", // complete
        ]
        .join("\n")
            + "\n";
        let path = write(dir.path(), "clinical.csv", &text);
        let spec = small_spec();
        let report = load(&path, &spec);
        assert!(report.issues.is_empty(), "{:?}", report.issues);
        let check = DataCheck::run(&report, &spec);
        let r = &check.recurrence_extent_missing;
        assert_eq!(r.patients, ["P01", "P02", "P03"]);
        assert_eq!((r.rec_macrovascular, r.rec_extrahepatic, r.early_within_milan), (2, 2, 2));
        let findings = check.findings();
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!((f.severity, f.code.as_str(), f.count), (Severity::Warning, "recurrence_extent_missing", 3));
        assert_eq!(f.patients, ["P01", "P02", "P03"]);
        assert!(f.message.contains("rec_macrovascular") && f.message.contains("within Milan"), "{}", f.message);
        let text = check.to_text();
        assert!(text.contains("Recurrence extent: 3 recurrence(s)"), "{text}");
        let json = serde_json::to_string(&(&check, &findings)).expect("serialises");
        for value in ["2018-06-01", "2021-01-01", "1.5", "2.0"] {
            assert!(!json.contains(value) && !text.contains(value), "{value}: {json}");
        }
    }
}

mod lung_fixture {
    use super::*;

    fn lung_spec() -> CohortSpec {
        let numeric = |c: &str| FeatureSpec { column: c.into(), kind: FeatureKind::Numeric { log: false } };
        CohortSpec {
            features: vec![
                numeric("age"),
                FeatureSpec {
                    column: "sex".into(),
                    kind: FeatureKind::Categorical { levels: vec!["1".into(), "2".into()] },
                },
                numeric("ph.ecog"),
                numeric("ph.karno"),
                numeric("pat.karno"),
                numeric("meal.cal"),
                numeric("wt.loss"),
            ],
            label: LabelSpec::Horizon {
                time_column: "time".into(),
                event_column: "status".into(),
                horizon_days: 365.0,
            },
            survival: Some(SurvivalSpec { time_column: "time".into(), event_column: "status".into() }),
            id_column: None,
        }
    }

    /// Expected counts come from Python's csv module on the same file: 228 rows, 165 with status 1,
    /// 121 with status 1 and time ≤ 365, 65 with time ≥ 365 otherwise, 42 censored before 365 days;
    /// meal.cal is empty in 47 rows.
    #[test]
    fn loads_the_ncctg_lung_table_with_a_horizon_label() {
        let spec = lung_spec();
        let report = load(Path::new(LUNG), &spec);
        assert!(report.issues.is_empty(), "{:?}", report.issues);
        let cohort = &report.cohort;
        assert_eq!(cohort.len(), 228);
        assert_eq!(cohort.patients[0].id, "row2");
        assert_eq!(cohort.patients.iter().filter(|p| p.survival.is_some_and(|(_, e)| e)).count(), 165);
        let labels = cohort.labels();
        assert_eq!(labels.iter().filter(|l| **l == Some(1)).count(), 121);
        assert_eq!(labels.iter().filter(|l| **l == Some(0)).count(), 65);
        assert_eq!(labels.iter().filter(|l| l.is_none()).count(), 42);
        let check = DataCheck::run(&report, &spec);
        let meal = check.missingness.iter().find(|m| m.column == "meal.cal").expect("meal.cal");
        assert_eq!(meal.missing, 47);
        assert_eq!(check.label_flow.unlabelled, 42);
    }

    #[test]
    fn design_width_depends_only_on_the_spec_and_standardises_training_rows() {
        let spec = lung_spec();
        let cohort = load(Path::new(LUNG), &spec).cohort;
        assert_eq!(design_width(&spec), 6 * 2 + 2);
        let splits = Splits::stratified(&cohort.labels(), 42, 0.15, 0.2).expect("valid fractions");
        let stats = FeatureStats::local(&cohort, &spec, &splits.train).expect("stats");
        let train = DesignMatrix::build(&cohort, &spec, &stats, &splits.train).expect("design");
        let few = DesignMatrix::build(&cohort, &spec, &stats, &splits.test[..3]).expect("design");
        assert_eq!((train.d, few.d, train.columns.len()), (14, 14, 14));
        assert_eq!(train.x.len(), train.n * train.d);
        for c in 0..train.d {
            let name = &train.columns[c];
            if name.contains("__missing") || name.contains('=') {
                continue;
            }
            // Standardised values of the observed (non-missing) rows.
            let values: Vec<f64> =
                (0..train.n).filter(|&i| train.row(i)[c + 1] == 0.0).map(|i| f64::from(train.row(i)[c])).collect();
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            assert!(mean.abs() < 1e-5, "{name}: mean {mean}");
            assert!((sd - 1.0).abs() < 1e-4, "{name}: sd {sd}");
        }
    }

    #[test]
    fn identity_rows_standardised_later_equal_rows_built_with_the_statistics() {
        let spec = lung_spec();
        let cohort = load(Path::new(LUNG), &spec).cohort;
        let splits = Splits::stratified(&cohort.labels(), 42, 0.15, 0.2).expect("valid fractions");
        let stats = FeatureStats::local(&cohort, &spec, &splits.train).expect("stats");
        let built = DesignMatrix::build(&cohort, &spec, &stats, &splits.test).expect("design");
        let raw = DesignMatrix::build(&cohort, &spec, &FeatureStats::identity(&spec), &splits.test).expect("raw");
        let positions = fedhcc_cohort::numeric_positions(&spec);
        assert_eq!(positions.len(), stats.columns.len());
        let mean: Vec<f32> = stats.mean().iter().map(|&m| m as f32).collect();
        let std: Vec<f32> = stats.std().iter().map(|&s| s as f32).collect();
        let mut changed = 0;
        for i in 0..raw.n {
            let mut row = raw.row(i).to_vec();
            fedhcc_cohort::standardise_row(&positions, &mut row, &mean, &std);
            for (c, (a, b)) in row.iter().zip(built.row(i)).enumerate() {
                assert!((a - b).abs() < 1e-4, "row {i} column {}: {a} vs {b}", built.columns[c]);
            }
            changed += usize::from(row != raw.row(i));
        }
        assert!(changed > 0, "standardising must change observed values");
    }

    #[test]
    fn merged_stats_of_two_halves_equal_stats_of_the_whole() {
        let spec = lung_spec();
        let cohort = load(Path::new(LUNG), &spec).cohort;
        let all: Vec<usize> = (0..cohort.len()).collect();
        let (a, b) = all.split_at(100);
        let whole = FeatureStats::local(&cohort, &spec, &all).expect("stats");
        let merged = FeatureStats::merge(&[
            FeatureStats::local(&cohort, &spec, a).expect("stats"),
            FeatureStats::local(&cohort, &spec, b).expect("stats"),
        ])
        .expect("merge");
        assert_eq!(merged.columns, whole.columns);
        assert_eq!(merged.count, whole.count);
        for k in 0..whole.columns.len() {
            assert!((merged.sum[k] - whole.sum[k]).abs() <= 1e-9 * whole.sum[k].abs().max(1.0));
            assert!((merged.sum_sq[k] - whole.sum_sq[k]).abs() <= 1e-9 * whole.sum_sq[k].abs().max(1.0));
            assert!((merged.mean()[k] - whole.mean()[k]).abs() < 1e-9);
            assert!((merged.std()[k] - whole.std()[k]).abs() < 1e-9);
        }
        let other = CohortSpec::hcc_preoperative();
        assert!(FeatureStats::local(&cohort, &other, &all).is_err());
    }
}

mod synthetic {
    use super::*;

    fn cohort_579() -> SynthCohort {
        synth::generate(2, 579, 42, cutoff()).expect("generates")
    }

    fn write_sites(cohort: &SynthCohort, dir: &Path) -> Vec<PathBuf> {
        cohort
            .sites
            .iter()
            .map(|site| {
                let folder = dir.join(&site.center_id);
                std::fs::create_dir_all(&folder).expect("site dir");
                let path = folder.join("clinical.csv");
                synth::write_site_csv(site, &path).expect("writes");
                path
            })
            .collect()
    }

    #[test]
    fn hits_the_study_prevalence_targets() {
        let cohort = cohort_579();
        assert_eq!(cohort.sites.len(), 2);
        assert_eq!(cohort.sites.iter().map(|s| s.rows.len()).sum::<usize>(), 579);
        assert_eq!(cohort.truth.len(), 579);
        let cfg = OutcomeConfig::default();
        let outcomes: Vec<_> = cohort
            .sites
            .iter()
            .flat_map(|s| &s.rows)
            .map(|r| r.follow_up().derive(&cfg).expect("synthetic rows are consistent"))
            .collect();
        let labelled: Vec<_> = outcomes.iter().filter(|o| o.aggressive_2y.is_some()).collect();
        let positive = labelled.iter().filter(|o| o.aggressive_2y == Some(1)).count();
        let prevalence = positive as f64 / labelled.len() as f64;
        let early = labelled
            .iter()
            .filter(|o| matches!(o.label_reason, LabelReason::Aggressive | LabelReason::EarlyWithinMilan))
            .count();
        let recurrence_2y = early as f64 / labelled.len() as f64;
        eprintln!("labelled {} prevalence {prevalence:.3} 2y recurrence {recurrence_2y:.3}", labelled.len());
        assert!((0.12..=0.20).contains(&prevalence), "aggressive prevalence {prevalence}");
        assert!((0.30..=0.40).contains(&recurrence_2y), "2-year recurrence {recurrence_2y}");
        // Centers differ in contrast-agent mix.
        let gadoxetate = |k: usize| {
            let rows = &cohort.sites[k].rows;
            rows.iter().filter(|r| r.mri_contrast_agent == "gadoxetate").count() as f64 / rows.len() as f64
        };
        assert!(gadoxetate(0) - gadoxetate(1) > 0.3, "{} vs {}", gadoxetate(0), gadoxetate(1));
        assert_eq!(cohort.sites[0].rows[0].patient_id, "A0001");
        assert_eq!(cohort.sites[1].center_id, "center_b");
    }

    #[test]
    fn same_seed_writes_identical_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = write_sites(&cohort_579(), &dir.path().join("one"));
        let second = write_sites(&cohort_579(), &dir.path().join("two"));
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(std::fs::read(a).expect("read"), std::fs::read(b).expect("read"));
        }
        let other = write_sites(&synth::generate(2, 579, 43, cutoff()).expect("generates"), &dir.path().join("three"));
        assert_ne!(std::fs::read(&first[0]).expect("read"), std::fs::read(&other[0]).expect("read"));
        let truth = dir.path().join("truth.csv");
        synth::write_truth_csv(&cohort_579().truth, &truth).expect("writes truth");
        let text = std::fs::read_to_string(&truth).expect("read truth");
        assert!(text.starts_with("patient_id,center_id,latent_risk\nA0001,center_a,"), "{}", &text[..60]);
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn round_trips_through_csv_to_the_same_outcomes() {
        let cohort = cohort_579();
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = CohortSpec::hcc_postoperative();
        let cfg = OutcomeConfig::default();
        for (site, path) in cohort.sites.iter().zip(write_sites(&cohort, dir.path())) {
            let header = std::fs::read_to_string(&path).expect("read");
            assert_eq!(header.lines().next(), Some(synth::CLINICAL_COLUMNS.join(",").as_str()));
            let report = load(&path, &spec);
            assert!(report.issues.is_empty(), "{:?}", &report.issues[..report.issues.len().min(3)]);
            assert_eq!(report.cohort.len(), site.rows.len());
            for (patient, row) in report.cohort.patients.iter().zip(&site.rows) {
                let expected = row.follow_up().derive(&cfg).expect("derivable");
                assert_eq!(patient.id, row.patient_id);
                assert_eq!(patient.label, expected.aggressive_2y);
                assert_eq!(patient.label_reason, Some(expected.label_reason));
                assert_eq!(patient.survival, Some((expected.rfs_days as f64, expected.rfs_event)));
                assert_eq!(patient.os, Some((expected.os_days as f64, expected.os_event)));
            }
            let check = DataCheck::run(&report, &spec);
            assert_eq!(check.patients_loaded, site.rows.len());
            let mri = check.mri_interval.as_ref().expect("mri dates present");
            assert!(mri.more_than_31_days_before_surgery > 0);
            assert!(check.out_of_range.iter().all(|o| o.count == 0), "{:?}", check.out_of_range);
            assert!(!check.to_text().contains(&site.rows[0].patient_id));
        }
    }

    #[test]
    fn rejects_impossible_arguments() {
        assert!(synth::generate(0, 10, 1, cutoff()).is_err());
        assert!(synth::generate(27, 100, 1, cutoff()).is_err());
        assert!(synth::generate(3, 2, 1, cutoff()).is_err());
        let early = NaiveDate::from_ymd_opt(2020, 1, 1).expect("date");
        assert!(synth::generate(2, 10, 1, early).is_err());
    }
}
