//! Decoding one TIFF chunk (tile or strip) to RGB8: JPEG (with shared JPEGTables), deflate, LZW, none.

use std::io::Read;

use flate2::read::ZlibDecoder;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Compression of a slide level's tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Compression {
    /// Uncompressed (1).
    None,
    /// LZW (5).
    Lzw,
    /// JPEG (7), possibly with shared tables in tag 347.
    Jpeg,
    /// Deflate / zlib (8, or the old 32946).
    Deflate,
}

impl Compression {
    pub(crate) fn from_tag(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::None,
            5 => Self::Lzw,
            7 => Self::Jpeg,
            8 | 32946 => Self::Deflate,
            _ => return None,
        })
    }
}

/// TIFF photometric interpretations a slide level may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Photometric {
    WhiteIsZero,
    BlackIsZero,
    Rgb,
    YCbCr,
}

/// How to turn one chunk's bytes into pixels.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    pub(crate) compression: Compression,
    pub(crate) photometric: Photometric,
    pub(crate) samples: usize,
    pub(crate) predictor: bool,
    pub(crate) jpeg_tables: Option<Vec<u8>>,
}

impl Codec {
    /// Decodes a `width × height` chunk to RGB8 (`width * height * 3` bytes); `Err` holds the reason.
    pub(crate) fn decode(&self, data: &[u8], width: usize, height: usize) -> Result<Vec<u8>, String> {
        if self.compression == Compression::Jpeg {
            return self.decode_jpeg(data, width, height);
        }
        let expected = width * height * self.samples;
        let mut raw = match self.compression {
            Compression::None => data.to_vec(),
            Compression::Deflate => {
                let mut out = Vec::with_capacity(expected);
                ZlibDecoder::new(data)
                    .take(expected as u64)
                    .read_to_end(&mut out)
                    .map_err(|e| format!("deflate stream is corrupt or cut short ({e})"))?;
                out
            }
            Compression::Lzw => {
                // Decoded into a buffer of the tile's size: LZW expands up to ~1000×, so an unbounded output
                // would let a crafted tile exhaust memory.
                let mut out = vec![0u8; expected];
                let mut decoder = weezl::decode::Decoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
                let (mut input, mut filled) = (data, 0);
                while filled < expected {
                    let r = decoder.decode_bytes(input, &mut out[filled..]);
                    input = &input[r.consumed_in..];
                    filled += r.consumed_out;
                    match r.status {
                        // A stream without an end code is common and harmless; a bad code is not.
                        Ok(weezl::LzwStatus::Ok) if r.consumed_in + r.consumed_out > 0 => {}
                        Ok(_) => break,
                        Err(e) => return Err(format!("LZW stream is corrupt ({e})")),
                    }
                }
                out.truncate(filled);
                out
            }
            Compression::Jpeg => Vec::new(),
        };
        if raw.len() < expected {
            return Err(format!("decodes to {} bytes, {width}×{height}×{} need {expected}", raw.len(), self.samples));
        }
        raw.truncate(expected);
        if self.predictor {
            for row in raw.chunks_exact_mut(width * self.samples) {
                for i in self.samples..row.len() {
                    row[i] = row[i].wrapping_add(row[i - self.samples]);
                }
            }
        }
        self.to_rgb(&raw)
    }

    fn to_rgb(&self, raw: &[u8]) -> Result<Vec<u8>, String> {
        match (self.photometric, self.samples) {
            (Photometric::Rgb, 3) => Ok(raw.to_vec()),
            (Photometric::Rgb, n) if n > 3 => Ok(raw.chunks_exact(n).flat_map(|p| [p[0], p[1], p[2]]).collect()),
            (Photometric::BlackIsZero, n) if n >= 1 => Ok(raw.chunks_exact(n).flat_map(|p| [p[0]; 3]).collect()),
            (Photometric::WhiteIsZero, n) if n >= 1 => Ok(raw.chunks_exact(n).flat_map(|p| [255 - p[0]; 3]).collect()),
            (p, n) => Err(format!("{n} samples per pixel with photometric {p:?} outside JPEG is not supported")),
        }
    }

