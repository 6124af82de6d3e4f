//! Parameter sets: the only form in which model weights cross a boundary (wire, disk, strategy).
//!
//! A [`ParameterSet`] is an ordered list of named f32 tensors stored as one flat vector, plus a
//! [`Fingerprint`] of the names and shapes. The coordinator and strategies see nothing else of a
//! model: no burn type ever reaches them.
//!
//! # Wire and disk format (the "payload")
//!
//! ```text
//! b"FHCP" | version u8 (=1) | header_len u32 LE | bincode(PayloadHeader) | f32 LE × n_params
//! ```
//!
//! The header is bincode-encoded (names, shapes, fingerprint); the numbers follow as raw little-endian
//! f32, exactly as bincode would write them, but contiguous so that a receiver can fold them into a
//! running sum chunk by chunk ([`PayloadReader`]) without ever holding a second copy of the model.
//!
//! Size: the parameter set and its one codec (encode, streaming decode, layout fingerprint). The
//! wire, the disk and the strategies depend on the codec having exactly one definition.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Magic bytes opening every payload.
pub const MAGIC: &[u8; 4] = b"FHCP";
/// Payload format version.
pub const FORMAT_VERSION: u8 = 1;
/// Upper bound on tensors in one set (hardening: a header cannot ask for unbounded allocation).
pub const MAX_TENSORS: usize = 65_536;
/// Upper bound on a tensor name's length in bytes.
pub const MAX_NAME_LEN: usize = 512;
/// Upper bound on a tensor's rank.
pub const MAX_RANK: usize = 8;
/// Upper bound on the number of parameters in one set (4 GiB of f32).
pub const MAX_PARAMS: usize = 1 << 30;
/// Upper bound on the encoded header.
pub const MAX_HEADER_LEN: usize = 16 << 20;

/// Errors building, encoding or decoding a parameter set.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamsError {
    #[error("tensor '{name}' has shape {shape:?} ({expected} values) but {actual} values were given")]
    ShapeMismatch { name: String, shape: Vec<usize>, expected: usize, actual: usize },
    #[error("tensor name '{0}' appears twice")]
    DuplicateName(String),
    #[error("parameter set limits exceeded: {0}")]
    Limit(String),
    #[error("payload is not a fedhcc parameter set: {0}")]
    BadPayload(String),
    #[error("payload is truncated: expected {expected} bytes, got {actual}")]
    Truncated { expected: usize, actual: usize },
    #[error("payload has {extra} bytes beyond its declared end")]
    TrailingBytes { extra: usize },
    #[error("payload fingerprint {found} does not match its own names and shapes ({computed})")]
    FingerprintInconsistent { found: Fingerprint, computed: Fingerprint },
    #[error("value {value} at tensor '{name}' index {index} is not finite")]
    NonFinite { name: String, index: usize, value: f32 },
}

/// SHA-256 of the ordered tensor names and shapes. Two sets with the same fingerprint can be added.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }

    /// The first 12 hex digits, for messages a person reads.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

/// Name and shape of one tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of values (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Names and shapes of a parameter set, in order, with their fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    specs: Vec<TensorSpec>,
    fingerprint: Fingerprint,
    numel: usize,
}

