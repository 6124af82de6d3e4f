//! Local training and evaluation of the multimodal (preop / postop) models.
//!
//! # Determinism
//!
//! Given the same global weights, data, config, [`TrainParams`] and backend, training gives
//! bit-identical weights on the CPU backends. Every random draw comes from a `ChaCha8Rng` seeded
//! with `TrainParams::seed`, one stream per purpose: 0 batch order, 1 dropout masks, 2 crop
//! augmentation, 3 patch sampling. burn's process-global RNG is never used.

use std::fmt;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use fedhcc_core::params::ParameterSet;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::backend::{Dispatch, autodiff, read_f32, read_scalar};
use crate::config::{BackendKind, TrainParams};
use crate::convert;
use crate::cox::{CoxTerms, Survival, concordance_index, cox_partial_nll};
use crate::error::ModelError;
use crate::fusion::{MultimodalNet, multimodal_layout};
use crate::metrics::auc;
use crate::mm_config::MultimodalConfig;
use crate::mm_data::{MultimodalDataset, MultimodalSample, TrainDraws, build_input};
use crate::train::{bce_with_logits, guarded, layout_bug, sigmoid};

/// Patients per forward pass when scoring (bounds memory: a default crop is 2.6 MB).
const EVAL_BATCH: usize = 8;
const SHUFFLE_STREAM: u64 = 0;
const DROPOUT_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;
const PATCH_STREAM: u64 = 3;

/// Reported after every batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchProgress {
    /// 1-based epoch.
    pub epoch: usize,
    /// Planned epochs.
    pub epochs: usize,
    /// 1-based batch within the epoch.
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// The batch's objective (`bce_weight · BCE + cox_weight · Cox`, without the FedProx term);
    /// `None` when the batch held no label and no event (no step was taken).
    pub loss: Option<f64>,
    /// Learning rate of the step.
    pub lr: f64,
}

/// The result of one local training of a multimodal model.
#[derive(Clone, Debug)]
pub struct MultimodalTrainOutcome {
    /// The trained weights (the best epoch's when early stopping is on).
    pub params: ParameterSet,
    /// Training patients (the weight of this update in a federated average).
    pub samples: usize,
    /// Mean batch objective over the last epoch run, without the FedProx term.
    pub train_loss: f64,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Epochs run (fewer than planned when stopped early).
    pub epochs_run: usize,
    /// The epoch whose weights are returned.
    pub best_epoch: usize,
    /// Validation objective of the returned weights, when a validation set with a label or an
    /// event was given.
    pub val_loss: Option<f64>,
    /// Whether early stopping ended the training.
    pub stopped_early: bool,
}

/// Scores and aggregate metrics of weights on a dataset. Its `Debug` leaves the scores out.
#[derive(Clone)]
pub struct MultimodalEvalOutcome {
    /// Patients scored.
    pub n: usize,
    /// Probability of aggressive recurrence (sigmoid of the logit), one per patient in dataset
    /// order. Patient-level: stays at the site.
    pub probabilities: Vec<f32>,
    /// Cox risk score (log relative hazard), one per patient. Patient-level: stays at the site.
    pub risks: Vec<f32>,
    /// Mean unweighted BCE over the labelled patients (`None`: no label).
    pub bce: Option<f64>,
    /// Cox negative partial log-likelihood over the whole set, per event (`None`: no event).
    pub cox: Option<f64>,
    /// AUC of the probabilities (`None`: fewer than two classes).
    pub auc: Option<f64>,
    /// Harrell's C of the risks (`None`: no comparable pair).
    pub c_index: Option<f64>,
}

impl fmt::Debug for MultimodalEvalOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultimodalEvalOutcome")
            .field("n", &self.n)
            .field("bce", &self.bce)
            .field("cox", &self.cox)
            .field("auc", &self.auc)
            .field("c_index", &self.c_index)
            .finish_non_exhaustive()
    }
}

