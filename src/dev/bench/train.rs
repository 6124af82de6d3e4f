//! `fedhcc bench train`: one site's local training epoch of the multimodal model at default sizes
//! (5 phases × 32×64×64 crops, slide bags of up to 512 patches, the cohort preset's clinical
//! columns) on random tensors of the right shapes, with the achieved convolution throughput
//! against a conv3d ceiling measured on the same backend in the same run.

use anyhow::{Result, bail};
use clap::Args;
use fedhcc_cohort::CohortSpec;
use fedhcc_model::{BackendKind, MultimodalConfig, MultimodalKind, TrainParams};
use std::time::Instant;

/// A site of the study's size: an epoch over it is what the targets are stated for.
const SITE_PATIENTS: usize = 290;

#[derive(Args)]
pub struct TrainArgs {
    /// `preop` (MRI + clinical) or `postop` (MRI + slides + clinical).
    #[arg(long, value_parser = ["preop", "postop"])]
    pub model: String,
    /// Patients in the synthetic site (the epoch time is also reported scaled to 290).
    #[arg(long, default_value_t = SITE_PATIENTS)]
    pub patients: usize,
    /// Patients per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Compute backend (default: the fastest CPU backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// Print one JSON line; besides the timings it holds `train_loss` (the epoch's mean batch objective)
    /// and `update_norm` (L2 norm of trained minus initial weights), which two backends should agree on.
    #[arg(long)]
    pub json: bool,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn train(args: &TrainArgs) -> Result<()> {
    if args.patients < 2 || args.patients > 100_000 || args.batch == 0 {
        bail!("--patients must be between 2 and 100000 and --batch at least 1");
    }
    let (kind, spec) = match args.model.as_str() {
        "preop" => (MultimodalKind::Preop, CohortSpec::hcc_preoperative()),
        _ => (MultimodalKind::Postop, CohortSpec::hcc_postoperative()),
    };
    let backend: BackendKind = match &args.backend {
        Some(b) => b.parse().map_err(|e| anyhow::anyhow!("--backend: {e}"))?,
        None => BackendKind::default(),
    };
    let cfg = MultimodalConfig::new(kind, fedhcc_cohort::design_width(&spec));
    cfg.validate()?;
    let data = fedhcc_model::synthetic_multimodal_site(&cfg, args.patients, 1);
    let global = fedhcc_model::init_multimodal_params(&cfg, 0)?;
    let tp = TrainParams { epochs: 1, batch_size: args.batch, lr: 1e-3, seed: 0, ..TrainParams::default() };
    let t = Instant::now();
    let out = fedhcc_model::train_multimodal(&cfg, &global, &data, None, &tp, backend, &|| false, &mut |_| {})?;
    let epoch_s = t.elapsed().as_secs_f64();
    let ceiling = fedhcc_model::conv3d_ceiling(backend, 2)?;
    let gflops = fedhcc_model::conv_train_flops(&cfg) * args.patients as f64 / epoch_s / 1e9;
    let epoch_s_290 = epoch_s * SITE_PATIENTS as f64 / args.patients as f64;
    let samples_per_s = args.patients as f64 / epoch_s;
    let rss = peak_rss_mb();
    // For comparing backends (scripts/gpu-check.sh): the same synthetic site, initial weights and
    // seed on two backends should give the same loss and update up to float rounding.
    let update_norm = global
        .values()
        .iter()
        .zip(out.params.values())
        .map(|(&a, &b)| (f64::from(b) - f64::from(a)).powi(2))
        .sum::<f64>()
        .sqrt();
    if args.json {
        let v = serde_json::json!({
            "model": kind.as_str(), "samples_per_s": round(samples_per_s), "epoch_s_290": round(epoch_s_290),
            "peak_rss_mb": rss.map(|m| m.round()), "gflops": round(gflops), "ceiling_gflops": round(ceiling.gflops),
            "backend": backend.as_str(), "patients": args.patients, "batch": args.batch, "steps": out.steps,
            "train_loss": out.train_loss, "update_norm": update_norm,
        });
        println!("{v}");
    } else {
        println!(
            "Local training epoch, {kind} model, {} backend, {} synthetic patients, batch {}",
            backend, args.patients, args.batch
        );
        println!("  parameters          {}", global.numel());
        println!(
            "  epoch               {epoch_s:.2} s ({} steps); {epoch_s_290:.1} s for a 290-patient site",
            out.steps
        );
        println!("  throughput          {samples_per_s:.2} patients/s");
        println!("  peak memory         {}", rss.map_or("n/a".into(), |m| format!("{m:.0} MiB")));
        println!(
            "  convolutions        {gflops:.2} GFLOP/s achieved vs {:.2} GFLOP/s conv3d ceiling ({:.0} %)",
            ceiling.gflops,
            100.0 * gflops / ceiling.gflops
        );
    }
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
