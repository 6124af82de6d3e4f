//! Secure aggregation: pairwise additive masks (Bonawitz et al., CCS 2017, the variant without secret
//! sharing, so without dropout recovery). The server learns only the sum of the sites' weighted
//! updates.
//!
//! # Protocol, per train task (one attempt of one round)
//!
//! 1. Each site makes a fresh [`RoundKeys`] and sends [`RoundKeys::public_bytes`] to the server.
//! 2. The server relays every (site id, public key) pair back to every site; both sides build the same
//!    [`Roster`] (context = study, run, round, task). Its [`Roster::digest`] names the exact set of
//!    sites and keys.
//! 3. Each site trains, encodes `weight × delta` in fixed point ([`FixedPoint::encode`]), adds its
//!    masks block by block ([`Masker::mask_block`]) and uploads the masked words plus, in the clear,
//!    its sample count (the FedAvg weight, which plain FedAvg discloses too) and the roster digest.
//! 4. The server folds each upload into a [`SumAccumulator`]; only when every roster member's full
//!    vector is in does it decode the weighted mean ([`SumAccumulator::decode`]); the total weight is the
//!    sum of the sample counts sent in the clear.
//!
//! A site that drops after the roster was fixed leaves its pairwise masks in the sum: the sum cannot
//! be decoded ([`SecAggError::IncompleteSum`]), the round is aborted and restarted with the remaining
//! sites **and fresh keys** (a [`Masker`] consumes its [`RoundKeys`] so that keys cannot be reused: the
//! same pair masks over two attempts would let the server subtract them).
//!
//! # Masks
//!
//! For each pair of sites (a, b) with a < b (byte order of the site ids) both derive the same 32-byte
//! seed: X25519 of one's secret and the other's public key, then HKDF-SHA256 with the roster digest
//! (study, run, round, task, every member and key) and the two ids in the info ([`pair_seed`]). The
//! seed keys ChaCha20 (IETF, nonce 0); keystream bytes `8i..8i+8`, little endian, are mask word `i`.
//! Site a adds the word, site b subtracts it, modulo 2^64: in the sum every pair's mask cancels
//! exactly. The keystream is seekable, so any block of the model can be masked on its own: a 1e8-value
//! model is masked as it is streamed, in blocks, never held twice.
//!
//! # Why modulo 2^64
//!
//! The sum of the encoded values must stay within the half range (2^63) of the modulus, so that it
//! decodes as a signed integer: `max_sites × max_weight × clip × scale < 2^63`, checked when a
//! [`FixedPoint`] is made (a configuration that could overflow is refused, never wrapped silently).
//! With 2^64 the default scale leaves ~2^(63 − log2(sites × max_weight × clip)) steps, e.g. 2^44 steps
//! per unit of clip for 8 sites with 10^5 samples each: the fixed-point error of the mean
//! (≤ sites / (2 · scale · total weight)) is far below f32 resolution for any realistic study. With
//! 2^32 the same study would keep only ~2^12 steps, below f32's 24-bit mantissa. The price is that a
//! masked upload is 8 bytes per value, twice the f32 size.
//!
//! # What it does and does not protect
//!
//! The server and the network see only uniformly distributed words from each site; the server learns
//! the sum (and each site's sample count). With two sites, each site can compute the other's update
//! from the new global model: secure aggregation protects against the server and the network, and
//! differential privacy ([`crate::dp`]) is what protects one site from another.
//!
//! Size: the key pairs, the roster and its digest, the pairwise masks, the fixed-point encoding and
//! the server's sum are one protocol whose security rests on invariants between them (masks cancel
//! only over the digest's roster; the bounds keep the sum below 2^63). A reviewer reads them in one
//! place.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Instant;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Bits of the modulus: masked and encoded words are `u64`, arithmetic is modulo 2^64.
pub const MODULUS_BITS: u32 = 64;
/// The half range of the modulus (2^63): the decoded sum is a signed integer below it in magnitude.
const HALF_RANGE: f64 = 9_223_372_036_854_775_808.0;
/// Safety margin on the half range for f64 rounding of the bound itself.
const HALF_RANGE_USABLE: f64 = HALF_RANGE * (1.0 - 1e-9);
/// Most values one masked vector may hold (IETF ChaCha20 has 2^32 blocks of 64 bytes per key).
pub const MAX_VALUES: u64 = 1 << 34;
/// Longest site id accepted in a roster (bytes).
pub const MAX_SITE_ID_BYTES: usize = 128;
/// Longest study id, run id or task id accepted in a context (bytes).
pub const MAX_CONTEXT_FIELD_BYTES: usize = 256;
/// Largest weight (sample count) of one site: weights must be exact in f64.
pub const MAX_WEIGHT_LIMIT: u64 = 1 << 53;
/// Words of keystream produced at a time: the masker's scratch memory is 8 × this many bytes.
const SCRATCH_WORDS: usize = 4096;
/// Domain separation for the HKDF salt and the roster digest.
const DOMAIN: &[u8] = b"fedhcc/secagg/v1";