impl Layout {
    /// Checks limits and uniqueness and computes the fingerprint.
    ///
    /// # Errors
    /// A duplicate name or a limit exceeded.
    pub fn new(specs: Vec<TensorSpec>) -> Result<Self, ParamsError> {
        if specs.len() > MAX_TENSORS {
            return Err(ParamsError::Limit(format!("{} tensors (at most {MAX_TENSORS})", specs.len())));
        }
        let mut seen = std::collections::HashSet::with_capacity(specs.len());
        let mut numel: usize = 0;
        for s in &specs {
            if s.name.is_empty() || s.name.len() > MAX_NAME_LEN {
                return Err(ParamsError::Limit(format!(
                    "tensor name of {} bytes (1 to {MAX_NAME_LEN} allowed)",
                    s.name.len()
                )));
            }
            if s.shape.len() > MAX_RANK {
                return Err(ParamsError::Limit(format!(
                    "tensor '{}' has rank {} (at most {MAX_RANK})",
                    s.name,
                    s.shape.len()
                )));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(ParamsError::DuplicateName(s.name.clone()));
            }
            let n =
                s.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= MAX_PARAMS).ok_or_else(
                    || ParamsError::Limit(format!("tensor '{}' shape {:?} is too large", s.name, s.shape)),
                )?;
            numel = numel
                .checked_add(n)
                .filter(|&n| n <= MAX_PARAMS)
                .ok_or_else(|| ParamsError::Limit(format!("more than {MAX_PARAMS} parameters")))?;
        }
        let fingerprint = fingerprint_of(&specs);
        Ok(Self { specs, fingerprint, numel })
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Total number of f32 values.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Length of the encoded payload in bytes.
    pub fn payload_len(&self) -> usize {
        header_bytes(self).len() + self.numel * 4
    }

    /// The tensor holding flat index `i`, and the index within it.
    pub fn locate(&self, mut i: usize) -> Option<(&TensorSpec, usize)> {
        for s in &self.specs {
            let n = s.numel();
            if i < n {
                return Some((s, i));
            }
            i -= n;
        }
        None
    }
}

fn fingerprint_of(specs: &[TensorSpec]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(b"fedhcc-layout-v1");
    h.update((specs.len() as u64).to_le_bytes());
    for s in specs {
        h.update((s.name.len() as u64).to_le_bytes());
        h.update(s.name.as_bytes());
        h.update((s.shape.len() as u64).to_le_bytes());
        for d in &s.shape {
            h.update((*d as u64).to_le_bytes());
        }
    }
    Fingerprint(h.finalize().into())
}

#[derive(Serialize, Deserialize)]
struct PayloadHeader {
    fingerprint: Fingerprint,
    specs: Vec<TensorSpec>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HEADER_LEN>()
}

