//! The multimodal models through the public API, at tiny sizes (2 phases × 8×16×16 crops, bags of
//! ≤ 10 patches × 6 features) so that the debug build stays fast.

use std::cell::Cell;

use fedhcc_model::{
    BackendKind, BatchProgress, LrSchedule, ModelError, MultimodalConfig, MultimodalDataset, MultimodalKind,
    MultimodalSample, ParameterSet, PatchBag, Survival, TrainParams, evaluate_multimodal, init_multimodal_params,
    multimodal_layout, train_multimodal,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOXELS: usize = 8 * 16 * 16;

fn config(kind: MultimodalKind) -> MultimodalConfig {
    let mut cfg = MultimodalConfig::new(kind, 4);
    cfg.mri.phases = 2;
    cfg.mri.crop = [8, 16, 16];
    cfg.mri.channels = vec![4, 8];
    cfg.mri.groups = 2;
    cfg.mri.embed = 8;
    cfg.wsi.features = 6;
    cfg.wsi.hidden = 8;
    cfg.wsi.attention = 4;
    cfg.wsi.max_train_patches = 4;
    cfg.clinical.hidden = vec![8];
    cfg.fusion.hidden = vec![16];
    cfg
}

/// A cohort whose label is carried by the crops' mean intensity (±0.5 on every present phase, plus
/// noise); the clinical values and the slides are noise. Every fifth patient misses phase 1, every
/// seventh has no slide, and the Cox times are shorter for positives.
fn cohort(n: usize, seed: u64) -> MultimodalDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let samples = (0..n)
        .map(|i| {
            let label = i % 2 == 0;
            let offset = if label { 0.5 } else { -0.5 };
            let crop: Vec<f32> = (0..2 * VOXELS).map(|_| offset + rng.random_range(-1.0f32..1.0)).collect();
            let patches = rng.random_range(1..=10);
            let bag =
                PatchBag { n: patches, d: 6, values: (0..patches * 6).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let time = if label { rng.random_range(1.0..12.0) } else { rng.random_range(6.0..40.0) };
            MultimodalSample {
                id: format!("P{i:03}"),
                crop: Some(crop),
                phase_present: vec![true, i % 5 != 3],
                bag: (i % 7 != 2).then_some(bag),
                clinical: (0..4).map(|_| rng.random_range(-1.0..1.0)).collect(),
                label: Some(label),
                survival: Some(Survival { time, event: rng.random_bool(0.7) }),
            }
        })
        .collect();
    MultimodalDataset::new(samples)
}

fn params(steps_epochs: usize, seed: u64) -> TrainParams {
    TrainParams { epochs: steps_epochs, batch_size: 8, lr: 5e-3, seed, ..TrainParams::default() }
}

fn bits(p: &ParameterSet) -> Vec<u32> {
    p.values().iter().map(|v| v.to_bits()).collect()
}

fn train(
    cfg: &MultimodalConfig,
    global: &ParameterSet,
    data: &MultimodalDataset,
    val: Option<&MultimodalDataset>,
    tp: &TrainParams,
) -> fedhcc_model::MultimodalTrainOutcome {
    train_multimodal(cfg, global, data, val, tp, BackendKind::Flex, &|| false, &mut |_| {}).unwrap()
}

#[test]
fn evaluation_gives_a_probability_and_a_risk_per_patient() {
    for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
        let cfg = config(kind);
        let data = cohort(11, 1);
        let ev =
            evaluate_multimodal(&cfg, &init_multimodal_params(&cfg, 0).unwrap(), &data, BackendKind::Flex).unwrap();
        assert_eq!((ev.n, ev.probabilities.len(), ev.risks.len()), (11, 11, 11));
        assert!(ev.probabilities.iter().all(|p| (0.0..=1.0).contains(p)) && ev.risks.iter().all(|r| r.is_finite()));
        assert!(ev.bce.is_some() && ev.cox.is_some() && ev.auc.is_some() && ev.c_index.is_some());
        // Scores do not depend on how patients are grouped into evaluation batches.
        let one = MultimodalDataset::new(vec![data.samples()[9].clone()]);
        let alone =
            evaluate_multimodal(&cfg, &init_multimodal_params(&cfg, 0).unwrap(), &one, BackendKind::Flex).unwrap();
        assert!((alone.risks[0] - ev.risks[9]).abs() < 1e-5, "{kind}");
    }
}

