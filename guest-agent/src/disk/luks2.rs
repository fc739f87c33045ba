//! LUKS2 headers, read and written in pure Rust: enough of the on-disk format
//! (as `cryptsetup` 2.x writes it) to format a disk with one keyslot and to
//! unlock a disk formatted by us or by `cryptsetup luksFormat`.
//!
//! On disk: two copies of the header (binary header + JSON metadata, each
//! `hdr_size` bytes, SHA-256 checksummed), the keyslots area, then the data
//! segment. A keyslot holds the volume key split by the anti-forensic
//! splitter (4000 stripes), encrypted with `aes-xts-plain64` under a key
//! derived from the passphrase (PBKDF2 or Argon2); a PBKDF2 digest of the
//! volume key tells a right passphrase from a wrong one.
//!
//! The header comes from the host and is untrusted: every size, offset and
//! cost is bounded before it is used (an Argon2 memory cost above
//! [`Limits::max_argon2_kib`] is refused rather than allocated).
//!
//! Not handled (refused with [`Luks2Error::Unsupported`]): authenticated
//! segments (dm-integrity), reencryption in progress, keyslots that are not
//! `luks2`/`luks1-AF`, ciphers other than `aes-xts-plain64`, header checksums
//! other than SHA-256.

use crate::status::{Classify, Kind};
use std::{collections::BTreeMap, fs::File, os::unix::fs::FileExt};

use aes::{
    cipher::{BlockCipher, BlockDecrypt, BlockEncrypt, KeyInit},
    Aes128, Aes256,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256, Sha512};
use xts_mode::{get_tweak_default, Xts128};
use zeroize::{Zeroize, Zeroizing};

/// Size of one header copy when we format (binary header + JSON area).
pub const HDR_SIZE: u64 = 16 * 1024;
/// Where the data segment starts when we format (cryptsetup's default).
pub const DATA_OFFSET: u64 = 16 * 1024 * 1024;
/// Volume key size: AES-256-XTS.
pub const VOLUME_KEY_LEN: usize = 64;
/// Anti-forensic stripes.
const STRIPES: usize = 4000;
/// Keyslot area offset and size when we format (cryptsetup's layout).
const AREA_OFFSET: u64 = 2 * HDR_SIZE;
const AREA_SIZE: u64 = 258_048;
/// PBKDF2 iterations for our keyslot and digest. The passphrase is a
/// 256-bit random secret from the broker (or an ephemeral one), so key
/// stretching adds nothing; 1000 is the smallest count cryptsetup accepts.
pub const PBKDF2_ITERATIONS: u32 = 1000;
/// Header sizes cryptsetup may use (secondary header offsets to probe).
pub const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// The keyslot and segment cipher.
pub const CIPHER: &str = "aes-xts-plain64";

/// Errors of LUKS2 handling.
#[derive(Debug, thiserror::Error)]
pub enum Luks2Error {
    /// Neither header copy carries the LUKS2 magic.
    #[error("no LUKS2 header")]
    NotLuks,
    /// A header is there but neither copy is intact.
    #[error("LUKS2 header is corrupt: {0}")]
    Corrupt(String),
    /// The header uses something this implementation does not do.
    #[error("LUKS2 feature not supported: {0}")]
    Unsupported(String),
    /// A cost or size beyond the configured limits.
    #[error("LUKS2 header exceeds a limit: {0}")]
    Limit(String),
    /// No keyslot opens with the given key.
    #[error("no LUKS2 keyslot opens with this key")]
    WrongKey,
    /// The device is too small to format.
    #[error("device of {0} bytes is too small for LUKS2 (at least 17 MiB)")]
    TooSmall(u64),
    /// Reading or writing the device failed.
    #[error("cannot {0} the LUKS2 header")]
    Io(&'static str, #[source] std::io::Error),
}

impl Classify for Luks2Error {
    fn kind(&self) -> Kind {
        match self {
            Luks2Error::WrongKey => Kind::PermissionDenied,
            Luks2Error::Corrupt(_) => Kind::DataLoss,
            Luks2Error::Unsupported(_) | Luks2Error::Limit(_) | Luks2Error::TooSmall(_) => {
                Kind::InvalidArgument
            }
            Luks2Error::NotLuks | Luks2Error::Io(..) => Kind::Internal,
        }
    }
}

/// Bounds on what a header may make us do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest Argon2 memory cost, KiB.
    pub max_argon2_kib: u32,
    /// Largest PBKDF2 iteration count or Argon2 time cost.
    pub max_iterations: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_argon2_kib: 64 * 1024,
            max_iterations: 10_000_000,
        }
    }
}

