//! Whole-slide images: Aperio SVS and generic pyramidal TIFF, read one tile at a time.
//!
//! [`Slide::open`] reads only the TIFF directories; [`Slide::read_region`] decodes just the tiles (or strips)
//! a region touches, so a 100 000 px slide costs what the region costs.
//!
//! Which directories are pyramid levels: the first directory is level 0. In an SVS file (its first
//! ImageDescription starts with "Aperio") the other *tiled* directories are levels and the stripped ones
//! (thumbnail, label, macro) are not, as in OpenSlide. In a generic TIFF, any later directory, tiled or
//! stripped, is a level when its size is a downsample of level 0 (same aspect, smaller) and it is not a mask
//! (`NewSubfileType` bit 2) or a label/macro by description. Levels are ordered from largest to smallest.

mod cache;
mod codec;
mod features;
mod ifd;
mod jpeg_writer;
mod tiles;
mod tissue;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use cache::{FeatureCache, file_sha256};
pub use codec::Compression;
pub use features::{HANDCRAFTED_HE_NAME, HandcraftedHe, PatchFeatureExtractor, SlideFeatures, extract_slide_features};
pub use jpeg_writer::{JpegPyramid, MAX_JPEG_TILE, RegionSource, write_jpeg_pyramid_tiff};
pub use tiles::{TilePlan, TilingConfig, plan_tiles};
pub use tissue::{TissueMask, tissue_mask};
pub use writer::write_pyramid_tiff;

use crate::ImagingError;
use codec::{Codec, Photometric};
use ifd::Ifd;

/// Largest region [`Slide::read_region`] returns (pixels), ~768 MiB of RGB.
pub const MAX_REGION_PIXELS: u64 = 1 << 28;
/// Largest decoded tile or strip accepted (bytes); larger ones are refused at open.
const MAX_CHUNK_BYTES: u64 = 256 << 20;

/// Which kind of slide file this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SlideFormat {
    /// Aperio SVS (a TIFF whose first ImageDescription starts with "Aperio").
    Aperio,
    /// Any other pyramidal (or single-level) TIFF.
    GenericTiff,
}

/// One pyramid level.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Level {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Tile width; the level width for a stripped level.
    pub tile_w: u32,
    /// Tile height; rows per strip for a stripped level.
    pub tile_h: u32,
    /// Level-0 pixels per pixel of this level (mean of the x and y ratios, as OpenSlide reports).
    pub downsample: f64,
    /// How the tiles are compressed.
    pub compression: Compression,
    /// Whether the level is tiled (else stripped).
    pub tiled: bool,
}

/// Decoding state of one level.
#[derive(Debug, Clone)]
struct LevelData {
    codec: Codec,
    offsets: Vec<u64>,
    counts: Vec<u64>,
    tiles_across: usize,
}

/// An open slide. Reads take `&self` and may run from several threads (file access is serialised).
#[derive(Debug)]
pub struct Slide {
    path: PathBuf,
    file: Mutex<File>,
    file_len: u64,
    format: SlideFormat,
    levels: Vec<Level>,
    data: Vec<LevelData>,
    mpp: Option<f64>,
    description: String,
}