fn header_bytes(layout: &Layout) -> Vec<u8> {
    let header = PayloadHeader { fingerprint: layout.fingerprint, specs: layout.specs.clone() };
    // Encoding a plain struct of strings and integers into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(&header, bincode_config()).unwrap_or_default();
    let mut out = Vec::with_capacity(9 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Named f32 tensors, stored flat, in a fixed order.
#[derive(Clone, Debug, PartialEq)]
pub struct ParameterSet {
    layout: Layout,
    data: Vec<f32>,
}

impl ParameterSet {
    /// Builds a set from a layout and flat data.
    ///
    /// # Errors
    /// `data.len()` differs from the layout's number of values.
    pub fn new(layout: Layout, data: Vec<f32>) -> Result<Self, ParamsError> {
        if data.len() != layout.numel {
            return Err(ParamsError::ShapeMismatch {
                name: "<all>".into(),
                shape: vec![layout.numel],
                expected: layout.numel,
                actual: data.len(),
            });
        }
        Ok(Self { layout, data })
    }

    /// Builds a set from `(name, shape, values)` triples, in order.
    ///
    /// # Errors
    /// A tensor whose value count disagrees with its shape, a duplicate name, or a limit exceeded.
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Self, ParamsError> {
        let mut specs = Vec::with_capacity(tensors.len());
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let expected: usize = shape.iter().product();
            if expected != values.len() {
                return Err(ParamsError::ShapeMismatch { name, shape, expected, actual: values.len() });
            }
            data.extend_from_slice(&values);
            specs.push(TensorSpec { name, shape });
        }
        let layout = Layout::new(specs)?;
        Ok(Self { layout, data })
    }

    /// A set of the given layout filled with zeros.
    pub fn zeros(layout: Layout) -> Self {
        let n = layout.numel;
        Self { layout, data: vec![0.0; n] }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.layout.fingerprint
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// All values, flat, in layout order.
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// All values, flat, mutable.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the set, returning the layout and flat values.
    pub fn into_parts(self) -> (Layout, Vec<f32>) {
        (self.layout, self.data)
    }

    /// Iterates over `(spec, values)` per tensor.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        let mut offset = 0;
        self.layout.specs.iter().map(move |s| {
            let n = s.numel();
            let v = &self.data[offset..offset + n];
            offset += n;
            (s, v)
        })
    }

    /// The values of one tensor by name.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors().find(|(s, _)| s.name == name).map(|(_, v)| v)
    }

    /// The first value that is NaN or infinite, if any.
    ///
    /// # Errors
    /// [`ParamsError::NonFinite`] naming the tensor and index.
    pub fn check_finite(&self) -> Result<(), ParamsError> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(non_finite_error(&self.layout, i, self.data[i])),
        }
    }

    /// `self - other`, elementwise (an update's delta against the global model).
    ///
    /// # Errors
    /// The layouts differ.
    pub fn delta_from(&self, base: &ParameterSet) -> Result<ParameterSet, ParamsError> {
        self.require_same_layout(base)?;
        let data = self.data.iter().zip(&base.data).map(|(a, b)| a - b).collect();
        Ok(Self { layout: self.layout.clone(), data })
    }

    /// Turns `self` into `self - base` in place (no second model-sized allocation).
    ///
    /// # Errors
    /// The layouts differ.
    pub fn subtract_in_place(&mut self, base: &ParameterSet) -> Result<(), ParamsError> {
        self.require_same_layout(base)?;
        for (a, b) in self.data.iter_mut().zip(&base.data) {
            *a -= b;
        }
        Ok(())
    }

    /// `self += scale * other`, elementwise.
    ///
    /// # Errors
    /// The layouts differ.
    pub fn add_scaled(&mut self, other: &ParameterSet, scale: f32) -> Result<(), ParamsError> {
        self.require_same_layout(other)?;
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += scale * b;
        }
        Ok(())
    }

    fn require_same_layout(&self, other: &ParameterSet) -> Result<(), ParamsError> {
        if self.layout.fingerprint != other.layout.fingerprint {
            return Err(ParamsError::BadPayload(format!(
                "layouts differ ({} vs {})",
                self.layout.fingerprint, other.layout.fingerprint
            )));
        }
        Ok(())
    }

    /// Encodes the payload (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = header_bytes(&self.layout);
        out.reserve(self.data.len() * 4);
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Writes the payload to `w` in blocks, without building it in memory.
    ///
    /// # Errors
    /// Whatever `w` returns.
    pub fn write_to<W: std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&header_bytes(&self.layout))?;
        let mut block = Vec::with_capacity(64 * 1024);
        for vals in self.data.chunks(16 * 1024) {
            block.clear();
            for v in vals {
                block.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&block)?;
        }
        Ok(())
    }

    /// Reads a payload from `r` in blocks (memory: the set itself, no second copy).
    ///
    /// # Errors
    /// I/O failure or anything [`ParameterSet::decode`] would refuse.
    pub fn read_from<R: std::io::Read>(r: &mut R) -> Result<Self, ParamsError> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ParamsError::BadPayload("payload ends early".into()),
            _ => ParamsError::BadPayload(format!("read failed: {e}")),
        };
        let mut head = vec![0u8; 9];
        r.read_exact(&mut head).map_err(io)?;
        let hlen = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
        if &head[..4] == MAGIC && hlen <= MAX_HEADER_LEN {
            head.resize(9 + hlen, 0);
            r.read_exact(&mut head[9..]).map_err(io)?;
        }
        let (layout, _) = decode_header(&head)?;
        let mut data = vec![0f32; layout.numel];
        let mut buf = vec![0u8; 1 << 20];
        for block in data.chunks_mut(buf.len() / 4) {
            let bytes = &mut buf[..block.len() * 4];
            r.read_exact(bytes).map_err(io)?;
            for (v, c) in block.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        let extra = r.read(&mut buf[..1]).map_err(io)?;
        if extra > 0 {
            return Err(ParamsError::TrailingBytes { extra });
        }
        Self::new(layout, data)
    }

    /// Decodes a complete payload.
    ///
    /// # Errors
    /// Anything wrong with the bytes: magic, version, header, fingerprint, length.
    pub fn decode(bytes: &[u8]) -> Result<Self, ParamsError> {
        let (layout, data_start) = decode_header(bytes)?;
        let expected = data_start + layout.numel * 4;
        if bytes.len() < expected {
            return Err(ParamsError::Truncated { expected, actual: bytes.len() });
        }
        if bytes.len() > expected {
            return Err(ParamsError::TrailingBytes { extra: bytes.len() - expected });
        }
        let data = bytes[data_start..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Self { layout, data })
    }
}