    fn decode_jpeg(&self, data: &[u8], width: usize, height: usize) -> Result<Vec<u8>, String> {
        let stream = match &self.jpeg_tables {
            Some(tables) => splice_tables(tables, data)?,
            None => data.to_vec(),
        };
        // Bound the decoder's allocation by the tile, whatever size the JPEG header claims.
        let limit = width.max(height).saturating_mul(2).max(64);
        let options = DecoderOptions::default().set_max_width(limit).set_max_height(limit);
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(&stream), options);
        decoder.decode_headers().map_err(|e| format!("JPEG header: {e:?}"))?;
        let input = decoder.input_colorspace().unwrap_or(ColorSpace::YCbCr);
        // The TIFF photometric, not the JPEG header, says whether the samples are YCbCr: Aperio writes RGB
        // samples in JPEG streams that name no colour space, which a JPEG decoder would take for YCbCr.
        let (out, channels) = match (self.photometric, input) {
            (Photometric::YCbCr, _) => (ColorSpace::RGB, 3),
            (Photometric::Rgb, ColorSpace::RGB | ColorSpace::YCbCr) => (input, 3),
            (Photometric::BlackIsZero | Photometric::WhiteIsZero, ColorSpace::Luma) => (ColorSpace::Luma, 1),
            (p, c) => return Err(format!("JPEG colour space {c:?} in a level with photometric {p:?}")),
        };
        decoder.set_options(options.jpeg_set_out_colorspace(out));
        let pixels = decoder.decode().map_err(|e| format!("JPEG data: {e:?}"))?;
        let info = decoder.info().ok_or("JPEG decoder reported no image size")?;
        let (jw, jh) = (usize::from(info.width), usize::from(info.height));
        if jw < width || jh < height || pixels.len() < jw * jh * channels {
            return Err(format!("JPEG is {jw}×{jh}, the tile needs {width}×{height}"));
        }
        let mut rgb = Vec::with_capacity(width * height * 3);
        for row in pixels.chunks_exact(jw * channels).take(height) {
            let row = &row[..width * channels];
            match (channels, self.photometric) {
                (3, _) => rgb.extend_from_slice(row),
                (_, Photometric::WhiteIsZero) => row.iter().for_each(|&v| rgb.extend_from_slice(&[255 - v; 3])),
                _ => row.iter().for_each(|&v| rgb.extend_from_slice(&[v; 3])),
            }
        }
        Ok(rgb)
    }
}

/// TIFF's abbreviated JPEG: the shared tables (SOI … EOI) go in front of the tile's stream (SOI … EOI),
/// without the tables' EOI and the tile's SOI.
fn splice_tables(tables: &[u8], tile: &[u8]) -> Result<Vec<u8>, String> {
    const SOI: [u8; 2] = [0xFF, 0xD8];
    const EOI: [u8; 2] = [0xFF, 0xD9];
    let body = tables
        .strip_prefix(&SOI)
        .map(|t| t.strip_suffix(&EOI).unwrap_or(t))
        .ok_or("JPEGTables (tag 347) does not start with a JPEG SOI marker")?;
    let rest = tile.strip_prefix(&SOI).ok_or("tile does not start with a JPEG SOI marker")?;
    let mut stream = Vec::with_capacity(2 + body.len() + rest.len());
    stream.extend_from_slice(&SOI);
    stream.extend_from_slice(body);
    stream.extend_from_slice(rest);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(compression: Compression, predictor: bool) -> Codec {
        Codec { compression, photometric: Photometric::Rgb, samples: 3, predictor, jpeg_tables: None }
    }

    #[test]
    fn lzw_tile_with_horizontal_predictor_round_trips() {
        let (w, h) = (5usize, 4usize);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        // Horizontal differencing per row and sample, as TIFF predictor 2 stores it.
        let mut diffs = pixels.clone();
        for row in diffs.chunks_exact_mut(w * 3) {
            for i in (3..row.len()).rev() {
                row[i] = row[i].wrapping_sub(row[i - 3]);
            }
        }
        let encoded =
            weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8).encode(&diffs).expect("encodes");
        assert_eq!(codec(Compression::Lzw, true).decode(&encoded, w, h), Ok(pixels));
    }

    #[test]
    fn short_or_corrupt_tiles_are_errors() {
        assert!(codec(Compression::None, false).decode(&[0; 10], 2, 2).is_err());
        assert!(codec(Compression::Deflate, false).decode(&[1, 2, 3, 4], 2, 2).is_err());
        assert!(codec(Compression::Lzw, false).decode(&[0xFF; 16], 2, 2).is_err());
        assert!(codec(Compression::Jpeg, false).decode(&[0xFF, 0xD8, 0xFF], 2, 2).is_err());
    }
}
