//! Tissue detection on a slide's smallest level: HSV saturation, Otsu threshold.
//!
//! Stained tissue is coloured and glass is grey/white, so saturation separates them better than brightness.
//! Otsu picks the split of the saturation histogram; a floor ([`MIN_SATURATION`]) keeps a blank slide's
//! sensor noise from being split into "tissue" and "background".

use super::Slide;
use crate::ImagingError;

/// Saturations at or below this (of 255) are never tissue, whatever Otsu says.
pub const MIN_SATURATION: u8 = 20;
/// The mask is computed on at most this many pixels per side (the level is subsampled beyond it).
const MAX_MASK_SIDE: u32 = 4096;

/// A boolean tissue mask over a slide, with the level it was computed on.
#[derive(Debug, Clone, PartialEq)]
pub struct TissueMask {
    /// Mask width.
    pub width: usize,
    /// Mask height.
    pub height: usize,
    /// Level-0 pixels per mask pixel (per side).
    pub downsample: f64,
    /// Saturation threshold used (0–255): a pixel is tissue when its saturation is above it.
    pub threshold: u8,
    /// Row-major, `true` = tissue.
    pub mask: Vec<bool>,
}

impl TissueMask {
    /// Share of mask pixels that are tissue, 0 for an empty mask.
    #[must_use]
    pub fn fraction(&self) -> f64 {
        if self.mask.is_empty() {
            return 0.0;
        }
        self.mask.iter().filter(|&&t| t).count() as f64 / self.mask.len() as f64
    }
}

/// Computes the tissue mask on the slide's smallest level, reading it one band of tiles at a time.
///
/// # Errors
///
/// Any error of [`Slide::read_region`] on that level.
pub fn tissue_mask(slide: &Slide) -> Result<TissueMask, ImagingError> {
    let Some((level, &info)) = slide.levels().iter().enumerate().next_back() else {
        return Err(ImagingError::request(slide.path(), "slide has no levels"));
    };
    let step = info.width.max(info.height).div_ceil(MAX_MASK_SIDE).max(1);
    let (mw, mh) = (info.width.div_ceil(step) as usize, info.height.div_ceil(step) as usize);
    let mut saturation = Vec::with_capacity(mw * mh);
    let band = info.tile_h.max(step);
    let mut y = 0;
    while y < info.height {
        let rows = band.min(info.height - y);
        let rgb = slide.read_region(level, 0, y, info.width, rows)?;
        for r in (0..rows).filter(|r| (y + r) % step == 0) {
            for c in (0..info.width).step_by(step as usize) {
                let i = ((r * info.width + c) * 3) as usize;
                saturation.push(hsv_saturation(rgb[i], rgb[i + 1], rgb[i + 2]));
            }
        }
        y += rows;
    }
    let threshold = otsu(&saturation).max(MIN_SATURATION);
    Ok(TissueMask {
        width: mw,
        height: mh,
        downsample: info.downsample * f64::from(step),
        threshold,
        mask: saturation.iter().map(|&s| s > threshold).collect(),
    })
}

/// HSV saturation `(max − min) / max`, scaled to 0–255.
fn hsv_saturation(r: u8, g: u8, b: u8) -> u8 {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    if max == 0 { 0 } else { ((u32::from(max - min) * 255 + u32::from(max) / 2) / u32::from(max)) as u8 }
}

/// Otsu's threshold on a 256-bin histogram: the `t` maximising between-class variance of `≤ t` vs `> t`.
fn otsu(values: &[u8]) -> u8 {
    let mut hist = [0u64; 256];
    values.iter().for_each(|&v| hist[usize::from(v)] += 1);
    let total = values.len() as f64;
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &n)| i as f64 * n as f64).sum();
    let (mut weight_low, mut sum_low) = (0.0, 0.0);
    let (mut best, mut best_t) = (-1.0, 0u8);
    for (t, &n) in hist.iter().enumerate() {
        weight_low += n as f64;
        sum_low += t as f64 * n as f64;
        let weight_high = total - weight_low;
        if weight_low == 0.0 || weight_high == 0.0 {
            continue;
        }
        let mean_low = sum_low / weight_low;
        let mean_high = (sum_all - sum_low) / weight_high;
        let between = weight_low * weight_high * (mean_low - mean_high).powi(2);
        if between > best {
            best = between;
            best_t = t as u8;
        }
    }
    best_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_splits_two_clusters_between_them() {
        let values: Vec<u8> = [10u8; 50].into_iter().chain([200u8; 50]).collect();
        let t = otsu(&values);
        assert!((10..200).contains(&t), "threshold {t}");
    }

    #[test]
    fn saturation_of_grey_is_zero_and_of_pure_red_is_full() {
        assert_eq!(hsv_saturation(128, 128, 128), 0);
        assert_eq!(hsv_saturation(255, 0, 0), 255);
        assert_eq!(hsv_saturation(0, 0, 0), 0);
    }
}
