//! Writing a JPEG-tiled pyramidal TIFF band by band, the way a slide scanner does, for the synthetic cohort.
//!
//! Level 0 is pulled from a caller's source one tile-row band at a time; every tile is JPEG-encoded (YCbCr,
//! photometric 6, compression 7; chroma 4:2:0 below quality 90, else 4:4:4) as soon as its band is complete,
//! and the lower levels are built from the bands as they pass (`downsample × downsample` box filter), so
//! memory is one band per level whatever the slide's size. The quantisation and Huffman tables, identical for every tile, are stored once
//! in the `JPEGTables` tag and left out of the tiles (abbreviated JPEG streams, as Aperio and other scanners
//! write them). The directories go at the end of the file; the file is written under a temporary name and
//! renamed into place only once complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

use crate::ImagingError;

/// Largest tile side accepted (pixels).
pub const MAX_JPEG_TILE: u32 = 4096;

/// What [`write_jpeg_pyramid_tiff`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct JpegPyramid {
    /// Level-0 width in pixels.
    pub width: u32,
    /// Level-0 height in pixels.
    pub height: u32,
    /// Tile side, a multiple of 16 from 16 to [`MAX_JPEG_TILE`]; level-0 bands are this many rows high.
    pub tile: u32,
    /// Most pyramid levels written (≥ 1). Fewer are written when a level already fits in one tile.
    pub levels: usize,
    /// Size ratio between successive levels: 2 or 4.
    pub downsample: u32,
    /// Microns per level-0 pixel, written as `XResolution`/`YResolution` in pixels per centimetre.
    pub mpp: f64,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
    /// ImageDescription of level 0 (ASCII; other characters are replaced by `?`).
    pub description: String,
}

/// Fills `rgb` (`w * h * 3` bytes, row-major RGB8) with the level-0 region whose top-left pixel is `(x0, y0)`.
pub type RegionSource<'a> = dyn FnMut(u32, u32, u32, u32, &mut [u8]) -> Result<(), ImagingError> + 'a;

/// Writes a pyramidal, JPEG-tiled, little-endian classic TIFF at `path` from `source`, which is asked for
/// level 0 in full-width bands of `spec.tile` rows (the last one shorter), top to bottom, each exactly once.
/// `progress(rows, height)` is called after each band with the level-0 rows written so far.
///
/// Level `l` is `ceil(width / downsample^l) × ceil(height / downsample^l)`; every level's first directory
/// entry is `NewSubfileType` 0 for level 0 and 1 (reduced resolution) for the others, with the resolution
/// tags scaled to that level. The result opens with [`crate::Slide::open`], tifffile and OpenSlide's generic
/// TIFF reader.
///
/// # Errors
///
/// [`ImagingError::InvalidRequest`] for an invalid `spec` or when the file would exceed classic TIFF's
/// 4 GiB (BigTIFF is not written); [`ImagingError::Io`] when the file cannot be written; any error `source`
/// returns. On error nothing is left at `path` (nor the temporary file).
pub fn write_jpeg_pyramid_tiff(
    path: &Path,
    spec: &JpegPyramid,
    source: &mut RegionSource<'_>,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<(), ImagingError> {
    validate(path, spec)?;
    let name = path.file_name().ok_or_else(|| ImagingError::request(path, "the path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = write_to(&tmp, path, spec, source, progress)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| ImagingError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the error that matters is `result`'s
    }
    result
}

fn validate(path: &Path, spec: &JpegPyramid) -> Result<(), ImagingError> {
    let bad = |what: String| Err(ImagingError::request(path, what));
    if spec.width == 0 || spec.height == 0 {
        return bad(format!("slide size {}×{} must be at least 1×1", spec.width, spec.height));
    }
    if spec.tile < 16 || spec.tile > MAX_JPEG_TILE || !spec.tile.is_multiple_of(16) {
        return bad(format!("tile {} must be a multiple of 16 from 16 to {MAX_JPEG_TILE}", spec.tile));
    }
    if spec.levels == 0 || !matches!(spec.downsample, 2 | 4) {
        return bad(format!("levels {} (≥ 1) and downsample {} (2 or 4)", spec.levels, spec.downsample));
    }
    let mpp_ok = spec.mpp.is_finite() && spec.mpp > 0.0;
    if !mpp_ok || !(1..=100).contains(&spec.quality) {
        return bad(format!("mpp {} (> 0) and JPEG quality {} (1 to 100)", spec.mpp, spec.quality));
    }
    Ok(())
}

/// One pyramid level while it is being written.
struct LevelState {
    width: usize,
    height: usize,
    /// The band being filled: `width × tile` RGB8.
    band: Vec<u8>,
    /// Rows of `band` filled.
    band_rows: usize,
    /// Rows of this level completed (all bands).
    rows_done: usize,
    /// Column sums of the rows of the level above that fold into this level's next row (levels ≥ 1).
    acc: Vec<u32>,
    /// Rows of the level above summed into `acc`.
    acc_rows: usize,
    /// Rows of the level above received so far.
    rows_in: usize,
    /// Byte offset and count of each tile, in row-major tile order.
    offsets: Vec<u64>,
    counts: Vec<u64>,
}

/// The output file and what is shared by all levels.
struct Sink<'a> {
    path: &'a Path,
    out: BufWriter<File>,
    pos: u64,
    tile: usize,
    quality: u8,
    /// The tables of the first tile, as `JPEGTables` (SOI, DQT and DHT segments, EOI).
    tables: Option<Vec<u8>>,
    /// Scratch: one padded tile.
    tile_buf: Vec<u8>,
}

