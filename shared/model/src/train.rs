//! Local training and evaluation: the only entry points that run burn.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use fedhcc_core::params::ParameterSet;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::backend::{Device, Dispatch, autodiff, read_f32, read_scalar};
use crate::config::{BackendKind, ClinicalModelConfig, TrainParams};
use crate::convert;
use crate::error::ModelError;
use crate::layout::model_layout;
use crate::net::{DropoutMasks, Mlp};

/// Rows per forward pass in [`evaluate`], bounding device memory for large cohorts.
const EVAL_CHUNK_ROWS: usize = 4096;
/// `ChaCha8Rng` stream for dropout masks; shuffling uses stream 0 of the same seed.
const DROPOUT_STREAM: u64 = 1;

/// A site's tabular data, borrowed. Its `Debug` shows the shape only: the values are patient data.
#[derive(Clone, Copy)]
pub struct Dataset<'a> {
    /// Features, row-major, `n × d`.
    pub x: &'a [f32],
    /// Rows.
    pub n: usize,
    /// Features per row.
    pub d: usize,
    /// Labels, 0 or 1, one per row.
    pub y: &'a [f32],
}

impl fmt::Debug for Dataset<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset").field("n", &self.n).field("d", &self.d).finish_non_exhaustive()
    }
}

impl Dataset<'_> {
    /// Checks the buffers against `n`, `d` and the model's inputs.
    ///
    /// # Errors
    /// [`ModelError::EmptyDataset`], [`ModelError::DimensionMismatch`] or
    /// [`ModelError::MalformedDataset`] naming the row (never the value: it is patient data).
    pub fn validate(&self, inputs: usize) -> Result<(), ModelError> {
        if self.n == 0 {
            return Err(ModelError::EmptyDataset);
        }
        if self.d != inputs {
            return Err(ModelError::DimensionMismatch { expected: inputs, found: self.d });
        }
        if Some(self.x.len()) != self.n.checked_mul(self.d) {
            return Err(ModelError::MalformedDataset(format!(
                "x holds {} values but n × d = {} × {}",
                self.x.len(),
                self.n,
                self.d
            )));
        }
        if self.y.len() != self.n {
            return Err(ModelError::MalformedDataset(format!("y holds {} labels for {} rows", self.y.len(), self.n)));
        }
        if let Some(i) = self.x.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::MalformedDataset(format!(
                "feature {} of row {} is not finite (impute missing values first)",
                i % self.d,
                i / self.d
            )));
        }
        if let Some(i) = self.y.iter().position(|&v| v != 0.0 && v != 1.0) {
            return Err(ModelError::MalformedDataset(format!("label of row {i} is not 0 or 1")));
        }
        Ok(())
    }

    fn positives(&self) -> usize {
        self.y.iter().filter(|&&v| v == 1.0).count()
    }
}

/// The result of one local training.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// The locally trained weights.
    pub params: ParameterSet,
    /// Rows trained on (the weight of this update in a federated average).
    pub samples: usize,
    /// Mean class-weighted binary cross-entropy over the last epoch, without the FedProx term.
    pub train_loss: f64,
    /// Optimizer steps taken.
    pub steps: usize,
}

/// The result of evaluating weights on a site's data. Its `Debug` leaves the scores out.
#[derive(Clone)]
pub struct EvalOutcome {
    /// Rows evaluated.
    pub n: usize,
    /// Mean (unweighted) binary cross-entropy.
    pub loss: f64,
    /// Sigmoid probabilities, one per row. Patient-level: they stay at the site.
    pub scores: Vec<f32>,
}

impl fmt::Debug for EvalOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EvalOutcome").field("n", &self.n).field("loss", &self.loss).finish_non_exhaustive()
    }
}

