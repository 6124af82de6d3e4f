//! Training and evaluation through the public API only (no burn types in sight).

use std::cell::Cell;

use fedhcc_model::{
    BackendKind, ClinicalModelConfig, Dataset, ModelError, ParameterSet, TrainParams, auc, evaluate, init_params,
    train_local,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A linearly separable toy cohort: label = 1 when `x0 + 0.5·x1 − x2 > 0`, with a margin.
struct Toy {
    x: Vec<f32>,
    y: Vec<f32>,
    n: usize,
    d: usize,
}

impl Toy {
    fn new(n: usize, d: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut x, mut y) = (Vec::with_capacity(n * d), Vec::with_capacity(n));
        while y.len() < n {
            let row: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let s = row[0] + 0.5 * row[1] - row[2];
            if s.abs() < 0.1 {
                continue;
            }
            x.extend_from_slice(&row);
            y.push(if s > 0.0 { 1.0 } else { 0.0 });
        }
        Self { x, y, n, d }
    }

    fn data(&self) -> Dataset<'_> {
        Dataset { x: &self.x, n: self.n, d: self.d, y: &self.y }
    }
}

fn cfg(d: usize) -> ClinicalModelConfig {
    ClinicalModelConfig { inputs: d, hidden: vec![8], dropout: 0.0 }
}

fn params(epochs: usize) -> TrainParams {
    TrainParams { epochs, batch_size: 16, lr: 0.02, weight_decay: 1e-4, seed: 11, pos_weight: None, prox_mu: 0.0 }
}

fn train(
    cfg: &ClinicalModelConfig,
    global: &ParameterSet,
    data: &Dataset,
    tp: &TrainParams,
) -> Result<fedhcc_model::TrainOutcome, ModelError> {
    train_local(cfg, global, data, tp, BackendKind::Flex, &|| false, &mut |_, _, _| {})
}

fn bits(p: &ParameterSet) -> Vec<u32> {
    p.values().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn training_lowers_the_loss_and_separates_the_classes() {
    let toy = Toy::new(64, 4, 1);
    let cfg = cfg(4);
    let global = init_params(&cfg, 5);
    let before = evaluate(&cfg, &global, &toy.data(), BackendKind::Flex).unwrap();
    let mut losses = Vec::new();
    let out = train_local(&cfg, &global, &toy.data(), &params(30), BackendKind::Flex, &|| false, &mut |e, n, l| {
        assert_eq!(n, 30);
        losses.push((e, l));
    })
    .unwrap();
    assert_eq!(losses.len(), 30);
    assert_eq!(losses.first().map(|p| p.0), Some(1));
    assert!(losses[29].1 < 0.5 * losses[0].1, "loss should fall: {losses:?}");
    assert_eq!((out.samples, out.steps), (64, 30 * 4));
    assert_eq!(out.train_loss, losses[29].1);
    assert_eq!(out.params.fingerprint(), global.fingerprint());

    let after = evaluate(&cfg, &out.params, &toy.data(), BackendKind::Flex).unwrap();
    assert!(after.loss < before.loss, "{} !< {}", after.loss, before.loss);
    let auc = auc(&after.scores, &toy.y).unwrap();
    assert!(auc > 0.9, "auc {auc}");
}

#[test]
fn evaluate_gives_one_probability_per_row() {
    let toy = Toy::new(10, 3, 2);
    for hidden in [vec![], vec![4, 2]] {
        let cfg = ClinicalModelConfig { inputs: 3, hidden, dropout: 0.0 };
        let out = evaluate(&cfg, &init_params(&cfg, 0), &toy.data(), BackendKind::Flex).unwrap();
        assert_eq!((out.n, out.scores.len()), (10, 10));
        assert!(out.scores.iter().all(|s| (0.0..=1.0).contains(s)));
        assert!(out.loss.is_finite() && out.loss > 0.0);
    }
}

#[test]
fn same_seed_gives_bit_identical_weights_and_another_seed_differs() {
    let toy = Toy::new(40, 4, 3);
    let cfg = ClinicalModelConfig { dropout: 0.25, ..cfg(4) };
    let global = init_params(&cfg, 9);
    let tp = params(3);
    let a = train(&cfg, &global, &toy.data(), &tp).unwrap();
    let b = train(&cfg, &global, &toy.data(), &tp).unwrap();
    assert_eq!(bits(&a.params), bits(&b.params));
    assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits());
    let c = train(&cfg, &global, &toy.data(), &TrainParams { seed: 12, ..tp }).unwrap();
    assert_ne!(bits(&a.params), bits(&c.params));
}