/// The data segment of a LUKS2 device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the encrypted data, bytes.
    pub offset: u64,
    /// Size of the encrypted data, bytes; `None` = to the end of the device.
    pub size: Option<u64>,
    /// Added to the sector number of the IV.
    pub iv_tweak: u64,
    /// Cipher, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Encryption sector size.
    pub sector_size: u32,
}

/// A volume key with the segment it opens.
pub struct Unlocked {
    /// The volume key (wiped when dropped).
    pub volume_key: Zeroizing<Vec<u8>>,
    /// The data segment.
    pub segment: Segment,
}

impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unlocked")
            .field("volume_key", &"<redacted>")
            .field("segment", &self.segment)
            .finish()
    }
}

// ---- JSON metadata (the subset we read) ----

#[derive(Deserialize)]
struct Metadata {
    keyslots: BTreeMap<String, Keyslot>,
    segments: BTreeMap<String, JSegment>,
    digests: BTreeMap<String, JDigest>,
    config: JConfig,
}

#[derive(Deserialize)]
struct Keyslot {
    #[serde(rename = "type")]
    typ: String,
    key_size: u32,
    af: Af,
    area: Area,
    kdf: Kdf,
}

#[derive(Deserialize)]
struct Af {
    #[serde(rename = "type")]
    typ: String,
    stripes: u32,
    hash: String,
}

