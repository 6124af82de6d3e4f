//! TIFF / BigTIFF directory (IFD) parsing: tags only, no pixel data.
//!
//! Written here rather than with the `tiff` crate's `Decoder`: that decoder builds a decodable image for each
//! directory as it walks them and hides the raw tile bytes, while a slide reader needs every directory's tags
//! (to pick pyramid levels, skip labels) and the raw tiles (to splice JPEGTables and choose the colour
//! transform per TIFF photometric, not per JPEG header).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::ImagingError;

const FORMAT: &str = "TIFF";
/// More directories than any slide has; stops a crafted chain from looping or exhausting memory.
const MAX_IFDS: usize = 1024;
/// Largest tag value read (offset tables of a very large slide stay far below this).
const MAX_TAG_BYTES: u64 = 256 << 20;

pub(crate) const NEW_SUBFILE_TYPE: u16 = 254;
pub(crate) const IMAGE_WIDTH: u16 = 256;
pub(crate) const IMAGE_LENGTH: u16 = 257;
pub(crate) const BITS_PER_SAMPLE: u16 = 258;
pub(crate) const COMPRESSION: u16 = 259;
pub(crate) const PHOTOMETRIC: u16 = 262;
pub(crate) const IMAGE_DESCRIPTION: u16 = 270;
pub(crate) const STRIP_OFFSETS: u16 = 273;
pub(crate) const SAMPLES_PER_PIXEL: u16 = 277;
pub(crate) const ROWS_PER_STRIP: u16 = 278;
pub(crate) const STRIP_BYTE_COUNTS: u16 = 279;
pub(crate) const X_RESOLUTION: u16 = 282;
pub(crate) const PLANAR_CONFIGURATION: u16 = 284;
pub(crate) const RESOLUTION_UNIT: u16 = 296;
pub(crate) const PREDICTOR: u16 = 317;
pub(crate) const TILE_WIDTH: u16 = 322;
pub(crate) const TILE_LENGTH: u16 = 323;
pub(crate) const TILE_OFFSETS: u16 = 324;
pub(crate) const TILE_BYTE_COUNTS: u16 = 325;
pub(crate) const SAMPLE_FORMAT: u16 = 339;
pub(crate) const JPEG_TABLES: u16 = 347;

/// A tag's value, by kind.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// BYTE, SHORT, LONG, LONG8, IFD, IFD8.
    Unsigned(Vec<u64>),
    /// RATIONAL as (numerator, denominator).
    Rational(Vec<(u32, u32)>),
    /// ASCII, without trailing NULs.
    Ascii(String),
    /// UNDEFINED (JPEGTables is one).
    Bytes(Vec<u8>),
    /// Signed and floating types, which no tag read here uses.
    Other,
}

/// One image file directory.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ifd {
    pub(crate) tags: BTreeMap<u16, Value>,
}

impl Ifd {
    pub(crate) fn uints(&self, tag: u16) -> Option<&[u64]> {
        match self.tags.get(&tag)? {
            Value::Unsigned(v) => Some(v),
            _ => None,
        }
    }
    pub(crate) fn uint(&self, tag: u16) -> Option<u64> {
        self.uints(tag)?.first().copied()
    }
    pub(crate) fn ascii(&self, tag: u16) -> Option<&str> {
        match self.tags.get(&tag)? {
            Value::Ascii(s) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn bytes(&self, tag: u16) -> Option<&[u8]> {
        match self.tags.get(&tag)? {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
    pub(crate) fn rational(&self, tag: u16) -> Option<(u32, u32)> {
        match self.tags.get(&tag)? {
            Value::Rational(v) => v.first().copied(),
            Value::Unsigned(v) => v.first().and_then(|&n| u32::try_from(n).ok()).map(|n| (n, 1)),
            _ => None,
        }
    }
}

/// Reads every directory of the file, in chain order.
pub(crate) fn read_ifds(path: &Path, file: &mut File, file_len: u64) -> Result<Vec<Ifd>, ImagingError> {
    let mut reader = Reader { path, file, file_len, big: false, bigtiff: false };
    let head = reader.bytes_at(0, 8.min(file_len))?;
    if head.len() < 8 {
        return Err(ImagingError::invalid(path, FORMAT, format!("file is only {file_len} bytes long")));
    }
    reader.big = match &head[0..2] {
        b"II" => false,
        b"MM" => true,
        other => {
            return Err(ImagingError::invalid(path, FORMAT, format!("byte-order mark is {other:?}, not II or MM")));
        }
    };
    let mut next = match reader.u16(&head[2..4]) {
        42 => reader.u32(&head[4..8]),
        43 => {
            reader.bigtiff = true;
            let b = reader.bytes_at(8, 8)?;
            reader.u64(&b)
        }
        v => return Err(ImagingError::invalid(path, FORMAT, format!("version is {v}, not 42 (TIFF) or 43 (BigTIFF)"))),
    };

    let mut ifds = Vec::new();
    let mut seen = HashSet::new();
    while next != 0 {
        if !seen.insert(next) || ifds.len() >= MAX_IFDS {
            return Err(ImagingError::invalid(
                path,
                FORMAT,
                format!("directory chain loops or is too long at offset {next}"),
            ));
        }
        let (ifd, following) = reader.ifd(next)?;
        ifds.push(ifd);
        next = following;
    }
    if ifds.is_empty() {
        return Err(ImagingError::invalid(path, FORMAT, "no image directory"));
    }
    Ok(ifds)
}

struct Reader<'a> {
    path: &'a Path,
    file: &'a mut File,
    file_len: u64,
    big: bool,
    bigtiff: bool,
}

impl Reader<'_> {
    fn bytes_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, ImagingError> {
        read_at(self.path, self.file, self.file_len, offset, len)
    }
    fn u16(&self, b: &[u8]) -> u16 {
        let a = [b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)];
        if self.big { u16::from_be_bytes(a) } else { u16::from_le_bytes(a) }
    }
    fn u32(&self, b: &[u8]) -> u64 {
        let mut a = [0u8; 4];
        a.iter_mut().zip(b).for_each(|(d, s)| *d = *s);
        u64::from(if self.big { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) })
    }
    fn u64(&self, b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.iter_mut().zip(b).for_each(|(d, s)| *d = *s);
        if self.big { u64::from_be_bytes(a) } else { u64::from_le_bytes(a) }
    }