fn write_to(
    tmp: &Path,
    path: &Path,
    spec: &JpegPyramid,
    source: &mut RegionSource<'_>,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<(), ImagingError> {
    let tile = spec.tile as usize;
    let f = spec.downsample as usize;
    let mut dims = vec![(spec.width as usize, spec.height as usize)];
    while dims.len() < spec.levels {
        let (w, h) = dims[dims.len() - 1];
        if w <= tile && h <= tile {
            break;
        }
        dims.push((w.div_ceil(f), h.div_ceil(f)));
    }
    let mut levels: Vec<LevelState> = dims
        .iter()
        .enumerate()
        .map(|(i, &(width, height))| LevelState {
            width,
            height,
            band: vec![0; width * tile * 3],
            band_rows: 0,
            rows_done: 0,
            acc: if i == 0 { Vec::new() } else { vec![0; width * 3] },
            acc_rows: 0,
            rows_in: 0,
            offsets: Vec::with_capacity(width.div_ceil(tile) * height.div_ceil(tile)),
            counts: Vec::with_capacity(width.div_ceil(tile) * height.div_ceil(tile)),
        })
        .collect();

    let file = File::create(tmp).map_err(|e| ImagingError::io(tmp, e))?;
    let mut sink = Sink {
        path,
        out: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
        tile,
        quality: spec.quality,
        tables: None,
        tile_buf: vec![0; tile * tile * 3],
    };
    sink.write(b"II*\0\0\0\0\0")?; // first-IFD offset patched at the end

    let (w0, h0) = (levels[0].width, levels[0].height);
    let mut y = 0;
    while y < h0 {
        let rows = tile.min(h0 - y);
        {
            let band = &mut levels[0].band[..w0 * rows * 3];
            band.fill(255);
            source(0, y as u32, w0 as u32, rows as u32, band)?;
        }
        levels[0].band_rows = rows;
        levels[0].rows_done += rows;
        flush_band(&mut sink, &mut levels, 0, f)?;
        y += rows;
        progress(y as u32, h0 as u32);
    }

    let tables = sink.tables.clone().unwrap_or_default();
    let mut ifd_offsets = Vec::with_capacity(levels.len());
    for (i, level) in levels.iter().enumerate() {
        ifd_offsets.push(write_ifd(&mut sink, spec, i, level, &tables)?);
    }
    // Chain the directories: header → IFD 0 → IFD 1 → … (each IFD's next-offset field is its last 4 bytes).
    let io = |e: std::io::Error| ImagingError::io(tmp, e);
    let mut patches = vec![(4u64, ifd_offsets[0].0)];
    for pair in ifd_offsets.windows(2) {
        patches.push((pair[0].1, pair[1].0));
    }
    for (at, value) in patches {
        sink.out.seek(SeekFrom::Start(at)).map_err(io)?;
        sink.out.write_all(&u32le(path, value)?).map_err(io)?;
    }
    let file = sink.out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Encodes the filled band of level `l`, then feeds its rows to level `l + 1` (which may complete its own
/// band and recurse).
fn flush_band(sink: &mut Sink<'_>, levels: &mut [LevelState], l: usize, f: usize) -> Result<(), ImagingError> {
    let (head, tail) = levels.split_at_mut(l + 1);
    let level = &mut head[l];
    let tile = sink.tile;
    for tx in 0..level.width.div_ceil(tile) {
        let (offset, count) = sink.encode_tile(&level.band, level.width, level.band_rows, tx * tile)?;
        level.offsets.push(offset);
        level.counts.push(count);
    }
    if !tail.is_empty() {
        for r in 0..level.band_rows {
            let row = &level.band[r * level.width * 3..(r + 1) * level.width * 3];
            let last = level.rows_done - level.band_rows + r + 1 == level.height;
            let next = &mut tail[0];
            if fold_row(next, row, level.width, f, last) && (next.band_rows == tile || next.rows_done == next.height) {
                flush_band(sink, tail, 0, f)?;
            }
        }
    }
    level.band_rows = 0;
    Ok(())
}

/// Adds one row of the level above (`src_width` pixels) to `next`'s column sums; after `f` rows, or the last
/// row, writes the averaged row into `next`'s band. Returns whether a row was written.
fn fold_row(next: &mut LevelState, row: &[u8], src_width: usize, f: usize, last: bool) -> bool {
    for (x, px) in row.chunks_exact(3).enumerate() {
        let a = &mut next.acc[(x / f) * 3..(x / f) * 3 + 3];
        a[0] += u32::from(px[0]);
        a[1] += u32::from(px[1]);
        a[2] += u32::from(px[2]);
    }
    next.acc_rows += 1;
    next.rows_in += 1;
    if next.acc_rows < f && !last {
        return false;
    }
    let start = next.band_rows * next.width * 3;
    for x in 0..next.width {
        let cols = f.min(src_width - x * f);
        let n = (cols * next.acc_rows) as u32;
        for c in 0..3 {
            next.band[start + x * 3 + c] = ((next.acc[x * 3 + c] + n / 2) / n) as u8;
        }
    }
    next.acc.fill(0);
    next.acc_rows = 0;
    next.band_rows += 1;
    next.rows_done += 1;
    true
}

impl Sink<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), ImagingError> {
        self.pos += bytes.len() as u64;
        if self.pos > u64::from(u32::MAX) {
            return Err(ImagingError::request(
                self.path,
                "the pyramid exceeds classic TIFF's 4 GiB and BigTIFF is not written; use a smaller size or a \
                 lower JPEG quality",
            ));
        }
        self.out.write_all(bytes).map_err(|e| ImagingError::io(self.path, e))
    }

    /// JPEG-encodes the tile of `band` (`width` wide, `rows` filled) starting at column `x0`, padded to a full
    /// tile by repeating the last column and row, writes it and returns its offset and byte count.
    fn encode_tile(&mut self, band: &[u8], width: usize, rows: usize, x0: usize) -> Result<(u64, u64), ImagingError> {
        let t = self.tile;
        let cols = t.min(width - x0);
        for r in 0..t {
            let src_row = r.min(rows - 1);
            let src = &band[(src_row * width + x0) * 3..(src_row * width + x0 + cols) * 3];
            let dst = &mut self.tile_buf[r * t * 3..(r + 1) * t * 3];
            dst[..cols * 3].copy_from_slice(src);
            let last = [src[cols * 3 - 3], src[cols * 3 - 2], src[cols * 3 - 1]];
            for px in dst[cols * 3..].chunks_exact_mut(3) {
                px.copy_from_slice(&last);
            }
        }
        let mut stream = Vec::with_capacity(t * t / 4);
        let mut encoder = Encoder::new(&mut stream, self.quality);
        encoder.set_sampling_factor(if self.quality >= 90 { SamplingFactor::F_1_1 } else { SamplingFactor::F_2_2 });
        // `t` ≤ MAX_JPEG_TILE, so it fits u16.
        encoder
            .encode(&self.tile_buf, t as u16, t as u16, ColorType::Rgb)
            .map_err(|e| ImagingError::request(self.path, format!("JPEG encoder refused a tile: {e}")))?;
        let stream = match (split_tables(&stream), &self.tables) {
            (Some((tables, body)), None) => {
                self.tables = Some(tables);
                body
            }
            (Some((tables, body)), Some(shared)) if tables == *shared => body,
            // Tables that differ from the shared ones (or a stream we cannot parse) stay in the tile: a
            // decoder uses a tile's own tables over JPEGTables.
            _ => stream,
        };
        let offset = self.pos;
        self.write(&stream)?;
        Ok((offset, stream.len() as u64))
    }
}

