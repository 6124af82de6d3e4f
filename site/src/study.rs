//! Typing the study's `[model]` and `[cohort]` sections (kept as raw tables by `fedhcc-core`,
//! typed here where the model and cohort crates meet).

use anyhow::{Context, Result, bail};
use fedhcc_cohort::{CohortSpec, OutcomeConfig};
use fedhcc_core::config::StudyConfig;
use fedhcc_core::params::{Layout, ParameterSet, TensorSpec};
use fedhcc_model::{ClinicalModelConfig, MultimodalConfig, MultimodalKind, MultimodalSection};
use serde::{Deserialize, Serialize};

use crate::preprocess::ImagingSection;

/// `[model]`: which model the study trains.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSection {
    /// An MLP over the cohort's clinical columns (an empty `hidden` = logistic regression).
    Clinical {
        #[serde(default = "default_hidden")]
        hidden: Vec<usize>,
        #[serde(default)]
        dropout: f64,
    },
    /// For benchmarks only: `params` zero-initialised values, no training.
    Synthetic { params: usize },
    /// The preoperative model: MRI crop + the cohort's clinical columns. The crop grid and the
    /// phases come from `[imaging.mri]`.
    Preop(MultimodalSection),
    /// The postoperative model: MRI crop + slide patch features + clinical columns. The patch
    /// feature width comes from `[imaging] extractor`.
    Postop(MultimodalSection),
}

fn default_hidden() -> Vec<usize> {
    vec![32]
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection::Clinical { hidden: default_hidden(), dropout: 0.0 }
    }
}

/// `[cohort]`: columns, label, outcome derivation and splits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CohortSection {
    /// `hcc_preoperative` or `hcc_postoperative`; or leave out and give `[cohort.spec]`.
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub spec: Option<CohortSpec>,
    #[serde(default)]
    pub outcomes: OutcomeConfig,
    #[serde(default = "default_val")]
    pub val_frac: f64,
    #[serde(default = "default_test")]
    pub test_frac: f64,
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
}

fn default_val() -> f64 {
    0.15
}
fn default_test() -> f64 {
    0.2
}
fn default_split_seed() -> u64 {
    42
}

/// The study's model and cohort, typed.
#[derive(Clone, Debug)]
pub struct StudyModel {
    pub model: ModelSection,
    pub cohort: CohortSection,
    pub spec: CohortSpec,
    /// `[imaging]`: how sites prepare MRI crops and slide features (defaults when absent).
    pub imaging: ImagingSection,
    /// How an evaluation is summarised: the study's `[evaluation]` with the default minimum cell
    /// size (a site raises it to its policy's with `fedhcc_client::site_policy::min_cell`).
    pub evaluation: fedhcc_stats::federated::EvaluationSettings,
}

impl StudyModel {
    /// Types the `[model]` and `[cohort]` sections of a study.
    ///
    /// # Errors
    /// Unknown keys, a bad value, or neither preset nor spec.
    pub fn from_study(study: &StudyConfig) -> Result<Self> {
        let model: ModelSection = if study.model.is_empty() {
            ModelSection::default()
        } else {
            toml::Value::Table(study.model.clone()).try_into().context("study [model] section")?
        };
        let cohort: CohortSection =
            toml::Value::Table(study.cohort.clone()).try_into().context("study [cohort] section")?;
        let spec = match (&cohort.preset, &cohort.spec) {
            (Some(_), Some(_)) => bail!("study [cohort]: give either `preset` or `[cohort.spec]`, not both"),
            (Some(p), None) if p == "hcc_preoperative" => CohortSpec::hcc_preoperative(),
            (Some(p), None) if p == "hcc_postoperative" => CohortSpec::hcc_postoperative(),
            (Some(p), None) => {
                bail!("study [cohort] preset = '{p}': known presets are hcc_preoperative, hcc_postoperative")
            }
            (None, Some(s)) => s.clone(),
            (None, None) if matches!(model, ModelSection::Synthetic { .. }) => CohortSpec::hcc_preoperative(),
            (None, None) => bail!("study [cohort]: name a `preset` or give `[cohort.spec]`"),
        };
        spec.validate().context("study [cohort.spec]")?;
        refuse_pathology_in_preop(&model, &cohort, &spec)?;
        if !(0.0..0.9).contains(&(cohort.val_frac + cohort.test_frac))
            || cohort.val_frac < 0.0
            || cohort.test_frac < 0.0
        {
            bail!("study [cohort]: val_frac + test_frac must be between 0 and 0.9");
        }
        if let ModelSection::Clinical { dropout, .. } = &model
            && !(0.0..1.0).contains(dropout)
        {
            bail!("study [model]: dropout must be in [0, 1)");
        }
        let imaging = ImagingSection::from_study(study)?;
        let e = &study.evaluation;
        let evaluation = fedhcc_stats::federated::EvaluationSettings {
            cutoff: e.cutoff,
            histogram_bins: e.histogram_bins,
            time_grid_days: e.time_grid_days,
            ..Default::default()
        };
        let typed = Self { model, cohort, spec, imaging, evaluation };
        if let Some(cfg) = typed.multimodal_config()? {
            cfg.validate().map_err(|e| anyhow::anyhow!("study [model]: {e}"))?;
        }
        Ok(typed)
    }