/// Trains the multimodal model starting from `global` on the site's `train` patients.
///
/// Objective per batch: `bce_weight · BCE + cox_weight · Cox (+ prox_mu/2 · ‖w − global‖²)`, where
/// BCE is class-weighted (positive class `tp.pos_weight`, or `n_neg / n_pos` of the labelled
/// training patients) and averaged over the batch's labelled patients, and Cox is the negative
/// partial log-likelihood of the batch (ties per `loss.ties`) averaged per event (0 without
/// events). AdamW with `tp.lr`, `tp.weight_decay`, the configured schedule; crops augmented and
/// slides sampled to `wsi.max_train_patches` patches per step.
///
/// With `val` (the site's validation split), its objective is computed after every epoch (without
/// augmentation, every patch) and, when `training.patience > 0`, training stops after `patience`
/// epochs without improvement and returns the best epoch's weights.
///
/// `cancel` is polled before every batch; `progress` is called after every batch.
///
/// # Errors
/// An invalid config, parameters or dataset (including a training set without any label or
/// event); [`ModelError::LayoutMismatch`]; [`ModelError::Cancelled`];
/// [`ModelError::NonFiniteLoss`]; [`ModelError::Backend`] when the backend fails or panics.
#[allow(clippy::too_many_arguments)] // mirrors `train_local`, plus the validation split
pub fn train_multimodal(
    cfg: &MultimodalConfig,
    global: &ParameterSet,
    train: &MultimodalDataset,
    val: Option<&MultimodalDataset>,
    tp: &TrainParams,
    backend: BackendKind,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<MultimodalTrainOutcome, ModelError> {
    check_params(cfg, global)?;
    tp.validate()?;
    train.validate(cfg)?;
    if let Some(v) = val {
        v.validate(cfg)?;
    }
    let (labelled, _, events) = train.counts();
    let usable = (labelled > 0 && cfg.loss.bce_weight > 0.0) || (events > 0 && cfg.loss.cox_weight > 0.0);
    if !usable {
        return Err(ModelError::MalformedDataset(
            "no training patient has a label (for the recurrence head) or an observed event (for the Cox head)".into(),
        ));
    }
    let _span = tracing::debug_span!("train_multimodal", kind = %cfg.kind, %backend, patients = train.len(),
        epochs = tp.epochs)
    .entered();
    guarded(backend, || train_on(cfg, global, train, val, tp, backend, cancel, progress))
}

/// Scores `data` with `params`: per-patient probability and risk, plus aggregate metrics.
///
/// # Errors
/// An invalid config or dataset, [`ModelError::LayoutMismatch`], or [`ModelError::Backend`].
pub fn evaluate_multimodal(
    cfg: &MultimodalConfig,
    params: &ParameterSet,
    data: &MultimodalDataset,
    backend: BackendKind,
) -> Result<MultimodalEvalOutcome, ModelError> {
    check_params(cfg, params)?;
    data.validate(cfg)?;
    let (logits, risks) = guarded(backend, || predict(cfg, params, data, backend))?;
    let samples = data.samples();
    let labelled: Vec<(f64, f64)> = logits
        .iter()
        .zip(samples)
        .filter_map(|(&z, s)| s.label.map(|y| (f64::from(z), if y { 1.0 } else { 0.0 })))
        .collect();
    let bce = (!labelled.is_empty())
        .then(|| labelled.iter().map(|&(z, y)| bce_with_logits(z, y)).sum::<f64>() / labelled.len() as f64);
    let surv: Vec<Option<Survival>> = samples.iter().map(|s| s.survival).collect();
    let probabilities: Vec<f32> = logits.iter().map(|&z| sigmoid(z.into()) as f32).collect();
    let (scores, labels): (Vec<f32>, Vec<f32>) =
        probabilities.iter().zip(samples).filter_map(|(&p, s)| s.label.map(|y| (p, if y { 1.0 } else { 0.0 }))).unzip();
    Ok(MultimodalEvalOutcome {
        n: data.len(),
        bce,
        cox: cox_partial_nll(&risks, &surv, cfg.loss.ties),
        auc: auc(&scores, &labels),
        c_index: concordance_index(&risks, &surv),
        probabilities,
        risks,
    })
}

fn check_params(cfg: &MultimodalConfig, params: &ParameterSet) -> Result<(), ModelError> {
    let layout = multimodal_layout(cfg)?;
    if layout.fingerprint() != params.fingerprint() {
        return Err(ModelError::LayoutMismatch {
            expected: layout.fingerprint().short(),
            found: params.fingerprint().short(),
        });
    }
    Ok(())
}

fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Logits and risks of every patient, in dataset order, without augmentation and with every patch.
fn predict(
    cfg: &MultimodalConfig,
    params: &ParameterSet,
    data: &MultimodalDataset,
    backend: BackendKind,
) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let device = backend.device();
    let model =
        convert::import(MultimodalNet::<Dispatch>::new(cfg, &device), params).map_err(|m| layout_bug(backend, m))?;
    let read = |t: Tensor<Dispatch, 1>| read_f32(t).map_err(|message| ModelError::Backend { backend, message });
    let (mut logits, mut risks) = (Vec::with_capacity(data.len()), Vec::with_capacity(data.len()));
    for chunk in data.samples().chunks(EVAL_BATCH) {
        let refs: Vec<&MultimodalSample> = chunk.iter().collect();
        let out = model.forward(build_input(cfg, &refs, None, &device), None);
        logits.extend(read(out.logit)?);
        risks.extend(read(out.risk)?);
    }
    Ok((logits, risks))
}

