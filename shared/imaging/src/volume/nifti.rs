//! NIfTI-1 and NIfTI-2 reading, and gzip NIfTI-1 writing.
//!
//! Written here rather than with the `nifti` crate: `nifti` 0.18 reads NIfTI-1 only, and the study accepts
//! NIfTI-2. The header is interpreted the way nibabel does (it is what REFERENCE.json reports):
//!
//! - byte order from `sizeof_hdr` (348 / 540 read either way);
//! - `scl_slope` of 0 or non-finite means "no scaling"; a valid slope with a non-finite intercept is an error;
//! - affine from the sform if `sform_code != 0`, else the qform (quaternion) if `qform_code != 0`, else
//!   nibabel's base affine from `pixdim` (x flipped, centred);
//! - nibabel's load-time header fixes: `pixdim[1..4]` taken as absolute values with 0 read as 1, and a `qfac`
//!   (`pixdim[0]`) other than −1 read as 1.
//!
//! Size: one format: NIfTI-1 and NIfTI-2 headers, the affine as nibabel derives it (qform and
//! sform), the data types and the gzip writer.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use super::{Volume, Volume4};
use crate::ImagingError;

const FORMAT: &str = "NIfTI";
const NIFTI1_HEADER: usize = 348;
const NIFTI2_HEADER: usize = 540;
/// Reading buffers grow on demand past this, so a corrupt header cannot reserve huge amounts up front.
const INITIAL_RESERVE: usize = 64 << 20;

/// On-disk voxel type of a NIfTI file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum NiftiDatatype {
    /// `DT_UINT8` (2).
    U8,
    /// `DT_INT8` (256).
    I8,
    /// `DT_INT16` (4).
    I16,
    /// `DT_UINT16` (512).
    U16,
    /// `DT_INT32` (8).
    I32,
    /// `DT_UINT32` (768).
    U32,
    /// `DT_INT64` (1024).
    I64,
    /// `DT_UINT64` (1280).
    U64,
    /// `DT_FLOAT32` (16).
    F32,
    /// `DT_FLOAT64` (64).
    F64,
}

impl NiftiDatatype {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }

    fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I8 => 256,
            Self::I16 => 4,
            Self::U16 => 512,
            Self::I32 => 8,
            Self::U32 => 768,
            Self::I64 => 1024,
            Self::U64 => 1280,
            Self::F32 => 16,
            Self::F64 => 64,
        }
    }

    /// Bytes per voxel on disk.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }
}

/// Header facts beyond the geometry, for data checks and reports.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NiftiInfo {
    /// 1 or 2.
    pub version: u8,
    /// On-disk voxel type.
    pub datatype: NiftiDatatype,
    /// Whether the file is big-endian.
    pub big_endian: bool,
    /// `scl_slope`, `scl_inter` as applied (`(1, 0)` when the file asks for no scaling).
    pub slope_inter: (f64, f64),
    /// `sform_code`, `qform_code` as written.
    pub sform_qform_codes: (i32, i32),
}

/// Voxel type [`write_nifti_gz`] stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    /// 32-bit float, values as they are.
    F32,
    /// 16-bit signed integer; every value must be finite and round to within `i16`'s range (masks, MRI
    /// intensities already integer).
    I16,
}

/// Reads a NIfTI file and returns its first frame (the whole volume for a 3-D file).
///
/// # Errors
///
/// Any [`ImagingError`] of [`read_nifti_frames`].
pub fn read_nifti(path: &Path) -> Result<Volume, ImagingError> {
    read_nifti_frames(path).map(Volume4::into_first_frame)
}