#[test]
fn training_learns_a_label_carried_by_crop_intensity() {
    for kind in [MultimodalKind::Preop, MultimodalKind::Postop] {
        let cfg = config(kind);
        let data = cohort(32, 2);
        let global = init_multimodal_params(&cfg, 0).unwrap();
        let before = evaluate_multimodal(&cfg, &global, &data, BackendKind::Flex).unwrap();
        let mut losses = Vec::new();
        let out = train_multimodal(
            &cfg,
            &global,
            &data,
            None,
            &TrainParams { lr: 2e-2, ..params(8, 3) },
            BackendKind::Flex,
            &|| false,
            &mut |p: &BatchProgress| losses.extend(p.loss),
        )
        .unwrap();
        let after = evaluate_multimodal(&cfg, &out.params, &data, BackendKind::Flex).unwrap();
        let (b, a) = (before.bce.unwrap(), after.bce.unwrap());
        assert!(a < 0.6 * b, "{kind}: BCE {b} → {a}, AUC {:?}", after.auc);
        assert!(after.auc.unwrap() > 0.95, "{kind}: AUC {:?}", after.auc);
        let first: f64 = losses[..4].iter().sum();
        let last: f64 = losses[losses.len() - 4..].iter().sum();
        assert!(last < first, "{kind}: batch objective {first} → {last}");
        assert_eq!((out.samples, out.steps, out.epochs_run), (32, 32, 8));
    }
}

#[test]
fn same_seed_gives_identical_weights_and_another_seed_does_not() {
    let cfg = config(MultimodalKind::Postop);
    let data = cohort(12, 4);
    let global = init_multimodal_params(&cfg, 1).unwrap();
    let a = train(&cfg, &global, &data, None, &params(2, 7));
    let b = train(&cfg, &global, &data, None, &params(2, 7));
    let c = train(&cfg, &global, &data, None, &params(2, 8));
    assert_eq!(bits(&a.params), bits(&b.params));
    assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits());
    assert_ne!(bits(&a.params), bits(&c.params));
}