/// Weighted BCE on logits, averaged over the labelled patients of the batch; `None` without labels.
fn bce_term<B: Backend>(
    logit: Tensor<B, 1>,
    samples: &[&MultimodalSample],
    pos_weight: f64,
    device: &B::Device,
) -> Option<Tensor<B, 1>> {
    let labelled = samples.iter().filter(|s| s.label.is_some()).count();
    if labelled == 0 {
        return None;
    }
    let y: Vec<f32> = samples.iter().map(|s| if s.label == Some(true) { 1.0 } else { 0.0 }).collect();
    let w: Vec<f32> = samples
        .iter()
        .map(|s| match s.label {
            Some(true) => pos_weight as f32,
            Some(false) => 1.0,
            None => 0.0,
        })
        .collect();
    let n = samples.len();
    let y = Tensor::<B, 1>::from_data(TensorData::new(y, [n]), device);
    let w = Tensor::<B, 1>::from_data(TensorData::new(w, [n]), device);
    // softplus(z) − z·y = max(z, 0) − z·y + log(1 + e^{−|z|}), stable for any z.
    let per = logit.clone().clamp_min(0.0) - logit.clone() * y + logit.abs().neg().exp().log1p();
    Some((per * w).sum().div_scalar(labelled as f64))
}

/// The batch objective, or `None` when the batch has no term with a positive weight.
fn objective<B: Backend>(
    cfg: &MultimodalConfig,
    logit: Tensor<B, 1>,
    risk: Tensor<B, 1>,
    samples: &[&MultimodalSample],
    pos_weight: f64,
    device: &B::Device,
) -> Option<Tensor<B, 1>> {
    let bce = (cfg.loss.bce_weight > 0.0)
        .then(|| bce_term(logit, samples, pos_weight, device))
        .flatten()
        .map(|t| t.mul_scalar(cfg.loss.bce_weight));
    let surv: Vec<Option<Survival>> = samples.iter().map(|s| s.survival).collect();
    let cox = (cfg.loss.cox_weight > 0.0)
        .then(|| CoxTerms::new(&surv, cfg.loss.ties))
        .flatten()
        .map(|terms| terms.loss(risk, device).mul_scalar(cfg.loss.cox_weight));
    match (bce, cox) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// The same objective in f64 over a whole set (validation), BCE weighted as in training.
fn objective_f64(
    cfg: &MultimodalConfig,
    logits: &[f32],
    risks: &[f32],
    samples: &[MultimodalSample],
    pos_weight: f64,
) -> Option<f64> {
    let (mut sum, mut labelled) = (0.0, 0usize);
    for (&z, s) in logits.iter().zip(samples) {
        if let Some(y) = s.label {
            let (y, w) = if y { (1.0, pos_weight) } else { (0.0, 1.0) };
            sum += w * bce_with_logits(z.into(), y);
            labelled += 1;
        }
    }
    let bce = (cfg.loss.bce_weight > 0.0 && labelled > 0).then(|| cfg.loss.bce_weight * sum / labelled as f64);
    let surv: Vec<Option<Survival>> = samples.iter().map(|s| s.survival).collect();
    let cox = (cfg.loss.cox_weight > 0.0)
        .then(|| cox_partial_nll(risks, &surv, cfg.loss.ties))
        .flatten()
        .map(|c| cfg.loss.cox_weight * c);
    match (bce, cox) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Every float parameter, flattened, in visiting order (for the FedProx distance).
struct Flatten<B: Backend>(Vec<Tensor<B, 1>>);

impl<B: Backend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().flatten::<1>(0, D - 1));
    }
}

/// `‖w − anchor‖²` over every parameter.
fn squared_distance<B: Backend>(model: &MultimodalNet<B>, anchor: &MultimodalNet<B>) -> Option<Tensor<B, 1>> {
    let (mut a, mut b) = (Flatten(Vec::new()), Flatten(Vec::new()));
    model.visit(&mut a);
    anchor.visit(&mut b);
    a.0.into_iter().zip(b.0).map(|(w, g)| (w - g).square().sum()).reduce(|x, y| x + y)
}

