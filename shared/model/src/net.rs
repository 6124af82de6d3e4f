//! The burn module: `Linear → ReLU (→ dropout) → … → Linear → 1 logit`. Internal to this crate.

use burn::module::Initializer;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ClinicalModelConfig;

/// The multilayer perceptron. Its field and layer names give the parameter names
/// (`layers.{i}.weight`, `layers.{i}.bias`), so renaming anything here changes the layout.
#[derive(Module, Debug)]
pub(crate) struct Mlp<B: Backend> {
    layers: Vec<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    /// A model of the given shape on `device`, with lazily initialised zero weights: every caller
    /// loads a [`ParameterSet`](fedhcc_core::params::ParameterSet) into it next, so burn's RNG is
    /// never consulted and the values never materialise.
    pub(crate) fn new(cfg: &ClinicalModelConfig, device: &B::Device) -> Self {
        let layers = cfg
            .layer_dims()
            .into_iter()
            .map(|(d_in, d_out)| LinearConfig::new(d_in, d_out).with_initializer(Initializer::Zeros).init(device))
            .collect();
        Self { layers }
    }

    /// Logits, one per row.
    ///
    /// # Shapes
    /// `x: [batch, inputs]` → `[batch]`.
    pub(crate) fn forward(&self, x: Tensor<B, 2>, mut dropout: Option<&mut DropoutMasks>) -> Tensor<B, 1> {
        let last = self.layers.len().saturating_sub(1);
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if i < last {
                h = relu(h);
                if let Some(masks) = dropout.as_deref_mut() {
                    let [rows, cols] = h.dims();
                    let mask = masks.next::<B>(rows, cols, &h.device());
                    h = h * mask;
                }
            }
        }
        let [rows, _] = h.dims();
        h.reshape([rows])
    }

    /// `‖w − anchor‖²` over every parameter (the FedProx distance to the global weights).
    ///
    /// # Shapes
    /// `→ [1]`.
    pub(crate) fn squared_distance(&self, anchor: &Mlp<B>) -> Option<Tensor<B, 1>> {
        let mut total: Option<Tensor<B, 1>> = None;
        let mut add = |t: Tensor<B, 1>| {
            total = Some(match total.take() {
                Some(s) => s + t,
                None => t,
            })
        };
        for (layer, fixed) in self.layers.iter().zip(&anchor.layers) {
            add((layer.weight.val() - fixed.weight.val()).square().sum());
            if let (Some(b), Some(fb)) = (&layer.bias, &fixed.bias) {
                add((b.val() - fb.val()).square().sum());
            }
        }
        total
    }
}

/// Inverted-dropout masks drawn from a seeded `ChaCha8Rng`, so that training is reproducible
/// without relying on burn's process-global RNG (shared between threads, hence between tests and
/// concurrent trainings).
pub(crate) struct DropoutMasks {
    rng: ChaCha8Rng,
    keep: f64,
}

impl DropoutMasks {
    /// Masks keeping each unit with probability `1 - prob`; `rng_stream` separates this stream
    /// from the shuffling stream of the same seed.
    pub(crate) fn new(seed: u64, rng_stream: u64, prob: f64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(rng_stream);
        Self { rng, keep: 1.0 - prob }
    }

    fn next<B: Backend>(&mut self, rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2> {
        let scale = (1.0 / self.keep) as f32;
        let values: Vec<f32> =
            (0..rows * cols).map(|_| if self.rng.random::<f64>() < self.keep { scale } else { 0.0 }).collect();
        Tensor::from_data(TensorData::new(values, [rows, cols]), device)
    }
}