#[test]
fn fedprox_keeps_the_weights_closer_to_the_global_model() {
    let toy = Toy::new(32, 4, 4);
    let cfg = cfg(4);
    let global = init_params(&cfg, 2);
    let dist = |p: &ParameterSet| p.values().iter().zip(global.values()).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
    let plain = train(&cfg, &global, &toy.data(), &params(5)).unwrap();
    let prox = train(&cfg, &global, &toy.data(), &TrainParams { prox_mu: 10.0, ..params(5) }).unwrap();
    assert!(dist(&prox.params) < dist(&plain.params), "{} !< {}", dist(&prox.params), dist(&plain.params));
}

#[test]
fn refuses_weights_of_another_layout() {
    let toy = Toy::new(8, 4, 5);
    let other = init_params(&ClinicalModelConfig { hidden: vec![16], ..cfg(4) }, 0);
    let err = train(&cfg(4), &other, &toy.data(), &params(1)).unwrap_err();
    let ModelError::LayoutMismatch { expected, found } = &err else { panic!("{err}") };
    assert_eq!(found, &other.fingerprint().short());
    assert_ne!(expected, found);
    assert!(err.to_string().contains(found.as_str()));
    assert!(matches!(
        evaluate(&cfg(4), &other, &toy.data(), BackendKind::Flex),
        Err(ModelError::LayoutMismatch { .. })
    ));
}

#[test]
fn cancel_stops_training() {
    let toy = Toy::new(64, 4, 6);
    let cfg = cfg(4);
    let calls = Cell::new(0);
    let cancel = || {
        calls.set(calls.get() + 1);
        calls.get() > 3
    };
    let err = train_local(
        &cfg,
        &init_params(&cfg, 0),
        &toy.data(),
        &params(50),
        BackendKind::Flex,
        &cancel,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Cancelled), "{err}");
    assert_eq!(calls.get(), 4, "polled before every step, stopped at the first `true`");
}

#[test]
fn rejects_bad_datasets() {
    let cfg = cfg(4);
    let global = init_params(&cfg, 0);
    let empty = Dataset { x: &[], n: 0, d: 4, y: &[] };
    assert!(matches!(train(&cfg, &global, &empty, &params(1)), Err(ModelError::EmptyDataset)));
    let toy = Toy::new(4, 3, 7);
    assert!(matches!(
        evaluate(&cfg, &global, &toy.data(), BackendKind::Flex),
        Err(ModelError::DimensionMismatch { expected: 4, found: 3 })
    ));
    let x = [0.0; 8];
    let short = Dataset { x: &x, n: 2, d: 4, y: &[1.0] };
    assert!(matches!(train(&cfg, &global, &short, &params(1)), Err(ModelError::MalformedDataset(_))));
    let bad_label = Dataset { x: &x, n: 2, d: 4, y: &[1.0, 2.0] };
    assert!(matches!(train(&cfg, &global, &bad_label, &params(1)), Err(ModelError::MalformedDataset(_))));
    let mut nan_x = x;
    nan_x[5] = f32::NAN;
    let err = train(&cfg, &global, &Dataset { x: &nan_x, n: 2, d: 4, y: &[0.0, 1.0] }, &params(1)).unwrap_err();
    assert!(err.to_string().contains("feature 1 of row 1"), "{err}");
}

#[test]
fn divergence_is_reported_with_its_epoch() {
    let toy = Toy::new(16, 4, 8);
    let cfg = cfg(4);
    let mut global = init_params(&cfg, 0);
    // Weights so large that the logits overflow f32: the loss is infinite from the first step.
    global.values_mut().iter_mut().for_each(|v| *v = 1e30);
    let err = train(&cfg, &global, &toy.data(), &params(2)).unwrap_err();
    assert!(matches!(err, ModelError::NonFiniteLoss { epoch: 1 }), "{err}");
}

#[test]
fn ndarray_backend_trains_too() {
    let toy = Toy::new(16, 4, 9);
    let cfg = cfg(4);
    let global = init_params(&cfg, 0);
    let out = train_local(&cfg, &global, &toy.data(), &params(2), BackendKind::Ndarray, &|| false, &mut |_, _, _| {})
        .unwrap();
    assert!(out.train_loss.is_finite());
    let flex = train(&cfg, &global, &toy.data(), &params(2)).unwrap();
    let max_diff = out.params.values().iter().zip(flex.params.values()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(max_diff < 1e-4, "flex and ndarray disagree by {max_diff}");
}

#[test]
fn debug_output_leaves_patient_values_out() {
    let toy = Toy::new(4, 4, 10);
    let shown = format!("{:?}", toy.data());
    assert_eq!(shown, "Dataset { n: 4, d: 4, .. }");
    let cfg = cfg(4);
    let eval = evaluate(&cfg, &init_params(&cfg, 0), &toy.data(), BackendKind::Flex).unwrap();
    assert!(!format!("{eval:?}").contains("scores"));
}