#[allow(clippy::too_many_arguments)]
fn train_on(
    cfg: &MultimodalConfig,
    global: &ParameterSet,
    train: &MultimodalDataset,
    val: Option<&MultimodalDataset>,
    tp: &TrainParams,
    backend: BackendKind,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&BatchProgress),
) -> Result<MultimodalTrainOutcome, ModelError> {
    let backend_err = |message: String| ModelError::Backend { backend, message };
    let (labelled, positives, _) = train.counts();
    let pos_weight = tp.pos_weight.unwrap_or(if positives == 0 || positives == labelled {
        1.0
    } else {
        (labelled - positives) as f64 / positives as f64
    });
    let device = autodiff(backend.device());
    let mut model =
        convert::import(MultimodalNet::<Dispatch>::new(cfg, &device), global).map_err(|m| layout_bug(backend, m))?;
    let anchor = if tp.prox_mu > 0.0 {
        let anchor = MultimodalNet::<Dispatch>::new(cfg, &device).no_grad();
        Some(convert::import(anchor, global).map_err(|m| layout_bug(backend, m))?)
    } else {
        None
    };
    let mut optim = AdamWConfig::new().with_weight_decay(tp.weight_decay as f32).init();
    let mut shuffle_rng = stream(tp.seed, SHUFFLE_STREAM);
    let mut dropout_rng = stream(tp.seed, DROPOUT_STREAM);
    let mut draws = TrainDraws {
        augment: &cfg.training.augment,
        augment_rng: stream(tp.seed, AUGMENT_STREAM),
        patch_rng: stream(tp.seed, PATCH_STREAM),
    };
    let n = train.len();
    let batch_size = tp.batch_size.min(n);
    let batches = n.div_ceil(batch_size);
    let total_steps = tp.epochs * batches;
    let early_stopping = cfg.training.patience > 0 && val.is_some();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut steps, mut train_loss, mut epochs_run) = (0, f64::NAN, 0);
    // (validation objective, weights, epoch) of the best epoch so far.
    let mut best: Option<(f64, ParameterSet, usize)> = None;
    let mut last_val = None;
    let mut since_best = 0;
    let mut stopped_early = false;

    for epoch in 0..tp.epochs {
        order.shuffle(&mut shuffle_rng);
        let (mut loss_sum, mut loss_rows) = (0.0, 0usize);
        for (b, rows) in order.chunks(batch_size).enumerate() {
            if cancel() {
                return Err(ModelError::Cancelled);
            }
            let lr = cfg.training.lr_at(tp.lr, epoch * batches + b, total_steps, epoch);
            let samples: Vec<&MultimodalSample> = rows.iter().map(|&i| &train.samples()[i]).collect();
            let input = build_input(cfg, &samples, Some(&mut draws), &device);
            let out = model.forward(input, Some(&mut dropout_rng));
            let mut batch_loss = None;
            if let Some(obj) = objective(cfg, out.logit, out.risk, &samples, pos_weight, &device) {
                let value = f64::from(read_scalar(obj.clone().detach()).map_err(backend_err)?);
                if !value.is_finite() {
                    return Err(ModelError::NonFiniteLoss { epoch: epoch + 1 });
                }
                let loss = match anchor.as_ref().and_then(|a| squared_distance(&model, a)) {
                    Some(dist) => obj + dist.mul_scalar(tp.prox_mu / 2.0),
                    None => obj,
                };
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
                steps += 1;
                loss_sum += value * rows.len() as f64;
                loss_rows += rows.len();
                batch_loss = Some(value);
            }
            progress(&BatchProgress {
                epoch: epoch + 1,
                epochs: tp.epochs,
                batch: b + 1,
                batches,
                loss: batch_loss,
                lr,
            });
        }
        epochs_run = epoch + 1;
        train_loss = if loss_rows > 0 { loss_sum / loss_rows as f64 } else { f64::NAN };
        tracing::debug!(epoch = epoch + 1, epochs = tp.epochs, loss = train_loss, "epoch done");
        let Some(val) = val else { continue };
        let snapshot = convert::export(&model.valid()).map_err(backend_err)?;
        let (logits, risks) = predict(cfg, &snapshot, val, backend)?;
        let Some(val_loss) = objective_f64(cfg, &logits, &risks, val.samples(), pos_weight) else { continue };
        if !val_loss.is_finite() {
            return Err(ModelError::NonFiniteLoss { epoch: epoch + 1 });
        }
        last_val = Some(val_loss);
        if !early_stopping {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _, _)| val_loss < *b) {
            best = Some((val_loss, snapshot, epoch + 1));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.training.patience {
                stopped_early = epoch + 1 < tp.epochs;
                break;
            }
        }
    }

    let (params, best_epoch, val_loss) = match best {
        Some((loss, params, epoch)) => (params, epoch, Some(loss)),
        None => (convert::export(&model.valid()).map_err(backend_err)?, epochs_run, last_val),
    };
    if params.check_finite().is_err() {
        return Err(ModelError::NonFiniteLoss { epoch: epochs_run });
    }
    Ok(MultimodalTrainOutcome {
        params,
        samples: n,
        train_loss,
        steps,
        epochs_run,
        best_epoch,
        val_loss,
        stopped_early,
    })
}