/// Everything that can go wrong in secure aggregation. Messages name the site, value index or
/// setting at fault and never contain update values.
#[derive(Debug, thiserror::Error)]
pub enum SecAggError {
    /// A fixed-point or roster setting is out of range.
    #[error("secure aggregation setting: {0}")]
    Config(String),
    /// The fixed-point settings allow a sum that does not fit the modulus.
    #[error(
        "secure aggregation fixed point could overflow: {sites} sites × max_weight {max_weight} × clip {clip} × scale \
         {scale} = {bound:.3e} is not below 2^63 = 9.223e18 (half the 2^64 modulus); use scale ≤ {max_scale:.3e} or a \
         smaller clip, max_weight or max_sites"
    )]
    Overflow {
        /// `max_sites`.
        sites: u32,
        /// `max_weight`.
        max_weight: u64,
        /// `clip`.
        clip: f64,
        /// `scale`.
        scale: f64,
        /// The largest possible |sum|.
        bound: f64,
        /// The largest scale that would fit.
        max_scale: f64,
    },
    /// A site's weight is larger than the configured `max_weight`.
    #[error(
        "site weight {weight} is larger than the secure aggregation max_weight {max_weight}; raise max_weight in the \
         study's secure aggregation settings"
    )]
    WeightTooLarge {
        /// The weight given.
        weight: u64,
        /// The configured bound.
        max_weight: u64,
    },
    /// A value of the update is NaN or infinite.
    #[error("value {index} of the update is not a finite number (NaN or infinite); the update cannot be encoded")]
    NotFinite {
        /// Index of the value in the update.
        index: u64,
    },
    /// Two lengths that must match do not.
    #[error("{what}: expected {expected} values, got {found}")]
    Length {
        /// Which length.
        what: &'static str,
        /// The length required.
        expected: u64,
        /// The length given.
        found: u64,
    },
    /// The roster is not usable.
    #[error("secure aggregation roster: {0}")]
    Roster(String),
    /// A peer's public key gives an all-zero shared secret (a low-order point).
    #[error(
        "site {peer}'s public key is a low-order point (the shared secret would be all zero); the key exchange is \
         refused and the round must restart with fresh keys"
    )]
    LowOrderKey {
        /// The peer whose key was refused.
        peer: String,
    },
    /// A public key that is not the canonical encoding of a curve point's u-coordinate.
    #[error(
        "the public key is not a canonical X25519 encoding (the top bit is set or the value is not below 2^255 - 19)"
    )]
    NonCanonicalKey,
    /// HKDF refused the requested output (cannot happen for 32 bytes; kept as an error, not a panic).
    #[error("secure aggregation key derivation failed")]
    Kdf,
    /// The ChaCha20 keystream ran out (only past [`MAX_VALUES`]).
    #[error("secure aggregation mask stream exhausted at value {offset}")]
    Keystream {
        /// The value index reached.
        offset: u64,
    },
    /// A site that is not in this round's roster.
    #[error("site {site} is not in this round's secure aggregation roster")]
    NotInRoster {
        /// The site.
        site: String,
    },
    /// A site masked against another roster than the server's.
    #[error(
        "site {site} masked its update for a different roster (another set of sites or keys); its masks cannot cancel \
         — restart the round with fresh keys"
    )]
    RosterMismatch {
        /// The site.
        site: String,
    },
    /// A site's upload was already started or folded in.
    #[error("site {site} has already contributed to this sum")]
    Duplicate {
        /// The site.
        site: String,
    },
    /// A block that does not continue the site's upload.
    #[error("site {site}: block at value {offset} arrives out of order (expected value {expected})")]
    OutOfOrder {
        /// The site.
        site: String,
        /// Where the block claims to start.
        offset: u64,
        /// Where the site's upload stands.
        expected: u64,
    },
    /// Not every roster member's full vector is in the sum.
    #[error(
        "the masked sum cannot be decoded: {} of the sites that exchanged keys have not contributed a complete update \
         ({}); their masks are still in the sum — abort this round and restart it with the remaining sites and fresh \
         keys",
        missing.len(),
        missing.join(", ")
    )]
    IncompleteSum {
        /// Roster members whose complete vector is not in the sum.
        missing: Vec<String>,
    },
    /// A decoded value lies outside what the sites could have sent: the masks did not cancel.
    #[error(
        "the decoded sum is out of range at value {index}: the masks did not cancel (a site's upload is missing, \
         altered or masked for another roster) — the round must be restarted; no model was produced"
    )]
    MasksDidNotCancel {
        /// First value found out of range.
        index: u64,
    },
    /// The total weight given to the decoder is impossible.
    #[error("total weight {total} is not between 1 and {max} ({sites} sites × max_weight)")]
    TotalWeight {
        /// The total weight given.
        total: u64,
        /// The largest possible total weight.
        max: u64,
        /// Sites in the roster.
        sites: usize,
    },
    /// The server could not allocate the sum.
    #[error("cannot allocate the secure aggregation sum for {values} values")]
    Allocation {
        /// Values requested.
        values: u64,
    },
}

