//! Patch features: the [`PatchFeatureExtractor`] trait, the default [`HandcraftedHe`] extractor (stain and
//! texture features that need no downloaded weights), and [`extract_slide_features`], which turns a slide into
//! a bag of patch feature vectors for the multiple-instance WSI branch.
//!
//! Tiles are read and described on a few worker threads (one [`Slide::read_region`] each; the slide's file
//! access is serialised, decoding is not), so memory is a few tiles per thread whatever the slide's size.
//! Results land in tile order, so the output does not depend on the thread count.
//!
//! Size: the extractor trait, the handcrafted H&E features (colour deconvolution, texture, nuclei)
//! and the slide-to-bag loop: the feature table and its width change together.

use std::cell::RefCell;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::Slide;
use super::tiles::{TilingConfig, plan_tiles, resample_square, to_level};
use crate::ImagingError;

/// Turns one RGB patch into a fixed-length feature vector.
///
/// Implementations must be deterministic (same pixels → same features), produce finite values, and bump
/// [`version`](Self::version) whenever their output changes: name and version are part of the feature cache's
/// key, so a stale cache entry is never mistaken for a current one.
pub trait PatchFeatureExtractor: Send + Sync {
    /// Short stable identifier, e.g. `"he-handcrafted"`.
    fn name(&self) -> &str;
    /// Output version; bump when the features change.
    fn version(&self) -> u32;
    /// Length of the feature vector.
    fn dim(&self) -> usize;
    /// One name per feature, `dim()` of them.
    fn feature_names(&self) -> Vec<String>;
    /// Describes one `side × side` RGB8 patch (row-major, `side * side * 3` bytes) into `out` (`dim()` values).
    fn extract(&self, rgb: &[u8], side: u32, out: &mut [f32]);
}

/// The default extractor, `"he-handcrafted"`: 35 stain, nuclear and texture features of an H&E patch.
///
/// Optical density (OD) is Beer–Lambert's `−log10(I / 255)` per channel (intensity floored at 1e-6 × 255, as
/// scikit-image does). Ruifrok–Johnston colour deconvolution with scikit-image's H&E-DAB stain matrix
/// (`rgb_from_hed` rows H = (0.65, 0.70, 0.29), E = (0.07, 0.99, 0.11), DAB = (0.27, 0.57, 0.78)) turns the
/// three channel ODs into haematoxylin (H) and eosin (E) amounts, floored at 0. These equal
/// `6 × skimage.color.rgb2hed` (scikit-image divides by `ln 1e-6` instead of `ln 10`). Grey is BT.601 luma
/// `(299 R + 587 G + 114 B + 500) / 1000` in integers.
///
/// | # | name | meaning |
/// |---|---|---|
/// | 0–4 | `h_od_mean`, `h_od_std`, `h_od_p10`, `h_od_p50`, `h_od_p90` | H amount over the patch: mean, population std, 10th/50th/90th percentile (linear interpolation, as numpy) |
/// | 5–9 | `e_od_…` | the same for E |
/// | 10 | `od_mean` | mean OD over pixels and channels (overall darkness) |
/// | 11 | `background_fraction` | pixels whose R+G+B OD is below 0.25 (glass, white gaps; grey ≳ 210) |
/// | 12 | `h_dominant_fraction` | non-background pixels with H > E (nuclei, basophilic cytoplasm) |
/// | 13 | `e_dominant_fraction` | non-background pixels with E ≥ H (cytoplasm, stroma, red cells) |
/// | 14, 15 | `h_od_tissue_mean`, `e_od_tissue_mean` | mean H and E over non-background pixels (0 if none) |
/// | 16 | `nuclear_fraction` | pixels with H > 0.4 OD (chromatin) |
/// | 17 | `nuclei_per_10k_px` | 8-connected blobs of such pixels with at least 10 pixels, per 10 000 patch pixels |
/// | 18 | `nucleus_mean_area_px` | mean pixel area of those blobs (0 if none) |
/// | 19–22 | `glcm_h_contrast`, `…_homogeneity`, `…_energy`, `…_correlation` | grey-level co-occurrence of H quantised to 16 levels over 0–1.2 OD (`min(⌊H · 16 / 1.2⌋, 15)`), distance 1, symmetric, normalised, averaged over 0°, 45°, 90°, 135°; as `skimage.feature.graycoprops` (correlation 1 for a flat patch) |
/// | 23–32 | `lbp_0` … `lbp_9` | share of pixels per rotation-invariant uniform LBP code (P = 8, R = 1, bilinear samples, 0 outside the patch; code = number of neighbours ≥ centre, 9 = non-uniform) on grey, as `skimage.feature.local_binary_pattern(method="uniform")` |
/// | 33, 34 | `grey_mean`, `grey_std` | grey level mean and population std, on 0–1 |
///
/// Reference values from scikit-image are checked in the crate's tests (`tests/reference/he_features.py`).
#[derive(Debug, Clone, Copy, Default)]
pub struct HandcraftedHe;