    /// The model's name in configs: `clinical`, `synthetic`, `preop` or `postop`.
    pub fn kind(&self) -> &'static str {
        match &self.model {
            ModelSection::Clinical { .. } => "clinical",
            ModelSection::Synthetic { .. } => "synthetic",
            ModelSection::Preop(_) => "preop",
            ModelSection::Postop(_) => "postop",
        }
    }

    /// The multimodal model configuration, if the study trains one.
    ///
    /// The MRI branch takes its phase count and crop grid from `[imaging.mri]` and the WSI branch
    /// its feature width from the `[imaging]` extractor, so that every site and the server derive
    /// the same parameter layout from the same study file.
    ///
    /// # Errors
    /// `[model.mri] phases / crop` or `[model.wsi] features` set to a value that contradicts
    /// `[imaging]`, or an unknown extractor.
    pub fn multimodal_config(&self) -> Result<Option<MultimodalConfig>> {
        let (kind, section) = match &self.model {
            ModelSection::Preop(s) => (MultimodalKind::Preop, s),
            ModelSection::Postop(s) => (MultimodalKind::Postop, s),
            _ => return Ok(None),
        };
        let mut section = section.clone();
        let defaults = MultimodalSection::default();
        let phases = self.imaging.mri.phases.len();
        let grid = self.imaging.mri.grid;
        let features = crate::preprocess::extractor(&self.imaging.extractor)?.dim();
        if section.mri.phases != defaults.mri.phases && section.mri.phases != phases {
            bail!(
                "study [model.mri] phases = {} but [imaging.mri] lists {phases} phases; leave [model.mri] phases out \
                 (the model takes it from [imaging.mri])",
                section.mri.phases
            );
        }
        if section.mri.crop != defaults.mri.crop && section.mri.crop != grid {
            bail!(
                "study [model.mri] crop = {:?} but [imaging.mri] grid = {grid:?}; leave [model.mri] crop out \
                 (the model takes it from [imaging.mri] grid)",
                section.mri.crop
            );
        }
        if kind.uses_wsi() && section.wsi.features != defaults.wsi.features && section.wsi.features != features {
            bail!(
                "study [model.wsi] features = {} but the '{}' extractor gives {features}; leave [model.wsi] features out",
                section.wsi.features,
                self.imaging.extractor
            );
        }
        section.mri.phases = phases;
        section.mri.crop = grid;
        section.wsi.features = features;
        Ok(Some(section.into_config(kind, fedhcc_cohort::design_width(&self.spec))))
    }

    /// The clinical model configuration, if the study trains one.
    pub fn clinical_config(&self) -> Option<ClinicalModelConfig> {
        match &self.model {
            ModelSection::Clinical { hidden, dropout } => Some(ClinicalModelConfig {
                inputs: fedhcc_cohort::design_width(&self.spec),
                hidden: hidden.clone(),
                dropout: *dropout,
            }),
            _ => None,
        }
    }

    /// The model every site starts from (deterministic from the study's seed): the burn model's
    /// tensors followed by the (unset) standardisation tensors of its input groups, which the
    /// server fills from the sites' pooled statistics before round 1.
    ///
    /// # Errors
    /// A synthetic model size out of range.
    pub fn initial_params(&self, seed: u64) -> Result<ParameterSet> {
        let model = match &self.model {
            ModelSection::Clinical { .. } => {
                let cfg = self.clinical_config().context("clinical model")?;
                fedhcc_model::init_params(&cfg, seed)
            }
            ModelSection::Synthetic { params } => return synthetic_params(*params),
            ModelSection::Preop(_) | ModelSection::Postop(_) => {
                let cfg = self.multimodal_config()?.context("multimodal model")?;
                fedhcc_model::init_multimodal_params(&cfg, seed).map_err(|e| anyhow::anyhow!("study [model]: {e}"))?
            }
        };
        let numeric = fedhcc_cohort::numeric_positions(&self.spec).len();
        let mut groups = vec![(crate::standardise::CLINICAL, numeric)];
        if let ModelSection::Postop(_) = &self.model {
            let cfg = self.multimodal_config()?.context("multimodal model")?;
            groups.push((crate::standardise::WSI, cfg.wsi.features));
        }
        let groups: Vec<(&str, usize)> = groups.into_iter().filter(|&(_, n)| n > 0).collect();
        fedhcc_core::standardisation::attach(model, &fedhcc_core::standardisation::unset_tensors(&groups))
            .context("adding the standardisation tensors")
    }
}