/// Reads a whole NIfTI-1 or NIfTI-2 file (`.nii`, `.nii.gz`, or a `.hdr`/`.img` pair), all frames.
///
/// # Errors
///
/// [`ImagingError::Io`] if the file cannot be read, [`ImagingError::InvalidFormat`] for a bad `sizeof_hdr`,
/// magic, dimension or scaling field, [`ImagingError::Unsupported`] for a data type other than the integer
/// and real ones, and [`ImagingError::Truncated`] when the data is shorter than the header says.
pub fn read_nifti_frames(path: &Path) -> Result<Volume4, ImagingError> {
    let mut reader = open_maybe_gz(path)?;
    let mut head = Vec::with_capacity(NIFTI2_HEADER);
    (&mut reader).take(NIFTI2_HEADER as u64).read_to_end(&mut head).map_err(|e| read_error(path, e))?;
    let header = Header::parse(path, &head)?;

    let n_voxels = header
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ImagingError::invalid(path, FORMAT, format!("dimensions {:?} overflow", header.dims)))?;
    let n_bytes = n_voxels
        .checked_mul(header.datatype.size())
        .ok_or_else(|| ImagingError::invalid(path, FORMAT, format!("dimensions {:?} overflow", header.dims)))?;

    let raw = if header.single_file {
        let offset = usize::try_from(header.vox_offset).unwrap_or(usize::MAX);
        let mut raw = head.get(offset.min(head.len())..).unwrap_or_default().to_vec();
        if offset > head.len() {
            let skip = (offset - head.len()) as u64;
            let skipped = io::copy(&mut (&mut reader).take(skip), &mut io::sink()).map_err(|e| read_error(path, e))?;
            if skipped < skip {
                return Err(ImagingError::truncated(
                    path,
                    format!("vox_offset is {offset} but the file ends after {} bytes", head.len() as u64 + skipped),
                ));
            }
        }
        raw.truncate(n_bytes);
        let raw = read_rest(path, &mut reader, raw, n_bytes)?;
        // Read to the end so that gzip checks its CRC and length trailer: a cut-off .nii.gz whose voxel bytes
        // happen to be complete is still reported.
        io::copy(&mut reader, &mut io::sink()).map_err(|e| read_error(path, e))?;
        raw
    } else {
        let img = image_path(path);
        let mut reader = open_maybe_gz(&img)?;
        io::copy(&mut (&mut reader).take(header.vox_offset), &mut io::sink()).map_err(|e| read_error(&img, e))?;
        read_rest(&img, &mut reader, Vec::new(), n_bytes)?
    };

    let (slope, inter) = header.slope_inter(path)?;
    let data = decode_voxels(&raw, header.datatype, header.big_endian, slope, inter);
    let spatial = |i: usize| header.dims.get(i).copied().unwrap_or(1);
    let dims = [spatial(0), spatial(1), spatial(2)];
    let n_frames = header.dims.iter().skip(3).product::<usize>();
    let spacing_mm = [header.pixdim[1], header.pixdim[2], header.pixdim[3]];
    let frame_step = (header.dims.len() > 3).then_some(header.pixdim[4]);
    let affine = header.affine();
    Ok(Volume4 {
        dims,
        n_frames,
        spacing_mm,
        frame_step,
        affine,
        data,
        info: NiftiInfo {
            version: header.version,
            datatype: header.datatype,
            big_endian: header.big_endian,
            slope_inter: (slope, inter),
            sform_qform_codes: (header.sform_code, header.qform_code),
        },
    })
}

/// Reads until `raw` holds `n_bytes` or the stream ends; the caller reports a short read as truncation.
fn read_rest(path: &Path, reader: &mut impl Read, mut raw: Vec<u8>, n_bytes: usize) -> Result<Vec<u8>, ImagingError> {
    let missing = n_bytes.saturating_sub(raw.len());
    raw.reserve(missing.min(INITIAL_RESERVE));
    reader.take(missing as u64).read_to_end(&mut raw).map_err(|e| read_error(path, e))?;
    if raw.len() < n_bytes {
        return Err(ImagingError::truncated(
            path,
            format!("header promises {n_bytes} bytes of voxel data, the file holds {}", raw.len()),
        ));
    }
    Ok(raw)
}

/// A gzip stream cut short surfaces as an `UnexpectedEof` (or a corrupt-deflate `InvalidInput`) while reading.
fn read_error(path: &Path, e: io::Error) -> ImagingError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => ImagingError::truncated(path, format!("compressed stream ends early ({e})")),
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
            ImagingError::invalid(path, FORMAT, format!("corrupt gzip stream ({e})"))
        }
        _ => ImagingError::io(path, e),
    }
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>, ImagingError> {
    let mut file = BufReader::new(File::open(path).map_err(|e| ImagingError::io(path, e))?);
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut file, &mut magic).map_err(|e| ImagingError::io(path, e))?;
    let prefix = io::Cursor::new(magic[..n].to_vec()).chain(file);
    if n == 2 && magic == [0x1f, 0x8b] { Ok(Box::new(MultiGzDecoder::new(prefix))) } else { Ok(Box::new(prefix)) }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `x.hdr` → `x.img`, `x.hdr.gz` → `x.img.gz` (the data half of a two-file NIfTI).