/// Trains the model starting from `global` on the site's data.
///
/// Mini-batches are drawn from a `ChaCha8Rng` seeded with `tp.seed`; the loss is class-weighted
/// binary cross-entropy on logits (positive class weighted by `tp.pos_weight`, or `n_neg / n_pos`),
/// plus `tp.prox_mu / 2 · ‖w − global‖²` when `prox_mu > 0`; the optimizer is AdamW.
/// `cancel` is polled before every step; `progress(epoch, epochs, loss)` is called after every
/// epoch with the 1-based epoch.
///
/// # Errors
/// An invalid config, parameters or dataset; [`ModelError::LayoutMismatch`] when `global` was
/// made for another model; [`ModelError::Cancelled`]; [`ModelError::NonFiniteLoss`] when training
/// diverges; [`ModelError::Backend`] when the backend fails or panics (a panic inside `cancel` or
/// `progress` is reported the same way).
pub fn train_local(
    cfg: &ClinicalModelConfig,
    global: &ParameterSet,
    data: &Dataset,
    tp: &TrainParams,
    backend: BackendKind,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainOutcome, ModelError> {
    check_inputs(cfg, global, data)?;
    tp.validate()?;
    let _span = tracing::debug_span!("train_local", %backend, rows = data.n, epochs = tp.epochs).entered();
    guarded(backend, || train_on(backend, cfg, global, data, tp, cancel, progress))
}

/// Scores `data` with `params`.
///
/// # Errors
/// An invalid config or dataset, [`ModelError::LayoutMismatch`], or [`ModelError::Backend`].
pub fn evaluate(
    cfg: &ClinicalModelConfig,
    params: &ParameterSet,
    data: &Dataset,
    backend: BackendKind,
) -> Result<EvalOutcome, ModelError> {
    check_inputs(cfg, params, data)?;
    let logits = guarded(backend, || {
        let device = backend.device();
        let model = convert::import(Mlp::<Dispatch>::new(cfg, &device), params).map_err(|m| layout_bug(backend, m))?;
        let mut logits = Vec::with_capacity(data.n);
        for start in (0..data.n).step_by(EVAL_CHUNK_ROWS) {
            let rows = EVAL_CHUNK_ROWS.min(data.n - start);
            let x = &data.x[start * data.d..(start + rows) * data.d];
            let x = Tensor::<Dispatch, 2>::from_data(TensorData::new(x.to_vec(), [rows, data.d]), &device);
            let out = read_f32(model.forward(x, None));
            logits.extend(out.map_err(|message| ModelError::Backend { backend, message })?);
        }
        Ok(logits)
    })?;
    let loss =
        logits.iter().zip(data.y).map(|(&z, &y)| bce_with_logits(z.into(), y.into())).sum::<f64>() / data.n as f64;
    let scores = logits.iter().map(|&z| sigmoid(z.into()) as f32).collect();
    Ok(EvalOutcome { n: data.n, loss, scores })
}

impl BackendKind {
    /// The burn device for this backend (without autodiff).
    pub(crate) fn device(self) -> Device {
        match self {
            BackendKind::Flex => crate::backend::flex(),
            BackendKind::Ndarray => Device::NdArray(burn::backend::ndarray::NdArrayDevice::Cpu),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Device::Cuda(burn::backend::cuda::CudaDevice { index: 0 }),
        }
    }
}

fn check_inputs(cfg: &ClinicalModelConfig, params: &ParameterSet, data: &Dataset) -> Result<(), ModelError> {
    let layout = model_layout(cfg)?;
    if layout.fingerprint() != params.fingerprint() {
        return Err(ModelError::LayoutMismatch {
            expected: layout.fingerprint().short(),
            found: params.fingerprint().short(),
        });
    }
    data.validate(cfg.inputs)
}

/// Runs burn work, turning a panic (burn reports many device failures by panicking, e.g. a
/// missing CUDA device) into [`ModelError::Backend`] so that a site reports it instead of dying.
pub(crate) fn guarded<T>(backend: BackendKind, work: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".to_string());
        Err(ModelError::Backend { backend, message: with_hint(backend, message) })
    })
}

/// A failed backend's message, with what an operator can check. The CUDA runtime reports a missing
/// driver library from its own thread (that panic's text, naming the library files it looked for,
/// is on standard error above), so what reaches here may only say that the device never started.
fn with_hint(backend: BackendKind, message: String) -> String {
    match backend {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => format!(
            "{message} (the cuda backend needs an NVIDIA GPU and the NVIDIA driver's libcuda on this machine; \
             `nvidia-smi` should list the GPU, and the lines above name the library files that were looked for)"
        ),
        BackendKind::Flex | BackendKind::Ndarray => message,
    }
}

/// The layout was checked before import, so an import failure is an internal inconsistency.
pub(crate) fn layout_bug(backend: BackendKind, message: String) -> ModelError {
    ModelError::Backend { backend, message: format!("loading weights into the model: {message}") }
}