#[test]
fn a_missing_phase_is_masked_not_invented() {
    let cfg = config(MultimodalKind::Preop);
    let global = init_multimodal_params(&cfg, 2).unwrap();
    let base = cohort(1, 5).into_samples().remove(0);
    let with = |present: bool, fill: f32| {
        let mut s = base.clone();
        s.phase_present = vec![true, present];
        if let Some(c) = s.crop.as_mut() {
            c[VOXELS..].fill(fill);
        }
        s
    };
    let score = |samples: Vec<MultimodalSample>| {
        let ev = evaluate_multimodal(&cfg, &global, &MultimodalDataset::new(samples), BackendKind::Flex).unwrap();
        ev.probabilities.iter().chain(&ev.risks).map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    // Whatever the missing channel holds (even NaN) the scores are those of zeros with the flag off…
    let masked = score(vec![with(false, 0.0), with(false, 1e3), with(false, f32::NAN)]);
    assert_eq!(masked[0..3], [masked[0]; 3]);
    assert_eq!(masked[3..6], [masked[3]; 3]);
    // …and a present phase of zeros is not the same thing: the presence flag reaches the model.
    let present = score(vec![with(true, 0.0)]);
    assert_ne!((present[0], present[1]), (masked[0], masked[3]));
    // A patient without any MRI is scored too.
    let mut no_mri = base.clone();
    no_mri.crop = None;
    assert!(score(vec![no_mri]).iter().all(|&b| f32::from_bits(b).is_finite()));
}

#[test]
fn patients_without_a_slide_are_handled() {
    let cfg = config(MultimodalKind::Postop);
    let global = init_multimodal_params(&cfg, 3).unwrap();
    let mut data = cohort(10, 6).into_samples();
    let mut empty = data[0].clone();
    empty.bag = Some(PatchBag { n: 0, d: 6, values: vec![] });
    let mut none = data[0].clone();
    none.bag = None;
    let ev = evaluate_multimodal(
        &cfg,
        &global,
        &MultimodalDataset::new(vec![empty, none, data[0].clone()]),
        BackendKind::Flex,
    )
    .unwrap();
    assert_eq!(ev.risks[0].to_bits(), ev.risks[1].to_bits());
    assert_ne!(ev.risks[0].to_bits(), ev.risks[2].to_bits());
    // A site where no patient has a slide still trains (the WSI branch gets no gradient).
    for s in &mut data {
        s.bag = None;
    }
    let out = train(&cfg, &global, &MultimodalDataset::new(data), None, &params(1, 0));
    assert!(out.train_loss.is_finite());
    assert_eq!(out.params.get("wsi.patch.weight"), global.get("wsi.patch.weight"));
}

#[test]
fn progress_is_reported_per_batch_and_cancel_stops_between_batches() {
    let cfg = config(MultimodalKind::Preop);
    let data = cohort(20, 7);
    let global = init_multimodal_params(&cfg, 0).unwrap();
    let mut seen = Vec::new();
    train_multimodal(&cfg, &global, &data, None, &params(2, 0), BackendKind::Flex, &|| false, &mut |p| {
        seen.push((p.epoch, p.batch, p.batches, p.epochs))
    })
    .unwrap();
    assert_eq!(seen, vec![(1, 1, 3, 2), (1, 2, 3, 2), (1, 3, 3, 2), (2, 1, 3, 2), (2, 2, 3, 2), (2, 3, 3, 2)]);
    let polls = Cell::new(0);
    let err = train_multimodal(
        &cfg,
        &global,
        &data,
        None,
        &params(2, 0),
        BackendKind::Flex,
        &|| {
            polls.set(polls.get() + 1);
            polls.get() > 2
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Cancelled), "{err}");
    assert_eq!(polls.get(), 3);
}

#[test]
fn early_stopping_returns_the_best_epochs_weights() {
    let mut cfg = config(MultimodalKind::Preop);
    cfg.training.schedule = LrSchedule::Constant;
    cfg.training.patience = 1;
    cfg.loss.cox_weight = 0.0;
    let data = cohort(16, 8);
    // A validation set whose labels contradict the training data: its loss rises as the model learns.
    let flipped: Vec<MultimodalSample> = cohort(8, 9)
        .into_samples()
        .into_iter()
        .map(|mut s| {
            s.label = s.label.map(|l| !l);
            s
        })
        .collect();
    let val = MultimodalDataset::new(flipped);
    let global = init_multimodal_params(&cfg, 0).unwrap();
    let tp = TrainParams { lr: 1e-2, ..params(6, 1) };
    let out = train(&cfg, &global, &data, Some(&val), &tp);
    assert!(out.stopped_early && out.best_epoch == 1 && out.epochs_run == 2, "{out:?}");
    // The returned weights are those after epoch 1: a 1-epoch run with the same seed gives them.
    let one = train(&cfg, &global, &data, None, &TrainParams { epochs: 1, ..tp.clone() });
    assert_eq!(bits(&out.params), bits(&one.params));
    assert!(out.val_loss.is_some());
    // With patience 0 the same run goes on to the end and reports the last validation loss.
    cfg.training.patience = 0;
    let all = train(&cfg, &global, &data, Some(&val), &tp);
    assert!(!all.stopped_early && all.epochs_run == 6 && all.best_epoch == 6);
    assert!(all.val_loss.unwrap() > out.val_loss.unwrap());
}

#[test]
fn fedprox_keeps_the_update_closer_to_the_global_weights() {
    let cfg = config(MultimodalKind::Preop);
    let data = cohort(16, 10);
    let global = init_multimodal_params(&cfg, 0).unwrap();
    let distance = |mu: f64| {
        let out = train(&cfg, &global, &data, None, &TrainParams { prox_mu: mu, ..params(3, 0) });
        out.params.values().iter().zip(global.values()).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()
    };
    let (free, held) = (distance(0.0), distance(50.0));
    assert!(held < 0.8 * free, "‖Δ‖² {free} without FedProx, {held} with μ = 50");
}

#[test]
fn unusable_inputs_are_refused_with_the_patient_named() {
    let pre = config(MultimodalKind::Preop);
    let post = config(MultimodalKind::Postop);
    let data = cohort(6, 11);
    let run = |cfg: &MultimodalConfig, global: &ParameterSet, data: &MultimodalDataset| {
        train_multimodal(cfg, global, data, None, &params(1, 0), BackendKind::Flex, &|| false, &mut |_| {}).unwrap_err()
    };
    let pre_params = init_multimodal_params(&pre, 0).unwrap();
    assert!(matches!(run(&post, &pre_params, &data), ModelError::LayoutMismatch { .. }));
    assert_ne!(multimodal_layout(&pre).unwrap().fingerprint(), multimodal_layout(&post).unwrap().fingerprint());

    let mut bad = data.clone().into_samples();
    bad[2].crop.as_mut().unwrap().pop();
    let err = run(&pre, &pre_params, &MultimodalDataset::new(bad)).to_string();
    assert!(err.contains("patient 'P002'") && err.contains("MRI crop holds"), "{err}");

    let mut bad = data.clone().into_samples();
    bad[1].crop.as_mut().unwrap()[5] = f32::INFINITY;
    let err = run(&pre, &pre_params, &MultimodalDataset::new(bad)).to_string();
    assert!(err.contains("patient 'P001'") && err.contains("phase 0"), "{err}");

    let mut bad = data.clone().into_samples();
    bad[4].bag = Some(PatchBag { n: 2, d: 5, values: vec![0.0; 10] });
    let post_params = init_multimodal_params(&post, 0).unwrap();
    let err = run(&post, &post_params, &MultimodalDataset::new(bad.clone())).to_string();
    assert!(err.contains("patient 'P004'") && err.contains("features per patch"), "{err}");
    // The preoperative model ignores slides.
    train(&pre, &pre_params, &MultimodalDataset::new(bad), None, &params(1, 0));

    let unlabelled: Vec<MultimodalSample> = data
        .clone()
        .into_samples()
        .into_iter()
        .map(|mut s| {
            s.label = None;
            s.survival = s.survival.map(|v| Survival { event: false, ..v });
            s
        })
        .collect();
    let err = run(&pre, &pre_params, &MultimodalDataset::new(unlabelled)).to_string();
    assert!(err.contains("no training patient has a label"), "{err}");
    assert!(matches!(run(&pre, &pre_params, &MultimodalDataset::default()), ModelError::EmptyDataset));
}

#[test]
fn either_head_alone_can_be_trained() {
    let data = cohort(10, 12);
    for (bce, cox) in [(1.0, 0.0), (0.0, 1.0)] {
        let mut cfg = config(MultimodalKind::Postop);
        cfg.loss.bce_weight = bce;
        cfg.loss.cox_weight = cox;
        let global = init_multimodal_params(&cfg, 0).unwrap();
        let out = train(&cfg, &global, &data, None, &params(1, 0));
        // The head without weight in the loss gets no gradient and keeps its global weights.
        let idle = if bce == 0.0 { "recurrence.weight" } else { "risk.weight" };
        assert_eq!(out.params.get(idle), global.get(idle), "{idle}");
        assert!(out.train_loss.is_finite());
    }
}
