//! Slide feature files and the content-addressed feature cache.
//!
//! # Feature file format (`.pfeat`, version 1, little-endian)
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `FHPFEAT1` |
//! | 4 | `u32` length `L` of the header |
//! | `L` | JSON header: extractor, version, dim, feature_names, n, slide_sha256, tissue_fraction, target_mpp, tile_px |
//! | `8 n` | coordinates, `u32` x then y per patch |
//! | `4 n dim` | features, `f32`, patch after patch |
//! | 32 | SHA-256 of everything before it |
//!
//! The trailing checksum makes a truncated or overwritten file an error on read rather than wrong features.
//! Files are written to a temporary name in the same folder, flushed to disk and renamed, so a reader sees the
//! old file or the complete new one, never a partial one.
//!
//! # Cache
//!
//! [`FeatureCache`] keeps one file per (slide content, tiling configuration, extractor name/version) under a
//! key ([`FeatureCache::key`]) built from the slide's SHA-256, so a renamed slide is still a hit, a changed one
//! (one byte) is a miss, and bumping an extractor's version invalidates its entries.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Slide;
use super::features::{PatchFeatureExtractor, SlideFeatures, extract_with_hash};
use super::tiles::TilingConfig;
use crate::ImagingError;

const MAGIC: &[u8; 8] = b"FHPFEAT1";
/// Format version, part of the cache key.
const FORMAT_VERSION: u32 = 1;
/// Largest JSON header accepted (a few thousand feature names fit easily).
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Extension of cache entries.
const EXTENSION: &str = "pfeat";
/// Marker in the names of temporary files (`.<name>.tmp-<pid>-<n>`).
const TEMP_MARKER: &str = ".tmp-";
/// Where the liveness of a temporary file's writer cannot be checked, it is stale after this long.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The JSON header of a feature file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    extractor: String,
    version: u32,
    dim: usize,
    feature_names: Vec<String>,
    n: usize,
    slide_sha256: String,
    tissue_fraction: f64,
    target_mpp: f64,
    tile_px: u32,
}