fn image_path(header: &Path) -> PathBuf {
    let name = header.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let img = if let Some(stem) = name.strip_suffix(".hdr.gz") {
        format!("{stem}.img.gz")
    } else if let Some(stem) = name.strip_suffix(".hdr") {
        format!("{stem}.img")
    } else {
        format!("{name}.img")
    };
    header.with_file_name(img)
}

/// Byte-order-aware field access into a header buffer whose length was checked by the caller.
struct Fields<'a> {
    bytes: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn arr<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.bytes.get(off..off + N) {
            a.copy_from_slice(s);
        }
        if self.big {
            a.reverse();
        }
        a
    }
    fn i16(&self, off: usize) -> i16 {
        i16::from_le_bytes(self.arr(off))
    }
    fn i32(&self, off: usize) -> i32 {
        i32::from_le_bytes(self.arr(off))
    }
    fn i64(&self, off: usize) -> i64 {
        i64::from_le_bytes(self.arr(off))
    }
    fn f32(&self, off: usize) -> f64 {
        f64::from(f32::from_le_bytes(self.arr(off)))
    }
    fn f64(&self, off: usize) -> f64 {
        f64::from_le_bytes(self.arr(off))
    }
}

struct Header {
    version: u8,
    big_endian: bool,
    single_file: bool,
    dims: Vec<usize>,
    /// After nibabel's fixes: `pixdim[0]` is ±1, `pixdim[1..4]` positive.
    pixdim: [f64; 8],
    datatype: NiftiDatatype,
    vox_offset: u64,
    scl_slope: f64,
    scl_inter: f64,
    qform_code: i32,
    sform_code: i32,
    quatern: [f64; 3],
    qoffset: [f64; 3],
    srow: [[f64; 4]; 3],
}

impl Header {
    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, ImagingError> {
        if bytes.len() < 4 {
            return Err(ImagingError::invalid(path, FORMAT, format!("file is only {} bytes long", bytes.len())));
        }
        let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let (size, big_endian) = match (le, be) {
            (348 | 540, _) => (le as usize, false),
            (_, 348 | 540) => (be as usize, true),
            _ => {
                return Err(ImagingError::invalid(
                    path,
                    FORMAT,
                    format!("sizeof_hdr is {le} (expected 348 for NIfTI-1 or 540 for NIfTI-2)"),
                ));
            }
        };
        if bytes.len() < size {
            return Err(ImagingError::truncated(
                path,
                format!("the {size}-byte header is cut off after {} bytes", bytes.len()),
            ));
        }
        let f = Fields { bytes, big: big_endian };
        let mut h = if size == NIFTI1_HEADER { Self::parse1(path, &f)? } else { Self::parse2(path, &f)? };
        h.big_endian = big_endian;
        h.fix_pixdim();
        Ok(h)
    }

    fn parse1(path: &Path, f: &Fields<'_>) -> Result<Self, ImagingError> {
        let magic = f.bytes.get(344..348).unwrap_or_default();
        let single_file = match magic {
            b"n+1\0" => true,
            b"ni1\0" => false,
            _ => {
                return Err(ImagingError::invalid(
                    path,
                    FORMAT,
                    format!("NIfTI-1 magic is {magic:?} (expected \"n+1\\0\" or \"ni1\\0\")"),
                ));
            }
        };
        let raw_dims: Vec<i64> = (0..8).map(|i| i64::from(f.i16(40 + 2 * i))).collect();
        let mut pixdim = [0.0; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = f.f32(76 + 4 * i);
        }
        let vox_offset = f.f32(108);
        Ok(Self {
            version: 1,
            big_endian: false,
            single_file,
            dims: check_dims(path, &raw_dims)?,
            pixdim,
            datatype: datatype(path, f.i16(70))?,
            vox_offset: check_offset(path, vox_offset, single_file, NIFTI1_HEADER)?,
            scl_slope: f.f32(112),
            scl_inter: f.f32(116),
            qform_code: i32::from(f.i16(252)),
            sform_code: i32::from(f.i16(254)),
            quatern: [f.f32(256), f.f32(260), f.f32(264)],
            qoffset: [f.f32(268), f.f32(272), f.f32(276)],
            srow: std::array::from_fn(|r| std::array::from_fn(|c| f.f32(280 + 16 * r + 4 * c))),
        })
    }

