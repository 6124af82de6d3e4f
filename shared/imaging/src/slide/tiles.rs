//! Tiling a slide at a target resolution: which level to read, which tiles hold tissue, and a deterministic cap.
//!
//! The grid is laid on the level whose resolution is the coarsest one still at least as fine as the target
//! (`target_mpp`, 5 % tolerance, so a 0.504 µm/px scan serves a 0.5 µm/px study). Each tile is one square
//! [`Slide::read_region`] of `read_px` pixels at that level, resampled to `tile_px`: memory stays a few tiles
//! whatever the slide's size. Tiles that would run off the slide's edge are dropped. The slide's tissue mask
//! ([`tissue_mask`], computed on the smallest level) decides which tiles are kept: the share of the tile's area
//! covered by tissue mask pixels (area-weighted) must reach `min_tissue`. Above `max_patches`, a seeded
//! subsample is taken that depends only on the tile coordinates and the seed, so the same slide and
//! configuration always give the same tiles.

use serde::{Deserialize, Serialize};

use super::{Slide, TissueMask, tissue_mask};
use crate::ImagingError;

/// A level qualifies when its resolution is at most this factor coarser than the target.
const MPP_TOLERANCE: f64 = 1.05;
/// Largest square read for one tile (pixels per side, ~200 MiB of RGB).
const MAX_READ_PX: u32 = 8192;

/// How a slide is cut into patches. Deserialises from a study TOML `[imaging.wsi]` table; absent keys take
/// the defaults below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TilingConfig {
    /// Resolution of the patches, microns per pixel (default 0.5, i.e. about 20× magnification).
    pub target_mpp: f64,
    /// Side of a patch in pixels at `target_mpp` (default 256).
    pub tile_px: u32,
    /// Minimum share of a tile's area that the tissue mask marks as tissue, 0–1 (default 0.5).
    pub min_tissue: f64,
    /// Most patches kept per slide; above it a seeded subsample is taken (default 1000).
    pub max_patches: usize,
    /// Seed of that subsample (default 0).
    pub seed: u64,
    /// Microns per level-0 pixel to assume for a slide that does not record its resolution. `None` (the
    /// default): such a slide is refused with a message, because patches at an unknown scale are not
    /// comparable with the others.
    pub assume_mpp: Option<f64>,
}

impl Default for TilingConfig {
    fn default() -> Self {
        Self { target_mpp: 0.5, tile_px: 256, min_tissue: 0.5, max_patches: 1000, seed: 0, assume_mpp: None }
    }
}

impl TilingConfig {
    /// Checks the ranges of every field.
    ///
    /// # Errors
    ///
    /// A message naming the `[imaging.wsi]` key that is out of range, its value, and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        let mpp_ok = |v: f64| v.is_finite() && v > 0.0 && v <= 1000.0;
        if !mpp_ok(self.target_mpp) {
            return Err(format!(
                "imaging.wsi.target_mpp must be a resolution in microns per pixel above 0 and at most 1000, got {}",
                self.target_mpp
            ));
        }
        if !(16..=4096).contains(&self.tile_px) {
            return Err(format!("imaging.wsi.tile_px must be between 16 and 4096 pixels, got {}", self.tile_px));
        }
        if !(0.0..=1.0).contains(&self.min_tissue) {
            return Err(format!("imaging.wsi.min_tissue must be a fraction between 0 and 1, got {}", self.min_tissue));
        }
        if !(1..=1_000_000).contains(&self.max_patches) {
            return Err(format!("imaging.wsi.max_patches must be between 1 and 1000000, got {}", self.max_patches));
        }
        if let Some(mpp) = self.assume_mpp
            && !mpp_ok(mpp)
        {
            return Err(format!(
                "imaging.wsi.assume_mpp must be a resolution in microns per pixel above 0 and at most 1000, got {mpp}"
            ));
        }
        Ok(())
    }
}