/// SHA-256 of a file, lowercase hex, read in 1 MiB blocks.
///
/// # Errors
///
/// [`ImagingError::Io`] naming the file if it cannot be opened or read.
pub fn file_sha256(path: &Path) -> Result<String, ImagingError> {
    let mut file = File::open(path).map_err(|e| ImagingError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let got = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImagingError::io(path, e)),
        };
        hasher.update(&buf[..got]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A writer that hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl SlideFeatures {
    /// Writes the features atomically: a temporary file in the same folder, flushed to disk, renamed over
    /// `path`, and the folder synced. On failure the temporary file is removed and `path` is untouched.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] if the fields disagree (`dim`, names, `features.len()`);
    /// [`ImagingError::Io`] naming the file on a write failure.
    pub fn write(&self, path: &Path) -> Result<(), ImagingError> {
        if self.feature_names.len() != self.dim || self.features.len() != self.n() * self.dim {
            return Err(ImagingError::request(
                path,
                format!(
                    "feature set is inconsistent: {} patches × {} features = {} values expected, {} present, {} names",
                    self.n(),
                    self.dim,
                    self.n() * self.dim,
                    self.features.len(),
                    self.feature_names.len()
                ),
            ));
        }
        let temp = temp_path(path);
        let result = self.write_to(&temp).and_then(|()| {
            fs::rename(&temp, path).map_err(|e| ImagingError::io(path, e))?;
            sync_parent(path)
        });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn write_to(&self, temp: &Path) -> Result<(), ImagingError> {
        let io = |e| ImagingError::io(temp, e);
        let header = Header {
            extractor: self.extractor.clone(),
            version: self.version,
            dim: self.dim,
            feature_names: self.feature_names.clone(),
            n: self.n(),
            slide_sha256: self.slide_sha256.clone(),
            tissue_fraction: self.tissue_fraction,
            target_mpp: self.target_mpp,
            tile_px: self.tile_px,
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| ImagingError::request(temp, format!("feature header cannot be encoded: {e}")))?;
        let file = File::create(temp).map_err(io)?;
        let mut w = HashingWriter { inner: BufWriter::new(file), hasher: Sha256::new() };
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&(json.len() as u32).to_le_bytes()).map_err(io)?;
        w.write_all(&json).map_err(io)?;
        for [x, y] in &self.coords {
            w.write_all(&x.to_le_bytes()).map_err(io)?;
            w.write_all(&y.to_le_bytes()).map_err(io)?;
        }
        for v in &self.features {
            w.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        let digest = w.hasher.finalize();
        let mut inner = w.inner;
        inner.write_all(&digest).map_err(io)?;
        let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }

    /// Reads a feature file written by [`write`](Self::write), checking its structure and checksum.
    ///
    /// # Errors
    ///
    /// [`ImagingError::Io`] if it cannot be read; [`ImagingError::InvalidFormat`] if it is not a feature file,
    /// its checksum does not match (damaged or truncated), its header is inconsistent or a value is not finite;
    /// [`ImagingError::Truncated`] if it is shorter than its header says.
    pub fn read(path: &Path) -> Result<Self, ImagingError> {
        let invalid = |reason: String| ImagingError::invalid(path, "patch feature", reason);
        let bytes = fs::read(path).map_err(|e| ImagingError::io(path, e))?;
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(invalid("it does not start with the feature file signature".into()));
        }
        let header_len = u64::from(u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]));
        if header_len > MAX_HEADER_BYTES {
            return Err(invalid(format!("header claims {header_len} bytes")));
        }
        let header_end = 12 + header_len as usize;
        let Some(json) = bytes.get(12..header_end) else {
            return Err(ImagingError::truncated(path, format!("{} bytes, header needs {header_end}", bytes.len())));
        };
        let header: Header =
            serde_json::from_slice(json).map_err(|e| invalid(format!("header is not valid JSON: {e}")))?;
        if header.feature_names.len() != header.dim {
            return Err(invalid(format!("{} feature names for {} features", header.feature_names.len(), header.dim)));
        }
        let body = (header.n as u64)
            .checked_mul(8 + 4 * header.dim as u64)
            .and_then(|b| b.checked_add(header_end as u64 + 32))
            .ok_or_else(|| invalid(format!("{} patches × {} features overflows", header.n, header.dim)))?;
        if (bytes.len() as u64) < body {
            return Err(ImagingError::truncated(
                path,
                format!("{} bytes, {} patches × {} features need {body}", bytes.len(), header.n, header.dim),
            ));
        }
        if bytes.len() as u64 != body {
            return Err(invalid(format!("{} bytes, {body} expected", bytes.len())));
        }
        let (content, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(content).as_slice() != digest {
            return Err(invalid("checksum mismatch: the file is damaged; delete it to recompute".into()));
        }
        let mut words = content[header_end..].chunks_exact(4).map(|w| [w[0], w[1], w[2], w[3]]);
        let coords: Vec<[u32; 2]> = (0..header.n)
            .map(|_| {
                let mut next = || words.next().map_or(0, u32::from_le_bytes);
                [next(), next()]
            })
            .collect();
        let features: Vec<f32> = words.map(f32::from_le_bytes).collect();
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!("feature {} of patch {} is not finite", i % header.dim, i / header.dim)));
        }
        Ok(Self {
            extractor: header.extractor,
            version: header.version,
            dim: header.dim,
            feature_names: header.feature_names,
            coords,
            features,
            slide_sha256: header.slide_sha256,
            tissue_fraction: header.tissue_fraction,
            target_mpp: header.target_mpp,
            tile_px: header.tile_px,
        })
    }
}

/// `.<name>.tmp-<pid>-<n>` next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "features".into(), |n| n.to_string_lossy().into_owned());
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}{TEMP_MARKER}{}-{n}", std::process::id()))
}

/// Makes a rename durable by syncing its folder (a no-op where folders cannot be opened, e.g. Windows).
fn sync_parent(path: &Path) -> Result<(), ImagingError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    {
        let dir = File::open(parent).map_err(|e| ImagingError::io(parent, e))?;
        dir.sync_all().map_err(|e| ImagingError::io(parent, e))?;
    }
    #[cfg(not(unix))]
    let _ = parent;
    Ok(())
}

