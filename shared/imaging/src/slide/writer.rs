//! Writing a deflate-tiled pyramidal TIFF, for the synthetic cohort's slides.
//!
//! Deflate rather than JPEG: no pure-Rust JPEG encoder is among our dependencies, and lossless tiles keep
//! synthetic ground truth exact. Each level halves the previous one (2×2 box filter) until the requested
//! count is reached or a level would fit in one tile.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use flate2::Compression as Level;
use flate2::write::ZlibEncoder;

use crate::ImagingError;

/// Writes `rgb` (`width * height * 3` bytes, row-major RGB8) as a little-endian TIFF with up to `levels`
/// deflate-compressed, `tile × tile` tiled pyramid levels, level 0 first, and `mpp` (microns per level-0
/// pixel) as `XResolution`/`YResolution` in pixels per centimetre.
///
/// # Errors
///
/// [`ImagingError::InvalidRequest`] if the buffer size, tile size (a positive multiple of 16), level count
/// or mpp is invalid, or if the file would exceed classic TIFF's 4 GiB; [`ImagingError::Io`] on write failure.
pub fn write_pyramid_tiff(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    tile: u32,
    levels: usize,
    mpp: f64,
) -> Result<(), ImagingError> {
    let (w, h) = (width as usize, height as usize);
    if width == 0 || height == 0 || rgb.len() != w * h * 3 {
        return Err(ImagingError::request(path, format!("{} bytes given for a {width}×{height} RGB image", rgb.len())));
    }
    if tile == 0 || !tile.is_multiple_of(16) || levels == 0 || !(mpp.is_finite() && mpp > 0.0) {
        return Err(ImagingError::request(
            path,
            format!("tile {tile} (must be a positive multiple of 16), levels {levels} (≥ 1), mpp {mpp} (> 0)"),
        ));
    }
    let io = |e: std::io::Error| ImagingError::io(path, e);
    let mut out = Vec::new();
    out.extend_from_slice(b"II*\0\0\0\0\0");

    let mut pyramid = vec![(rgb.to_vec(), w, h)];
    while pyramid.len() < levels {
        let (prev, pw, ph) = &pyramid[pyramid.len() - 1];
        if *pw <= tile as usize && *ph <= tile as usize {
            break;
        }
        let next = halve(prev, *pw, *ph);
        pyramid.push(next);
    }

    let px_per_cm = 10_000.0 / mpp;
    let resolution = rational(px_per_cm);
    let mut ifd_offsets = Vec::new();
    let mut tables = Vec::new();
    for (pixels, lw, lh) in &pyramid {
        let t = tile as usize;
        let (across, down) = (lw.div_ceil(t), lh.div_ceil(t));
        let (mut offsets, mut counts) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; t * t * 3];
        for ty in 0..down {
            for tx in 0..across {
                buf.fill(0);
                for r in 0..t.min(lh - ty * t) {
                    let n = t.min(lw - tx * t) * 3;
                    let src = ((ty * t + r) * lw + tx * t) * 3;
                    buf[r * t * 3..r * t * 3 + n].copy_from_slice(&pixels[src..src + n]);
                }
                let mut z = ZlibEncoder::new(Vec::new(), Level::default());
                z.write_all(&buf).map_err(io)?;
                let compressed = z.finish().map_err(io)?;
                offsets.push(out.len());
                counts.push(compressed.len());
                out.extend_from_slice(&compressed);
            }
        }
        tables.push((offsets, counts, *lw, *lh));
    }
    for (i, (offsets, counts, lw, lh)) in tables.iter().enumerate() {
        if out.len() % 2 == 1 {
            out.push(0);
        }
        ifd_offsets.push(out.len());
        let longs = |v: &[usize]| -> Result<Vec<u8>, ImagingError> {
            v.iter()
                .map(|&x| u32::try_from(x).map(u32::to_le_bytes))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat())
                .map_err(|_| ImagingError::request(path, "pyramid exceeds classic TIFF's 4 GiB"))
        };
        let short = |v: u16| v.to_le_bytes().to_vec();
        let long = |v: usize| (v as u32).to_le_bytes().to_vec();
        let mut entries: Vec<(u16, u16, u32, Vec<u8>)> = vec![
            (254, 4, 1, long(usize::from(i > 0))),
            (256, 4, 1, long(*lw)),
            (257, 4, 1, long(*lh)),
            (258, 3, 3, [8u16, 8, 8].iter().flat_map(|b| b.to_le_bytes()).collect()),
            (259, 3, 1, short(8)),
            (262, 3, 1, short(2)),
            (277, 3, 1, short(3)),
            (282, 5, 1, resolution.clone()),
            (283, 5, 1, resolution.clone()),
            (284, 3, 1, short(1)),
            (296, 3, 1, short(3)),
            (322, 4, 1, long(tile as usize)),
            (323, 4, 1, long(tile as usize)),
            (324, 4, offsets.len() as u32, longs(offsets)?),
            (325, 4, counts.len() as u32, longs(counts)?),
        ];
        if i == 0 {
            let text = b"fedhcc-imaging synthetic pyramid\0".to_vec();
            entries.push((270, 2, text.len() as u32, text));
            entries.sort_by_key(|e| e.0);
        }
        let ifd_start = out.len();
        let ifd_len = 2 + 12 * entries.len() + 4;
        let mut extra = Vec::new();
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, kind, count, data) in &entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            if data.len() <= 4 {
                let mut field = [0u8; 4];
                field[..data.len()].copy_from_slice(data);
                out.extend_from_slice(&field);
            } else {
                // Values that do not fit the entry follow the directory, word-aligned.
                out.extend_from_slice(&longs(&[ifd_start + ifd_len + extra.len()])?);
                extra.extend_from_slice(data);
                if extra.len() % 2 == 1 {
                    extra.push(0);
                }
            }
        }
        out.extend_from_slice(&[0, 0, 0, 0]); // next IFD, patched below
        out.extend_from_slice(&extra);
    }
    // Chain: header → IFD 0 → IFD 1 → …
    let first = u32::try_from(ifd_offsets[0]).map_err(|_| ImagingError::request(path, "pyramid exceeds 4 GiB"))?;
    out[4..8].copy_from_slice(&first.to_le_bytes());
    for pair in ifd_offsets.windows(2) {
        let entries = u16::from_le_bytes([out[pair[0]], out[pair[0] + 1]]) as usize;
        let at = pair[0] + 2 + 12 * entries;
        out[at..at + 4].copy_from_slice(&(pair[1] as u32).to_le_bytes());
    }

    let mut file = BufWriter::new(File::create(path).map_err(io)?);
    file.write_all(&out).map_err(io)?;
    file.flush().map_err(io)
}

/// Halves an RGB image with a 2×2 box filter (edge pixels averaged with what exists).
fn halve(pixels: &[u8], w: usize, h: usize) -> (Vec<u8>, usize, usize) {
    let (nw, nh) = (w.div_ceil(2), h.div_ceil(2));
    let mut out = vec![0u8; nw * nh * 3];
    for y in 0..nh {
        for x in 0..nw {
            for c in 0..3 {
                let (mut sum, mut n) = (0u32, 0u32);
                for (sy, sx) in [(2 * y, 2 * x), (2 * y, 2 * x + 1), (2 * y + 1, 2 * x), (2 * y + 1, 2 * x + 1)] {
                    if sy < h && sx < w {
                        sum += u32::from(pixels[(sy * w + sx) * 3 + c]);
                        n += 1;
                    }
                }
                out[(y * nw + x) * 3 + c] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    (out, nw, nh)
}

/// A TIFF RATIONAL close to `v` (denominator 10 000).
fn rational(v: f64) -> Vec<u8> {
    let den = 10_000u32;
    let num = (v * f64::from(den)).round().clamp(1.0, f64::from(u32::MAX)) as u32;
    [num.to_le_bytes(), den.to_le_bytes()].concat()
}