    fn parse2(path: &Path, f: &Fields<'_>) -> Result<Self, ImagingError> {
        let magic = f.bytes.get(4..12).unwrap_or_default();
        let single_file = match magic {
            b"n+2\0\r\n\x1a\n" => true,
            b"ni2\0\r\n\x1a\n" => false,
            _ => {
                return Err(ImagingError::invalid(
                    path,
                    FORMAT,
                    format!("NIfTI-2 magic is {magic:?} (expected \"n+2\\0\\r\\n\\x1a\\n\")"),
                ));
            }
        };
        let raw_dims: Vec<i64> = (0..8).map(|i| f.i64(16 + 8 * i)).collect();
        let mut pixdim = [0.0; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = f.f64(104 + 8 * i);
        }
        let vox_offset = f.i64(168) as f64;
        Ok(Self {
            version: 2,
            big_endian: false,
            single_file,
            dims: check_dims(path, &raw_dims)?,
            pixdim,
            datatype: datatype(path, f.i16(12))?,
            vox_offset: check_offset(path, vox_offset, single_file, NIFTI2_HEADER)?,
            scl_slope: f.f64(176),
            scl_inter: f.f64(184),
            qform_code: f.i32(344),
            sform_code: f.i32(348),
            quatern: [f.f64(352), f.f64(360), f.f64(368)],
            qoffset: [f.f64(376), f.f64(384), f.f64(392)],
            srow: std::array::from_fn(|r| std::array::from_fn(|c| f.f64(400 + 32 * r + 8 * c))),
        })
    }

    /// nibabel's `_chk_qfac` and `_chk_pixdims` fixes, applied on load.
    fn fix_pixdim(&mut self) {
        if self.pixdim[0] != -1.0 {
            self.pixdim[0] = 1.0;
        }
        for p in &mut self.pixdim[1..4] {
            *p = if *p == 0.0 || !p.is_finite() { 1.0 } else { p.abs() };
        }
    }

    fn slope_inter(&self, path: &Path) -> Result<(f64, f64), ImagingError> {
        if self.scl_slope == 0.0 || !self.scl_slope.is_finite() {
            return Ok((1.0, 0.0));
        }
        if !self.scl_inter.is_finite() {
            return Err(ImagingError::invalid(
                path,
                FORMAT,
                format!("scl_slope is {} but scl_inter is {}", self.scl_slope, self.scl_inter),
            ));
        }
        Ok((self.scl_slope, self.scl_inter))
    }

    /// nibabel's `get_best_affine`.
    fn affine(&self) -> [[f64; 4]; 4] {
        if self.sform_code != 0 {
            let [x, y, z] = self.srow;
            [x, y, z, [0.0, 0.0, 0.0, 1.0]]
        } else if self.qform_code != 0 {
            let r = quat_to_mat(self.quatern);
            let zooms = [self.pixdim[1], self.pixdim[2], self.pixdim[3] * self.pixdim[0]];
            let mut a = identity();
            for (row, r_row) in a.iter_mut().zip(r) {
                for c in 0..3 {
                    row[c] = r_row[c] * zooms[c];
                }
            }
            for (i, off) in self.qoffset.iter().enumerate() {
                a[i][3] = *off;
            }
            a
        } else {
            // nibabel's `shape_zoom_affine(shape[:3], zooms[:3], x_flip=True)`.
            let mut a = identity();
            for (i, row) in a.iter_mut().take(3).enumerate() {
                let n = self.dims.get(i).copied().unwrap_or(1) as f64;
                let zoom = if i == 0 { -self.pixdim[1] } else { self.pixdim[i + 1] };
                row[i] = zoom;
                row[3] = -(n - 1.0) / 2.0 * zoom;
            }
            a
        }
    }
}

fn identity() -> [[f64; 4]; 4] {
    std::array::from_fn(|r| std::array::from_fn(|c| if r == c { 1.0 } else { 0.0 }))
}

/// nibabel's `fillpositive` + `quat2mat`: `a = sqrt(1 - b² - c² - d²)` (0 if slightly negative).
fn quat_to_mat([b, c, d]: [f64; 3]) -> [[f64; 3]; 3] {
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let n = a * a + b * b + c * c + d * d;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (x, y, z) = (b * s, c * s, d * s);
    let (wx, wy, wz) = (a * x, a * y, a * z);
    let (xx, xy, xz) = (b * x, b * y, b * z);
    let (yy, yz, zz) = (c * y, c * z, d * z);
    [[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]]
}

