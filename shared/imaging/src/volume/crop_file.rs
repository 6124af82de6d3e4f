//! The on-disk form of an [`MriCrop`]: written atomically, read with every size checked.
//!
//! # Format (version 1, all numbers little-endian)
//!
//! ```text
//! magic            8 bytes  "FHCCCROP"
//! version          u32      1
//! phases           u32      number of phases P (1 to 64)
//! grid             3 × u32  z, y, x (each 1 to 1024, at most 2^24 voxels)
//! tumour_volume_ml f64
//! box_size_mm      3 × f64  x, y, z
//! per phase        u8 present (0/1), u16 name length, name (UTF-8)
//! data             P × z × y × x f32, x fastest
//! ```
//!
//! Nothing may follow the data. A reader checks the file's length against the header before it reserves
//! memory, and refuses non-finite values and absent phases that are not all zeros.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::preprocess::{MAX_GRID_SIDE, MAX_GRID_VOXELS, MAX_PHASE_NAME, MAX_PHASES, MriCrop};
use crate::ImagingError;

const FORMAT: &str = "MRI crop";
const MAGIC: [u8; 8] = *b"FHCCCROP";
const VERSION: u32 = 1;
/// Distinguishes the temporary files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl MriCrop {
    /// Writes the crop to `path` atomically: a temporary file in the same folder is written, flushed to disk
    /// and renamed over `path`, then the folder is flushed. On any error the temporary file is removed, so
    /// `path` either keeps its previous content or holds the whole new crop — never a partial file.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] if the crop's fields disagree (data length, flags, names, sizes out of
    /// the format's range); [`ImagingError::Io`] naming `path` if the folder cannot be written.
    pub fn write(&self, path: &Path) -> Result<(), ImagingError> {
        let bytes = self.encode(path)?;
        write_atomic(path, &bytes)
    }

    /// Reads a crop written by [`MriCrop::write`].
    ///
    /// # Errors
    ///
    /// [`ImagingError::Io`] if the file cannot be read; [`ImagingError::InvalidFormat`] for a wrong magic, a
    /// header value out of range, bytes after the data, a non-finite value or an absent phase with non-zero
    /// values; [`ImagingError::Unsupported`] for another format version; [`ImagingError::Truncated`] if the
    /// file ends early. Every message names the file.
    pub fn read(path: &Path) -> Result<MriCrop, ImagingError> {
        let cap = (MAX_PHASES * MAX_GRID_VOXELS * 4 + 4096) as u64;
        let len = fs::metadata(path).map_err(|e| ImagingError::io(path, e))?.len();
        if len > cap {
            return Err(ImagingError::invalid(path, FORMAT, format!("{len} bytes is larger than any crop can be")));
        }
        let bytes = fs::read(path).map_err(|e| ImagingError::io(path, e))?;
        decode(path, &bytes)
    }

    fn encode(&self, path: &Path) -> Result<Vec<u8>, ImagingError> {
        let bad = |reason: String| Err(ImagingError::request(path, format!("crop not written: {reason}")));
        let n = self.grid.iter().try_fold(1usize, |acc, &g| acc.checked_mul(g));
        if !self.grid.iter().all(|g| (1..=MAX_GRID_SIDE).contains(g)) || n.is_none_or(|n| n > MAX_GRID_VOXELS) {
            return bad(format!("grid {:?} is outside the format's range", self.grid));
        }
        let n = self.phase_len();
        if self.phases.is_empty() || self.phases.len() > MAX_PHASES {
            return bad(format!("{} phases (1 to {MAX_PHASES} allowed)", self.phases.len()));
        }
        if self.present.len() != self.phases.len() || Some(self.data.len()) != n.checked_mul(self.phases.len()) {
            return bad(format!(
                "{} phases, {} presence flags and {} values for a {:?} grid",
                self.phases.len(),
                self.present.len(),
                self.data.len(),
                self.grid
            ));
        }
        if let Some(name) = self.phases.iter().find(|p| p.is_empty() || p.len() > MAX_PHASE_NAME) {
            return bad(format!("phase name '{name}' must be 1 to {MAX_PHASE_NAME} bytes"));
        }
        let mut out = Vec::with_capacity(64 + 64 * self.phases.len() + 4 * self.data.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.phases.len() as u32).to_le_bytes());
        for g in self.grid {
            out.extend_from_slice(&(g as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.tumour_volume_ml.to_le_bytes());
        for s in self.box_size_mm {
            out.extend_from_slice(&s.to_le_bytes());
        }
        for (name, present) in self.phases.iter().zip(&self.present) {
            out.push(u8::from(*present));
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }
}

/// A cursor over the file's bytes whose short reads are truncation errors naming the file and the field.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ImagingError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            ImagingError::truncated(
                self.path,
                format!("the file ends after {} bytes, inside the {what} (byte {})", self.bytes.len(), self.at),
            )
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ImagingError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ImagingError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn f64(&mut self, what: &str) -> Result<f64, ImagingError> {
        self.array(what).map(f64::from_le_bytes)
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<MriCrop, ImagingError> {
    let invalid = |reason: String| ImagingError::invalid(path, FORMAT, reason);
    let mut c = Cursor { path, bytes, at: 0 };
    let magic: [u8; 8] = c.array("magic")?;
    if magic != MAGIC {
        return Err(invalid(format!(
            "starts with {magic:02x?}, not the crop magic \"FHCCCROP\" (not a file written by `fedhcc preprocess`)"
        )));
    }
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(ImagingError::unsupported(
            path,
            format!("crop format version {version}; this build reads version {VERSION}: rerun `fedhcc preprocess`"),
        ));
    }
    let n_phases = c.u32("header")? as usize;
    if !(1..=MAX_PHASES).contains(&n_phases) {
        return Err(invalid(format!("{n_phases} phases (1 to {MAX_PHASES} allowed)")));
    }
    let mut grid = [0usize; 3];
    for g in &mut grid {
        *g = c.u32("header")? as usize;
    }
    let n = grid.iter().try_fold(1usize, |acc, &g| acc.checked_mul(g));
    if !grid.iter().all(|g| (1..=MAX_GRID_SIDE).contains(g)) || n.is_none_or(|n| n > MAX_GRID_VOXELS) {
        return Err(invalid(format!("grid {grid:?} is outside the format's range")));
    }
    let tumour_volume_ml = c.f64("header")?;
    let box_size_mm = [c.f64("header")?, c.f64("header")?, c.f64("header")?];
    let non_negative = |v: f64| v.is_finite() && v >= 0.0;
    if !(non_negative(tumour_volume_ml) && box_size_mm.into_iter().all(non_negative)) {
        return Err(invalid(format!(
            "tumour volume {tumour_volume_ml} ml or box size {box_size_mm:?} mm is impossible"
        )));
    }
    let mut phases = Vec::with_capacity(n_phases);
    let mut present = Vec::with_capacity(n_phases);
    for i in 0..n_phases {
        let flag = c.array::<1>("phase list")?[0];
        if flag > 1 {
            return Err(invalid(format!("phase {i}: presence flag {flag} (0 or 1 expected)")));
        }
        let len = usize::from(u16::from_le_bytes(c.array("phase list")?));
        if !(1..=MAX_PHASE_NAME).contains(&len) {
            return Err(invalid(format!("phase {i}: name of {len} bytes (1 to {MAX_PHASE_NAME} allowed)")));
        }
        let name = std::str::from_utf8(c.take(len, "phase list")?)
            .map_err(|_| invalid(format!("phase {i}: name is not UTF-8")))?;
        phases.push(name.to_string());
        present.push(flag == 1);
    }
    let per_phase = grid.iter().product::<usize>();
    let n_values = per_phase * n_phases;
    let expected = n_values * 4;
    let rest = bytes.len() - c.at;
    if rest < expected {
        return Err(ImagingError::truncated(
            path,
            format!(
                "the header promises {expected} bytes of values ({n_phases} phases × {grid:?}), the file holds {rest}"
            ),
        ));
    }
    if rest > expected {
        return Err(invalid(format!("{} unexpected bytes after the values", rest - expected)));
    }
    let data: Vec<f32> = bytes[c.at..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("value {i} (phase '{}') is not finite", phases[i / per_phase])));
    }
    for (p, name) in phases.iter().enumerate() {
        if !present[p] && data[p * per_phase..(p + 1) * per_phase].iter().any(|v| *v != 0.0) {
            return Err(invalid(format!("phase '{name}' is marked absent but holds non-zero values")));
        }
    }
    Ok(MriCrop { grid, phases, present, data, tumour_volume_ml, box_size_mm })
}

/// Temp file in `path`'s folder → write → fsync → rename over `path` → fsync the folder; the temp file is
/// removed on any failure before the rename took effect.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImagingError> {
    let name = path.file_name().ok_or_else(|| ImagingError::request(path, "the crop path names no file"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // The temp file may not exist (the folder refused it); nothing else to clean up then.
        let _ = fs::remove_file(&tmp);
        return Err(ImagingError::io(path, e));
    }
    sync_dir(dir).map_err(|e| ImagingError::io(dir, e))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    // Windows cannot open a folder as a file; NTFS commits the rename with its metadata journal.
    Ok(())
}