/// One site's key pair for one train task (one attempt of one round). Generate a fresh one for every
/// task: a [`Masker`] consumes it. The secret is wiped from memory when dropped.
pub struct RoundKeys {
    secret: StaticSecret,
    public: PublicKey,
}

impl RoundKeys {
    /// A fresh key pair from a cryptographically secure generator (`rand::rng()` or
    /// `rand::rngs::OsRng` in production; a seeded `ChaCha20Rng` only in tests).
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        let secret = StaticSecret::from(*bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The public key, to send to the server (32 bytes).
    pub fn public_bytes(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl std::fmt::Debug for RoundKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundKeys").field("public", &hex::encode(self.public.as_bytes())).finish_non_exhaustive()
    }
}

/// What a roster is bound to: the masks of one task can never cancel with those of another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecAggContext {
    /// Study id.
    pub study_id: String,
    /// Run id.
    pub run_id: String,
    /// Round (1-based).
    pub round: u32,
    /// Task id (a restarted round has a new task id).
    pub task_id: String,
}

/// The sites that exchanged keys for one task, with their public keys, in site-id order. Server and
/// sites build it from the same relayed list; [`Roster::digest`] lets the server check that a site
/// masked for exactly this roster.
#[derive(Clone, Debug)]
pub struct Roster {
    context: SecAggContext,
    members: BTreeMap<String, [u8; 32]>,
    digest: [u8; 32],
}

fn length_prefixed(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

impl Roster {
    /// Builds a roster from (site id, public key) pairs.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Roster`] for fewer than two sites (one site's "sum" is its own update), an empty,
    /// over-long or repeated site id, a public key used by two sites, or over-long context fields.
    pub fn new(
        context: SecAggContext,
        members: impl IntoIterator<Item = (String, [u8; 32])>,
    ) -> Result<Self, SecAggError> {
        for (name, v) in [("study id", &context.study_id), ("run id", &context.run_id), ("task id", &context.task_id)] {
            if v.len() > MAX_CONTEXT_FIELD_BYTES {
                return Err(SecAggError::Roster(format!("{name} is longer than {MAX_CONTEXT_FIELD_BYTES} bytes")));
            }
        }
        let mut map = BTreeMap::new();
        for (site, key) in members {
            if site.is_empty() || site.len() > MAX_SITE_ID_BYTES {
                return Err(SecAggError::Roster(format!(
                    "site id {site:?} must be 1 to {MAX_SITE_ID_BYTES} bytes long"
                )));
            }
            if map.values().any(|k| *k == key) {
                return Err(SecAggError::Roster(format!("site {site} uses a public key another site already uses")));
            }
            if map.insert(site.clone(), key).is_some() {
                return Err(SecAggError::Roster(format!("site {site} appears twice")));
            }
        }
        if map.len() < 2 {
            return Err(SecAggError::Roster(format!(
                "secure aggregation needs at least two sites, the roster has {}",
                map.len()
            )));
        }
        let mut h = Sha256::new();
        length_prefixed(&mut h, DOMAIN);
        length_prefixed(&mut h, b"roster");
        length_prefixed(&mut h, context.study_id.as_bytes());
        length_prefixed(&mut h, context.run_id.as_bytes());
        h.update(context.round.to_be_bytes());
        length_prefixed(&mut h, context.task_id.as_bytes());
        h.update((map.len() as u64).to_be_bytes());
        for (site, key) in &map {
            length_prefixed(&mut h, site.as_bytes());
            h.update(key);
        }
        Ok(Self { context, members: map, digest: h.finalize().into() })
    }

    /// SHA-256 over the context and every (site, key) pair: equal digests mean equal rosters.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The context the roster is bound to.
    pub fn context(&self) -> &SecAggContext {
        &self.context
    }

    /// The site ids, in order.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false (a roster has at least two sites); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A site's public key.
    pub fn public_key(&self, site: &str) -> Option<&[u8; 32]> {
        self.members.get(site)
    }
}

/// Checks a public key a site advertises before anyone masks with it: its encoding is canonical
/// (the u-coordinate below 2^255 - 19, the unused top bit clear) and it is not a low-order point,
/// which would give every peer an all-zero shared secret (checked as the peers would meet it: an
/// X25519 exchange with a fixed secret is not contributory exactly for those points).
///
/// # Errors
/// [`SecAggError::NonCanonicalKey`], or [`SecAggError::LowOrderKey`] naming `site`.
pub fn check_public_key(site: &str, key: &[u8; 32]) -> Result<(), SecAggError> {
    // 2^255 - 19, little endian: ed ff … ff 7f.
    let at_least_p = key[31] == 0x7f && key[1..31].iter().all(|&b| b == 0xff) && key[0] >= 0xed;
    if key[31] & 0x80 != 0 || at_least_p {
        return Err(SecAggError::NonCanonicalKey);
    }
    let probe = StaticSecret::from([0x5a; 32]);
    if !probe.diffie_hellman(&PublicKey::from(*key)).was_contributory() {
        return Err(SecAggError::LowOrderKey { peer: site.to_string() });
    }
    Ok(())
}

/// The 32-byte seed that `my_id` and `peer_id` share for this roster: X25519, then HKDF-SHA256 with
/// salt `fedhcc/secagg/v1` and info = roster digest ‖ the two site ids in byte order (each length
/// prefixed). Both sites get the same seed.
///
/// # Errors
///
/// [`SecAggError::NotInRoster`] if either site is not in the roster, [`SecAggError::RosterMismatch`]
/// if the roster carries another key for `my_id` than `keys`, [`SecAggError::Roster`] if the two ids
/// are equal, [`SecAggError::LowOrderKey`] if the shared secret is not contributory (all zero).
pub fn pair_seed(
    keys: &RoundKeys,
    my_id: &str,
    peer_id: &str,
    roster: &Roster,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let mine = roster.public_key(my_id).ok_or_else(|| SecAggError::NotInRoster { site: my_id.to_string() })?;
    if *mine != keys.public_bytes() {
        return Err(SecAggError::RosterMismatch { site: my_id.to_string() });
    }
    if my_id == peer_id {
        return Err(SecAggError::Roster(format!("site {my_id} cannot pair with itself")));
    }
    let peer = roster.public_key(peer_id).ok_or_else(|| SecAggError::NotInRoster { site: peer_id.to_string() })?;
    let shared = keys.secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(SecAggError::LowOrderKey { peer: peer_id.to_string() });
    }
    let (lo, hi) = if my_id < peer_id { (my_id, peer_id) } else { (peer_id, my_id) };
    let mut info = Vec::with_capacity(32 + 16 + lo.len() + hi.len() + 16);
    info.extend_from_slice(b"pair-seed");
    info.extend_from_slice(&roster.digest);
    for id in [lo, hi] {
        info.extend_from_slice(&(id.len() as u64).to_be_bytes());
        info.extend_from_slice(id.as_bytes());
    }
    let hk = Hkdf::<Sha256>::new(Some(DOMAIN), shared.as_bytes());
    let mut seed = Zeroizing::new([0u8; 32]);
    hk.expand(&info, seed.as_mut()).map_err(|_| SecAggError::Kdf)?;
    Ok(seed)
}