fn check_dims(path: &Path, raw: &[i64]) -> Result<Vec<usize>, ImagingError> {
    let ndim = raw.first().copied().unwrap_or(0);
    if !(1..=7).contains(&ndim) {
        return Err(ImagingError::invalid(path, FORMAT, format!("dim[0] is {ndim} (expected 1 to 7)")));
    }
    raw[1..=ndim as usize]
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            usize::try_from(d).ok().filter(|&d| d > 0).ok_or_else(|| {
                ImagingError::invalid(path, FORMAT, format!("dim[{}] is {d} (expected a positive size)", i + 1))
            })
        })
        .collect()
}

fn check_offset(path: &Path, vox_offset: f64, single_file: bool, header_size: usize) -> Result<u64, ImagingError> {
    if !vox_offset.is_finite() || vox_offset < 0.0 {
        return Err(ImagingError::invalid(path, FORMAT, format!("vox_offset is {vox_offset}")));
    }
    let offset = vox_offset as u64;
    if single_file && offset < header_size as u64 {
        // Some writers leave 0 in single-file images; the data then follows the header and its 4-byte
        // extension flag, as the standard requires.
        return Ok(header_size as u64 + 4);
    }
    Ok(offset)
}

fn datatype(path: &Path, code: i16) -> Result<NiftiDatatype, ImagingError> {
    NiftiDatatype::from_code(code).ok_or_else(|| {
        let name = match code {
            0 => "unknown (0)",
            1 => "binary (1)",
            32 => "complex64 (32)",
            128 => "RGB24 (128)",
            1536 => "float128 (1536)",
            1792 => "complex128 (1792)",
            2048 => "complex256 (2048)",
            2304 => "RGBA32 (2304)",
            _ => "not a NIfTI datatype",
        };
        ImagingError::unsupported(
            path,
            format!("NIfTI datatype {code}: {name}; convert the image to an integer or float scalar type"),
        )
    })
}

fn decode_voxels(raw: &[u8], dt: NiftiDatatype, big: bool, slope: f64, inter: f64) -> Vec<f32> {
    fn conv<const N: usize>(raw: &[u8], big: bool, f: impl Fn([u8; N]) -> f64, scale: impl Fn(f64) -> f32) -> Vec<f32> {
        raw.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                if big {
                    a.reverse();
                }
                scale(f(a))
            })
            .collect()
    }
    let identity = slope == 1.0 && inter == 0.0;
    let scale = move |v: f64| if identity { v as f32 } else { (v * slope + inter) as f32 };
    match dt {
        NiftiDatatype::U8 => conv::<1>(raw, big, |a| f64::from(a[0]), scale),
        NiftiDatatype::I8 => conv::<1>(raw, big, |a| f64::from(a[0] as i8), scale),
        NiftiDatatype::I16 => conv::<2>(raw, big, |a| f64::from(i16::from_le_bytes(a)), scale),
        NiftiDatatype::U16 => conv::<2>(raw, big, |a| f64::from(u16::from_le_bytes(a)), scale),
        NiftiDatatype::I32 => conv::<4>(raw, big, |a| f64::from(i32::from_le_bytes(a)), scale),
        NiftiDatatype::U32 => conv::<4>(raw, big, |a| f64::from(u32::from_le_bytes(a)), scale),
        NiftiDatatype::I64 => conv::<8>(raw, big, |a| i64::from_le_bytes(a) as f64, scale),
        NiftiDatatype::U64 => conv::<8>(raw, big, |a| u64::from_le_bytes(a) as f64, scale),
        NiftiDatatype::F32 => conv::<4>(raw, big, |a| f64::from(f32::from_le_bytes(a)), scale),
        NiftiDatatype::F64 => conv::<8>(raw, big, f64::from_le_bytes, scale),
    }
}