    fn ifd(&mut self, offset: u64) -> Result<(Ifd, u64), ImagingError> {
        // Entry-count field, entry, inline value (also the next-directory pointer) sizes.
        let (count_size, entry_size, inline) = if self.bigtiff { (8u64, 20u64, 8u64) } else { (2, 12, 4) };
        let count_bytes = self.bytes_at(offset, count_size)?;
        let count = if self.bigtiff { self.u64(&count_bytes) } else { u64::from(self.u16(&count_bytes)) };
        if count.saturating_mul(entry_size) > self.file_len {
            return Err(ImagingError::invalid(
                self.path,
                FORMAT,
                format!("directory at {offset} claims {count} entries"),
            ));
        }
        let table = self.bytes_at(offset.saturating_add(count_size), count * entry_size + inline)?;
        let mut ifd = Ifd::default();
        for e in table.chunks_exact(entry_size as usize).take(count as usize) {
            let tag = self.u16(&e[0..2]);
            let kind = self.u16(&e[2..4]);
            let (n, field) =
                if self.bigtiff { (self.u64(&e[4..12]), &e[12..20]) } else { (self.u32(&e[4..8]), &e[8..12]) };
            let unit: u64 = match kind {
                1 | 2 | 6 | 7 => 1,
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16 | 17 | 18 => 8,
                _ => continue, // unknown type: skip the entry, as the TIFF spec asks readers to
            };
            let size = n.saturating_mul(unit);
            if size > MAX_TAG_BYTES {
                return Err(ImagingError::invalid(self.path, FORMAT, format!("tag {tag} claims {size} bytes")));
            }
            let raw = if size <= inline {
                field[..size as usize].to_vec()
            } else {
                let at = if self.bigtiff { self.u64(field) } else { self.u32(field) };
                self.bytes_at(at, size)?
            };
            let value = match kind {
                1 => Value::Unsigned(raw.iter().map(|&b| u64::from(b)).collect()),
                2 => Value::Ascii(String::from_utf8_lossy(&raw).trim_end_matches('\0').to_string()),
                3 => Value::Unsigned(raw.chunks_exact(2).map(|c| u64::from(self.u16(c))).collect()),
                4 | 13 => Value::Unsigned(raw.chunks_exact(4).map(|c| self.u32(c)).collect()),
                16 | 18 => Value::Unsigned(raw.chunks_exact(8).map(|c| self.u64(c)).collect()),
                5 => Value::Rational(
                    raw.chunks_exact(8).map(|c| (self.u32(&c[..4]) as u32, self.u32(&c[4..]) as u32)).collect(),
                ),
                7 => Value::Bytes(raw),
                _ => Value::Other,
            };
            ifd.tags.insert(tag, value);
        }
        let next_at = (count * entry_size) as usize;
        let next = match table.get(next_at..) {
            Some(b) if self.bigtiff && b.len() >= 8 => self.u64(b),
            Some(b) if !self.bigtiff && b.len() >= 4 => self.u32(b),
            _ => 0,
        };
        Ok((ifd, next))
    }
}

/// Reads `len` bytes at `offset`, after checking they lie inside the file.
pub(crate) fn read_at(
    path: &Path,
    file: &mut File,
    file_len: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ImagingError> {
    let end = offset.checked_add(len).filter(|&end| end <= file_len).ok_or_else(|| {
        ImagingError::truncated(
            path,
            format!("{len} bytes at offset {offset} lie past the end of the {file_len}-byte file"),
        )
    })?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| ImagingError::io(path, e))?;
    let mut buf = vec![0u8; (end - offset) as usize];
    file.read_exact(&mut buf).map_err(|e| ImagingError::io(path, e))?;
    Ok(buf)
}
