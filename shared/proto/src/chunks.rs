//! The one receiver of a chunked transfer, for every direction: a site's update arriving at the
//! server, the global model arriving at a site, the final model arriving at `fedhcc admin export`.
//! Sans IO: the caller feeds it each chunk as it comes (and writes or decodes the bytes itself);
//! the receiver checks what every transfer's header promises — chunks of 1 to
//! [`MAX_CHUNK_BYTES`](crate::MAX_CHUNK_BYTES) bytes, at most the declared count, exactly the
//! declared bytes — and the SHA-256 of what arrived.

use sha2::{Digest, Sha256};

/// Why a transfer is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk of 0 or more than `MAX_CHUNK_BYTES` bytes.
    #[error("chunk {index} is {len} bytes (1 to {} allowed)", crate::MAX_CHUNK_BYTES)]
    ChunkSize { index: u64, len: usize },
    /// More chunks than the header declared.
    #[error("more chunks than the {declared} declared")]
    TooManyChunks { declared: u64 },
    /// More bytes than the header declared.
    #[error("more bytes than the {declared} declared")]
    TooLong { declared: u64 },
    /// The transfer ended early (or with fewer chunks than declared).
    #[error("the transfer ended after {received} of {declared} bytes ({chunks} chunks)")]
    Short { received: u64, declared: u64, chunks: u64 },
    /// What arrived does not hash to what the header declared.
    #[error("SHA-256 of what arrived is {got}, the header declared {declared}")]
    Digest { got: String, declared: String },
}

impl ChunkError {
    /// The bytes arrived whole but differ from what was declared (altered or damaged on the way),
    /// as opposed to a transfer of the wrong shape.
    pub fn is_digest(&self) -> bool {
        matches!(self, ChunkError::Digest { .. })
    }
}

/// A transfer being received.
#[derive(Debug)]
pub struct ChunkReceiver {
    declared_bytes: u64,
    declared_chunks: Option<u64>,
    bytes: u64,
    chunks: u64,
    hasher: Sha256,
}

impl ChunkReceiver {
    /// A transfer of `declared_bytes` bytes; with `declared_chunks`, in exactly that many chunks.
    pub fn new(declared_bytes: u64, declared_chunks: Option<u64>) -> Self {
        ChunkReceiver { declared_bytes, declared_chunks, bytes: 0, chunks: 0, hasher: Sha256::new() }
    }

    /// Takes the next chunk: checked, counted and hashed. The caller uses the bytes only after this
    /// returns `Ok`.
    ///
    /// # Errors
    /// A chunk of a size not allowed, one chunk too many, or more bytes than declared.
    pub fn accept(&mut self, chunk: &[u8]) -> Result<(), ChunkError> {
        self.chunks += 1;
        if let Some(declared) = self.declared_chunks
            && self.chunks > declared
        {
            return Err(ChunkError::TooManyChunks { declared });
        }
        if chunk.is_empty() || chunk.len() > crate::MAX_CHUNK_BYTES {
            return Err(ChunkError::ChunkSize { index: self.chunks, len: chunk.len() });
        }
        self.bytes += chunk.len() as u64;
        if self.bytes > self.declared_bytes {
            return Err(ChunkError::TooLong { declared: self.declared_bytes });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The transfer has ended: every declared byte (and chunk) must have arrived and hash to
    /// `declared_sha256` (hexadecimal, either case). Returns the SHA-256 of what arrived.
    ///
    /// # Errors
    /// A short transfer, or another SHA-256.
    pub fn finish(self, declared_sha256: &str) -> Result<[u8; 32], ChunkError> {
        let short = self.bytes != self.declared_bytes || self.declared_chunks.is_some_and(|c| c != self.chunks);
        if short {
            return Err(ChunkError::Short { received: self.bytes, declared: self.declared_bytes, chunks: self.chunks });
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        let got = hex::encode(digest);
        if !got.eq_ignore_ascii_case(declared_sha256) {
            return Err(ChunkError::Digest { got, declared: declared_sha256.to_string() });
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_CHUNK_BYTES;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_whole_transfer_is_accepted_with_its_digest() {
        let data: Vec<u8> = (0..(MAX_CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let mut r = ChunkReceiver::new(data.len() as u64, Some(2));
        for c in data.chunks(MAX_CHUNK_BYTES) {
            r.accept(c).unwrap();
        }
        assert_eq!(r.bytes(), data.len() as u64);
        let digest = r.finish(&sha(&data).to_uppercase()).unwrap();
        assert_eq!(hex::encode(digest), sha(&data));
    }

    #[test]
    fn every_broken_promise_is_refused_and_named() {
        let mut r = ChunkReceiver::new(10, Some(2));
        assert_eq!(r.accept(&[]), Err(ChunkError::ChunkSize { index: 1, len: 0 }));
        let mut r = ChunkReceiver::new(u64::MAX, None);
        let big = vec![0u8; MAX_CHUNK_BYTES + 1];
        assert_eq!(r.accept(&big), Err(ChunkError::ChunkSize { index: 1, len: MAX_CHUNK_BYTES + 1 }));
        let mut r = ChunkReceiver::new(10, Some(1));
        r.accept(&[1; 4]).unwrap();
        assert_eq!(r.accept(&[1; 4]), Err(ChunkError::TooManyChunks { declared: 1 }));
        let mut r = ChunkReceiver::new(6, None);
        r.accept(&[1; 4]).unwrap();
        assert_eq!(r.accept(&[1; 4]), Err(ChunkError::TooLong { declared: 6 }));
        let mut r = ChunkReceiver::new(8, Some(2));
        r.accept(&[1; 8]).unwrap();
        assert_eq!(r.finish(&sha(&[1; 8])), Err(ChunkError::Short { received: 8, declared: 8, chunks: 1 }));
        let mut r = ChunkReceiver::new(8, None);
        r.accept(&[1; 4]).unwrap();
        assert_eq!(r.finish(&sha(&[1; 4])), Err(ChunkError::Short { received: 4, declared: 8, chunks: 1 }));
        let mut r = ChunkReceiver::new(4, None);
        r.accept(&[2; 4]).unwrap();
        let e = r.finish(&sha(&[1; 4])).unwrap_err();
        assert!(e.is_digest() && e.to_string().contains(&sha(&[2; 4])), "{e}");
    }
}