/// One pairwise mask stream.
struct PeerMask {
    /// True: this site adds the peer's mask (peer id is larger); false: subtracts it.
    add: bool,
    cipher: ChaCha20,
}

/// A site's masking state for one task: one ChaCha20 keystream per peer. Masks any block of the
/// encoded vector independently ([`Masker::mask_block`]); uses 32 KiB of scratch memory whatever the
/// model size.
pub struct Masker {
    site: String,
    len: u64,
    digest: [u8; 32],
    peers: Vec<PeerMask>,
    scratch: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("site", &self.site)
            .field("len", &self.len)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// Derives a mask stream with every other roster member for a vector of `len` values. Consumes
    /// the keys: they are wiped here and can mask nothing else.
    ///
    /// # Errors
    ///
    /// [`SecAggError::NotInRoster`] / [`SecAggError::RosterMismatch`] if the roster does not carry this
    /// site with these keys (the server substituted a key), [`SecAggError::LowOrderKey`] for a
    /// degenerate peer key, [`SecAggError::Config`] for `len` 0 or above [`MAX_VALUES`].
    pub fn new(site_id: &str, keys: RoundKeys, roster: &Roster, len: u64) -> Result<Self, SecAggError> {
        if len == 0 || len > MAX_VALUES {
            return Err(SecAggError::Config(format!("a masked vector needs 1 to {MAX_VALUES} values, not {len}")));
        }
        let mut peers = Vec::with_capacity(roster.len().saturating_sub(1));
        for peer in roster.sites().filter(|p| *p != site_id) {
            let seed = pair_seed(&keys, site_id, peer, roster)?;
            let cipher = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
            peers.push(PeerMask { add: peer > site_id, cipher });
        }
        if peers.len() + 1 != roster.len() {
            return Err(SecAggError::NotInRoster { site: site_id.to_string() });
        }
        Ok(Self {
            site: site_id.to_string(),
            len,
            digest: roster.digest(),
            peers,
            scratch: Zeroizing::new(vec![0u8; SCRATCH_WORDS * 8]),
        })
    }

    /// The number of values of the vector being masked.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a masker has at least one value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of the roster the masks were made for; upload it with the vector.
    pub fn roster_digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Adds this site's masks to `block`, the encoded values `offset .. offset + block.len()`
    /// (wrapping, modulo 2^64). Blocks may come in any order; each must be masked exactly once.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Length`] if the block reaches past the vector's length.
    pub fn mask_block(&mut self, offset: u64, block: &mut [u64]) -> Result<(), SecAggError> {
        let end = offset.checked_add(block.len() as u64).filter(|e| *e <= self.len).ok_or(SecAggError::Length {
            what: "masked block reaches past the end of the vector",
            expected: self.len,
            found: offset.saturating_add(block.len() as u64),
        })?;
        debug_assert!(end <= self.len);
        let scratch = &mut self.scratch[..];
        for peer in &mut self.peers {
            let mut at = offset;
            for chunk in block.chunks_mut(SCRATCH_WORDS) {
                let bytes = &mut scratch[..chunk.len() * 8];
                peer.cipher.try_seek(at * 8).map_err(|_| SecAggError::Keystream { offset: at })?;
                peer.cipher.try_write_keystream(bytes).map_err(|_| SecAggError::Keystream { offset: at })?;
                let (words, _) = bytes.as_chunks::<8>();
                if peer.add {
                    for (v, w) in chunk.iter_mut().zip(words) {
                        *v = v.wrapping_add(u64::from_le_bytes(*w));
                    }
                } else {
                    for (v, w) in chunk.iter_mut().zip(words) {
                        *v = v.wrapping_sub(u64::from_le_bytes(*w));
                    }
                }
                at += chunk.len() as u64;
            }
        }
        Ok(())
    }
}