impl Slide {
    /// Opens a slide and reads its directories (no pixel data).
    ///
    /// # Errors
    ///
    /// [`ImagingError::Io`] if the file cannot be opened, [`ImagingError::InvalidFormat`] /
    /// [`ImagingError::Truncated`] if it is not a readable TIFF, and [`ImagingError::Unsupported`] if a level
    /// uses a compression, sample layout or bit depth other than 8-bit chunky RGB/greyscale with JPEG,
    /// deflate, LZW or no compression (e.g. Aperio's JPEG 2000).
    pub fn open(path: &Path) -> Result<Self, ImagingError> {
        let mut file = File::open(path).map_err(|e| ImagingError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ImagingError::io(path, e))?.len();
        let ifds = ifd::read_ifds(path, &mut file, file_len)?;
        let description = ifds[0].ascii(ifd::IMAGE_DESCRIPTION).unwrap_or_default().to_string();
        let format = if description.starts_with("Aperio") { SlideFormat::Aperio } else { SlideFormat::GenericTiff };

        let base = (dimension(&ifds[0], ifd::IMAGE_WIDTH), dimension(&ifds[0], ifd::IMAGE_LENGTH));
        let (Some(w0), Some(h0)) = base else {
            return Err(ImagingError::invalid(path, "TIFF", "first directory has no ImageWidth/ImageLength"));
        };
        let mut chosen: Vec<&Ifd> = vec![&ifds[0]];
        for d in &ifds[1..] {
            let tiled = d.tags.contains_key(&ifd::TILE_WIDTH);
            let desc = d.ascii(ifd::IMAGE_DESCRIPTION).unwrap_or_default().to_ascii_lowercase();
            let is_mask = d.uint(ifd::NEW_SUBFILE_TYPE).unwrap_or(0) & 4 != 0;
            if is_mask || desc.contains("label") || desc.contains("macro") {
                continue;
            }
            if format == SlideFormat::Aperio && !tiled {
                continue;
            }
            let (Some(w), Some(h)) = (dimension(d, ifd::IMAGE_WIDTH), dimension(d, ifd::IMAGE_LENGTH)) else {
                continue;
            };
            if w < w0 && h < h0 && is_downsample(w0, h0, w, h) {
                chosen.push(d);
            }
        }
        chosen.sort_by_key(|d| std::cmp::Reverse(dimension(d, ifd::IMAGE_WIDTH)));

        let mut levels = Vec::with_capacity(chosen.len());
        let mut data = Vec::with_capacity(chosen.len());
        for (index, d) in chosen.into_iter().enumerate() {
            let (level, level_data) = level_of(path, index, d, (w0, h0), file_len)?;
            levels.push(level);
            data.push(level_data);
        }

        let mpp = match format {
            SlideFormat::Aperio => aperio_mpp(&description),
            SlideFormat::GenericTiff => resolution_mpp(&ifds[0]),
        };
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file), file_len, format, levels, data, mpp, description })
    }

    /// The file this slide was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SVS or generic TIFF.
    #[must_use]
    pub fn format(&self) -> SlideFormat {
        self.format
    }

    /// Pyramid levels, largest first.
    #[must_use]
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Microns per level-0 pixel: Aperio's `MPP = …` for SVS; for TIFF, `XResolution` with `ResolutionUnit`
    /// inch or centimetre (none when the unit is absent or "none").
    #[must_use]
    pub fn mpp(&self) -> Option<f64> {
        self.mpp
    }

    /// The first directory's ImageDescription (Aperio's key/value header for SVS).
    #[must_use]
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Reads a `w × h` region of `level` whose top-left pixel is `(x, y)` **in that level's pixel grid**
    /// (not level-0 coordinates), as RGB8, row-major, `w * h * 3` bytes. Parts outside the level are white.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] for a level that does not exist or a region over
    /// [`MAX_REGION_PIXELS`]; [`ImagingError::Tile`] / [`ImagingError::Truncated`] when a tile the region
    /// touches is corrupt or lies past the end of the file.
    pub fn read_region(&self, level: usize, x: u32, y: u32, w: u32, h: u32) -> Result<Vec<u8>, ImagingError> {
        let (Some(info), Some(ld)) = (self.levels.get(level), self.data.get(level)) else {
            return Err(ImagingError::request(
                &self.path,
                format!("level {level} requested, the slide has {} levels", self.levels.len()),
            ));
        };
        if u64::from(w) * u64::from(h) > MAX_REGION_PIXELS {
            return Err(ImagingError::request(
                &self.path,
                format!("region {w}×{h} exceeds {MAX_REGION_PIXELS} pixels; read it in pieces"),
            ));
        }
        let (w, h) = (w as usize, h as usize);
        let mut out = vec![255u8; w * h * 3];
        let (x0, y0) = (x as usize, y as usize);
        let (x1, y1) = ((x0 + w).min(info.width as usize), (y0 + h).min(info.height as usize));
        if x0 >= x1 || y0 >= y1 {
            return Ok(out);
        }
        let (tw, th) = (info.tile_w as usize, info.tile_h as usize);
        for row in y0 / th..=(y1 - 1) / th {
            for col in x0 / tw..=(x1 - 1) / tw {
                let tile = self.decode_tile(level, info, ld, col, row)?;
                // Rows of this tile that the region covers, in level coordinates.
                let (ty0, tx0) = (row * th, col * tw);
                let tile_rows = th.min(info.height as usize - ty0);
                for ly in y0.max(ty0)..y1.min(ty0 + tile_rows) {
                    let lx0 = x0.max(tx0);
                    let lx1 = x1.min(tx0 + tw);
                    let src = ((ly - ty0) * tw + (lx0 - tx0)) * 3;
                    let dst = ((ly - y0) * w + (lx0 - x0)) * 3;
                    let n = (lx1 - lx0) * 3;
                    out[dst..dst + n].copy_from_slice(&tile[src..src + n]);
                }
            }
        }
        Ok(out)
    }

    /// Decodes tile `(col, row)` to RGB8 of `tile_w × rows` (rows = `tile_h`, fewer for a last strip).
    fn decode_tile(
        &self,
        level: usize,
        info: &Level,
        ld: &LevelData,
        col: usize,
        row: usize,
    ) -> Result<Vec<u8>, ImagingError> {
        let index = row * ld.tiles_across + col;
        let tile_err =
            |reason: String| ImagingError::Tile { path: self.path.clone(), level, tile: index, col, row, reason };
        let (tw, th) = (info.tile_w as usize, info.tile_h as usize);
        let rows = if info.tiled { th } else { th.min(info.height as usize - row * th) };
        let (Some(&offset), Some(&count)) = (ld.offsets.get(index), ld.counts.get(index)) else {
            return Err(tile_err("missing from the offset table".into()));
        };
        if count == 0 {
            // A sparse tile: nothing was scanned there.
            return Ok(vec![255u8; tw * rows * 3]);
        }
        let bytes = {
            let mut file = self.file.lock().map_err(|_| tile_err("file lock poisoned by a panicked reader".into()))?;
            ifd::read_at(&self.path, &mut file, self.file_len, offset, count).map_err(|e| match e {
                ImagingError::Truncated { reason, .. } => tile_err(format!("file is truncated: {reason}")),
                other => other,
            })?
        };
        ld.codec.decode(&bytes, tw, rows).map_err(tile_err)
    }
}