/// Where a slide's patches are read from.
#[derive(Debug, Clone, PartialEq)]
pub struct TilePlan {
    /// Pyramid level the tiles are read from.
    pub level: usize,
    /// Microns per pixel of that level.
    pub level_mpp: f64,
    /// Side of the square read at `level` for one tile (resampled to `tile_px`).
    pub read_px: u32,
    /// Level-0 top-left corner `[x, y]` of each kept tile, row-major (by y, then x).
    pub coords: Vec<[u32; 2]>,
    /// Share of the whole slide that the tissue mask marks as tissue.
    pub tissue_fraction: f64,
    /// Tiles that passed the tissue test, before the `max_patches` cap.
    pub candidates: usize,
}

/// Plans the patches of a slide: the level, the read size and the kept tiles' coordinates.
///
/// # Errors
///
/// [`ImagingError::InvalidRequest`] (naming the slide) when the configuration is invalid, the slide does not
/// record its resolution and `assume_mpp` is not set, the slide is coarser than `target_mpp`, or it has no level
/// close enough to the target for a tile to be read in one piece of at most 8192 pixels a side; any error of
/// [`tissue_mask`] (a corrupt tile of the smallest level names the level and the tile).
pub fn plan_tiles(slide: &Slide, cfg: &TilingConfig) -> Result<TilePlan, ImagingError> {
    cfg.validate().map_err(|e| ImagingError::request(slide.path(), e))?;
    let mpp0 = match (slide.mpp(), cfg.assume_mpp) {
        (Some(mpp), _) => mpp,
        (None, Some(assumed)) => assumed,
        (None, None) => {
            return Err(ImagingError::request(
                slide.path(),
                "the slide does not record its resolution (microns per pixel); set imaging.wsi.assume_mpp if \
                 this site's slides were all scanned at one known resolution, or re-export the slide with it",
            ));
        }
    };
    let (level, level_mpp) = choose_level(slide, mpp0, cfg.target_mpp).ok_or_else(|| {
        ImagingError::request(
            slide.path(),
            format!(
                "the slide's full resolution is {mpp0:.4} µm/px, coarser than the study's target of {} µm/px \
                 (imaging.wsi.target_mpp); it was scanned at too low a magnification, or its file records a \
                 placeholder resolution",
                cfg.target_mpp
            ),
        )
    })?;
    let info = slide.levels()[level];
    let read = (f64::from(cfg.tile_px) * cfg.target_mpp / level_mpp).round().max(1.0);
    if read > f64::from(MAX_READ_PX) {
        return Err(ImagingError::request(
            slide.path(),
            format!(
                "the slide has no pyramid level near {} µm/px (the nearest finer one is {level_mpp:.4} µm/px), so \
                 each {}-pixel patch would need a {read}-pixel read; add pyramid levels (e.g. `vips tiffsave \
                 --tile --pyramid`) or choose a finer imaging.wsi.target_mpp",
                cfg.target_mpp, cfg.tile_px
            ),
        ));
    }
    let read_px = read as u32;
    let mask = tissue_mask(slide)?;

    let mut kept = Vec::new();
    let (across, down) = (info.width / read_px, info.height / read_px);
    let side0 = f64::from(read_px) * info.downsample;
    for row in 0..down {
        for col in 0..across {
            let (lx, ly) = (col * read_px, row * read_px);
            let x0 = f64::from(lx) * info.downsample;
            let y0 = f64::from(ly) * info.downsample;
            if tile_tissue(&mask, x0, y0, side0) >= cfg.min_tissue {
                kept.push([to_level0(lx, info.downsample), to_level0(ly, info.downsample)]);
            }
        }
    }
    let candidates = kept.len();
    if kept.len() > cfg.max_patches {
        kept.sort_by_key(|&[x, y]| (subsample_key(cfg.seed, x, y), y, x));
        kept.truncate(cfg.max_patches);
        kept.sort_by_key(|&[x, y]| (y, x));
    }
    Ok(TilePlan { level, level_mpp, read_px, coords: kept, tissue_fraction: mask.fraction(), candidates })
}