/// Masks a whole encoded vector in place (in 8 Ki-value blocks) and returns the roster digest to upload
/// with it. For models too large to hold twice, use [`Masker::mask_block`] on each block as it is
/// encoded and sent.
///
/// # Errors
///
/// As [`Masker::new`].
pub fn mask_update(
    site_id: &str,
    keys: RoundKeys,
    roster: &Roster,
    encoded: &mut [u64],
) -> Result<[u8; 32], SecAggError> {
    let mut masker = Masker::new(site_id, keys, roster, encoded.len() as u64)?;
    let mut offset = 0u64;
    for block in encoded.chunks_mut(8192) {
        masker.mask_block(offset, block)?;
        offset += block.len() as u64;
    }
    Ok(masker.roster_digest())
}

/// Fixed-point settings as written in the study configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedPointConfig {
    /// Largest |delta| per value before weighting; larger values are clamped to ±clip (and counted).
    pub clip: f64,
    /// Largest weight (sample count) of one site.
    pub max_weight: u64,
    /// Most sites in one sum.
    pub max_sites: u32,
    /// Integer steps per unit of `weight × delta`. Default: the largest power of two that cannot
    /// overflow ([`FixedPoint::largest_scale`]).
    #[serde(default)]
    pub scale: Option<f64>,
}

/// Statistics of one encoding (counts only, no values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Values whose |delta| exceeded `clip` and were clamped.
    pub clipped: u64,
}

/// Validated fixed-point encoding of `weight × delta` into signed integers modulo 2^64. Any sum of at
/// most `max_sites` encoded vectors with weights at most `max_weight` fits in the half range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedPoint {
    scale: f64,
    clip: f64,
    max_weight: u64,
    max_sites: u32,
}

