//! Times one local epoch of the multimodal model at default sizes on a synthetic site: 5 phases ×
//! 32×64×64 crops, slides of up to 512 patches × 35 features (sampled to
//! `wsi.max_train_patches` per step), 20 clinical columns.
//!
//! `cargo run --release -p fedhcc-model --example multimodal_epoch -- [preop|postop] [patients] [batch] [backend]`
//!
//! Prints one JSON line: seconds for the epoch, samples per second, optimizer steps, peak resident
//! memory of the process (VmHWM, Linux), and the achieved GFLOP/s of the convolutions (an
//! analytic count: forward + two backward convolutions per stage).

use std::time::Instant;

use fedhcc_model::{
    BackendKind, MultimodalConfig, MultimodalKind, TrainParams, conv_train_flops, init_multimodal_params,
    synthetic_multimodal_site, train_multimodal,
};

const CLINICAL: usize = 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = match args.first().map(String::as_str) {
        None | Some("preop") => MultimodalKind::Preop,
        Some("postop") => MultimodalKind::Postop,
        Some(other) => return Err(format!("model '{other}': expected preop or postop").into()),
    };
    let patients: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(290);
    let batch: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(8);
    let backend: BackendKind = args.get(3).map(|a| a.parse()).transpose()?.unwrap_or_default();

    let cfg = MultimodalConfig::new(kind, CLINICAL);
    let t = Instant::now();
    let data = synthetic_multimodal_site(&cfg, patients, 1);
    let gen_s = t.elapsed().as_secs_f64();
    let global = init_multimodal_params(&cfg, 0)?;
    let tp = TrainParams { epochs: 1, batch_size: batch, lr: 1e-3, seed: 0, ..TrainParams::default() };

    let t = Instant::now();
    let out = train_multimodal(&cfg, &global, &data, None, &tp, backend, &|| false, &mut |_| {})?;
    let epoch_s = t.elapsed().as_secs_f64();
    let gflop = conv_train_flops(&cfg) * patients as f64 / 1e9;
    println!(
        "{{\"model\":\"{kind}\",\"backend\":\"{backend}\",\"patients\":{patients},\"batch\":{batch},\"params\":{},\
         \"steps\":{},\"epoch_s\":{epoch_s:.3},\"samples_per_s\":{:.2},\"peak_rss_mb\":{},\"conv_gflop_epoch\":{gflop:.2},\
         \"conv_gflops\":{:.2},\"train_loss\":{:.4},\"data_gen_s\":{gen_s:.2}}}",
        global.numel(),
        out.steps,
        patients as f64 / epoch_s,
        peak_rss_mb().map_or("null".to_string(), |m| format!("{m:.0}")),
        gflop / epoch_s,
        out.train_loss,
    );
    Ok(())
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