/// The coarsest level whose resolution is within [`MPP_TOLERANCE`] of the target, with its mpp.
fn choose_level(slide: &Slide, mpp0: f64, target: f64) -> Option<(usize, f64)> {
    slide
        .levels()
        .iter()
        .enumerate()
        .map(|(i, l)| (i, mpp0 * l.downsample))
        .filter(|&(_, mpp)| mpp <= target * MPP_TOLERANCE)
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// A level-local coordinate in level-0 pixels. [`to_level`] inverts it exactly: the rounding error here is at
/// most half a level-0 pixel, under half a level pixel whenever the downsample exceeds 1.
fn to_level0(v: u32, downsample: f64) -> u32 {
    (f64::from(v) * downsample).round().min(f64::from(u32::MAX)) as u32
}

/// A level-0 coordinate in the pixel grid of a level of the given downsample.
pub(crate) fn to_level(v0: u32, downsample: f64) -> u32 {
    (f64::from(v0) / downsample).round() as u32
}

/// Share of the level-0 square `[x0, x0 + side) × [y0, y0 + side)` that is tissue, weighting each mask pixel
/// by its overlap with the square (so a tile smaller than a mask pixel is still judged).
fn tile_tissue(mask: &TissueMask, x0: f64, y0: f64, side: f64) -> f64 {
    let d = mask.downsample;
    let span = |start: f64, len: usize| {
        let first = (start / d).floor().max(0.0) as usize;
        let last = (((start + side) / d).ceil() as usize).min(len);
        (first, last)
    };
    let overlap = |i: usize, start: f64| {
        let (a, b) = (i as f64 * d, (i + 1) as f64 * d);
        (b.min(start + side) - a.max(start)).max(0.0)
    };
    let ((cx0, cx1), (cy0, cy1)) = (span(x0, mask.width), span(y0, mask.height));
    let (mut tissue, mut total) = (0.0, 0.0);
    for my in cy0..cy1 {
        let wy = overlap(my, y0);
        for mx in cx0..cx1 {
            let w = wy * overlap(mx, x0);
            total += w;
            if mask.mask[my * mask.width + mx] {
                tissue += w;
            }
        }
    }
    if total > 0.0 { tissue / total } else { 0.0 }
}

/// Sort key of a tile in the seeded subsample: a hash of the seed and the level-0 coordinates (SplitMix64
/// finaliser), so the choice does not depend on the order tiles were found in.
fn subsample_key(seed: u64, x: u32, y: u32) -> u64 {
    splitmix64(seed ^ splitmix64((u64::from(x) << 32) | u64::from(y)))
}

fn splitmix64(v: u64) -> u64 {
    let mut z = v.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Resamples a square RGB8 image of side `src` to side `dst` by area averaging (each output pixel is the
/// mean of the input area it covers, fractional pixels weighted by their overlap); a copy when equal.
pub(crate) fn resample_square(rgb: &[u8], src: usize, dst: usize) -> Vec<u8> {
    if src == dst {
        return rgb.to_vec();
    }
    let weights = area_weights(src, dst);
    // Horizontal pass: src rows × dst columns.
    let mut tmp = vec![0f32; src * dst * 3];
    for y in 0..src {
        let row = &rgb[y * src * 3..(y + 1) * src * 3];
        let out = &mut tmp[y * dst * 3..(y + 1) * dst * 3];
        for (x, (start, ws)) in weights.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &w) in ws.iter().enumerate() {
                let i = (start + k) * 3;
                for c in 0..3 {
                    acc[c] += w * f32::from(row[i + c]);
                }
            }
            out[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass.
    let mut out = vec![0u8; dst * dst * 3];
    let mut acc = vec![0f32; dst * 3];
    for (y, (start, ws)) in weights.iter().enumerate() {
        acc.fill(0.0);
        for (k, &w) in ws.iter().enumerate() {
            let src_row = &tmp[(start + k) * dst * 3..(start + k + 1) * dst * 3];
            acc.iter_mut().zip(src_row).for_each(|(a, &v)| *a += w * v);
        }
        let dst_row = &mut out[y * dst * 3..(y + 1) * dst * 3];
        dst_row.iter_mut().zip(&acc).for_each(|(o, &a)| *o = a.round().clamp(0.0, 255.0) as u8);
    }
    out
}

/// For each output index, the first input index it covers and the weights (summing to 1) of the inputs.
fn area_weights(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            let (a, b) = (o as f64 * scale, ((o + 1) as f64 * scale).min(src as f64));
            let first = (a.floor() as usize).min(src - 1);
            let last = (b.ceil() as usize).clamp(first + 1, src);
            let ws = (first..last)
                .map(|i| {
                    let overlap = (b.min((i + 1) as f64) - a.max(i as f64)).max(0.0);
                    (overlap / (b - a)) as f32
                })
                .collect();
            (first, ws)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_coordinates_round_trip_exactly() {
        for ds in [1.0, 2.0, 4.0, 4.032_258, 3.999_9, 16.0] {
            for v in [0u32, 1, 255, 256, 511, 4096, 99_999] {
                assert_eq!(to_level(to_level0(v, ds), ds), v, "downsample {ds}, v {v}");
            }
        }
    }

    #[test]
    fn area_resampling_halves_by_averaging_and_keeps_flat_images_flat() {
        // 4×4 → 2×2: each output pixel is the mean of a 2×2 block.
        let src: Vec<u8> = (0..16u8).flat_map(|i| [i * 10, 0, 255]).collect();
        let out = resample_square(&src, 4, 2);
        let red: Vec<u8> = out.iter().step_by(3).copied().collect();
        assert_eq!(red, vec![25, 45, 105, 125]);
        assert!(out.iter().skip(2).step_by(3).all(|&b| b == 255));
        // Non-integer ratios, both ways, keep a flat image flat.
        let flat = vec![77u8; 37 * 37 * 3];
        assert!(resample_square(&flat, 37, 16).iter().all(|&v| v == 77));
        assert!(resample_square(&flat, 37, 40).iter().all(|&v| v == 77));
    }

    #[test]
    fn area_weights_sum_to_one() {
        for (src, dst) in [(512, 256), (257, 256), (246, 256), (1000, 3), (3, 7)] {
            for (start, ws) in area_weights(src, dst) {
                assert!(start + ws.len() <= src);
                let s: f32 = ws.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{src}->{dst}: {s}");
            }
        }
    }

    #[test]
    fn validate_names_the_key_out_of_range() {
        assert!(TilingConfig::default().validate().is_ok());
        let bad = TilingConfig { tile_px: 8, ..TilingConfig::default() };
        assert!(bad.validate().is_err_and(|e| e.contains("tile_px") && e.contains('8')));
        let bad = TilingConfig { min_tissue: 1.5, ..TilingConfig::default() };
        assert!(bad.validate().is_err_and(|e| e.contains("min_tissue")));
        let bad = TilingConfig { target_mpp: f64::NAN, ..TilingConfig::default() };
        assert!(bad.validate().is_err_and(|e| e.contains("target_mpp")));
        let bad = TilingConfig { max_patches: 0, ..TilingConfig::default() };
        assert!(bad.validate().is_err_and(|e| e.contains("max_patches")));
        let bad = TilingConfig { assume_mpp: Some(-1.0), ..TilingConfig::default() };
        assert!(bad.validate().is_err_and(|e| e.contains("assume_mpp")));
    }

    #[test]
    fn subsample_key_depends_on_seed_and_coordinates() {
        assert_eq!(subsample_key(1, 10, 20), subsample_key(1, 10, 20));
        assert_ne!(subsample_key(1, 10, 20), subsample_key(2, 10, 20));
        assert_ne!(subsample_key(1, 10, 20), subsample_key(1, 20, 10));
    }
}