/// Name of [`HandcraftedHe`].
pub const HANDCRAFTED_HE_NAME: &str = "he-handcrafted";

const HE_NAMES: [&str; 35] = [
    "h_od_mean",
    "h_od_std",
    "h_od_p10",
    "h_od_p50",
    "h_od_p90",
    "e_od_mean",
    "e_od_std",
    "e_od_p10",
    "e_od_p50",
    "e_od_p90",
    "od_mean",
    "background_fraction",
    "h_dominant_fraction",
    "e_dominant_fraction",
    "h_od_tissue_mean",
    "e_od_tissue_mean",
    "nuclear_fraction",
    "nuclei_per_10k_px",
    "nucleus_mean_area_px",
    "glcm_h_contrast",
    "glcm_h_homogeneity",
    "glcm_h_energy",
    "glcm_h_correlation",
    "lbp_0",
    "lbp_1",
    "lbp_2",
    "lbp_3",
    "lbp_4",
    "lbp_5",
    "lbp_6",
    "lbp_7",
    "lbp_8",
    "lbp_9",
    "grey_mean",
    "grey_std",
];

/// scikit-image's `rgb_from_hed`: the OD vectors (rows) of haematoxylin, eosin and DAB.
const RGB_FROM_HED: [[f64; 3]; 3] = [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]];
/// Its inverse: channel OD (row vector) × this = stain amounts.
const HED_FROM_RGB: [[f64; 3]; 3] = inverse3(RGB_FROM_HED);
/// Pixels with R+G+B OD below this are background.
const BACKGROUND_OD_SUM: f64 = 0.25;
/// Pixels with H above this are nuclear (chromatin).
const NUCLEAR_H_OD: f64 = 0.4;
/// Smallest blob counted as a nucleus, pixels.
const MIN_NUCLEUS_PX: u32 = 10;
/// Grey levels of the H co-occurrence matrix, and the H amount mapped to the top level.
const GLCM_LEVELS: usize = 16;
const GLCM_H_MAX: f64 = 1.2;
/// Uniform LBP with 8 neighbours: codes 0–8 plus one non-uniform bin.
const LBP_BINS: usize = 10;

/// `−log10(max(v / 255, 1e-6))` for each 8-bit value.
static OD_LUT: LazyLock<[f64; 256]> = LazyLock::new(|| std::array::from_fn(|v| -(v as f64 / 255.0).max(1e-6).log10()));