fn non_finite_error(layout: &Layout, flat: usize, value: f32) -> ParamsError {
    match layout.locate(flat) {
        Some((s, i)) => ParamsError::NonFinite { name: s.name.clone(), index: i, value },
        None => ParamsError::NonFinite { name: "<unknown>".into(), index: flat, value },
    }
}

/// Parses the payload header from the start of `bytes`.
///
/// Returns `Ok(None)`-like truncation as [`ParamsError::Truncated`] so that a streaming caller can
/// wait for more bytes.
///
/// # Errors
/// Wrong magic or version, an undecodable header, limits exceeded, or a fingerprint that does not
/// match the names and shapes it came with.
pub fn decode_header(bytes: &[u8]) -> Result<(Layout, usize), ParamsError> {
    if bytes.len() < 9 {
        return Err(ParamsError::Truncated { expected: 9, actual: bytes.len() });
    }
    if &bytes[..4] != MAGIC {
        return Err(ParamsError::BadPayload("wrong magic bytes".into()));
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(ParamsError::BadPayload(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            bytes[4]
        )));
    }
    let hlen = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if hlen > MAX_HEADER_LEN {
        return Err(ParamsError::Limit(format!("header of {hlen} bytes (at most {MAX_HEADER_LEN})")));
    }
    let end = 9 + hlen;
    if bytes.len() < end {
        return Err(ParamsError::Truncated { expected: end, actual: bytes.len() });
    }
    let (header, used): (PayloadHeader, usize) = bincode::serde::decode_from_slice(&bytes[9..end], bincode_config())
        .map_err(|e| ParamsError::BadPayload(format!("header does not decode: {e}")))?;
    if used != hlen {
        return Err(ParamsError::BadPayload(format!("header declares {hlen} bytes but uses {used}")));
    }
    let layout = Layout::new(header.specs)?;
    if layout.fingerprint != header.fingerprint {
        return Err(ParamsError::FingerprintInconsistent { found: header.fingerprint, computed: layout.fingerprint });
    }
    Ok((layout, end))
}

/// Values decoded at a time by [`PayloadReader`].
const READ_BLOCK: usize = 8192;

/// Incremental payload reader: feed chunks as they arrive; values are handed to a callback with
/// their flat offset, so a caller can check or fold them without buffering the payload.
#[derive(Debug, Default)]
pub struct PayloadReader {
    header_buf: Vec<u8>,
    layout: Option<Layout>,
    /// Bytes of a value split across two chunks.
    carry: Vec<u8>,
    /// Values delivered so far.
    offset: usize,
    scratch: Vec<f32>,
}