/// A folder of slide feature files keyed by slide content, tiling configuration and extractor.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    /// Opens (creating it if needed) a cache folder, and removes temporary files that a crashed writer left
    /// behind (those whose writing process is no longer running).
    ///
    /// # Errors
    ///
    /// [`ImagingError::Io`] naming the folder if it cannot be created or listed.
    pub fn new(dir: &Path) -> Result<Self, ImagingError> {
        fs::create_dir_all(dir).map_err(|e| ImagingError::io(dir, e))?;
        for entry in fs::read_dir(dir).map_err(|e| ImagingError::io(dir, e))? {
            let entry = entry.map_err(|e| ImagingError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale_temp(&name, &entry) {
                // Another process may have removed it first; either way it is gone.
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The cache folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key of a slide (by content hash) under a tiling configuration and an extractor:
    /// `<first 16 hex digits of the slide hash>-<extractor>-v<version>-<16 hex digits>`, the last part a
    /// SHA-256 over the full slide hash, every configuration field, the extractor's name, version and feature
    /// names, and the file format version.
    #[must_use]
    pub fn key(slide_sha256: &str, cfg: &TilingConfig, extractor: &dyn PatchFeatureExtractor) -> String {
        let mut h = Sha256::new();
        let canonical = format!(
            "fedhcc patch features {FORMAT_VERSION}\nslide {slide_sha256}\ntarget_mpp {:?}\ntile_px {}\n\
             min_tissue {:?}\nmax_patches {}\nseed {}\nassume_mpp {:?}\nextractor {:?}\nversion {}\ndim {}\n",
            cfg.target_mpp,
            cfg.tile_px,
            cfg.min_tissue,
            cfg.max_patches,
            cfg.seed,
            cfg.assume_mpp,
            extractor.name(),
            extractor.version(),
            extractor.dim(),
        );
        h.update(canonical.as_bytes());
        for name in extractor.feature_names() {
            h.update(name.as_bytes());
            h.update(b"\n");
        }
        let digest = hex(&h.finalize());
        let safe = |s: &str, max: usize| -> String {
            s.chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
                .take(max)
                .collect()
        };
        format!("{}-{}-v{}-{}", safe(slide_sha256, 16), safe(extractor.name(), 40), extractor.version(), &digest[..16])
    }

    /// The file an entry is stored in.
    #[must_use]
    pub fn path_for(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{EXTENSION}"))
    }

    /// The slide's features: read from the cache when present (`true`), else computed, stored atomically and
    /// returned (`false`). An entry that cannot be read or does not describe this slide and configuration is
    /// recomputed and replaced. A failure leaves no file behind.
    ///
    /// # Errors
    ///
    /// Those of [`file_sha256`], [`Slide::open`] and [`super::extract_slide_features`] (each names the slide
    /// file), [`ImagingError::InvalidRequest`] if the slide changed while it was being read, and
    /// [`ImagingError::Io`] if the entry cannot be written.
    pub fn get_or_compute(
        &self,
        slide_path: &Path,
        cfg: &TilingConfig,
        extractor: &dyn PatchFeatureExtractor,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(SlideFeatures, bool), ImagingError> {
        let before = stamp(slide_path)?;
        let sha = file_sha256(slide_path)?;
        let key = Self::key(&sha, cfg, extractor);
        let entry = self.path_for(&key);
        if entry.exists()
            && let Ok(cached) = SlideFeatures::read(&entry)
            && describes(&cached, &sha, cfg, extractor)
        {
            return Ok((cached, true));
        }
        let slide = Slide::open(slide_path)?;
        let features = extract_with_hash(&slide, cfg, extractor, sha, progress)?;
        if stamp(slide_path)? != before {
            return Err(ImagingError::request(
                slide_path,
                "the slide file changed while its features were computed (is it still being copied?); run again \
                 once it is complete",
            ));
        }
        features.write(&entry)?;
        Ok((features, false))
    }
}

/// Size and modification time: a cheap check that a file did not change between two points.
fn stamp(path: &Path) -> Result<(u64, Option<SystemTime>), ImagingError> {
    let meta = fs::metadata(path).map_err(|e| ImagingError::io(path, e))?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Whether a cached entry is the one asked for (guards against a hand-copied or mis-keyed file).
fn describes(f: &SlideFeatures, sha: &str, cfg: &TilingConfig, extractor: &dyn PatchFeatureExtractor) -> bool {
    f.slide_sha256 == sha
        && f.extractor == extractor.name()
        && f.version == extractor.version()
        && f.dim == extractor.dim()
        && f.tile_px == cfg.tile_px
        && f.target_mpp.to_bits() == cfg.target_mpp.to_bits()
}

/// Whether a folder entry is a temporary feature file whose writer is gone.
fn is_stale_temp(name: &str, entry: &fs::DirEntry) -> bool {
    let Some(marker) = name.find(TEMP_MARKER).filter(|_| name.starts_with('.')) else {
        return false;
    };
    let Some(pid) = name[marker + TEMP_MARKER.len()..].split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    let proc_fs = Path::new("/proc/self");
    if proc_fs.exists() {
        return !Path::new("/proc").join(pid.to_string()).exists();
    }
    entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > STALE_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    }

    #[test]
    fn temp_names_are_hidden_unique_and_recognised() {
        let a = temp_path(Path::new("/x/k.pfeat"));
        let b = temp_path(Path::new("/x/k.pfeat"));
        assert_ne!(a, b);
        let name = a.file_name().expect("name").to_string_lossy().into_owned();
        assert!(name.starts_with(".k.pfeat.tmp-"), "{name}");
    }
}