#[derive(Deserialize)]
struct Area {
    #[serde(rename = "type")]
    typ: String,
    offset: String,
    size: String,
    encryption: String,
    key_size: u32,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Kdf {
    #[serde(rename = "pbkdf2")]
    Pbkdf2 {
        hash: String,
        iterations: u32,
        salt: String,
    },
    #[serde(rename = "argon2i")]
    Argon2i {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: String,
    },
    #[serde(rename = "argon2id")]
    Argon2id {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: String,
    },
}

#[derive(Deserialize)]
struct JSegment {
    #[serde(rename = "type")]
    typ: String,
    offset: String,
    size: String,
    iv_tweak: String,
    encryption: String,
    sector_size: u32,
    #[serde(default)]
    integrity: Option<serde_json::Value>,
    #[serde(default)]
    flags: Vec<String>,
}

#[derive(Deserialize)]
struct JDigest {
    #[serde(rename = "type")]
    typ: String,
    keyslots: Vec<String>,
    segments: Vec<String>,
    hash: String,
    iterations: u32,
    salt: String,
    digest: String,
}

#[derive(Deserialize)]
struct JConfig {
    json_size: String,
    keyslots_size: String,
    #[serde(default)]
    requirements: Option<serde_json::Value>,
}

fn num(what: &str, s: &str) -> Result<u64, Luks2Error> {
    s.parse()
        .map_err(|_| Luks2Error::Corrupt(format!("{what} '{s}' is not a number")))
}

fn b64(what: &str, s: &str, max: usize) -> Result<Vec<u8>, Luks2Error> {
    let v = B64
        .decode(s)
        .map_err(|_| Luks2Error::Corrupt(format!("{what} is not base64")))?;
    if v.is_empty() || v.len() > max {
        return Err(Luks2Error::Corrupt(format!("{what} has {} bytes", v.len())));
    }
    Ok(v)
}

// ---- the device ----

/// Positional reads from a device: the agent reads a [`File`]; tests and the
/// fuzz targets read bytes in memory (`[u8]`, where a read past the end fails
/// with [`std::io::ErrorKind::UnexpectedEof`] as a file's does).
pub trait ReadAt {
    /// Fills `buf` from `offset`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

// ---- the binary header ----

/// One intact header copy.
struct Header {
    seqid: u64,
    hdr_size: u64,
    json: Metadata,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Reads and checks the header copy at `offset`. `Ok(None)`: no magic there.
fn read_copy<D: ReadAt + ?Sized>(
    dev: &D,
    offset: u64,
    secondary: bool,
) -> Result<Option<Header>, Luks2Error> {
    let mut bin = [0u8; 4096];
    match dev.read_exact_at(&mut bin, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Luks2Error::Io("read", e)),
    }
    let magic = if secondary {
        MAGIC_SECONDARY
    } else {
        MAGIC_PRIMARY
    };
    if &bin[0..6] != magic {
        return Ok(None);
    }
    let version = u16::from_be_bytes([bin[6], bin[7]]);
    if version != 2 {
        return Err(Luks2Error::Unsupported(format!("LUKS version {version}")));
    }
    let hdr_size = be64(&bin, 8);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(Luks2Error::Corrupt(format!("header size {hdr_size}")));
    }
    if be64(&bin, 256) != offset {
        return Err(Luks2Error::Corrupt(format!(
            "header at {offset} says it is at {}",
            be64(&bin, 256)
        )));
    }
    let alg_end = bin[72..104].iter().position(|&c| c == 0).unwrap_or(32);
    if &bin[72..72 + alg_end] != b"sha256" {
        return Err(Luks2Error::Unsupported(format!(
            "header checksum '{}'",
            String::from_utf8_lossy(&bin[72..72 + alg_end])
        )));
    }
    let mut all = vec![0u8; hdr_size as usize];
    dev.read_exact_at(&mut all, offset)
        .map_err(|e| Luks2Error::Io("read", e))?;
    let stored: [u8; 32] = all[448..480]
        .try_into()
        .map_err(|_| Luks2Error::Corrupt("checksum field".into()))?;
    all[448..512].fill(0);
    if Sha256::digest(&all)[..] != stored[..] {
        return Err(Luks2Error::Corrupt(format!(
            "checksum of the copy at {offset}"
        )));
    }
    let area = &all[4096..];
    let end = area.iter().position(|&c| c == 0).unwrap_or(area.len());
    let json: Metadata = serde_json::from_slice(&area[..end])
        .map_err(|e| Luks2Error::Corrupt(format!("JSON metadata: {e}")))?;
    if num("json_size", &json.config.json_size)? != hdr_size - 4096 {
        return Err(Luks2Error::Corrupt(
            "json_size does not match hdr_size".into(),
        ));
    }
    Ok(Some(Header {
        seqid: be64(&bin, 16),
        hdr_size,
        json,
    }))
}

/// Reads the newest intact header copy.
fn read_header<D: ReadAt + ?Sized>(dev: &D) -> Result<Header, Luks2Error> {
    let mut errors = Vec::new();
    let mut seen_magic = false;
    let mut best: Option<Header> = None;
    let mut consider = |r: Result<Option<Header>, Luks2Error>| match r {
        Ok(Some(h)) => {
            seen_magic = true;
            if best.as_ref().is_none_or(|b| h.seqid > b.seqid) {
                best = Some(h);
            }
        }
        Ok(None) => {}
        Err(Luks2Error::Io(w, e)) => errors.push(format!("{w}: {e}")),
        Err(e) => {
            seen_magic = true;
            errors.push(e.to_string());
        }
    };
    consider(read_copy(dev, 0, false));
    for off in HDR_SIZES {
        consider(read_copy(dev, off, true));
    }
    match best {
        Some(h) => Ok(h),
        None if seen_magic => Err(Luks2Error::Corrupt(errors.join("; "))),
        None if errors.is_empty() => Err(Luks2Error::NotLuks),
        None => Err(Luks2Error::Corrupt(errors.join("; "))),
    }
}

/// Whether `dev` carries a LUKS2 header (magic in either copy).
pub fn is_luks<D: ReadAt + ?Sized>(dev: &D) -> Result<bool, Luks2Error> {
    match read_header(dev) {
        Ok(_) => Ok(true),
        Err(Luks2Error::NotLuks) => Ok(false),
        Err(Luks2Error::Io(w, e)) => Err(Luks2Error::Io(w, e)),
        Err(_) => Ok(true),
    }
}

// ---- crypto pieces ----

enum Hash {
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(s: &str) -> Result<Self, Luks2Error> {
        match s {
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(Luks2Error::Unsupported(format!("hash '{other}'"))),
        }
    }