impl PayloadReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The layout, once the header has been read.
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    /// Values delivered so far.
    pub fn values_read(&self) -> usize {
        self.offset
    }

    /// Feeds the next chunk; `on_values(offset, values)` receives every complete value in order.
    /// Non-finite values are refused here, so nothing downstream ever sees one.
    ///
    /// # Errors
    /// A bad header, a non-finite value, or more bytes than the header declared.
    pub fn push(&mut self, mut chunk: &[u8], mut on_values: impl FnMut(usize, &[f32])) -> Result<(), ParamsError> {
        if self.layout.is_none() {
            self.header_buf.extend_from_slice(chunk);
            match decode_header(&self.header_buf) {
                Ok((layout, start)) => {
                    let rest = self.header_buf.split_off(start);
                    self.header_buf = Vec::new();
                    self.layout = Some(layout);
                    return self.push(&rest, on_values);
                }
                Err(ParamsError::Truncated { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let Some(total) = self.layout.as_ref().map(Layout::numel) else { return Ok(()) };
        if !self.carry.is_empty() {
            let need = 4 - self.carry.len();
            let take = need.min(chunk.len());
            self.carry.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.carry.len() == 4 {
                let v = f32::from_le_bytes([self.carry[0], self.carry[1], self.carry[2], self.carry[3]]);
                self.carry.clear();
                self.deliver_one(v, &mut on_values)?;
            }
        }
        let whole = chunk.len() / 4 * 4;
        if whole > 0 {
            let n = whole / 4;
            if self.offset + n > total {
                return Err(ParamsError::TrailingBytes { extra: (self.offset + n - total) * 4 });
            }
            // Decoded in small blocks: the reader's memory stays constant whatever the chunk size.
            for block in chunk[..whole].chunks(4 * READ_BLOCK) {
                self.scratch.clear();
                self.scratch.extend(block.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                if let Some(i) = self.scratch.iter().position(|v| !v.is_finite())
                    && let Some(layout) = self.layout.as_ref()
                {
                    return Err(non_finite_error(layout, self.offset + i, self.scratch[i]));
                }
                on_values(self.offset, &self.scratch);
                self.offset += self.scratch.len();
            }
        }
        self.carry.extend_from_slice(&chunk[whole..]);
        if self.offset == total && !self.carry.is_empty() {
            return Err(ParamsError::TrailingBytes { extra: self.carry.len() });
        }
        Ok(())
    }

    fn deliver_one(&mut self, v: f32, on_values: &mut impl FnMut(usize, &[f32])) -> Result<(), ParamsError> {
        let Some(layout) = self.layout.as_ref() else { return Ok(()) };
        if self.offset >= layout.numel {
            return Err(ParamsError::TrailingBytes { extra: 4 });
        }
        if !v.is_finite() {
            return Err(non_finite_error(layout, self.offset, v));
        }
        on_values(self.offset, &[v]);
        self.offset += 1;
        Ok(())
    }

    /// Confirms that exactly the declared number of values arrived.
    ///
    /// # Errors
    /// [`ParamsError::Truncated`] when bytes are missing.
    pub fn finish(&self) -> Result<(), ParamsError> {
        match &self.layout {
            None => Err(ParamsError::Truncated { expected: 9, actual: self.header_buf.len() }),
            Some(l) if self.offset != l.numel || !self.carry.is_empty() => Err(ParamsError::Truncated {
                expected: l.payload_len(),
                actual: l.payload_len() - (l.numel - self.offset) * 4 + self.carry.len(),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// Reads a payload's values from a byte stream in caller-sized blocks, after checking its header:
/// for strategies that walk several updates side by side (coordinate-wise median, server
/// optimizers), so memory stays one block per update.
#[derive(Debug)]
pub struct ValueReader<R> {
    inner: R,
    layout: Layout,
    remaining: usize,
    buf: Vec<u8>,
}

impl<R: std::io::Read> ValueReader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// A short stream or anything [`decode_header`] refuses.
    pub fn new(mut inner: R) -> Result<Self, ParamsError> {
        let mut head = vec![0u8; 9];
        inner.read_exact(&mut head).map_err(read_error)?;
        let hlen = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
        if &head[..4] == MAGIC && hlen <= MAX_HEADER_LEN {
            head.resize(9 + hlen, 0);
            inner.read_exact(&mut head[9..]).map_err(read_error)?;
        }
        let (layout, _) = decode_header(&head)?;
        let remaining = layout.numel;
        Ok(Self { inner, layout, remaining, buf: Vec::new() })
    }

    /// The payload's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Values not read yet.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Fills `out` with the next `out.len()` values.
    ///
    /// # Errors
    /// Fewer values left than asked for, a short stream, or a value that is NaN or infinite.
    pub fn read(&mut self, out: &mut [f32]) -> Result<(), ParamsError> {
        if out.len() > self.remaining {
            return Err(ParamsError::BadPayload(format!(
                "{} values asked for, {} left in the payload",
                out.len(),
                self.remaining
            )));
        }
        let start = self.layout.numel - self.remaining;
        self.buf.resize(out.len() * 4, 0);
        self.inner.read_exact(&mut self.buf).map_err(read_error)?;
        for (v, c) in out.iter_mut().zip(self.buf.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(non_finite_error(&self.layout, start + i, out[i]));
        }
        self.remaining -= out.len();
        Ok(())
    }

    /// Confirms that every value was read and nothing follows.
    ///
    /// # Errors
    /// Values left unread, or bytes beyond the declared end.
    pub fn finish(mut self) -> Result<(), ParamsError> {
        if self.remaining != 0 {
            return Err(ParamsError::BadPayload(format!("{} values were left unread", self.remaining)));
        }
        let mut one = [0u8; 1];
        match self.inner.read(&mut one).map_err(read_error)? {
            0 => Ok(()),
            n => Err(ParamsError::TrailingBytes { extra: n }),
        }
    }
}

fn read_error(e: std::io::Error) -> ParamsError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ParamsError::BadPayload("payload ends early".into()),
        _ => ParamsError::BadPayload(format!("read failed: {e}")),
    }
}

/// SHA-256 of a byte string, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParameterSet {
        ParameterSet::from_tensors(vec![
            ("a.weight".into(), vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-8, -7.25]),
            ("a.bias".into(), vec![3], vec![0.1, 0.2, 0.3]),
            ("scalar".into(), vec![], vec![42.0]),
        ])
        .unwrap()
    }

    #[test]
    fn encode_decode_round_trip_is_bit_exact() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(bytes.len(), p.layout().payload_len());
        let q = ParameterSet::decode(&bytes).unwrap();
        assert_eq!(p, q);
        assert_eq!(
            p.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            q.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn fingerprint_depends_on_names_and_shapes_only() {
        let p = sample();
        let mut q = p.clone();
        q.values_mut()[0] = 99.0;
        assert_eq!(p.fingerprint(), q.fingerprint());
        let r = ParameterSet::from_tensors(vec![("a.weight".into(), vec![3, 2], vec![0.0; 6])]).unwrap();
        let s = ParameterSet::from_tensors(vec![("a.weight".into(), vec![2, 3], vec![0.0; 6])]).unwrap();
        assert_ne!(r.fingerprint(), s.fingerprint());
    }

    #[test]
    fn streaming_reader_matches_decode_for_every_chunk_size() {
        let p = sample();
        let bytes = p.encode();
        for chunk in [1, 2, 3, 5, 7, 64, bytes.len()] {
            let mut r = PayloadReader::new();
            let mut got = vec![f32::NAN; p.numel()];
            for c in bytes.chunks(chunk) {
                r.push(c, |off, vals| got[off..off + vals.len()].copy_from_slice(vals)).unwrap();
            }
            r.finish().unwrap();
            assert_eq!(got, p.values(), "chunk size {chunk}");
        }
        let mut written = Vec::new();
        p.write_to(&mut written).unwrap();
        assert_eq!(written, bytes);
        assert_eq!(ParameterSet::read_from(&mut written.as_slice()).unwrap(), p);
    }

    #[test]
    fn rejects_non_finite_with_tensor_and_index() {
        let mut p = sample();
        p.values_mut()[7] = f32::INFINITY;
        assert_eq!(
            p.check_finite(),
            Err(ParamsError::NonFinite { name: "a.bias".into(), index: 1, value: f32::INFINITY })
        );
        let mut r = PayloadReader::new();
        let err = r.push(&p.encode(), |_, _| {}).unwrap_err();
        assert!(matches!(err, ParamsError::NonFinite { ref name, index: 1, .. } if name == "a.bias"), "{err}");
    }

    #[test]
    fn rejects_truncated_trailing_and_corrupt_headers() {
        let bytes = sample().encode();
        assert!(matches!(ParameterSet::decode(&bytes[..bytes.len() - 1]), Err(ParamsError::Truncated { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(ParameterSet::decode(&long), Err(ParamsError::TrailingBytes { extra: 1 })));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(ParameterSet::decode(&bad), Err(ParamsError::BadPayload(_))));
        let mut huge = bytes.clone();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(ParameterSet::decode(&huge), Err(ParamsError::Limit(_))));
        let mut r = PayloadReader::new();
        r.push(&bytes[..bytes.len() - 2], |_, _| {}).unwrap();
        assert!(matches!(r.finish(), Err(ParamsError::Truncated { .. })));
        assert!(matches!(r.push(&[0, 0, 0, 0, 0, 0], |_, _| {}), Err(ParamsError::TrailingBytes { .. })));
    }

    #[test]
    fn value_reader_reads_blocks_and_refuses_short_long_and_non_finite_payloads() {
        let p = sample();
        let bytes = p.encode();
        let mut r = ValueReader::new(bytes.as_slice()).unwrap();
        assert_eq!(r.layout(), p.layout());
        let mut got = vec![0.0; p.numel()];
        let (a, b) = got.split_at_mut(4);
        r.read(a).unwrap();
        r.read(b).unwrap();
        assert_eq!(got, p.values());
        assert!(r.read(&mut [0.0]).is_err(), "nothing left");
        r.finish().unwrap();

        let mut long = bytes.clone();
        long.push(0);
        let mut r = ValueReader::new(long.as_slice()).unwrap();
        r.read(&mut vec![0.0; p.numel()]).unwrap();
        assert!(matches!(r.finish(), Err(ParamsError::TrailingBytes { extra: 1 })));

        let mut r = ValueReader::new(&bytes[..bytes.len() - 1]).unwrap();
        assert!(r.read(&mut vec![0.0; p.numel()]).is_err());
        let r = ValueReader::new(bytes.as_slice()).unwrap();
        assert!(r.finish().is_err(), "unread values");

        let mut q = sample();
        q.values_mut()[8] = f32::NAN;
        let enc = q.encode();
        let mut r = ValueReader::new(enc.as_slice()).unwrap();
        let e = r.read(&mut vec![0.0; q.numel()]).unwrap_err();
        assert!(matches!(e, ParamsError::NonFinite { ref name, index: 2, .. } if name == "a.bias"), "{e}");
        assert!(ValueReader::new(&bytes[..5]).is_err());
    }

    #[test]
    fn rejects_duplicate_names_and_shape_mismatch() {
        let dup = ParameterSet::from_tensors(vec![("x".into(), vec![1], vec![0.0]), ("x".into(), vec![1], vec![0.0])]);
        assert_eq!(dup, Err(ParamsError::DuplicateName("x".into())));
        let bad = ParameterSet::from_tensors(vec![("x".into(), vec![2], vec![0.0])]);
        assert!(matches!(bad, Err(ParamsError::ShapeMismatch { expected: 2, actual: 1, .. })));
    }

    #[test]
    fn delta_and_add_scaled() {
        let p = sample();
        let mut q = p.clone();
        q.values_mut().iter_mut().for_each(|v| *v += 1.0);
        let d = q.delta_from(&p).unwrap();
        let mut q2 = q.clone();
        q2.subtract_in_place(&p).unwrap();
        assert_eq!(q2, d);
        assert!(d.values().iter().all(|&v| (v - 1.0).abs() < 1e-6 || v == 0.0 || (v - 1.0).abs() < 1e-3));
        let mut r = p.clone();
        r.add_scaled(&d, 0.5).unwrap();
        assert!((r.values()[0] - 1.5).abs() < 1e-6);
    }
}