impl FixedPoint {
    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Config`] for a non-positive or non-finite scale or clip, max_weight 0 or above
    /// 2^53, or fewer than 2 sites; [`SecAggError::Overflow`] when
    /// `max_sites × (max_weight × clip × scale + ½)` is not below 2^63.
    pub fn new(scale: f64, clip: f64, max_weight: u64, max_sites: u32) -> Result<Self, SecAggError> {
        Self::check_common(clip, max_weight, max_sites)?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(SecAggError::Config(format!("scale must be a positive number, not {scale}")));
        }
        let bound = f64::from(max_sites) * (max_weight as f64 * clip * scale + 0.5);
        if bound >= HALF_RANGE_USABLE {
            let max_scale = (HALF_RANGE_USABLE / f64::from(max_sites) - 0.5) / (max_weight as f64 * clip);
            return Err(SecAggError::Overflow { sites: max_sites, max_weight, clip, scale, bound, max_scale });
        }
        Ok(Self { scale, clip, max_weight, max_sites })
    }

    fn check_common(clip: f64, max_weight: u64, max_sites: u32) -> Result<(), SecAggError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(SecAggError::Config(format!("clip must be a positive number, not {clip}")));
        }
        if max_weight == 0 || max_weight > MAX_WEIGHT_LIMIT {
            return Err(SecAggError::Config(format!("max_weight must be 1 to 2^53, not {max_weight}")));
        }
        if max_sites < 2 {
            return Err(SecAggError::Config(format!("max_sites must be at least 2, not {max_sites}")));
        }
        Ok(())
    }

    /// The largest power-of-two scale that cannot overflow with these bounds.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Config`] as in [`FixedPoint::new`], or when not even scale 2^-60 fits.
    pub fn largest_scale(clip: f64, max_weight: u64, max_sites: u32) -> Result<f64, SecAggError> {
        Self::check_common(clip, max_weight, max_sites)?;
        let exact = (HALF_RANGE_USABLE / f64::from(max_sites) - 0.5) / (max_weight as f64 * clip);
        if !(exact.is_finite() && exact > 0.0) {
            return Err(SecAggError::Config("clip × max_weight × max_sites is too large for 2^63".into()));
        }
        let mut exp = exact.log2().floor() as i32;
        // f64 log2 may round up across an exact power of two.
        while exp > -60 && 2f64.powi(exp) > exact {
            exp -= 1;
        }
        if exp <= -60 {
            return Err(SecAggError::Config("clip × max_weight × max_sites is too large for 2^63".into()));
        }
        Ok(2f64.powi(exp))
    }

    /// From the study's settings; a missing scale becomes [`FixedPoint::largest_scale`].
    ///
    /// # Errors
    ///
    /// As [`FixedPoint::new`].
    pub fn from_config(cfg: &FixedPointConfig) -> Result<Self, SecAggError> {
        let scale = match cfg.scale {
            Some(s) => s,
            None => Self::largest_scale(cfg.clip, cfg.max_weight, cfg.max_sites)?,
        };
        Self::new(scale, cfg.clip, cfg.max_weight, cfg.max_sites)
    }

    /// Steps per unit of `weight × delta`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Largest |delta| encoded without clamping.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// Largest weight of one site.
    pub fn max_weight(&self) -> u64 {
        self.max_weight
    }

    /// Most sites in one sum.
    pub fn max_sites(&self) -> u32 {
        self.max_sites
    }

    /// Encodes `round(weight × clamp(delta, ±clip) × scale)` for each value into `out` (two's
    /// complement in a `u64`). Encode and mask block by block for large models; `delta` and `out`
    /// are one block.
    ///
    /// # Errors
    ///
    /// [`SecAggError::WeightTooLarge`] above `max_weight`, [`SecAggError::Length`] if the slices differ
    /// in length, [`SecAggError::NotFinite`] (index within the block) for NaN or ±∞.
    pub fn encode(&self, weight: u64, delta: &[f32], out: &mut [u64]) -> Result<EncodeStats, SecAggError> {
        if weight > self.max_weight {
            return Err(SecAggError::WeightTooLarge { weight, max_weight: self.max_weight });
        }
        if delta.len() != out.len() {
            return Err(SecAggError::Length {
                what: "encoded block",
                expected: delta.len() as u64,
                found: out.len() as u64,
            });
        }
        let factor = weight as f64 * self.scale;
        let mut stats = EncodeStats::default();
        for (i, (d, o)) in delta.iter().zip(out.iter_mut()).enumerate() {
            let d = f64::from(*d);
            if !d.is_finite() {
                return Err(SecAggError::NotFinite { index: i as u64 });
            }
            let c = if d.abs() > self.clip {
                stats.clipped += 1;
                self.clip.copysign(d)
            } else {
                d
            };
            // |c × factor| ≤ max_weight × clip × scale < 2^63 by construction: the cast cannot saturate.
            *o = ((c * factor).round() as i64) as u64;
        }
        Ok(stats)
    }

    /// Largest |decoded mean − exact weighted mean| from fixed-point rounding alone, for `sites`
    /// sites with total weight `total_weight`: `sites / (2 × scale × total_weight)`. The f32 result
    /// adds at most half an f32 ulp of the value.
    pub fn max_rounding_error(&self, sites: usize, total_weight: u64) -> f64 {
        sites as f64 * 0.5 / (self.scale * total_weight.max(1) as f64)
    }
}

/// Where one roster member's upload stands in a [`SumAccumulator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    NotStarted,
    Receiving { next: u64 },
    Complete,
}

/// The server's side: wrapping sum of the masked vectors of exactly the roster's sites, decoded only
/// when every one of them is complete. Memory: 8 bytes per value.
#[derive(Debug)]
pub struct SumAccumulator {
    fixed: FixedPoint,
    digest: [u8; 32],
    progress: BTreeMap<String, Progress>,
    sum: Vec<u64>,
}

impl SumAccumulator {
    /// An empty sum of `len` values for the roster's sites.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Config`] if the roster has more sites than `fixed.max_sites()` or `len` is 0 or
    /// above [`MAX_VALUES`]; [`SecAggError::Allocation`] if the memory is not available.
    pub fn new(roster: &Roster, fixed: FixedPoint, len: u64) -> Result<Self, SecAggError> {
        if roster.len() > fixed.max_sites as usize {
            return Err(SecAggError::Config(format!(
                "{} sites exchanged keys but the fixed point is sized for at most {} (max_sites)",
                roster.len(),
                fixed.max_sites
            )));
        }
        if len == 0 || len > MAX_VALUES {
            return Err(SecAggError::Config(format!("a masked vector needs 1 to {MAX_VALUES} values, not {len}")));
        }
        let n = usize::try_from(len).map_err(|_| SecAggError::Allocation { values: len })?;
        let mut sum = Vec::new();
        sum.try_reserve_exact(n).map_err(|_| SecAggError::Allocation { values: len })?;
        sum.resize(n, 0u64);
        let progress = roster.sites().map(|s| (s.to_string(), Progress::NotStarted)).collect();
        Ok(Self { fixed, digest: roster.digest(), progress, sum })
    }

    /// Number of values.
    pub fn len(&self) -> u64 {
        self.sum.len() as u64
    }