const fn inverse3(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let c00 = m[1][1] * m[2][2] - m[1][2] * m[2][1];
    let c01 = m[1][2] * m[2][0] - m[1][0] * m[2][2];
    let c02 = m[1][0] * m[2][1] - m[1][1] * m[2][0];
    let det = m[0][0] * c00 + m[0][1] * c01 + m[0][2] * c02;
    [
        [c00 / det, (m[0][2] * m[2][1] - m[0][1] * m[2][2]) / det, (m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det],
        [c01 / det, (m[0][0] * m[2][2] - m[0][2] * m[2][0]) / det, (m[0][2] * m[1][0] - m[0][0] * m[1][2]) / det],
        [c02 / det, (m[0][1] * m[2][0] - m[0][0] * m[2][1]) / det, (m[0][0] * m[1][1] - m[0][1] * m[1][0]) / det],
    ]
}

/// Per-thread buffers, reused from patch to patch.
#[derive(Default)]
struct Scratch {
    /// Bit patterns of the (non-negative) f32 H and E amounts.
    h: Vec<u32>,
    e: Vec<u32>,
    grey: Vec<u8>,
    glcm_level: Vec<u8>,
    nuclear: Vec<bool>,
    lbp: LbpScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl PatchFeatureExtractor for HandcraftedHe {
    fn name(&self) -> &str {
        HANDCRAFTED_HE_NAME
    }

    fn version(&self) -> u32 {
        1
    }

    fn dim(&self) -> usize {
        HE_NAMES.len()
    }

    fn feature_names(&self) -> Vec<String> {
        HE_NAMES.iter().map(|s| (*s).to_string()).collect()
    }

    /// # Panics
    ///
    /// If `rgb` is not `side * side * 3` bytes or `out` not [`dim`](PatchFeatureExtractor::dim) values (a
    /// caller's bug, not a property of any file).
    fn extract(&self, rgb: &[u8], side: u32, out: &mut [f32]) {
        let s = side as usize;
        assert_eq!(rgb.len(), s * s * 3, "patch must be side × side RGB8");
        assert_eq!(out.len(), HE_NAMES.len(), "output must hold {} features", HE_NAMES.len());
        SCRATCH.with(|scratch| he_features(rgb, s, &mut scratch.borrow_mut(), out));
    }
}

fn he_features(rgb: &[u8], s: usize, sc: &mut Scratch, out: &mut [f32]) {
    let n = s * s;
    if n == 0 {
        out.fill(0.0);
        return;
    }
    let lut = &*OD_LUT;
    let m = HED_FROM_RGB;
    let glcm_scale = GLCM_LEVELS as f64 / GLCM_H_MAX;
    sc.h.resize(n, 0);
    sc.e.resize(n, 0);
    sc.grey.resize(n, 0);
    sc.glcm_level.resize(n, 0);
    sc.nuclear.resize(n, false);
    // Stain amounts are floored at +0.0 (never −0.0), so their f32 bit patterns sort like their values.
    let positive = |v: f64| if v > 0.0 { v } else { 0.0 };
    let (mut sum_h, mut sum_h2, mut sum_e, mut sum_e2, mut sum_od) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut tissue_h, mut tissue_e) = (0.0f64, 0.0f64);
    let (mut background, mut h_dominant, mut nuclear) = (0usize, 0usize, 0usize);
    let (mut sum_grey, mut sum_grey2) = (0u64, 0u64);
    let planes = sc.h.iter_mut().zip(sc.e.iter_mut()).zip(sc.grey.iter_mut()).zip(sc.glcm_level.iter_mut());
    for (px, ((((h_out, e_out), grey_out), level_out), nuclear_out)) in
        rgb.chunks_exact(3).zip(planes.zip(sc.nuclear.iter_mut()))
    {
        let (r, g, b) = (px[0], px[1], px[2]);
        let (odr, odg, odb) = (lut[usize::from(r)], lut[usize::from(g)], lut[usize::from(b)]);
        let h = positive(odr * m[0][0] + odg * m[1][0] + odb * m[2][0]);
        let e = positive(odr * m[0][1] + odg * m[1][1] + odb * m[2][1]);
        let od_sum = odr + odg + odb;
        sum_h += h;
        sum_h2 += h * h;
        sum_e += e;
        sum_e2 += e * e;
        sum_od += od_sum;
        let is_tissue = od_sum >= BACKGROUND_OD_SUM;
        background += usize::from(!is_tissue);
        h_dominant += usize::from(is_tissue && h > e);
        tissue_h += if is_tissue { h } else { 0.0 };
        tissue_e += if is_tissue { e } else { 0.0 };
        let is_nuclear = h > NUCLEAR_H_OD;
        nuclear += usize::from(is_nuclear);
        *nuclear_out = is_nuclear;
        *level_out = ((h * glcm_scale) as usize).min(GLCM_LEVELS - 1) as u8;
        *h_out = (h as f32).to_bits();
        *e_out = (e as f32).to_bits();
        let grey = (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000;
        sum_grey += u64::from(grey);
        sum_grey2 += u64::from(grey * grey);
        *grey_out = grey as u8;
    }
    let e_dominant = n - background - h_dominant;
    let nf = n as f64;
    let mean_std = |sum: f64, sum2: f64| {
        let mean = sum / nf;
        (mean, (sum2 / nf - mean * mean).max(0.0).sqrt())
    };
    let (h_mean, h_std) = mean_std(sum_h, sum_h2);
    let (e_mean, e_std) = mean_std(sum_e, sum_e2);
    let h_q = percentiles(&mut sc.h, [10.0, 50.0, 90.0]);
    let e_q = percentiles(&mut sc.e, [10.0, 50.0, 90.0]);
    let tissue = n - background;
    let share = |k: usize| k as f64 / nf;
    let tissue_mean = |v: f64| if tissue > 0 { v / tissue as f64 } else { 0.0 };
    let (blobs, blob_area) = nuclear_blobs(&sc.nuclear, s);
    let glcm = glcm_properties(&sc.glcm_level, s);
    let lbp = lbp_histogram(&sc.grey, s, &mut sc.lbp);
    let (grey_mean, grey_std) = mean_std(sum_grey as f64, sum_grey2 as f64);

    let values: [f64; 35] = [
        h_mean,
        h_std,
        h_q[0],
        h_q[1],
        h_q[2],
        e_mean,
        e_std,
        e_q[0],
        e_q[1],
        e_q[2],
        sum_od / (3.0 * nf),
        share(background),
        share(h_dominant),
        share(e_dominant),
        tissue_mean(tissue_h),
        tissue_mean(tissue_e),
        share(nuclear),
        f64::from(blobs) * 10_000.0 / nf,
        if blobs > 0 { blob_area as f64 / f64::from(blobs) } else { 0.0 },
        glcm[0],
        glcm[1],
        glcm[2],
        glcm[3],
        lbp[0] / nf,
        lbp[1] / nf,
        lbp[2] / nf,
        lbp[3] / nf,
        lbp[4] / nf,
        lbp[5] / nf,
        lbp[6] / nf,
        lbp[7] / nf,
        lbp[8] / nf,
        lbp[9] / nf,
        grey_mean / 255.0,
        grey_std / 255.0,
    ];
    out.iter_mut().zip(values).for_each(|(o, v)| *o = v as f32);
}

/// Percentiles with numpy's default linear interpolation (`pos = q / 100 · (n − 1)`) of ascending `qs`, of
/// non-negative f32 values given as their bit patterns (which order like the values); reorders `v`. Each order statistic is selected in the part right of the previous one, and the value after
/// it is the smallest of the (already partitioned) stretch up to the next one.
fn percentiles<const K: usize>(v: &mut [u32], qs: [f64; K]) -> [f64; K] {
    let last = v.len() - 1;
    let at = qs.map(|q| {
        let pos = (q / 100.0 * last as f64).clamp(0.0, last as f64);
        let k = (pos.floor() as usize).min(last);
        (k, pos - k as f64)
    });
    let mut start = 0;
    for &(k, _) in &at {
        if k >= start {
            v[start..].select_nth_unstable(k - start);
            start = k + 1;
        }
    }
    let mut out = [0.0; K];
    for (i, &(k, frac)) in at.iter().enumerate() {
        let lo = f64::from(f32::from_bits(v[k]));
        out[i] = if frac == 0.0 || k == last {
            lo
        } else {
            let end = at.iter().map(|&(k2, _)| k2).filter(|&k2| k2 > k).min().map_or(v.len(), |k2| k2 + 1);
            let hi = f64::from(f32::from_bits(v[k + 1..end].iter().copied().fold(u32::MAX, u32::min)));
            lo + (hi - lo) * frac
        };
    }
    out
}

/// Number of 8-connected blobs of at least [`MIN_NUCLEUS_PX`] pixels, and their total area. Runs of set pixels
/// in each row are joined to the runs they touch (diagonals included) in the row above with a union–find.
fn nuclear_blobs(mask: &[bool], s: usize) -> (u32, u64) {
    // (start, end exclusive) of each run; runs of the previous row are `prev_runs`.
    let mut parent: Vec<u32> = Vec::new();
    let mut area: Vec<u64> = Vec::new();
    let mut prev: Vec<(usize, usize, u32)> = Vec::new();
    let mut cur: Vec<(usize, usize, u32)> = Vec::new();
    fn find(parent: &mut [u32], mut i: u32) -> u32 {
        while parent[i as usize] != i {
            let p = parent[i as usize];
            parent[i as usize] = parent[p as usize];
            i = p;
        }
        i
    }
    for row in mask.chunks_exact(s) {
        cur.clear();
        let mut x = 0;
        while x < s {
            if !row[x] {
                x += 1;
                continue;
            }
            let start = x;
            while x < s && row[x] {
                x += 1;
            }
            let id = parent.len() as u32;
            parent.push(id);
            area.push((x - start) as u64);
            cur.push((start, x, id));
        }
        // 8-adjacency of [a0, a1) and [b0, b1) in consecutive rows: a0 <= b1 && b0 <= a1.
        let mut j = 0;
        for &(start, end, id) in &cur {
            while j < prev.len() && prev[j].1 < start {
                j += 1;
            }
            let mut k = j;
            while k < prev.len() && prev[k].0 <= end {
                let (a, b) = (find(&mut parent, prev[k].2), find(&mut parent, id));
                if a != b {
                    let (root, child) = if a < b { (a, b) } else { (b, a) };
                    parent[child as usize] = root;
                    area[root as usize] += area[child as usize];
                }
                k += 1;
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let (mut count, mut total) = (0u32, 0u64);
    for i in 0..parent.len() {
        if parent[i] == i as u32 && area[i] >= u64::from(MIN_NUCLEUS_PX) {
            count += 1;
            total += area[i];
        }
    }
    (count, total)
}

/// Contrast, homogeneity, energy and correlation of the symmetric, normalised co-occurrence matrices at
/// distance 1 for 0°, 45°, 90° and 135°, averaged over the four angles (as `skimage.feature.graycoprops`).
fn glcm_properties(levels: &[u8], s: usize) -> [f64; 4] {
    const L: usize = GLCM_LEVELS;
    // Offsets (row, column); the matrices are symmetrised, so the sign convention of the angles is moot.
    const OFFSETS: [(usize, isize); 4] = [(0, 1), (1, 1), (1, 0), (1, -1)];
    let mut props = [0.0f64; 4];
    for (dr, dc) in OFFSETS {
        // Pairs (pixel, neighbour) of each row with the row `dr` below, shifted by `dc` columns; two
        // alternating count tables keep runs of equal pairs from waiting on each other's increments.
        let mut counts = [[0u32; L * L]; 2];
        for r in 0..s.saturating_sub(dr) {
            let (row, other) = (&levels[r * s..(r + 1) * s], &levels[(r + dr) * s..(r + dr + 1) * s]);
            let (from, to) = match dc {
                1 => (&row[..s - 1], &other[1..]),
                -1 => (&row[1..], &other[..s - 1]),
                _ => (row, other),
            };
            for (k, (&a, &b)) in from.iter().zip(to).enumerate() {
                counts[k & 1][usize::from(a) * L + usize::from(b)] += 1;
            }
        }
        let counts: [[u32; L]; L] =
            std::array::from_fn(|i| std::array::from_fn(|j| counts[0][i * L + j] + counts[1][i * L + j]));
        let mut p = [[0.0f64; L]; L];
        let mut total = 0.0;
        for i in 0..L {
            for j in 0..L {
                p[i][j] = f64::from(counts[i][j]) + f64::from(counts[j][i]);
                total += p[i][j];
            }
        }
        if total > 0.0 {
            p.iter_mut().flatten().for_each(|v| *v /= total);
        }
        let (mut contrast, mut homogeneity, mut asm, mut mean_i, mut mean_j) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (i, row) in p.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let d = (i as f64 - j as f64).powi(2);
                contrast += v * d;
                homogeneity += v / (1.0 + d);
                asm += v * v;
                mean_i += i as f64 * v;
                mean_j += j as f64 * v;
            }
        }
        let (mut var_i, mut var_j, mut cov) = (0.0, 0.0, 0.0);
        for (i, row) in p.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let (di, dj) = (i as f64 - mean_i, j as f64 - mean_j);
                var_i += v * di * di;
                var_j += v * dj * dj;
                cov += v * di * dj;
            }
        }
        let (std_i, std_j) = (var_i.sqrt(), var_j.sqrt());
        let correlation = if std_i < 1e-15 || std_j < 1e-15 { 1.0 } else { cov / (std_i * std_j) };
        props[0] += contrast;
        props[1] += homogeneity;
        props[2] += asm.sqrt();
        props[3] += correlation;
    }
    props.map(|v| v / OFFSETS.len() as f64)
}

/// Buffers of the LBP pass.
#[derive(Default)]
struct LbpScratch {
    grey: Vec<f64>,
    plus: Vec<f64>,
    minus: Vec<f64>,
    bits: Vec<u8>,
}

/// 1/√2 rounded to 5 decimals, as scikit-image rounds its sample offsets: the exact constant would move the
/// diagonal samples and change which near-ties count as "at least the centre".
#[allow(clippy::approx_constant)]
const LBP_DIAGONAL: f64 = 0.70711;
/// scikit-image's sample offsets for P = 8, R = 1: `round(−R sin(2πp/P), 5)`, `round(R cos(2πp/P), 5)`.
const LBP_ROW: [f64; 8] = [-0.0, -LBP_DIAGONAL, -1.0, -LBP_DIAGONAL, -0.0, LBP_DIAGONAL, 1.0, LBP_DIAGONAL];
const LBP_COL: [f64; 8] = [1.0, LBP_DIAGONAL, 0.0, -LBP_DIAGONAL, -1.0, -LBP_DIAGONAL, -0.0, LBP_DIAGONAL];

/// Counts of uniform LBP codes 0–8 and of non-uniform patterns (bin 9) over the grey patch.
///
/// Interior rows are done a row at a time in loops the compiler vectorises: axis neighbours sit on the grid,
/// so their bilinear value is the pixel itself (an exact comparison); diagonal neighbours use scikit-image's
/// bilinear formula term for term, with the same fractions, so ties (flat areas) are decided identically.
/// The border pixels, whose samples may fall outside (value 0), take the general path.
fn lbp_histogram(grey: &[u8], s: usize, sc: &mut LbpScratch) -> [f64; LBP_BINS] {
    let codes = &*LBP_CODES;
    let mut hist = [0u32; LBP_BINS];
    let mut count = |bits: u8| hist[usize::from(codes[usize::from(bits)])] += 1;
    if s < 3 {
        (0..s * s).for_each(|i| count(lbp_bits_general(grey, s, i / s, i % s)));
        return hist.map(f64::from);
    }
    // Fractions of `index ± 0.70711` as scikit-image computes them (`v − floor(v)`), per row and column.
    let frac = |i: usize, offset: f64| {
        let v = i as f64 + offset;
        v - v.floor()
    };
    sc.plus.clear();
    sc.plus.extend((0..s).map(|i| frac(i, LBP_DIAGONAL)));
    sc.minus.clear();
    sc.minus.extend((0..s).map(|i| frac(i, -LBP_DIAGONAL)));
    sc.grey.clear();
    sc.grey.extend(grey.iter().map(|&v| f64::from(v)));
    sc.bits.resize(s, 0);
    let inner = 1..s - 1;
    for r in 1..s - 1 {
        let row = |k: usize| &sc.grey[k * s..(k + 1) * s];
        let (up, mid, down) = (row(r - 1), row(r), row(r + 1));
        let bits = &mut sc.bits[inner.clone()];
        // Axis neighbours: p = 0 (right), 2 (up), 4 (left), 6 (down).
        for (c, b) in inner.clone().zip(bits.iter_mut()) {
            let centre = mid[c];
            *b = u8::from(mid[c + 1] >= centre)
                | u8::from(up[c] >= centre) << 2
                | u8::from(mid[c - 1] >= centre) << 4
                | u8::from(down[c] >= centre) << 6;
        }
        // Diagonals: p = 1 (up-right), 3 (up-left), 5 (down-left), 7 (down-right). Row offset −0.70711 lies
        // between rows r − 1 and r; +0.70711 between r and r + 1; likewise for columns.
        let (dr_up, dr_down) = (sc.minus[r], sc.plus[r]);
        diagonal(bits, mid, up, mid, dr_up, &sc.plus, false, 1);
        diagonal(bits, mid, up, mid, dr_up, &sc.minus, true, 3);
        diagonal(bits, mid, mid, down, dr_down, &sc.minus, true, 5);
        diagonal(bits, mid, mid, down, dr_down, &sc.plus, false, 7);
        bits.iter().for_each(|&b| count(b));
    }
    // The border: first and last rows, first and last columns.
    for c in 0..s {
        count(lbp_bits_general(grey, s, 0, c));
        count(lbp_bits_general(grey, s, s - 1, c));
    }
    for r in 1..s - 1 {
        count(lbp_bits_general(grey, s, r, 0));
        count(lbp_bits_general(grey, s, r, s - 1));
    }
    hist.map(f64::from)
}

/// Sets bit `p` of `bits[c − 1]` for interior columns `c` when the bilinear sample between rows `top`/`bottom`
/// (weight `dr` on `bottom`) and columns `c`/`c + 1` (or `c − 1`/`c` when `left`), weight `dc[c]` on the
/// right one, is at least the centre — scikit-image's `bilinear_interpolation`, operation for operation.
#[allow(clippy::too_many_arguments)]
fn diagonal(bits: &mut [u8], mid: &[f64], top: &[f64], bottom: &[f64], dr: f64, dc: &[f64], left: bool, p: u32) {
    let n = bits.len();
    let first = if left { 0 } else { 1 };
    let (t0, t1) = (&top[first..first + n], &top[first + 1..first + 1 + n]);
    let (b0, b1) = (&bottom[first..first + n], &bottom[first + 1..first + 1 + n]);
    let (centre, dc) = (&mid[1..1 + n], &dc[1..1 + n]);
    for i in 0..n {
        let d = dc[i];
        let t = (1.0 - d) * t0[i] + d * t1[i];
        let b = (1.0 - d) * b0[i] + d * b1[i];
        let value = (1.0 - dr) * t + dr * b;
        bits[i] |= u8::from(value - centre[i] >= 0.0) << p;
    }
}

/// The LBP pattern of pixel `(r, c)` with samples outside the patch read as 0 (scikit-image's constant mode).
fn lbp_bits_general(grey: &[u8], s: usize, r: usize, c: usize) -> u8 {
    let si = s as isize;
    let pixel = |r: f64, c: f64| -> f64 {
        let (r, c) = (r as isize, c as isize);
        if r < 0 || c < 0 || r >= si || c >= si { 0.0 } else { f64::from(grey[(r * si + c) as usize]) }
    };
    let centre = f64::from(grey[r * s + c]);
    let mut bits = 0u8;
    for p in 0..8 {
        let (rr, cc) = (r as f64 + LBP_ROW[p], c as f64 + LBP_COL[p]);
        let (r0, r1, c0, c1) = (rr.floor(), rr.ceil(), cc.floor(), cc.ceil());
        let (dr, dc) = (rr - r0, cc - c0);
        let top = (1.0 - dc) * pixel(r0, c0) + dc * pixel(r0, c1);
        let bottom = (1.0 - dc) * pixel(r1, c0) + dc * pixel(r1, c1);
        let value = (1.0 - dr) * top + dr * bottom;
        bits |= u8::from(value - centre >= 0.0) << p;
    }
    bits
}

/// Uniform LBP code of each 8-bit neighbour pattern (bit p = neighbour p): the number of set bits when the
/// bits change at most twice along neighbours 0…7, else 9.
static LBP_CODES: LazyLock<[u8; 256]> = LazyLock::new(|| {
    std::array::from_fn(|bits| {
        let changes = ((bits ^ (bits >> 1)) & 0x7F).count_ones();
        if changes <= 2 { bits.count_ones() as u8 } else { 9 }
    })
});

/// A slide's bag of patch features, with what produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlideFeatures {
    /// Extractor name ([`PatchFeatureExtractor::name`]).
    pub extractor: String,
    /// Extractor version.
    pub version: u32,
    /// Features per patch.
    pub dim: usize,
    /// One name per feature.
    pub feature_names: Vec<String>,
    /// Level-0 top-left corner `[x, y]` of each patch, row-major.
    pub coords: Vec<[u32; 2]>,
    /// `n × dim` values, patch after patch.
    pub features: Vec<f32>,
    /// SHA-256 (lowercase hex) of the slide file the features were computed from.
    pub slide_sha256: String,
    /// Share of the slide the tissue mask marks as tissue.
    pub tissue_fraction: f64,
    /// Patch resolution, microns per pixel.
    pub target_mpp: f64,
    /// Patch side, pixels.
    pub tile_px: u32,
}