/// Splits a complete JPEG stream into `JPEGTables` (SOI, its DQT and DHT segments, EOI) and the abbreviated
/// stream without them (and without the JFIF APP0 segment, which TIFF tiles do not carry). `None` if the
/// stream's segments cannot be followed up to the start of scan.
fn split_tables(stream: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut tables = vec![0xFF, 0xD8];
    let mut body = vec![0xFF, 0xD8];
    let mut i = 2;
    if stream.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    loop {
        let (&ff, &marker) = (stream.get(i)?, stream.get(i + 1)?);
        if ff != 0xFF {
            return None;
        }
        if marker == 0xDA {
            body.extend_from_slice(&stream[i..]);
            break;
        }
        let len = usize::from(u16::from_be_bytes([*stream.get(i + 2)?, *stream.get(i + 3)?]));
        let segment = stream.get(i..i + 2 + len)?;
        match marker {
            0xDB | 0xC4 => tables.extend_from_slice(segment),
            0xE0 => {}
            _ => body.extend_from_slice(segment),
        }
        i += 2 + len;
    }
    tables.extend_from_slice(&[0xFF, 0xD9]);
    Some((tables, body))
}

fn u32le(path: &Path, v: u64) -> Result<[u8; 4], ImagingError> {
    u32::try_from(v)
        .map(u32::to_le_bytes)
        .map_err(|_| ImagingError::request(path, "the pyramid exceeds classic TIFF's 4 GiB; BigTIFF is not written"))
}