    /// Always false: a sum has at least one value.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Starts `site`'s upload, which declares the roster digest it masked for.
    ///
    /// # Errors
    ///
    /// [`SecAggError::NotInRoster`], [`SecAggError::RosterMismatch`] (digest differs),
    /// [`SecAggError::Duplicate`] (already started or complete). Nothing changes on error.
    pub fn begin_site(&mut self, site: &str, roster_digest: &[u8; 32]) -> Result<(), SecAggError> {
        let p = self.progress.get_mut(site).ok_or_else(|| SecAggError::NotInRoster { site: site.to_string() })?;
        if *roster_digest != self.digest {
            return Err(SecAggError::RosterMismatch { site: site.to_string() });
        }
        if *p != Progress::NotStarted {
            return Err(SecAggError::Duplicate { site: site.to_string() });
        }
        *p = Progress::Receiving { next: 0 };
        Ok(())
    }

    /// Adds the next block of `site`'s masked vector (values `offset .. offset + block.len()`, in
    /// order from 0). The site is complete when its last value is in.
    ///
    /// # Errors
    ///
    /// [`SecAggError::NotInRoster`], [`SecAggError::OutOfOrder`] (not started, or not the next
    /// block), [`SecAggError::Length`] past the end. Nothing changes on error.
    pub fn add_block(&mut self, site: &str, offset: u64, block: &[u64]) -> Result<(), SecAggError> {
        let len = self.sum.len() as u64;
        let p = self.progress.get_mut(site).ok_or_else(|| SecAggError::NotInRoster { site: site.to_string() })?;
        let next = match *p {
            Progress::Receiving { next } => next,
            Progress::NotStarted => {
                return Err(SecAggError::OutOfOrder { site: site.to_string(), offset, expected: 0 });
            }
            Progress::Complete => return Err(SecAggError::Duplicate { site: site.to_string() }),
        };
        if offset != next {
            return Err(SecAggError::OutOfOrder { site: site.to_string(), offset, expected: next });
        }
        let end = next.checked_add(block.len() as u64).filter(|e| *e <= len).ok_or(SecAggError::Length {
            what: "masked upload is longer than the model",
            expected: len,
            found: next.saturating_add(block.len() as u64),
        })?;
        // `end ≤ len`, which fits usize: the sum was allocated with it.
        let range = next as usize..end as usize;
        for (s, b) in self.sum[range].iter_mut().zip(block) {
            *s = s.wrapping_add(*b);
        }
        *p = if end == len { Progress::Complete } else { Progress::Receiving { next: end } };
        Ok(())
    }

    /// The sites whose complete masked vector is in the sum.
    pub fn sites_in_sum(&self) -> Vec<String> {
        self.progress.iter().filter(|(_, p)| **p == Progress::Complete).map(|(s, _)| s.clone()).collect()
    }

    /// Roster members whose complete vector is not (yet) in the sum, including partial uploads.
    pub fn missing_sites(&self) -> Vec<String> {
        self.progress.iter().filter(|(_, p)| **p != Progress::Complete).map(|(s, _)| s.clone()).collect()
    }

    /// True when every roster member's vector is complete: only then can the sum be decoded.
    pub fn is_complete(&self) -> bool {
        self.progress.values().all(|p| *p == Progress::Complete)
    }

    /// Decodes values `offset .. offset + out.len()` of the weighted mean: sum / scale / total weight.
    /// `total_weight` is the sum of the sites' sample counts (sent in the clear).
    ///
    /// # Errors
    ///
    /// [`SecAggError::IncompleteSum`] unless every roster member is complete,
    /// [`SecAggError::TotalWeight`] for 0 or more than sites × max_weight, [`SecAggError::Length`]
    /// past the end, [`SecAggError::MasksDidNotCancel`] if a value exceeds what the sites could have
    /// sent (`total_weight × clip × scale + sites`), which happens with overwhelming probability when
    /// a mask did not cancel.
    pub fn decode_block(&self, total_weight: u64, offset: u64, out: &mut [f32]) -> Result<(), SecAggError> {
        let missing = self.missing_sites();
        if !missing.is_empty() {
            return Err(SecAggError::IncompleteSum { missing });
        }
        let sites = self.progress.len();
        let max = self.fixed.max_weight.saturating_mul(sites as u64);
        if total_weight == 0 || total_weight > max {
            return Err(SecAggError::TotalWeight { total: total_weight, max, sites });
        }
        let len = self.sum.len() as u64;
        let end = offset.checked_add(out.len() as u64).filter(|e| *e <= len).ok_or(SecAggError::Length {
            what: "decoded block reaches past the end of the sum",
            expected: len,
            found: offset.saturating_add(out.len() as u64),
        })?;
        let w = total_weight as f64;
        let bound = w * self.fixed.clip * self.fixed.scale + sites as f64;
        let divisor = self.fixed.scale * w;
        for (i, (s, o)) in self.sum[offset as usize..end as usize].iter().zip(out.iter_mut()).enumerate() {
            let v = *s as i64 as f64;
            if v.abs() > bound {
                return Err(SecAggError::MasksDidNotCancel { index: offset + i as u64 });
            }
            *o = (v / divisor) as f32;
        }
        Ok(())
    }

    /// Decodes the whole weighted mean (see [`SumAccumulator::decode_block`]).
    ///
    /// # Errors
    ///
    /// As [`SumAccumulator::decode_block`].
    pub fn decode(&self, total_weight: u64) -> Result<Vec<f32>, SecAggError> {
        let mut out = vec![0f32; self.sum.len()];
        self.decode_block(total_weight, 0, &mut out)?;
        Ok(out)
    }
}

