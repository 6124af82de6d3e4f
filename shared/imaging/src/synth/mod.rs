//! Procedural phantoms for the synthetic cohort: MRI studies ([`mri`]) and H&E whole-slide images
//! ([`slide`]), written in the formats the real sites deliver (gzip NIfTI-1, JPEG-tiled pyramidal TIFF).
//!
//! Each phantom is a plain parameter struct (what the tumour looks like, the scanner or stain of the center,
//! a seed) and writes its files; the cohort generator (`fedhcc-cohort`) maps a patient's clinical row and
//! latent risk to the parameters. Everything is a pure function of the parameters: the same parameters give
//! the same bytes, whatever the thread or the order patients are written in.
//!
//! The random helpers here are small and fast on purpose (one multiply-xorshift per draw): the phantoms draw
//! one value per voxel or per pixel, and what matters is determinism and speed, not statistical subtlety.

pub mod mri;
pub mod slide;

/// SplitMix64's finaliser: a bijective 64-bit mix, the basis of every hash and seed here.
#[must_use]
pub const fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seed for one named stream of a generator (`label` such as a patient id or "bias"), independent of the
/// other labels' streams: FNV-1a of the label, mixed with `seed`.
#[must_use]
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in label.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(seed ^ mix64(h))
}

/// Hash of a lattice point, for noise and per-cell decisions.
#[inline]
pub(crate) fn hash3(seed: u64, x: i64, y: i64, z: i64) -> u64 {
    mix64(seed ^ mix64((x as u64) ^ mix64((y as u64) ^ mix64(z as u64))))
}

/// `h`'s top 24 bits as a uniform number in `[0, 1)`.
#[inline]
pub(crate) fn unit(h: u64) -> f32 {
    (h >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// A small, fast, seedable generator (SplitMix64 sequence).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(mix64(seed))
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in `[low, high)`.
    pub(crate) fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// Standard normal (Box–Muller), for parameters.
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Two approximately standard normals from one draw (each a sum of four 8-bit uniforms, Irwin–Hall):
    /// per-voxel noise at the cost of one multiply-xorshift.
    #[inline]
    pub(crate) fn normal_pair(&mut self) -> (f32, f32) {
        let r = self.next_u64();
        let sum = |r: u64| ((r & 0xFF) + ((r >> 8) & 0xFF) + ((r >> 16) & 0xFF) + ((r >> 24) & 0xFF)) as f32;
        // Four U{0..255}: mean 510, variance 4 · (256² − 1) / 12.
        const SCALE: f32 = 1.0 / 147.800_54;
        ((sum(r) - 510.0) * SCALE, (sum(r >> 32) - 510.0) * SCALE)
    }
}

/// Smooth value noise in `[-1, 1]` at `(x, y, z)` in lattice units: hashed lattice values, trilinear with
/// smoothstep weights.
pub(crate) fn value_noise3(seed: u64, x: f32, y: f32, z: f32) -> f32 {
    let (fx, fy, fz) = (x.floor(), y.floor(), z.floor());
    let (ix, iy, iz) = (fx as i64, fy as i64, fz as i64);
    let s = |t: f32| t * t * (3.0 - 2.0 * t);
    let (tx, ty, tz) = (s(x - fx), s(y - fy), s(z - fz));
    let v = |dx: i64, dy: i64, dz: i64| unit(hash3(seed, ix + dx, iy + dy, iz + dz)) * 2.0 - 1.0;
    let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
    let x00 = lerp(v(0, 0, 0), v(1, 0, 0), tx);
    let x10 = lerp(v(0, 1, 0), v(1, 1, 0), tx);
    let x01 = lerp(v(0, 0, 1), v(1, 0, 1), tx);
    let x11 = lerp(v(0, 1, 1), v(1, 1, 1), tx);
    lerp(lerp(x00, x10, ty), lerp(x01, x11, ty), tz)
}

/// Two octaves of [`value_noise3`], roughly in `[-1, 1]`.
pub(crate) fn fractal_noise3(seed: u64, x: f32, y: f32, z: f32) -> f32 {
    (value_noise3(seed, x, y, z) + 0.5 * value_noise3(seed ^ 0xA5A5, 2.0 * x + 17.3, 2.0 * y + 5.1, 2.0 * z + 9.7))
        / 1.25
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_by_label_and_seed() {
        assert_eq!(derive_seed(7, "A0001"), derive_seed(7, "A0001"));
        assert_ne!(derive_seed(7, "A0001"), derive_seed(7, "A0002"));
        assert_ne!(derive_seed(7, "A0001"), derive_seed(8, "A0001"));
    }

    #[test]
    fn normal_pairs_have_unit_variance_and_are_uncorrelated() {
        let mut rng = Rng::new(4);
        let n = 200_000;
        let (mut s, mut s2, mut sxy) = ([0.0f64; 2], [0.0f64; 2], 0.0f64);
        for _ in 0..n {
            let (a, b) = rng.normal_pair();
            let (a, b) = (f64::from(a), f64::from(b));
            s[0] += a;
            s[1] += b;
            s2[0] += a * a;
            s2[1] += b * b;
            sxy += a * b;
        }
        let n = f64::from(n);
        for k in 0..2 {
            let (mean, var) = (s[k] / n, s2[k] / n - (s[k] / n).powi(2));
            assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, variance {var}");
        }
        assert!((sxy / n).abs() < 0.01, "covariance {}", sxy / n);
    }

    #[test]
    fn noise_is_bounded_and_continuous() {
        let mut max_step = 0.0f32;
        let mut prev = value_noise3(1, 0.0, 0.3, 0.7);
        for i in 1..2000 {
            let v = value_noise3(1, i as f32 * 0.01, 0.3, 0.7);
            assert!((-1.0..=1.0).contains(&v));
            max_step = max_step.max((v - prev).abs());
            prev = v;
        }
        assert!(max_step < 0.05, "largest step {max_step}");
    }
}