    fn len(&self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    fn digest_parts(&self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Hash::Sha256 => {
                let mut h = Sha256::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
            Hash::Sha512 => {
                let mut h = Sha512::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
        }
    }

    fn pbkdf2(&self, pass: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(pass, salt, iterations, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(pass, salt, iterations, out),
        }
    }
}

/// The anti-forensic diffuser: each digest-sized block replaced by
/// H(be32(index) || block), the last block truncated.
fn diffuse(hash: &Hash, buf: &mut [u8]) {
    let ds = hash.len();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let d = hash.digest_parts(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// Splits `key` into `stripes` stripes (LUKS AF).
fn af_split(key: &[u8], stripes: usize, hash: &Hash) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    OsRng.fill_bytes(&mut out[..n * (stripes - 1)]);
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in out[..n * (stripes - 1)].chunks(n) {
        d.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut d);
    }
    out[n * (stripes - 1)..]
        .iter_mut()
        .zip(d.iter().zip(key))
        .for_each(|(o, (a, b))| *o = a ^ b);
    out
}

/// Merges AF stripes back into the key.
fn af_merge(material: &[u8], key_len: usize, stripes: usize, hash: &Hash) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for s in material[..key_len * (stripes - 1)].chunks(key_len) {
        d.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut d);
    }
    let last = &material[key_len * (stripes - 1)..key_len * stripes];
    d.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    d
}

fn xts<C>(key: &[u8]) -> Result<Xts128<C>, Luks2Error>
where
    C: BlockCipher + BlockEncrypt + BlockDecrypt + KeyInit + Clone,
{
    let half = key.len() / 2;
    let bad = |_| Luks2Error::Unsupported(format!("{}-byte XTS key", key.len()));
    Ok(Xts128::new(
        C::new_from_slice(&key[..half]).map_err(bad)?,
        C::new_from_slice(&key[half..]).map_err(bad)?,
    ))
}

/// aes-xts-plain64 over 512-byte sectors numbered from 0 (keyslot areas).
fn keyslot_crypt(key: &[u8], buf: &mut [u8], encrypt: bool) -> Result<(), Luks2Error> {
    match (key.len(), encrypt) {
        (32, true) => xts::<Aes128>(key)?.encrypt_area(buf, 512, 0, get_tweak_default),
        (32, false) => xts::<Aes128>(key)?.decrypt_area(buf, 512, 0, get_tweak_default),
        (64, true) => xts::<Aes256>(key)?.encrypt_area(buf, 512, 0, get_tweak_default),
        (64, false) => xts::<Aes256>(key)?.decrypt_area(buf, 512, 0, get_tweak_default),
        (n, _) => {
            return Err(Luks2Error::Unsupported(format!(
                "keyslot key of {n} bytes for {CIPHER}"
            )))
        }
    }
    Ok(())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---- unlocking ----

/// Opens a LUKS2 device with `passphrase`: returns the volume key and the
/// data segment.
pub fn unlock<D: ReadAt + ?Sized>(
    dev: &D,
    passphrase: &[u8],
    limits: &Limits,
) -> Result<Unlocked, Luks2Error> {
    let h = read_header(dev)?;
    let m = &h.json;
    if let Some(req) = &m.config.requirements {
        let mandatory = req.get("mandatory").and_then(|v| v.as_array());
        if mandatory.is_some_and(|v| !v.is_empty()) {
            return Err(Luks2Error::Unsupported(format!("requirements {req}")));
        }
    }
    let keyslots_size = num("keyslots_size", &m.config.keyslots_size)?;
    let keyslots_end = (2 * h.hdr_size)
        .checked_add(keyslots_size)
        .ok_or_else(|| Luks2Error::Corrupt(format!("keyslots_size {keyslots_size}")))?;
    let (seg_id, seg) = m
        .segments
        .iter()
        .next()
        .ok_or_else(|| Luks2Error::Corrupt("no segment".into()))?;
    if m.segments.len() != 1 {
        return Err(Luks2Error::Unsupported(format!(
            "{} segments (reencryption?)",
            m.segments.len()
        )));
    }
    let segment = check_segment(seg, keyslots_end)?;
    let mut last_err = Luks2Error::WrongKey;
    for d in m.digests.values() {
        if !d.segments.contains(seg_id) {
            continue;
        }
        for ks_id in &d.keyslots {
            let Some(ks) = m.keyslots.get(ks_id) else {
                continue;
            };
            match open_keyslot(dev, ks, passphrase, h.hdr_size, keyslots_end, limits) {
                Ok(vk) => {
                    if check_digest(d, &vk, limits)? {
                        return Ok(Unlocked {
                            volume_key: vk,
                            segment,
                        });
                    }
                }
                Err(e @ (Luks2Error::Io(..) | Luks2Error::Limit(_))) => return Err(e),
                Err(e) => last_err = e,
            }
        }
    }
    Err(last_err)
}

fn check_segment(s: &JSegment, keyslots_end: u64) -> Result<Segment, Luks2Error> {
    if s.typ != "crypt" {
        return Err(Luks2Error::Unsupported(format!("segment type '{}'", s.typ)));
    }
    if s.integrity.is_some() {
        return Err(Luks2Error::Unsupported(
            "authenticated (integrity) segment".into(),
        ));
    }
    if !s.flags.is_empty() {
        return Err(Luks2Error::Unsupported(format!(
            "segment flags {:?}",
            s.flags
        )));
    }
    if s.encryption != CIPHER {
        return Err(Luks2Error::Unsupported(format!(
            "cipher '{}'",
            s.encryption
        )));
    }
    if !matches!(s.sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(Luks2Error::Corrupt(format!(
            "sector size {}",
            s.sector_size
        )));
    }
    let offset = num("segment offset", &s.offset)?;
    if offset < keyslots_end || offset % u64::from(s.sector_size) != 0 {
        return Err(Luks2Error::Corrupt(format!("segment offset {offset}")));
    }
    let size = match s.size.as_str() {
        "dynamic" => None,
        n => {
            let n = num("segment size", n)?;
            if n % u64::from(s.sector_size) != 0 {
                return Err(Luks2Error::Corrupt(format!("segment size {n}")));
            }
            Some(n)
        }
    };
    Ok(Segment {
        offset,
        size,
        iv_tweak: num("iv_tweak", &s.iv_tweak)?,
        cipher: s.encryption.clone(),
        sector_size: s.sector_size,
    })
}

fn open_keyslot<D: ReadAt + ?Sized>(
    dev: &D,
    ks: &Keyslot,
    passphrase: &[u8],
    hdr_size: u64,
    keyslots_end: u64,
    limits: &Limits,
) -> Result<Zeroizing<Vec<u8>>, Luks2Error> {
    if ks.typ != "luks2" || ks.af.typ != "luks1" || ks.area.typ != "raw" {
        return Err(Luks2Error::Unsupported(format!(
            "keyslot type '{}'/'{}'/'{}'",
            ks.typ, ks.af.typ, ks.area.typ
        )));
    }
    if ks.area.encryption != CIPHER {
        return Err(Luks2Error::Unsupported(format!(
            "keyslot cipher '{}'",
            ks.area.encryption
        )));
    }
    let key_len = ks.key_size as usize;
    let stripes = ks.af.stripes as usize;
    if !(16..=64).contains(&key_len) || !(1..=STRIPES).contains(&stripes) {
        return Err(Luks2Error::Corrupt(format!(
            "keyslot key size {key_len}, stripes {stripes}"
        )));
    }
    let af_hash = Hash::parse(&ks.af.hash)?;
    let offset = num("area offset", &ks.area.offset)?;
    let size = num("area size", &ks.area.size)?;
    let material_len = (key_len * stripes).next_multiple_of(512);
    if offset < 2 * hdr_size
        || offset % 512 != 0
        || (material_len as u64) > size
        || offset.checked_add(size).is_none_or(|e| e > keyslots_end)
    {
        return Err(Luks2Error::Corrupt(format!(
            "keyslot area {offset}+{size} outside the keyslots area"
        )));
    }
    // Checked before allocating: the header is the host's to write.
    if !matches!(ks.area.key_size, 32 | 64) {
        return Err(Luks2Error::Unsupported(format!(
            "keyslot area key of {} bytes",
            ks.area.key_size
        )));
    }
    let mut kek = Zeroizing::new(vec![0u8; ks.area.key_size as usize]);
    derive(&ks.kdf, passphrase, &mut kek, limits)?;
    let mut material = Zeroizing::new(vec![0u8; material_len]);
    dev.read_exact_at(&mut material, offset)
        .map_err(|e| Luks2Error::Io("read", e))?;
    keyslot_crypt(&kek, &mut material, false)?;
    Ok(af_merge(&material, key_len, stripes, &af_hash))
}

fn derive(kdf: &Kdf, pass: &[u8], out: &mut [u8], limits: &Limits) -> Result<(), Luks2Error> {
    match kdf {
        Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        } => {
            if *iterations == 0 || *iterations > limits.max_iterations {
                return Err(Luks2Error::Limit(format!("{iterations} PBKDF2 iterations")));
            }
            let salt = b64("kdf salt", salt, 64)?;
            Hash::parse(hash)?.pbkdf2(pass, &salt, *iterations, out);
            Ok(())
        }
        Kdf::Argon2i {
            time,
            memory,
            cpus,
            salt,
        }
        | Kdf::Argon2id {
            time,
            memory,
            cpus,
            salt,
        } => {
            if *memory > limits.max_argon2_kib {
                return Err(Luks2Error::Limit(format!(
                    "Argon2 memory {memory} KiB (limit {} KiB)",
                    limits.max_argon2_kib
                )));
            }
            if *time > limits.max_iterations || *cpus > 16 {
                return Err(Luks2Error::Limit(format!(
                    "Argon2 time {time}, cpus {cpus}"
                )));
            }
            let salt = b64("kdf salt", salt, 64)?;
            let alg = if matches!(kdf, Kdf::Argon2i { .. }) {
                argon2::Algorithm::Argon2i
            } else {
                argon2::Algorithm::Argon2id
            };
            let params = argon2::Params::new(*memory, *time, *cpus, Some(out.len()))
                .map_err(|e| Luks2Error::Corrupt(format!("Argon2 parameters: {e}")))?;
            argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into(pass, &salt, out)
                .map_err(|e| Luks2Error::Corrupt(format!("Argon2: {e}")))
        }
    }
}

fn check_digest(d: &JDigest, vk: &[u8], limits: &Limits) -> Result<bool, Luks2Error> {
    if d.typ != "pbkdf2" {
        return Err(Luks2Error::Unsupported(format!("digest type '{}'", d.typ)));
    }
    if d.iterations == 0 || d.iterations > limits.max_iterations {
        return Err(Luks2Error::Limit(format!(
            "{} digest iterations",
            d.iterations
        )));
    }
    let salt = b64("digest salt", &d.salt, 64)?;
    let want = b64("digest", &d.digest, 64)?;
    let mut got = vec![0u8; want.len()];
    Hash::parse(&d.hash)?.pbkdf2(vk, &salt, d.iterations, &mut got);
    Ok(ct_eq(&got, &want))
}

// ---- formatting ----

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

fn uuid_v4() -> String {
    let mut b: [u8; 16] = random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Formats `dev` (of `size` bytes) as LUKS2 with one keyslot for
/// `passphrase`: a fresh random volume key, `aes-xts-plain64` with
/// `sector_size`-byte sectors (512 or 4096), PBKDF2-SHA256. Returns what
/// [`unlock`] would.
pub fn format(
    dev: &File,
    size: u64,
    passphrase: &[u8],
    sector_size: u32,
) -> Result<Unlocked, Luks2Error> {
    if size < DATA_OFFSET + (1 << 20) {
        return Err(Luks2Error::TooSmall(size));
    }
    if !matches!(sector_size, 512 | 4096) {
        return Err(Luks2Error::Unsupported(format!(
            "sector size {sector_size}"
        )));
    }
    let hash = Hash::Sha256;
    let mut vk = Zeroizing::new(vec![0u8; VOLUME_KEY_LEN]);
    OsRng.fill_bytes(&mut vk);

    // Keyslot 0: AF-split volume key, encrypted under the derived key.
    let ks_salt: [u8; 32] = random();
    let mut kek = Zeroizing::new(vec![0u8; VOLUME_KEY_LEN]);
    hash.pbkdf2(passphrase, &ks_salt, PBKDF2_ITERATIONS, &mut kek);
    let mut material = af_split(&vk, STRIPES, &hash);
    keyslot_crypt(&kek, &mut material, true)?;

    let dg_salt: [u8; 32] = random();
    let mut digest = [0u8; 32];
    hash.pbkdf2(&vk, &dg_salt, PBKDF2_ITERATIONS, &mut digest);

    let json = json!({
        "keyslots": {"0": {
            "type": "luks2",
            "key_size": VOLUME_KEY_LEN,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": "sha256"},
            "area": {
                "type": "raw",
                "offset": AREA_OFFSET.to_string(),
                "size": AREA_SIZE.to_string(),
                "encryption": CIPHER,
                "key_size": VOLUME_KEY_LEN,
            },
            "kdf": {
                "type": "pbkdf2",
                "hash": "sha256",
                "iterations": PBKDF2_ITERATIONS,
                "salt": B64.encode(ks_salt),
            },
        }},
        "tokens": {},
        "segments": {"0": {
            "type": "crypt",
            "offset": DATA_OFFSET.to_string(),
            "size": "dynamic",
            "iv_tweak": "0",
            "encryption": CIPHER,
            "sector_size": sector_size,
        }},
        "digests": {"0": {
            "type": "pbkdf2",
            "keyslots": ["0"],
            "segments": ["0"],
            "hash": "sha256",
            "iterations": PBKDF2_ITERATIONS,
            "salt": B64.encode(dg_salt),
            "digest": B64.encode(digest),
        }},
        "config": {
            "json_size": (HDR_SIZE - 4096).to_string(),
            "keyslots_size": (DATA_OFFSET - 2 * HDR_SIZE).to_string(),
        },
    });
    let text = json.to_string();
    if text.len() >= (HDR_SIZE - 4096) as usize {
        return Err(Luks2Error::Corrupt("metadata does not fit".into()));
    }
    let uuid = uuid_v4();
    let write = |e| Luks2Error::Io("write", e);
    dev.write_all_at(&material, AREA_OFFSET).map_err(write)?;
    material.zeroize();
    // Secondary copy first: a torn write leaves no half-new primary.
    for (offset, magic) in [(HDR_SIZE, MAGIC_SECONDARY), (0, MAGIC_PRIMARY)] {
        let hdr = header_bytes(magic, offset, &uuid, text.as_bytes());
        dev.write_all_at(&hdr, offset).map_err(write)?;
    }
    dev.sync_all().map_err(write)?;
    Ok(Unlocked {
        volume_key: vk,
        segment: Segment {
            offset: DATA_OFFSET,
            size: None,
            iv_tweak: 0,
            cipher: CIPHER.into(),
            sector_size,
        },
    })
}

/// One header copy: binary header, JSON area, checksum.
fn header_bytes(magic: &[u8; 6], offset: u64, uuid: &str, json: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HDR_SIZE as usize];
    b[0..6].copy_from_slice(magic);
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&HDR_SIZE.to_be_bytes());
    b[16..24].copy_from_slice(&1u64.to_be_bytes()); // seqid
    b[72..78].copy_from_slice(b"sha256");
    let salt: [u8; 64] = random();
    b[104..168].copy_from_slice(&salt);
    b[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
    b[256..264].copy_from_slice(&offset.to_be_bytes());
    b[4096..4096 + json.len()].copy_from_slice(json);
    let sum = Sha256::digest(&b);
    b[448..480].copy_from_slice(&sum);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("disk"))
            .unwrap();
        f.set_len(size).unwrap();
        (d, f)
    }

    #[test]
    fn af_split_and_merge_round_trip() {
        let key: [u8; 64] = random();
        for stripes in [1, 2, 4000] {
            let m = af_split(&key, stripes, &Hash::Sha256);
            assert_eq!(&af_merge(&m, 64, stripes, &Hash::Sha256)[..], &key[..]);
        }
    }

    #[test]
    fn format_then_unlock_and_wrong_key() {
        let (_d, f) = disk(20 << 20);
        assert!(!is_luks(&f).unwrap());
        assert!(matches!(
            unlock(&f, b"k", &Limits::default()),
            Err(Luks2Error::NotLuks)
        ));
        let made = format(&f, 20 << 20, b"secret", 4096).unwrap();
        assert!(is_luks(&f).unwrap());
        let got = unlock(&f, b"secret", &Limits::default()).unwrap();
        assert_eq!(got.volume_key, made.volume_key);
        assert_eq!(got.segment, made.segment);
        assert_eq!(got.segment.sector_size, 4096);
        assert!(matches!(
            unlock(&f, b"other", &Limits::default()),
            Err(Luks2Error::WrongKey)
        ));
        assert!(!format!("{got:?}").contains(&hex::encode(&got.volume_key[..4])));
    }

    #[test]
    fn a_damaged_primary_falls_back_to_the_secondary() {
        let (_d, f) = disk(20 << 20);
        format(&f, 20 << 20, b"secret", 4096).unwrap();
        f.write_all_at(b"{garbage", 4096).unwrap();
        assert!(unlock(&f, b"secret", &Limits::default()).is_ok());
        f.write_all_at(b"{garbage", HDR_SIZE + 4096).unwrap();
        assert!(matches!(
            unlock(&f, b"secret", &Limits::default()),
            Err(Luks2Error::Corrupt(_))
        ));
        assert!(is_luks(&f).unwrap(), "a corrupt header is still a header");
    }

    /// Replaces `from` by `to` in the JSON of both header copies and re-seals
    /// their checksums: a header as a host could write it.
    fn rewrite_json(f: &File, from: &str, to: &str) {
        for offset in [0, HDR_SIZE] {
            let mut copy = vec![0u8; HDR_SIZE as usize];
            FileExt::read_exact_at(f, &mut copy, offset).unwrap();
            let end = copy[4096..].iter().position(|&c| c == 0).unwrap() + 4096;
            let json = String::from_utf8(copy[4096..end].to_vec()).unwrap();
            assert!(json.contains(from), "{from} not in the header");
            let json = json.replace(from, to);
            copy[4096..].fill(0);
            copy[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
            copy[448..512].fill(0);
            let sum = Sha256::digest(&copy);
            copy[448..480].copy_from_slice(&sum);
            f.write_all_at(&copy, offset).unwrap();
        }
    }

    #[test]
    fn a_keyslots_size_past_the_end_of_u64_is_corrupt() {
        let (_d, f) = disk(20 << 20);
        format(&f, 20 << 20, b"secret", 4096).unwrap();
        let size = DATA_OFFSET - 2 * HDR_SIZE;
        rewrite_json(
            &f,
            &format!(r#""keyslots_size":"{size}""#),
            &format!(r#""keyslots_size":"{}""#, u64::MAX - 1),
        );
        assert!(is_luks(&f).unwrap());
        let e = unlock(&f, b"secret", &Limits::default()).unwrap_err();
        assert!(
            matches!(&e, Luks2Error::Corrupt(m) if m.contains("keyslots_size")),
            "{e:?}"
        );
    }

    #[test]
    fn a_resealed_header_still_unlocks() {
        // The helper above changes nothing but what it is asked to.
        let (_d, f) = disk(20 << 20);
        format(&f, 20 << 20, b"secret", 4096).unwrap();
        rewrite_json(&f, r#""tokens":{}"#, r#""tokens":{ }"#);
        unlock(&f, b"secret", &Limits::default()).unwrap();
    }

    #[test]
    fn too_small_devices_are_refused() {
        let (_d, f) = disk(4 << 20);
        assert!(matches!(
            format(&f, 4 << 20, b"k", 4096),
            Err(Luks2Error::TooSmall(_))
        ));
    }
}