/// Writes `volume` as a gzip-compressed, little-endian NIfTI-1 file (`n+1`, `vox_offset` 352) with its
/// affine as the sform (`sform_code` 2, aligned) and, where the affine's rotation is orthogonal, as the
/// qform too (so that readers that prefer the qform agree).
///
/// # Errors
///
/// [`ImagingError::InvalidRequest`] if `volume.data.len()` differs from its `dims`, a dimension exceeds
/// NIfTI-1's `i16` limit, or (for [`StorageType::I16`]) a value is not finite or out of `i16`'s range;
/// [`ImagingError::Io`] if the file cannot be written.
pub fn write_nifti_gz(path: &Path, volume: &Volume, storage: StorageType) -> Result<(), ImagingError> {
    if volume.data.len() != volume.n_voxels() {
        return Err(ImagingError::request(
            path,
            format!("volume has {} values but dims {:?} need {}", volume.data.len(), volume.dims, volume.n_voxels()),
        ));
    }
    let mut dims = [0i16; 3];
    for (d, &n) in dims.iter_mut().zip(&volume.dims) {
        *d = i16::try_from(n)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| ImagingError::request(path, format!("dimension {n} does not fit NIfTI-1 (1 to 32767)")))?;
    }
    let datatype = match storage {
        StorageType::F32 => NiftiDatatype::F32,
        StorageType::I16 => NiftiDatatype::I16,
    };

    let mut h = vec![0u8; NIFTI1_HEADER + 4];
    let mut put = |off: usize, bytes: &[u8]| h[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &348i32.to_le_bytes());
    put(38, b"r");
    put(40, &3i16.to_le_bytes());
    for (i, d) in dims.iter().enumerate() {
        put(42 + 2 * i, &d.to_le_bytes());
    }
    for i in 3..7 {
        put(42 + 2 * i, &1i16.to_le_bytes());
    }
    put(70, &datatype.code().to_le_bytes());
    put(72, &((datatype.size() * 8) as i16).to_le_bytes());
    let (quatern, qfac) = mat_to_quat(&volume.affine, volume.spacing_mm);
    put(76, &(qfac as f32).to_le_bytes());
    for (i, s) in volume.spacing_mm.iter().enumerate() {
        put(80 + 4 * i, &(*s as f32).to_le_bytes());
    }
    put(108, &352f32.to_le_bytes());
    put(112, &1f32.to_le_bytes());
    put(116, &0f32.to_le_bytes());
    put(123, &[2u8]); // xyzt_units: mm
    put(148, b"fedhcc-imaging");
    if let Some(q) = quatern {
        put(252, &2i16.to_le_bytes());
        for (i, v) in q.iter().enumerate() {
            put(256 + 4 * i, &(*v as f32).to_le_bytes());
        }
        for i in 0..3 {
            put(268 + 4 * i, &(volume.affine[i][3] as f32).to_le_bytes());
        }
    }
    put(254, &2i16.to_le_bytes());
    for r in 0..3 {
        for c in 0..4 {
            put(280 + 16 * r + 4 * c, &(volume.affine[r][c] as f32).to_le_bytes());
        }
    }
    put(344, b"n+1\0");

    let mut body = Vec::with_capacity(volume.data.len() * datatype.size());
    match storage {
        StorageType::F32 => volume.data.iter().for_each(|v| body.extend_from_slice(&v.to_le_bytes())),
        StorageType::I16 => {
            for (i, v) in volume.data.iter().enumerate() {
                let r = v.round();
                if !r.is_finite() || r < f32::from(i16::MIN) || r > f32::from(i16::MAX) {
                    return Err(ImagingError::request(
                        path,
                        format!("voxel {i} is {v}, which int16 storage cannot hold; write it as float32"),
                    ));
                }
                body.extend_from_slice(&(r as i16).to_le_bytes());
            }
        }
    }

    let file = File::create(path).map_err(|e| ImagingError::io(path, e))?;
    let mut gz = GzEncoder::new(io::BufWriter::new(file), Compression::default());
    gz.write_all(&h).and_then(|()| gz.write_all(&body)).map_err(|e| ImagingError::io(path, e))?;
    gz.finish().and_then(|mut w| w.flush()).map_err(|e| ImagingError::io(path, e))
}