fn dimension(d: &Ifd, tag: u16) -> Option<u32> {
    d.uint(tag).and_then(|v| u32::try_from(v).ok()).filter(|&v| v > 0)
}

/// Whether `w × h` is level-0 `w0 × h0` shrunk by one factor, up to the rounding of repeated halving.
fn is_downsample(w0: u32, h0: u32, w: u32, h: u32) -> bool {
    let d = (f64::from(w0) / f64::from(w) + f64::from(h0) / f64::from(h)) / 2.0;
    let tol = |n: u32| 2.0 + 0.02 * f64::from(n);
    (f64::from(w0) / d - f64::from(w)).abs() <= tol(w) && (f64::from(h0) / d - f64::from(h)).abs() <= tol(h)
}

fn level_of(
    path: &Path,
    index: usize,
    d: &Ifd,
    (w0, h0): (u32, u32),
    file_len: u64,
) -> Result<(Level, LevelData), ImagingError> {
    let unsupported = |what: String| ImagingError::unsupported(path, format!("level {index}: {what}"));
    let invalid = |what: String| ImagingError::invalid(path, "TIFF", format!("level {index}: {what}"));
    let width = dimension(d, ifd::IMAGE_WIDTH).ok_or_else(|| invalid("no ImageWidth".into()))?;
    let height = dimension(d, ifd::IMAGE_LENGTH).ok_or_else(|| invalid("no ImageLength".into()))?;
    let code = d.uint(ifd::COMPRESSION).unwrap_or(1);
    let compression = Compression::from_tag(code).ok_or_else(|| {
        let name = match code {
            6 => "old-style JPEG (6)".to_string(),
            33003 | 33005 => format!("Aperio JPEG 2000 ({code})"),
            34712 => "JPEG 2000 (34712)".to_string(),
            other => format!("{other}"),
        };
        unsupported(format!("TIFF compression {name} is not supported (JPEG, deflate, LZW or none are)"))
    })?;
    let samples = d.uint(ifd::SAMPLES_PER_PIXEL).unwrap_or(1) as usize;
    if samples == 0 || samples > 8 {
        return Err(invalid(format!("{samples} samples per pixel")));
    }
    let bits = d.uints(ifd::BITS_PER_SAMPLE).map_or(vec![1], <[u64]>::to_vec);
    if bits.iter().any(|&b| b != 8) {
        return Err(unsupported(format!("bits per sample {bits:?}; only 8-bit samples are read")));
    }
    if d.uint(ifd::PLANAR_CONFIGURATION).unwrap_or(1) != 1 && samples > 1 {
        return Err(unsupported("planar (separate) sample configuration".into()));
    }
    if d.uint(ifd::SAMPLE_FORMAT).unwrap_or(1) != 1 {
        return Err(unsupported("non-integer sample format".into()));
    }
    let photometric = match d.uint(ifd::PHOTOMETRIC) {
        Some(0) => Photometric::WhiteIsZero,
        Some(1) => Photometric::BlackIsZero,
        Some(2) => Photometric::Rgb,
        Some(6) => Photometric::YCbCr,
        // Absent: JPEG tiles carry their own colour; otherwise guess from the sample count.
        None if samples >= 3 => Photometric::Rgb,
        None => Photometric::BlackIsZero,
        Some(other) => return Err(unsupported(format!("photometric interpretation {other}"))),
    };
    let predictor = match d.uint(ifd::PREDICTOR).unwrap_or(1) {
        1 => false,
        2 => true,
        other => return Err(unsupported(format!("predictor {other}"))),
    };
    let tiled = d.tags.contains_key(&ifd::TILE_WIDTH);
    let (tile_w, tile_h, offsets_tag, counts_tag) = if tiled {
        let tw = dimension(d, ifd::TILE_WIDTH).ok_or_else(|| invalid("TileWidth is 0".into()))?;
        let th = dimension(d, ifd::TILE_LENGTH).ok_or_else(|| invalid("no TileLength".into()))?;
        (tw, th, ifd::TILE_OFFSETS, ifd::TILE_BYTE_COUNTS)
    } else {
        let rps = d.uint(ifd::ROWS_PER_STRIP).map_or(height, |r| r.min(u64::from(height)) as u32).max(1);
        (width, rps, ifd::STRIP_OFFSETS, ifd::STRIP_BYTE_COUNTS)
    };
    let chunk_bytes = u64::from(tile_w) * u64::from(tile_h) * samples.max(3) as u64;
    if chunk_bytes > MAX_CHUNK_BYTES {
        return Err(unsupported(format!(
            "{} of {tile_w}×{tile_h} pixels ({chunk_bytes} bytes decoded) exceed {MAX_CHUNK_BYTES} bytes; \
             re-tile the image (e.g. `vips tiffsave --tile --pyramid`)",
            if tiled { "tiles" } else { "strips" }
        )));
    }
    let tiles_across = width.div_ceil(tile_w) as usize;
    let tiles_down = height.div_ceil(tile_h) as usize;
    let offsets = d.uints(offsets_tag).map(<[u64]>::to_vec).unwrap_or_default();
    let counts = d.uints(counts_tag).map(<[u64]>::to_vec).unwrap_or_default();
    let needed = tiles_across * tiles_down;
    if offsets.len() < needed || counts.len() < needed {
        return Err(invalid(format!(
            "{needed} tiles needed, offset table has {} and byte-count table {}",
            offsets.len(),
            counts.len()
        )));
    }
    // A chunk beyond the end is reported when it is read (the rest of the slide may still be usable), but a
    // tile larger than the whole file is a corrupt table.
    if let Some(i) = counts.iter().position(|&c| c > file_len) {
        return Err(invalid(format!("tile {i} claims {} bytes, more than the file holds", counts[i])));
    }
    let jpeg_tables = d.bytes(ifd::JPEG_TABLES).map(<[u8]>::to_vec).or_else(|| match d.tags.get(&ifd::JPEG_TABLES) {
        Some(ifd::Value::Unsigned(v)) => Some(v.iter().map(|&b| b as u8).collect()),
        _ => None,
    });
    let downsample = (f64::from(w0) / f64::from(width) + f64::from(h0) / f64::from(height)) / 2.0;
    Ok((
        Level { width, height, tile_w, tile_h, downsample, compression, tiled },
        LevelData {
            codec: Codec { compression, photometric, samples, predictor, jpeg_tables },
            offsets,
            counts,
            tiles_across,
        },
    ))
}

/// Aperio's `|MPP = 0.4990|` key in the first ImageDescription.
fn aperio_mpp(description: &str) -> Option<f64> {
    description.split('|').find_map(|field| {
        let (key, value) = field.split_once('=')?;
        (key.trim() == "MPP").then(|| value.trim().parse::<f64>().ok()).flatten().filter(|v| *v > 0.0)
    })
}

/// `XResolution` (pixels per unit) with `ResolutionUnit` 2 (inch) or 3 (centimetre), as microns per pixel.
fn resolution_mpp(d: &Ifd) -> Option<f64> {
    let (num, den) = d.rational(ifd::X_RESOLUTION)?;
    if num == 0 || den == 0 {
        return None;
    }
    let per_unit = f64::from(num) / f64::from(den);
    match d.uint(ifd::RESOLUTION_UNIT).unwrap_or(2) {
        2 => Some(25_400.0 / per_unit),
        3 => Some(10_000.0 / per_unit),
        _ => None,
    }
}