/// Appends words as little-endian bytes (the upload format of a masked vector).
pub fn words_to_le_bytes(words: &[u64], out: &mut Vec<u8>) {
    out.reserve(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Reads little-endian words from bytes (a chunk of a masked upload).
///
/// # Errors
///
/// [`SecAggError::Length`] if the byte count is not a multiple of 8.
pub fn words_from_le_bytes(bytes: &[u8], out: &mut Vec<u64>) -> Result<(), SecAggError> {
    let (words, rest) = bytes.as_chunks::<8>();
    if !rest.is_empty() {
        return Err(SecAggError::Length {
            what: "masked upload bytes (8 per value)",
            expected: (bytes.len() / 8 * 8) as u64,
            found: bytes.len() as u64,
        });
    }
    out.extend(words.iter().map(|w| u64::from_le_bytes(*w)));
    Ok(())
}

/// Timings of one simulated secure aggregation ([`bench_mask`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MaskTiming {
    /// Values per update.
    pub values: usize,
    /// Sites.
    pub sites: usize,
    /// Seconds for one site's key agreement with all peers (X25519 + HKDF), mean over sites.
    pub keys_s: f64,
    /// Seconds for one site's fixed-point encoding, mean over sites.
    pub encode_s: f64,
    /// Seconds for one site's masking (all peers), mean over sites.
    pub mask_s: f64,
    /// Seconds for the server to fold all sites' vectors.
    pub accumulate_s: f64,
    /// Seconds for the server to decode the mean.
    pub decode_s: f64,
    /// Values masked per second by one site (values / `mask_s`).
    pub mask_values_per_s: f64,
    /// Largest |decoded − exact weighted mean| over the values.
    pub max_abs_error: f64,
}

/// Runs a full secure aggregation of `sites` synthetic updates of `values` values in this process and
/// times each step (deterministic inputs; keys from a fixed seed — a benchmark, not for production).
///
/// # Errors
///
/// As the steps it runs; [`SecAggError::Config`] for fewer than 2 sites or 0 values.
pub fn bench_mask(values: usize, sites: usize) -> Result<MaskTiming, SecAggError> {
    use rand::{Rng, SeedableRng};
    if sites < 2 || values == 0 {
        return Err(SecAggError::Config("bench_mask needs at least 2 sites and 1 value".into()));
    }
    let n_sites = u32::try_from(sites).map_err(|_| SecAggError::Config("too many sites".into()))?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0x5ec);
    let fixed =
        FixedPoint::from_config(&FixedPointConfig { clip: 1.0, max_weight: 10_000, max_sites: n_sites, scale: None })?;
    let ctx = SecAggContext { study_id: "bench".into(), run_id: "r".into(), round: 1, task_id: "t".into() };
    let ids: Vec<String> = (0..sites).map(|i| format!("site_{i:03}")).collect();
    let keys: Vec<RoundKeys> = ids.iter().map(|_| RoundKeys::generate(&mut rng)).collect();
    let roster = Roster::new(ctx, ids.iter().cloned().zip(keys.iter().map(RoundKeys::public_bytes)))?;
    let mut acc = SumAccumulator::new(&roster, fixed, values as u64)?;
    let mut exact = vec![0f64; values];
    let (mut keys_s, mut encode_s, mut mask_s, mut accumulate_s) = (0.0, 0.0, 0.0, 0.0);
    let mut total_weight = 0u64;
    let mut delta = vec![0f32; values];
    let mut words = vec![0u64; values];
    for (id, k) in ids.iter().zip(keys) {
        let weight = rng.random_range(50..500u64);
        total_weight += weight;
        for (d, e) in delta.iter_mut().zip(exact.iter_mut()) {
            *d = rng.random_range(-0.05f32..0.05);
            *e += weight as f64 * f64::from(*d);
        }
        let t = Instant::now();
        let mut masker = Masker::new(id, k, &roster, values as u64)?;
        keys_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        fixed.encode(weight, &delta, &mut words)?;
        encode_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut offset = 0u64;
        for block in words.chunks_mut(8192) {
            masker.mask_block(offset, block)?;
            offset += block.len() as u64;
        }
        mask_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        acc.begin_site(id, &masker.roster_digest())?;
        acc.add_block(id, 0, &words)?;
        accumulate_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let mean = acc.decode(total_weight)?;
    let decode_s = t.elapsed().as_secs_f64();
    let max_abs_error =
        mean.iter().zip(&exact).map(|(m, e)| (f64::from(*m) - e / total_weight as f64).abs()).fold(0.0, f64::max);
    let per = sites as f64;
    Ok(MaskTiming {
        values,
        sites,
        keys_s: keys_s / per,
        encode_s: encode_s / per,
        mask_s: mask_s / per,
        accumulate_s,
        decode_s,
        mask_values_per_s: values as f64 / (mask_s / per),
        max_abs_error,
    })
}