impl SlideFeatures {
    /// Number of patches.
    #[must_use]
    pub fn n(&self) -> usize {
        self.coords.len()
    }

    /// The features of patch `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.n()`.
    #[must_use]
    pub fn patch(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}

/// Most worker threads one slide's extraction uses.
const MAX_WORKERS: usize = 8;
/// Budget (bytes) for the tile buffers of all workers together.
const WORKER_MEMORY: usize = 256 << 20;

/// Tiles a slide ([`plan_tiles`]) and describes every kept tile with `extractor`. `progress(done, total)` is
/// called on the calling thread after each tile (and once with `done = 0`).
///
/// # Errors
///
/// Those of [`plan_tiles`] and [`super::file_sha256`]; the first tile that cannot be read
/// ([`ImagingError::Tile`] names the file, level and tile); [`ImagingError::InvalidRequest`] if the extractor's
/// names disagree with its dimension or it produces a non-finite value.
pub fn extract_slide_features(
    slide: &Slide,
    cfg: &TilingConfig,
    extractor: &dyn PatchFeatureExtractor,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SlideFeatures, ImagingError> {
    let sha = super::file_sha256(slide.path())?;
    extract_with_hash(slide, cfg, extractor, sha, progress)
}

/// [`extract_slide_features`] for a slide whose hash the caller already has.
pub(crate) fn extract_with_hash(
    slide: &Slide,
    cfg: &TilingConfig,
    extractor: &dyn PatchFeatureExtractor,
    slide_sha256: String,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SlideFeatures, ImagingError> {
    let dim = extractor.dim();
    let feature_names = extractor.feature_names();
    if feature_names.len() != dim || dim == 0 {
        return Err(ImagingError::request(
            slide.path(),
            format!(
                "feature extractor {:?} declares {dim} features but names {}",
                extractor.name(),
                feature_names.len()
            ),
        ));
    }
    let plan = plan_tiles(slide, cfg)?;
    let n = plan.coords.len();
    let mut features = vec![0f32; n * dim];
    progress(0, n);
    if n > 0 {
        let downsample = slide.levels()[plan.level].downsample;
        // Workers: the cores (at most MAX_WORKERS), fewer when each tile's buffers are large, so that the
        // tiles in flight stay within WORKER_MEMORY (a slide without intermediate levels needs big reads).
        let (read, tile) = (plan.read_px as usize, cfg.tile_px as usize);
        let per_tile = read * read * 3 + read * tile * 3 * 4 + tile * tile * 3 + dim * 4;
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_WORKERS)
            .min(WORKER_MEMORY / per_tile.max(1))
            .clamp(1, n);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::sync_channel::<Result<(usize, Vec<f32>), ImagingError>>(threads * 2);
        let tile_px = cfg.tile_px as usize;
        let mut first_error = None;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let tx = tx.clone();
                let (next, stop, plan) = (&next, &stop, &plan);
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let [x0, y0] = plan.coords[i];
                        let result = slide
                            .read_region(
                                plan.level,
                                to_level(x0, downsample),
                                to_level(y0, downsample),
                                plan.read_px,
                                plan.read_px,
                            )
                            .map(|rgb| {
                                let tile = resample_square(&rgb, plan.read_px as usize, tile_px);
                                let mut out = vec![0f32; dim];
                                extractor.extract(&tile, tile_px as u32, &mut out);
                                (i, out)
                            });
                        let failed = result.is_err();
                        if tx.send(result).is_err() || failed {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut done = 0;
            for message in rx {
                match message {
                    Ok((i, values)) => {
                        features[i * dim..(i + 1) * dim].copy_from_slice(&values);
                        done += 1;
                        progress(done, n);
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                }
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        if let Some(bad) = features.iter().position(|v| !v.is_finite()) {
            let [x, y] = plan.coords[bad / dim];
            return Err(ImagingError::request(
                slide.path(),
                format!(
                    "feature extractor {:?} produced a non-finite value for feature {:?} of the patch at level-0 \
                     ({x}, {y})",
                    extractor.name(),
                    feature_names[bad % dim]
                ),
            ));
        }
    }
    Ok(SlideFeatures {
        extractor: extractor.name().to_string(),
        version: extractor.version(),
        dim,
        feature_names,
        coords: plan.coords,
        features,
        slide_sha256,
        tissue_fraction: plan.tissue_fraction,
        target_mpp: cfg.target_mpp,
        tile_px: cfg.tile_px,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stain_matrix_inverse_is_an_inverse() {
        for (i, row) in RGB_FROM_HED.iter().enumerate() {
            for j in 0..3 {
                let v: f64 = row.iter().zip(&HED_FROM_RGB).map(|(a, col)| a * col[j]).sum();
                assert!((v - f64::from(u8::from(i == j))).abs() < 1e-12, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let mut v: Vec<u32> = (0..11).rev().map(|i| (i as f32).to_bits()).collect();
        assert_eq!(percentiles(&mut v, [0.0, 10.0, 50.0, 95.0, 100.0]), [0.0, 1.0, 5.0, 9.5, 10.0]);
        let mut one = vec![3.0f32.to_bits()];
        assert_eq!(percentiles(&mut one, [10.0, 90.0]), [3.0, 3.0]);
    }

    #[test]
    fn blobs_join_diagonals_and_merging_runs_and_skip_small_ones() {
        let s = 32;
        let mut mask = vec![false; s * s];
        let mut set = |r: usize, c: usize| mask[r * s + c] = true;
        // A diagonal line of 12 pixels: one blob with 8-connectivity (twelve with 4-connectivity).
        (0..12).for_each(|i| set(i, i));
        // A 3×3 square: 9 pixels, below the 10-pixel minimum.
        (0..3).for_each(|r| (13..16).for_each(|c| set(r, c)));
        // A U whose two arms (runs of separate labels) are joined by the bottom row: 5 + 5 + 3 = 13 pixels.
        (0..5).for_each(|r| {
            set(r, 20);
            set(r, 24);
        });
        (21..24).for_each(|c| set(4, c));
        // A 2×6 bar: 12 pixels.
        (20..22).for_each(|r| (2..8).for_each(|c| set(r, c)));
        assert_eq!(nuclear_blobs(&mask, s), (3, 12 + 13 + 12));
    }

    #[test]
    fn flat_patch_has_flat_texture() {
        let rgb = vec![255u8; 32 * 32 * 3];
        let mut out = vec![0f32; HE_NAMES.len()];
        HandcraftedHe.extract(&rgb, 32, &mut out);
        let get = |name: &str| out[HE_NAMES.iter().position(|n| *n == name).expect("name")];
        assert_eq!(get("background_fraction"), 1.0);
        assert_eq!(get("h_od_mean"), 0.0);
        assert_eq!(get("glcm_h_contrast"), 0.0);
        assert_eq!(get("glcm_h_energy"), 1.0);
        assert_eq!(get("glcm_h_correlation"), 1.0);
        assert_eq!(get("grey_mean"), 1.0);
        // Every interior pixel ties with all its neighbours (code 8); border pixels see zeros outside.
        assert!(get("lbp_8") > 0.8);
        let lbp_sum: f32 = (0..10).map(|k| get(&format!("lbp_{k}"))).sum();
        assert!((lbp_sum - 1.0).abs() < 1e-6);
    }
}
