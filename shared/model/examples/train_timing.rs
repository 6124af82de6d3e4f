//! Times one `train_local` + `evaluate` on a synthetic cohort (default 290 rows × 40 features,
//! 5 epochs, hidden [32], batch 32) on each CPU backend.
//!
//! `cargo run -p fedhcc-model --example train_timing [--release] -- [rows] [features] [epochs]`

use std::time::Instant;

use fedhcc_model::{BackendKind, ClinicalModelConfig, Dataset, TrainParams, auc, evaluate, init_params, train_local};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (n, d, epochs) =
        (args.first().copied().unwrap_or(290), args.get(1).copied().unwrap_or(40), args.get(2).copied().unwrap_or(5));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = x.chunks(d).map(|r| if r[0] - r[1] + 0.3 * r[2] > 0.2 { 1.0 } else { 0.0 }).collect();
    let data = Dataset { x: &x, n, d, y: &y };
    let cfg = ClinicalModelConfig { inputs: d, hidden: vec![32], dropout: 0.1 };
    let global = init_params(&cfg, 0);
    let tp = TrainParams { epochs, batch_size: 32, lr: 1e-2, ..TrainParams::default() };
    for backend in [BackendKind::Flex, BackendKind::Ndarray] {
        let t = Instant::now();
        let out = train_local(&cfg, &global, &data, &tp, backend, &|| false, &mut |_, _, _| {})?;
        let train_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let eval = evaluate(&cfg, &out.params, &data, backend)?;
        let eval_s = t.elapsed().as_secs_f64();
        println!(
            "{backend}: {n}×{d}, {epochs} epochs, {} steps: train {train_s:.3} s ({:.2} ms/step), evaluate {eval_s:.4} s, \
             loss {:.4}, train AUC {:.3}",
            out.steps,
            1e3 * train_s / out.steps as f64,
            out.train_loss,
            auc(&eval.scores, &y).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