/// A preoperative model must not see the pathology columns: they are known only after resection, so a
/// model trained on them learns from the future and cannot be used before surgery.
///
/// # Errors
/// `kind = "preop"` with the postoperative preset, or with a `[cohort.spec]` listing a pathology column.
fn refuse_pathology_in_preop(model: &ModelSection, cohort: &CohortSection, spec: &CohortSpec) -> Result<()> {
    if !matches!(model, ModelSection::Preop(_)) {
        return Ok(());
    }
    let columns = spec.pathology_columns();
    if columns.is_empty() {
        return Ok(());
    }
    let source = match &cohort.preset {
        Some(p) => format!("[cohort] preset = \"{p}\" adds the pathology columns"),
        None => "[cohort.spec] lists the pathology column(s)".to_owned(),
    };
    bail!(
        "study [model] kind = \"preop\" but {source} {}: they are known only after resection, so a preoperative \
         model trained on them learns from the future and cannot be used before surgery. For the preoperative \
         model use preset = \"hcc_preoperative\" (or remove those columns from [cohort.spec]); a model with \
         pathology is kind = \"postop\"",
        columns.join(", ")
    )
}

/// A benchmark model of `n` parameters, split into tensors of at most 1 Mi values.
///
/// # Errors
/// `n` is zero or beyond the parameter-set limits.
pub fn synthetic_params(n: usize) -> Result<ParameterSet> {
    if n == 0 {
        bail!("a model needs at least one parameter");
    }
    let block = 1 << 20;
    let specs: Vec<TensorSpec> = (0..n.div_ceil(block))
        .map(|i| TensorSpec { name: format!("block{i}.weight"), shape: vec![(n - i * block).min(block)] })
        .collect();
    let layout = Layout::new(specs)?;
    Ok(ParameterSet::zeros(layout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedhcc_core::config::StudyConfig;

    fn study(model: &str, cohort: &str) -> StudyConfig {
        let text = format!(
            "study_id = \"s\"\n[federation]\nrounds = 1\nmin_sites = 1\n[model]\n{model}\n[cohort]\n{cohort}\n\
             [imaging.mri]\ngrid = [8, 16, 16]\n"
        );
        toml::from_str(&text).unwrap()
    }

    /// Every study file and site configuration in configs/ types as the model it is named after, with
    /// the model's default (`--scale full`) sizes.
    #[test]
    fn every_shipped_study_and_site_config_types_as_its_model() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let kind_of = |name: &str| match name {
            n if n.contains("preop") => "preop",
            n if n.contains("postop") => "postop",
            _ => "clinical",
        };
        let mut seen = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let study = if name.starts_with("study") {
                fedhcc_core::config::load_study(&path).unwrap()
            } else if name.starts_with("site-") {
                fedhcc_core::config::load_site(&path).unwrap().1
            } else {
                continue;
            };
            let model = StudyModel::from_study(&study).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(model.kind(), kind_of(&name), "{name}");
            model.initial_params(study.training.seed).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            if let Some(cfg) = model.multimodal_config().unwrap() {
                let full = MultimodalSection::default();
                assert_eq!((cfg.mri.crop, cfg.mri.phases), ([32, 64, 64], 5), "{name}");
                assert_eq!((&cfg.mri.channels, cfg.mri.embed), (&full.mri.channels, full.mri.embed), "{name}");
                let preset = if model.kind() == "preop" { "hcc_preoperative" } else { "hcc_postoperative" };
                assert_eq!(model.cohort.preset.as_deref(), Some(preset), "{name}");
            }
            seen.push(name);
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "site-center_b-postop.toml",
                "site-center_b-preop.toml",
                "site-center_b.toml",
                "site-tongji-postop.toml",
                "site-tongji-preop.toml",
                "site-tongji.toml",
                "study-postop.toml",
                "study-preop.toml",
                "study.toml",
            ]
        );
    }

    #[test]
    fn a_preoperative_model_with_the_postoperative_preset_is_refused_with_the_reason() {
        let e = StudyModel::from_study(&study("kind = \"preop\"", "preset = \"hcc_postoperative\""))
            .expect_err("pathology would leak into the preoperative model");
        let e = format!("{e:#}");
        for needle in ["kind = \"preop\"", "hcc_postoperative", "mvi", "after resection", "hcc_preoperative"] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // The same columns through a hand-written spec are refused too.
        let mut spec = CohortSpec::hcc_preoperative();
        spec.features.extend(CohortSpec::hcc_postoperative().features.into_iter().filter(|f| f.column == "mvi"));
        let mut custom = study("kind = \"preop\"", "");
        custom.cohort.insert("spec".into(), toml::Value::try_from(&spec).unwrap());
        let e = format!("{:#}", StudyModel::from_study(&custom).unwrap_err());
        assert!(e.contains("[cohort.spec]") && e.contains("mvi") && !e.contains("es_grade"), "{e}");
        // The study's own pairings load.
        for (kind, preset) in
            [("preop", "hcc_preoperative"), ("postop", "hcc_postoperative"), ("clinical", "hcc_postoperative")]
        {
            let m = StudyModel::from_study(&study(&format!("kind = \"{kind}\""), &format!("preset = \"{preset}\"")));
            assert_eq!(m.unwrap().kind(), kind);
        }
    }
}
