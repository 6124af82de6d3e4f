//! Masking throughput: `cargo run --release -p fedhcc-secure --example bench_mask [values] [sites…]`
//! (default 1e6 values, 2 and 8 sites). Prints one line per site count.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let values: usize = match args.first() {
        Some(v) => v.parse::<f64>()? as usize,
        None => 1_000_000,
    };
    let sites: Vec<usize> =
        if args.len() > 1 { args[1..].iter().map(|s| s.parse()).collect::<Result<_, _>>()? } else { vec![2, 8] };
    for n in sites {
        let t = fedhcc_secure::secagg::bench_mask(values, n)?;
        println!(
            "{values} values × {n} sites: per site keys {:.2} ms, encode {:.1} ms, mask {:.1} ms ({:.3e} values/s, {:.0} MB/s \
             of masked words); server fold {:.1} ms, decode {:.1} ms; max |mean − exact| {:.2e}",
            t.keys_s * 1e3,
            t.encode_s * 1e3,
            t.mask_s * 1e3,
            t.mask_values_per_s,
            t.mask_values_per_s * 8.0 / 1e6,
            t.accumulate_s * 1e3,
            t.decode_s * 1e3,
            t.max_abs_error
        );
    }
    Ok(())
}