/// A TIFF RATIONAL close to `v` (denominator 10 000).
fn rational(v: f64) -> Vec<u8> {
    let den = 10_000u32;
    let num = (v * f64::from(den)).round().clamp(1.0, f64::from(u32::MAX)) as u32;
    [num.to_le_bytes(), den.to_le_bytes()].concat()
}

/// Writes level `i`'s directory (word-aligned, values that do not fit an entry after it) and returns its
/// offset and the offset of its next-IFD field.
fn write_ifd(
    sink: &mut Sink<'_>,
    spec: &JpegPyramid,
    i: usize,
    level: &LevelState,
    tables: &[u8],
) -> Result<(u64, u64), ImagingError> {
    const SHORT: u16 = 3;
    const LONG: u16 = 4;
    const RATIONAL: u16 = 5;
    const ASCII: u16 = 2;
    const UNDEFINED: u16 = 7;
    if sink.pos % 2 == 1 {
        sink.write(&[0])?;
    }
    let path: PathBuf = sink.path.to_path_buf();
    let longs = |v: &[u64]| -> Result<Vec<u8>, ImagingError> {
        v.iter().map(|&x| u32le(&path, x)).collect::<Result<Vec<_>, _>>().map(|v| v.concat())
    };
    let short = |v: u16| v.to_le_bytes().to_vec();
    let long = |v: usize| (v as u32).to_le_bytes().to_vec();
    // Pixels per centimetre of this level.
    let scale = spec.width as f64 / level.width as f64;
    let resolution = rational(10_000.0 / (spec.mpp * scale));
    let n_tiles = level.offsets.len() as u32;
    let subsampling: u16 = if spec.quality >= 90 { 1 } else { 2 };
    let mut entries: Vec<(u16, u16, u32, Vec<u8>)> = vec![
        (254, LONG, 1, long(usize::from(i > 0))),
        (256, LONG, 1, long(level.width)),
        (257, LONG, 1, long(level.height)),
        (258, SHORT, 3, [8u16, 8, 8].iter().flat_map(|b| b.to_le_bytes()).collect()),
        (259, SHORT, 1, short(7)),
        (262, SHORT, 1, short(6)),
        (277, SHORT, 1, short(3)),
        (282, RATIONAL, 1, resolution.clone()),
        (283, RATIONAL, 1, resolution),
        (284, SHORT, 1, short(1)),
        (296, SHORT, 1, short(3)),
        (322, LONG, 1, long(sink.tile)),
        (323, LONG, 1, long(sink.tile)),
        (324, LONG, n_tiles, longs(&level.offsets)?),
        (325, LONG, n_tiles, longs(&level.counts)?),
        (530, SHORT, 2, [subsampling, subsampling].iter().flat_map(|b| b.to_le_bytes()).collect()),
    ];
    if !tables.is_empty() {
        entries.push((347, UNDEFINED, tables.len() as u32, tables.to_vec()));
    }
    if i == 0 {
        let mut text: Vec<u8> = spec.description.chars().map(|c| if c.is_ascii() { c as u8 } else { b'?' }).collect();
        text.retain(|&b| b != 0);
        text.push(0);
        entries.push((270, ASCII, text.len() as u32, text));
    }
    entries.sort_by_key(|e| e.0);

    let ifd_start = sink.pos;
    let ifd_len = 2 + 12 * entries.len() as u64 + 4;
    let mut dir = Vec::with_capacity(ifd_len as usize);
    let mut extra = Vec::new();
    dir.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, count, data) in &entries {
        dir.extend_from_slice(&tag.to_le_bytes());
        dir.extend_from_slice(&kind.to_le_bytes());
        dir.extend_from_slice(&count.to_le_bytes());
        if data.len() <= 4 {
            let mut field = [0u8; 4];
            field[..data.len()].copy_from_slice(data);
            dir.extend_from_slice(&field);
        } else {
            dir.extend_from_slice(&u32le(sink.path, ifd_start + ifd_len + extra.len() as u64)?);
            extra.extend_from_slice(data);
            if extra.len() % 2 == 1 {
                extra.push(0);
            }
        }
    }
    dir.extend_from_slice(&[0, 0, 0, 0]);
    sink.write(&dir)?;
    sink.write(&extra)?;
    Ok((ifd_start, ifd_start + ifd_len - 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compression, Slide};

    /// A smooth, deterministic test image with some texture, as a pure function of the pixel.
    fn pixel(x: u32, y: u32) -> [u8; 3] {
        let (xf, yf) = (f64::from(x), f64::from(y));
        [
            (128.0 + 100.0 * (xf / 37.0).sin()) as u8,
            (128.0 + 100.0 * (yf / 23.0).cos()) as u8,
            ((x / 64 + y / 64) % 2 * 120 + 60) as u8,
        ]
    }

    fn fill(x0: u32, y0: u32, w: u32, h: u32, rgb: &mut [u8]) {
        for y in 0..h {
            for x in 0..w {
                let i = ((y * w + x) * 3) as usize;
                rgb[i..i + 3].copy_from_slice(&pixel(x0 + x, y0 + y));
            }
        }
    }

    fn spec(width: u32, height: u32, downsample: u32) -> JpegPyramid {
        JpegPyramid {
            width,
            height,
            tile: 128,
            levels: 4,
            downsample,
            mpp: 0.5,
            quality: 90,
            description: "test pyramid".into(),
        }
    }

    /// Box average of the `f × f` block of the source image at `(x, y)` of a level `f` times smaller.
    fn reference(x: u32, y: u32, f: u32, w0: u32, h0: u32) -> [f64; 3] {
        let mut sum = [0.0; 3];
        let mut n = 0.0;
        for sy in y * f..((y + 1) * f).min(h0) {
            for sx in x * f..((x + 1) * f).min(w0) {
                let p = pixel(sx, sy);
                (0..3).for_each(|c| sum[c] += f64::from(p[c]));
                n += 1.0;
            }
        }
        sum.map(|s| s / n)
    }

    fn mean_abs_error(slide: &Slide, level: usize, f: u32, w0: u32, h0: u32) -> f64 {
        let info = slide.levels()[level];
        let rgb = slide.read_region(level, 0, 0, info.width, info.height).expect("region reads");
        let mut err = 0.0;
        for y in 0..info.height {
            for x in 0..info.width {
                let r = reference(x, y, f, w0, h0);
                let i = ((y * info.width + x) * 3) as usize;
                (0..3).for_each(|c| err += (f64::from(rgb[i + c]) - r[c]).abs());
            }
        }
        err / f64::from(info.width * info.height * 3)
    }

    #[test]
    fn pyramid_reads_back_within_jpeg_tolerance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slide.tif");
        let (w0, h0) = (1000, 700);
        let mut bands = Vec::new();
        let mut source = |x0: u32, y0: u32, w: u32, h: u32, rgb: &mut [u8]| {
            bands.push((x0, y0, w, h));
            fill(x0, y0, w, h, rgb);
            Ok(())
        };
        let mut last_progress = (0, 0);
        write_jpeg_pyramid_tiff(&path, &spec(w0, h0, 2), &mut source, &mut |done, total| {
            last_progress = (done, total);
        })
        .expect("writes");
        assert_eq!(last_progress, (700, 700));
        // Six bands of 128 rows and one of 60, each asked once, top to bottom.
        assert_eq!(bands.len(), 6);
        assert!(bands.iter().enumerate().all(|(i, b)| *b == (0, i as u32 * 128, 1000, 128.min(700 - i as u32 * 128))));

        let slide = Slide::open(&path).expect("opens");
        let dims: Vec<(u32, u32)> = slide.levels().iter().map(|l| (l.width, l.height)).collect();
        assert_eq!(dims, vec![(1000, 700), (500, 350), (250, 175), (125, 88)]);
        assert!(slide.levels().iter().all(|l| l.compression == Compression::Jpeg && l.tiled && l.tile_w == 128));
        let mpp = slide.mpp().expect("mpp");
        assert!((mpp - 0.5).abs() < 1e-6, "mpp {mpp}");
        assert_eq!(slide.description(), "test pyramid");
        for (level, f) in [(0, 1), (1, 2), (2, 4), (3, 8)] {
            let err = mean_abs_error(&slide, level, f, w0, h0);
            assert!(err < 2.0, "level {level}: mean absolute error {err}");
        }
        // Region reads that straddle tiles agree with the whole-level read.
        let whole = slide.read_region(0, 0, 0, 1000, 700).expect("reads");
        let part = slide.read_region(0, 120, 250, 20, 10).expect("reads");
        for r in 0..10usize {
            let src = ((250 + r) * 1000 + 120) * 3;
            assert_eq!(&part[r * 60..(r + 1) * 60], &whole[src..src + 60]);
        }
    }

    #[test]
    fn tables_are_shared_and_tiles_abbreviated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slide.tif");
        write_jpeg_pyramid_tiff(
            &path,
            &JpegPyramid { quality: 80, ..spec(300, 200, 4) },
            &mut |x, y, w, h, rgb| {
                fill(x, y, w, h, rgb);
                Ok(())
            },
            &mut |_, _| {},
        )
        .expect("writes");
        let slide = Slide::open(&path).expect("opens");
        assert_eq!(slide.levels().len(), 2);
        assert_eq!((slide.levels()[1].width, slide.levels()[1].height), (75, 50));
        // Chroma is subsampled 4:2:0 below quality 90, which blurs this image's sharp colour edges.
        let err = mean_abs_error(&slide, 1, 4, 300, 200);
        assert!(err < 8.0, "level 1: mean absolute error {err}");
        // Every level has the shared tables; no tile carries its own (nor a JFIF header).
        let bytes = std::fs::read(&path).expect("reads");
        for (level, data) in slide.data.iter().enumerate() {
            let tables = data.codec.jpeg_tables.as_deref().expect("JPEGTables");
            assert!(tables.starts_with(&[0xFF, 0xD8, 0xFF, 0xDB]) && tables.ends_with(&[0xFF, 0xD9]));
            for (&offset, &count) in data.offsets.iter().zip(&data.counts) {
                let tile = &bytes[offset as usize..(offset + count) as usize];
                let (tile_tables, _) = split_tables(tile).expect("tile parses");
                assert_eq!(tile_tables, [0xFF, 0xD8, 0xFF, 0xD9], "level {level} tile has its own tables");
                assert!(!tile.windows(2).any(|w| w == [0xFF, 0xE0]), "level {level} tile has an APP0");
            }
        }
    }

    #[test]
    fn invalid_requests_and_source_errors_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slide.tif");
        let mut ok = |x: u32, y: u32, w: u32, h: u32, rgb: &mut [u8]| {
            fill(x, y, w, h, rgb);
            Ok(())
        };
        for bad in [
            JpegPyramid { tile: 100, ..spec(64, 64, 2) },
            JpegPyramid { downsample: 3, ..spec(64, 64, 2) },
            JpegPyramid { quality: 0, ..spec(64, 64, 2) },
            JpegPyramid { mpp: f64::NAN, ..spec(64, 64, 2) },
            JpegPyramid { width: 0, ..spec(64, 64, 2) },
        ] {
            let err = write_jpeg_pyramid_tiff(&path, &bad, &mut ok, &mut |_, _| {}).expect_err("refused");
            assert!(matches!(err, ImagingError::InvalidRequest { .. }), "{err}");
        }
        let mut calls = 0;
        let err = write_jpeg_pyramid_tiff(
            &path,
            &spec(400, 400, 2),
            &mut |_, _, _, _, _| {
                calls += 1;
                if calls == 2 { Err(ImagingError::request("source", "stop")) } else { Ok(()) }
            },
            &mut |_, _| {},
        )
        .expect_err("source error");
        assert!(err.to_string().contains("stop"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("lists").count(), 0, "nothing left behind");
    }

    #[test]
    fn single_tile_slide_has_one_level() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("small.tif");
        write_jpeg_pyramid_tiff(
            &path,
            &spec(100, 37, 2),
            &mut |x, y, w, h, rgb| {
                fill(x, y, w, h, rgb);
                Ok(())
            },
            &mut |_, _| {},
        )
        .expect("writes");
        let slide = Slide::open(&path).expect("opens");
        assert_eq!(slide.levels().len(), 1);
        assert!(mean_abs_error(&slide, 0, 1, 100, 37) < 3.0);
    }
}