/// The NIfTI quaternion `(b, c, d)` and `qfac` for an affine whose 3×3 part is a rotation (possibly with a
/// flip) times `diag(spacing)`; `None` when it is not (sheared), in which case only the sform is written.
fn mat_to_quat(affine: &[[f64; 4]; 4], spacing: [f64; 3]) -> (Option<[f64; 3]>, f64) {
    let mut r = [[0.0; 3]; 3];
    for c in 0..3 {
        if spacing[c] <= 0.0 || !spacing[c].is_finite() {
            return (None, 1.0);
        }
        for (row, r_row) in r.iter_mut().enumerate() {
            r_row[c] = affine[row][c] / spacing[c];
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    if qfac < 0.0 {
        for row in &mut r {
            row[2] = -row[2];
        }
    }
    // Orthonormal within single precision, else the qform would misdescribe the grid.
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = (0..3).map(|k| r[k][i] * r[k][j]).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            if (dot - want).abs() > 1e-4 {
                return (None, qfac);
            }
        }
    }
    // Shepperd's method, as in nifti_mat44_to_quatern, with a ≥ 0.
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (a, b, c, d) = if trace > 0.0 {
        let s = 0.5 / (trace + 1.0).sqrt();
        (0.25 / s, (r[2][1] - r[1][2]) * s, (r[0][2] - r[2][0]) * s, (r[1][0] - r[0][1]) * s)
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = 2.0 * (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt();
        ((r[2][1] - r[1][2]) / s, 0.25 * s, (r[0][1] + r[1][0]) / s, (r[0][2] + r[2][0]) / s)
    } else if r[1][1] > r[2][2] {
        let s = 2.0 * (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt();
        ((r[0][2] - r[2][0]) / s, (r[0][1] + r[1][0]) / s, 0.25 * s, (r[1][2] + r[2][1]) / s)
    } else {
        let s = 2.0 * (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt();
        ((r[1][0] - r[0][1]) / s, (r[0][2] + r[2][0]) / s, (r[1][2] + r[2][1]) / s, 0.25 * s)
    };
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    (Some([b * sign, c * sign, d * sign]), qfac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A big-endian NIfTI-1 header for a `2×3×4` int32 image with scaling and neither sform nor qform.
    fn big_endian_header(magic: &[u8; 4], vox_offset: f32) -> Vec<u8> {
        let mut h = vec![0u8; NIFTI1_HEADER];
        let mut put = |off: usize, bytes: &[u8]| h[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &348i32.to_be_bytes());
        for (i, d) in [3i16, 2, 3, 4, 1, 1, 1, 1].iter().enumerate() {
            put(40 + 2 * i, &d.to_be_bytes());
        }
        put(70, &8i16.to_be_bytes());
        put(72, &32i16.to_be_bytes());
        for (i, p) in [1f32, 2.0, 3.0, 4.0].iter().enumerate() {
            put(76 + 4 * i, &p.to_be_bytes());
        }
        put(108, &vox_offset.to_be_bytes());
        put(112, &2f32.to_be_bytes());
        put(116, &(-1f32).to_be_bytes());
        put(344, magic);
        h
    }

    fn voxels() -> Vec<u8> {
        (0..24i32).flat_map(|i| (i - 5).to_be_bytes()).collect()
    }

    fn expected(v: &Volume) {
        assert_eq!(v.dims, [2, 3, 4]);
        let want: Vec<f32> = (0..24).map(|i| 2.0 * (i - 5) as f32 - 1.0).collect();
        assert_eq!(v.data, want);
        // nibabel's base affine: x flipped, centred on the grid.
        assert_eq!(
            v.affine,
            [[-2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, -3.0], [0.0, 0.0, 4.0, -6.0], [0.0, 0.0, 0.0, 1.0]]
        );
    }

    #[test]
    fn big_endian_int32_with_scaling_and_pixdim_affine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("be.nii");
        let mut bytes = big_endian_header(b"n+1\0", 352.0);
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&voxels());
        std::fs::write(&path, bytes).expect("write");
        expected(&read_nifti(&path).expect("reads"));
    }

    #[test]
    fn header_and_image_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pair.hdr"), big_endian_header(b"ni1\0", 0.0)).expect("write");
        std::fs::write(dir.path().join("pair.img"), voxels()).expect("write");
        expected(&read_nifti(&dir.path().join("pair.hdr")).expect("reads"));
    }

    #[test]
    fn unsupported_datatype_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rgb.nii");
        let mut bytes = big_endian_header(b"n+1\0", 352.0);
        bytes[70..72].copy_from_slice(&128i16.to_be_bytes());
        std::fs::write(&path, bytes).expect("write");
        let err = read_nifti(&path).expect_err("RGB24 is not scalar");
        assert!(err.to_string().contains("RGB24"), "{err}");
    }
}