fn train_on(
    backend: BackendKind,
    cfg: &ClinicalModelConfig,
    global: &ParameterSet,
    data: &Dataset,
    tp: &TrainParams,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainOutcome, ModelError> {
    let backend_err = |message: String| ModelError::Backend { backend, message };
    let positives = data.positives();
    let pos_weight = tp.pos_weight.unwrap_or(if positives == 0 || positives == data.n {
        1.0
    } else {
        (data.n - positives) as f64 / positives as f64
    });
    let device = autodiff(backend.device());
    let mut model = convert::import(Mlp::<Dispatch>::new(cfg, &device), global).map_err(|m| layout_bug(backend, m))?;
    // The FedProx anchor: the global weights as constants (no gradient) on the same device.
    let anchor = if tp.prox_mu > 0.0 {
        Some(
            convert::import(Mlp::<Dispatch>::new(cfg, &device).no_grad(), global)
                .map_err(|m| layout_bug(backend, m))?,
        )
    } else {
        None
    };
    let mut optim = AdamWConfig::new().with_weight_decay(tp.weight_decay as f32).init();
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(tp.seed);
    let mut dropout = (cfg.dropout > 0.0).then(|| DropoutMasks::new(tp.seed, DROPOUT_STREAM, cfg.dropout));
    let batch_size = tp.batch_size.min(data.n);
    let mut order: Vec<usize> = (0..data.n).collect();
    let mut steps = 0;
    let mut train_loss = f64::NAN;

    for epoch in 1..=tp.epochs {
        order.shuffle(&mut shuffle_rng);
        // Summed on the device and read once per epoch: a read per step would sync every step.
        let mut loss_sum: Option<Tensor<Dispatch, 1>> = None;
        for rows in order.chunks(batch_size) {
            if cancel() {
                return Err(ModelError::Cancelled);
            }
            let xb: Vec<f32> = rows.iter().flat_map(|&r| &data.x[r * data.d..(r + 1) * data.d]).copied().collect();
            let yb: Vec<f32> = rows.iter().map(|&r| data.y[r]).collect();
            let wb: Vec<f32> = yb.iter().map(|&y| if y == 1.0 { pos_weight as f32 } else { 1.0 }).collect();
            let x = Tensor::<Dispatch, 2>::from_data(TensorData::new(xb, [rows.len(), data.d]), &device);
            let y = Tensor::<Dispatch, 1>::from_data(TensorData::new(yb, [rows.len()]), &device);
            let w = Tensor::<Dispatch, 1>::from_data(TensorData::new(wb, [rows.len()]), &device);
            let bce = weighted_bce(model.forward(x, dropout.as_mut()), y, w);
            let loss = match anchor.as_ref().and_then(|a| model.squared_distance(a)) {
                Some(dist) => bce.clone() + dist.mul_scalar(tp.prox_mu / 2.0),
                None => bce.clone(),
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(tp.lr, model, grads);
            steps += 1;
            let weighted = bce.detach().mul_scalar(rows.len() as f64);
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + weighted,
                None => weighted,
            });
        }
        let sum = match loss_sum {
            Some(sum) => read_scalar(sum).map_err(backend_err)?,
            None => f32::NAN,
        };
        train_loss = f64::from(sum) / data.n as f64;
        if !train_loss.is_finite() {
            return Err(ModelError::NonFiniteLoss { epoch });
        }
        tracing::debug!(epoch, epochs = tp.epochs, loss = train_loss, "epoch done");
        progress(epoch, tp.epochs, train_loss);
    }

    let params = convert::export(&model.valid()).map_err(backend_err)?;
    if params.check_finite().is_err() {
        return Err(ModelError::NonFiniteLoss { epoch: tp.epochs });
    }
    Ok(TrainOutcome { params, samples: data.n, train_loss, steps })
}

/// Class-weighted binary cross-entropy on logits, averaged over the rows: `mean(w · [(1−y)·z −
/// log σ(z)])`, the formula of burn's `BinaryCrossEntropyLoss` with logits and class weights. The
/// labels and per-row weights `w` are built on the host as float tensors: burn 0.21's loss takes
/// integer labels and converts them with `Tensor::float`, which on an autodiff `Dispatch` device
/// returns a tensor without the autodiff wrapping, so multiplying it with the logits panics ("The
/// provided tensors are not on the same backend").
///
/// # Shapes
/// `logits, y, w: [rows]` → `[1]`.
fn weighted_bce<B: Backend>(logits: Tensor<B, 1>, y: Tensor<B, 1>, w: Tensor<B, 1>) -> Tensor<B, 1> {
    (((y.neg() + 1.0) * logits.clone() - log_sigmoid(logits)) * w).mean()
}

/// `−[y·log σ(z) + (1−y)·log(1−σ(z))]`, stable for any `z`.
pub(crate) fn bce_with_logits(z: f64, y: f64) -> f64 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_cuda_backend_gets_the_driver_hint() {
        assert_eq!(with_hint(BackendKind::Flex, "out of memory".into()), "out of memory");
        #[cfg(feature = "cuda")]
        {
            let m = with_hint(BackendKind::Cuda, "RecvError".into());
            assert!(m.starts_with("RecvError (") && m.contains("libcuda") && m.contains("nvidia-smi"), "{m}");
        }
    }
}
