//! The AMD SEV-SNP attestation report (`ATTESTATION_REPORT`, 0x4A0 bytes) and the certificate
//! table the host may attach to it (`SNP_GET_EXT_REPORT`).
//!
//! Owns the byte layout and its strict parsing; it checks nothing cryptographic (that is
//! `veil_verifier::verify::snp`'s). Offsets follow AMD's SEV-SNP ABI specification (report versions 2, 3
//! and 5 share the fields read here). The simulated TEE reuses this layout.

use thiserror::Error;
use veil_common::{Classify, Kind};

/// Size of a report in bytes.
pub const REPORT_LEN: usize = 0x4A0;
/// The report is signed over bytes `0..SIGNED_LEN`.
pub const SIGNED_LEN: usize = 0x2A0;
/// Offset of the signature (r, then s; each 72 bytes little-endian).
pub const SIGNATURE_OFFSET: usize = 0x2A0;
/// `SIGNATURE_ALGO` value for ECDSA P-384 with SHA-384.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// Guest policy bit: debugging allowed.
pub const POLICY_DEBUG_BIT: u64 = 1 << 19;

const OFF_VERSION: usize = 0x00;
const OFF_GUEST_SVN: usize = 0x04;
const OFF_POLICY: usize = 0x08;
const OFF_FAMILY_ID: usize = 0x10;
const OFF_IMAGE_ID: usize = 0x20;
const OFF_VMPL: usize = 0x30;
const OFF_SIG_ALGO: usize = 0x34;
const OFF_CURRENT_TCB: usize = 0x38;
const OFF_PLATFORM_INFO: usize = 0x40;
const OFF_FLAGS: usize = 0x48;
const OFF_REPORT_DATA: usize = 0x50;
const OFF_MEASUREMENT: usize = 0x90;
const OFF_HOST_DATA: usize = 0xC0;
const OFF_ID_KEY_DIGEST: usize = 0xE0;
const OFF_AUTHOR_KEY_DIGEST: usize = 0x110;
const OFF_REPORT_ID: usize = 0x140;
const OFF_REPORTED_TCB: usize = 0x180;
const OFF_CPUID_FAM: usize = 0x188;
const OFF_CPUID_MOD: usize = 0x189;
const OFF_CPUID_STEP: usize = 0x18A;
const OFF_CHIP_ID: usize = 0x1A0;
const OFF_COMMITTED_TCB: usize = 0x1E0;
const OFF_LAUNCH_TCB: usize = 0x1F0;

/// Certificate-table GUIDs (as printed, RFC 4122 text form).
pub mod guid {
    /// AMD Root Key.
    pub const ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";
    /// AMD SEV Key (intermediate).
    pub const ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
    /// Versioned Chip Endorsement Key.
    pub const VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
    /// Versioned Loaded Endorsement Key.
    pub const VLEK: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
    /// Certificate revocation list.
    pub const CRL: &str = "92f81bc3-5811-4d3d-97ff-d19f88dc67ea";
}

/// Upper bound on certificate-table entries we accept (the kernel's table is a few entries).
pub const MAX_CERT_ENTRIES: usize = 16;
/// Upper bound on the size of a certificate table (the kernel limits it to a few pages).
pub const MAX_CERT_TABLE_LEN: usize = 64 * 1024;

/// Why bytes are not a well-formed SNP report or certificate table.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SnpParseError {
    /// The report is not exactly 0x4A0 bytes.
    #[error("SNP report is {0} bytes, expected 0x4A0 (1184)")]
    ReportLength(usize),
    /// The report version is not one we know the layout of.
    #[error("SNP report version {0} is not supported (2, 3 or 5 expected)")]
    UnsupportedVersion(u32),
    /// The signature algorithm is not ECDSA P-384/SHA-384.
    #[error("SNP report signature algorithm {0} is not ECDSA P-384 with SHA-384 (1)")]
    UnsupportedSignatureAlgorithm(u32),
    /// The signature's r or s has bytes set above the 48 that a P-384 scalar uses.
    #[error("SNP report signature component has non-zero high bytes")]
    SignatureHighBytes,
    /// The certificate table is longer than we accept.
    #[error("SNP certificate table is {0} bytes, more than the limit")]
    CertTableTooLong(usize),
    /// A certificate-table entry header runs past the end of the table.
    #[error("SNP certificate table is truncated at entry {0}")]
    CertTableTruncated(usize),
    /// The table has no all-zero terminator within the entry limit.
    #[error("SNP certificate table has no terminator within {MAX_CERT_ENTRIES} entries")]
    CertTableUnterminated,
    /// An entry's offset/length points outside the table.
    #[error("SNP certificate table entry {index} (offset {offset}, length {length}) lies outside the table")]
    CertEntryOutOfBounds {
        /// Entry index.
        index: usize,
        /// Offset from the start of the table.
        offset: u32,
        /// Length in bytes.
        length: u32,
    },
    /// The same GUID appears twice.
    #[error("SNP certificate table lists {0} twice")]
    CertDuplicate(String),
    /// A version-2 report with a masked (all-zero) chip ID: its TCB layout cannot be told.
    #[error("SNP report version 2 has a masked chip ID, so its TCB layout is unknown")]
    MaskedChipId,
    /// The report's CPUID names no SEV-SNP processor generation.
    #[error("SNP report CPUID family {family:#x} model {model:#x} is no known SEV-SNP processor")]
    UnknownProcessor {
        /// CPUID family.
        family: u8,
        /// CPUID model.
        model: u8,
    },
    /// A field of the JSON report form has the wrong length or value.
    #[error("SNP report field {0} has the wrong length or value")]
    Field(&'static str),
}

impl Classify for SnpParseError {
    fn kind(&self) -> Kind {
        match self {
            SnpParseError::ReportLength(_)
            | SnpParseError::UnsupportedVersion(_)
            | SnpParseError::UnsupportedSignatureAlgorithm(_)
            | SnpParseError::SignatureHighBytes
            | SnpParseError::CertTableTooLong(_)
            | SnpParseError::CertTableTruncated(_)
            | SnpParseError::CertTableUnterminated
            | SnpParseError::CertEntryOutOfBounds { .. }
            | SnpParseError::CertDuplicate(_)
            | SnpParseError::MaskedChipId
            | SnpParseError::UnknownProcessor { .. }
            | SnpParseError::Field(_) => Kind::InvalidArgument,
        }
    }
}

/// A TCB version as the SNP firmware reports it (one byte per component).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TcbVersion {
    /// Firmware (FMC) SPL; Turin and later only, 0 before.
    #[serde(default)]
    pub fmc: u8,
    /// Boot loader SPL.
    pub bootloader: u8,
    /// PSP OS (TEE) SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

/// The processor generation, which decides the TCB encoding and the AMD root to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// EPYC 7003 (Zen 3).
    Milan,
    /// EPYC 9004 (Zen 4).
    Genoa,
    /// EPYC 9005 (Zen 5).
    Turin,
}

impl Generation {
    /// Lower-case name, as AMD's key distribution service spells it.
    pub fn name(self) -> &'static str {
        match self {
            Generation::Milan => "milan",
            Generation::Genoa => "genoa",
            Generation::Turin => "turin",
        }
    }
}

impl TcbVersion {
    /// Decodes the 64-bit TCB field with the layout of `generation`.
    pub fn from_u64(raw: u64, generation: Option<Generation>) -> Self {
        let b = raw.to_le_bytes();
        match generation {
            Some(Generation::Turin) => TcbVersion {
                fmc: b[0],
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            },
            _ => TcbVersion {
                fmc: 0,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            },
        }
    }

    /// True when every component is at least the one in `min`.
    pub fn meets(&self, min: &TcbVersion) -> Result<(), &'static str> {
        if self.fmc < min.fmc {
            return Err("fmc");
        }
        if self.bootloader < min.bootloader {
            return Err("bootloader");
        }
        if self.tee < min.tee {
            return Err("tee");
        }
        if self.snp < min.snp {
            return Err("snp");
        }
        if self.microcode < min.microcode {
            return Err("microcode");
        }
        Ok(())
    }
}

/// A parsed SEV-SNP attestation report. The raw bytes are kept for signature checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpReport {
    raw: Box<[u8; REPORT_LEN]>,
}

fn u32_at(b: &[u8; REPORT_LEN], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; REPORT_LEN], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn arr<const N: usize>(b: &[u8; REPORT_LEN], off: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&b[off..off + N]);
    v
}

impl SnpReport {
    /// Parses exactly 0x4A0 bytes. Rejects unknown versions, signature algorithms other than
    /// ECDSA P-384, and signature components with non-zero padding.
    pub fn parse(bytes: &[u8]) -> Result<Self, SnpParseError> {
        let raw: [u8; REPORT_LEN] = bytes
            .try_into()
            .map_err(|_| SnpParseError::ReportLength(bytes.len()))?;
        let version = u32_at(&raw, OFF_VERSION);
        if !matches!(version, 2 | 3 | 5) {
            return Err(SnpParseError::UnsupportedVersion(version));
        }
        let algo = u32_at(&raw, OFF_SIG_ALGO);
        if algo != SIG_ALGO_ECDSA_P384_SHA384 {
            return Err(SnpParseError::UnsupportedSignatureAlgorithm(algo));
        }
        let sig = &raw[SIGNATURE_OFFSET..SIGNATURE_OFFSET + 144];
        if sig[48..72].iter().any(|&b| b != 0) || sig[120..144].iter().any(|&b| b != 0) {
            return Err(SnpParseError::SignatureHighBytes);
        }
        Ok(SnpReport { raw: Box::new(raw) })
    }

    /// The whole report.
    pub fn as_bytes(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }

    /// The signed part (`0..0x2A0`).
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// Report format version.
    pub fn version(&self) -> u32 {
        u32_at(&self.raw, OFF_VERSION)
    }
    /// Guest SVN from the ID block.
    pub fn guest_svn(&self) -> u32 {
        u32_at(&self.raw, OFF_GUEST_SVN)
    }
    /// The guest policy the VM was launched with.
    pub fn policy(&self) -> u64 {
        u64_at(&self.raw, OFF_POLICY)
    }
    /// True when the guest policy allows debugging (the host can then read guest memory).
    pub fn debug_allowed(&self) -> bool {
        self.policy() & POLICY_DEBUG_BIT != 0
    }
    /// Family ID from the ID block.
    pub fn family_id(&self) -> [u8; 16] {
        arr(&self.raw, OFF_FAMILY_ID)
    }
    /// Image ID from the ID block.
    pub fn image_id(&self) -> [u8; 16] {
        arr(&self.raw, OFF_IMAGE_ID)
    }
    /// The VMPL that requested the report.
    pub fn vmpl(&self) -> u32 {
        u32_at(&self.raw, OFF_VMPL)
    }
    /// Signature algorithm.
    pub fn signature_algo(&self) -> u32 {
        u32_at(&self.raw, OFF_SIG_ALGO)
    }
    /// Platform info flags (SMT, TSME, ...).
    pub fn platform_info(&self) -> u64 {
        u64_at(&self.raw, OFF_PLATFORM_INFO)
    }
    /// Report flags; bits 2..4 select the signing key (0 = VCEK, 1 = VLEK).
    pub fn flags(&self) -> u32 {
        u32_at(&self.raw, OFF_FLAGS)
    }
    /// Which key signed: 0 VCEK, 1 VLEK, 7 none.
    pub fn signing_key(&self) -> u32 {
        (self.flags() >> 2) & 0x7
    }
    /// The 64 bytes the guest asked to be bound into the report.
    pub fn report_data(&self) -> [u8; 64] {
        arr(&self.raw, OFF_REPORT_DATA)
    }
    /// The launch measurement.
    pub fn measurement(&self) -> [u8; 48] {
        arr(&self.raw, OFF_MEASUREMENT)
    }
    /// Data the host supplied at launch (veil: the init-data digest).
    pub fn host_data(&self) -> [u8; 32] {
        arr(&self.raw, OFF_HOST_DATA)
    }
    /// Digest of the ID key, if an ID block was used.
    pub fn id_key_digest(&self) -> [u8; 48] {
        arr(&self.raw, OFF_ID_KEY_DIGEST)
    }
    /// Digest of the author key, if any.
    pub fn author_key_digest(&self) -> [u8; 48] {
        arr(&self.raw, OFF_AUTHOR_KEY_DIGEST)
    }
    /// Report ID of the guest.
    pub fn report_id(&self) -> [u8; 32] {
        arr(&self.raw, OFF_REPORT_ID)
    }
    /// Raw REPORTED_TCB (the TCB the VCEK is derived from).
    pub fn reported_tcb_raw(&self) -> u64 {
        u64_at(&self.raw, OFF_REPORTED_TCB)
    }
    /// Raw CURRENT_TCB.
    pub fn current_tcb_raw(&self) -> u64 {
        u64_at(&self.raw, OFF_CURRENT_TCB)
    }
    /// Raw COMMITTED_TCB.
    pub fn committed_tcb_raw(&self) -> u64 {
        u64_at(&self.raw, OFF_COMMITTED_TCB)
    }
    /// Raw LAUNCH_TCB.
    pub fn launch_tcb_raw(&self) -> u64 {
        u64_at(&self.raw, OFF_LAUNCH_TCB)
    }
    /// The chip identifier (all zero when MASK_CHIP_ID is set).
    pub fn chip_id(&self) -> [u8; 64] {
        arr(&self.raw, OFF_CHIP_ID)
    }
    /// CPUID family/model/stepping, present from report version 3.
    pub fn cpuid(&self) -> Option<(u8, u8, u8)> {
        if self.version() >= 3 {
            Some((
                self.raw[OFF_CPUID_FAM],
                self.raw[OFF_CPUID_MOD],
                self.raw[OFF_CPUID_STEP],
            ))
        } else {
            None
        }
    }
    /// The processor generation, when the report says (version 3 and later).
    pub fn generation(&self) -> Option<Generation> {
        let (family, model, _) = self.cpuid()?;
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Generation::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Generation::Genoa),
            (0x1A, 0x00..=0x11) => Some(Generation::Turin),
            _ => None,
        }
    }
    /// REPORTED_TCB decoded for this report's generation (Milan layout when unknown).
    pub fn reported_tcb(&self) -> TcbVersion {
        TcbVersion::from_u64(self.reported_tcb_raw(), self.generation())
    }
    /// The signature's r, big-endian, 48 bytes.
    pub fn signature_r_be(&self) -> [u8; 48] {
        let mut r = [0u8; 48];
        r.copy_from_slice(&self.raw[SIGNATURE_OFFSET..SIGNATURE_OFFSET + 48]);
        r.reverse();
        r
    }
    /// The signature's s, big-endian, 48 bytes.
    pub fn signature_s_be(&self) -> [u8; 48] {
        let mut s = [0u8; 48];
        s.copy_from_slice(&self.raw[SIGNATURE_OFFSET + 72..SIGNATURE_OFFSET + 72 + 48]);
        s.reverse();
        s
    }
}

/// Field offsets for builders of SNP-layout reports (the simulated firmware, tests).
pub mod layout {
    #![allow(
        missing_docs,
        reason = "each constant is the offset of the field it names"
    )]
    pub const VERSION: usize = super::OFF_VERSION;
    pub const POLICY: usize = super::OFF_POLICY;
    pub const VMPL: usize = super::OFF_VMPL;
    pub const SIG_ALGO: usize = super::OFF_SIG_ALGO;
    pub const CURRENT_TCB: usize = super::OFF_CURRENT_TCB;
    pub const REPORT_DATA: usize = super::OFF_REPORT_DATA;
    pub const MEASUREMENT: usize = super::OFF_MEASUREMENT;
    pub const HOST_DATA: usize = super::OFF_HOST_DATA;
    pub const REPORT_ID: usize = super::OFF_REPORT_ID;
    pub const REPORTED_TCB: usize = super::OFF_REPORTED_TCB;
    pub const CHIP_ID: usize = super::OFF_CHIP_ID;
    pub const COMMITTED_TCB: usize = super::OFF_COMMITTED_TCB;
    pub const LAUNCH_TCB: usize = super::OFF_LAUNCH_TCB;
}

/// One certificate from the host-supplied certificate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertEntry {
    /// The GUID, in RFC 4122 text form.
    pub guid: String,
    /// The DER (or PEM) bytes.
    pub data: Vec<u8>,
}

/// The certificate table from `SNP_GET_EXT_REPORT` / configfs-tsm `auxblob`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertTable {
    /// Entries in table order.
    pub entries: Vec<CertEntry>,
}

/// Formats a GUID stored in the mixed-endian layout of the certificate table.
fn guid_text(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// Encodes an RFC 4122 GUID text into the table's mixed-endian bytes (for builders and tests).
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hexstr: String = text.chars().filter(|c| *c != '-').collect();
    let v = hex::decode(hexstr).ok()?;
    let v: [u8; 16] = v.try_into().ok()?;
    Some([
        v[3], v[2], v[1], v[0], v[5], v[4], v[7], v[6], v[8], v[9], v[10], v[11], v[12], v[13],
        v[14], v[15],
    ])
}

impl CertTable {
    /// Parses a table: 24-byte entries `{guid[16], offset u32, length u32}` ended by an all-zero
    /// entry; offsets count from the start of the table.
    pub fn parse(bytes: &[u8]) -> Result<Self, SnpParseError> {
        if bytes.len() > MAX_CERT_TABLE_LEN {
            return Err(SnpParseError::CertTableTooLong(bytes.len()));
        }
        let mut entries: Vec<CertEntry> = Vec::new();
        for index in 0..=MAX_CERT_ENTRIES {
            let start = index * 24;
            let header = bytes
                .get(start..start + 24)
                .ok_or(SnpParseError::CertTableTruncated(index))?;
            if header.iter().all(|&b| b == 0) {
                return Ok(CertTable { entries });
            }
            if index == MAX_CERT_ENTRIES {
                break;
            }
            let mut g = [0u8; 16];
            g.copy_from_slice(&header[..16]);
            let offset = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
            let length = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
            let oob = SnpParseError::CertEntryOutOfBounds {
                index,
                offset,
                length,
            };
            let begin = usize::try_from(offset).map_err(|_| oob.clone())?;
            let len = usize::try_from(length).map_err(|_| oob.clone())?;
            let end = begin.checked_add(len).ok_or(oob.clone())?;
            let data = bytes.get(begin..end).ok_or(oob)?;
            let guid = guid_text(&g);
            if entries.iter().any(|e| e.guid == guid) {
                return Err(SnpParseError::CertDuplicate(guid));
            }
            entries.push(CertEntry {
                guid,
                data: data.to_vec(),
            });
        }
        Err(SnpParseError::CertTableUnterminated)
    }

    /// Builds table bytes from entries (used by tests and the simulated firmware).
    pub fn encode(&self) -> Vec<u8> {
        let header_len = (self.entries.len() + 1) * 24;
        let mut out = vec![0u8; header_len];
        for (i, e) in self.entries.iter().enumerate() {
            let offset = out.len() as u32;
            let g = guid_bytes(&e.guid).unwrap_or([0u8; 16]);
            out[i * 24..i * 24 + 16].copy_from_slice(&g);
            out[i * 24 + 16..i * 24 + 20].copy_from_slice(&offset.to_le_bytes());
            out[i * 24 + 20..i * 24 + 24].copy_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.data);
        }
        out
    }

    /// The certificate with this GUID, if present.
    pub fn get(&self, guid: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.guid == guid)
            .map(|e| e.data.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> [u8; REPORT_LEN] {
        let mut r = [0u8; REPORT_LEN];
        r[0] = 2;
        r[OFF_SIG_ALGO] = 1;
        r
    }

    #[test]
    fn rejects_wrong_lengths() {
        assert_eq!(
            SnpReport::parse(&[0u8; 10]),
            Err(SnpParseError::ReportLength(10))
        );
        let mut long = minimal().to_vec();
        long.push(0);
        assert_eq!(
            SnpReport::parse(&long),
            Err(SnpParseError::ReportLength(REPORT_LEN + 1))
        );
        assert!(SnpReport::parse(&minimal()).is_ok());
    }

    #[test]
    fn rejects_unknown_version_and_algo() {
        let mut r = minimal();
        r[0] = 9;
        assert_eq!(
            SnpReport::parse(&r),
            Err(SnpParseError::UnsupportedVersion(9))
        );
        let mut r = minimal();
        r[OFF_SIG_ALGO] = 2;
        assert_eq!(
            SnpReport::parse(&r),
            Err(SnpParseError::UnsupportedSignatureAlgorithm(2))
        );
    }

    #[test]
    fn cert_table_round_trip_and_bounds() {
        let t = CertTable {
            entries: vec![
                CertEntry {
                    guid: guid::VCEK.into(),
                    data: vec![1, 2, 3],
                },
                CertEntry {
                    guid: guid::ASK.into(),
                    data: vec![4, 5],
                },
            ],
        };
        let bytes = t.encode();
        assert_eq!(CertTable::parse(&bytes).unwrap(), t);
        assert_eq!(t.get(guid::VCEK), Some(&[1u8, 2, 3][..]));
        // Truncated payload.
        assert!(matches!(
            CertTable::parse(&bytes[..bytes.len() - 1]),
            Err(SnpParseError::CertEntryOutOfBounds { .. })
        ));
        // Cut inside the header area: the first entry now points outside the table.
        assert!(CertTable::parse(&bytes[..30]).is_err());
        // A header with no terminator at all.
        let mut no_term = vec![0u8; 24];
        no_term[0] = 1;
        assert!(matches!(
            CertTable::parse(&no_term),
            Err(SnpParseError::CertTableTruncated(1))
        ));
        assert_eq!(guid_text(&guid_bytes(guid::ARK).unwrap()), guid::ARK);
    }

    #[test]
    fn every_parse_error_is_invalid_argument() {
        for e in [
            SnpParseError::ReportLength(0),
            SnpParseError::UnsupportedVersion(0),
            SnpParseError::UnsupportedSignatureAlgorithm(0),
            SnpParseError::SignatureHighBytes,
            SnpParseError::CertTableTooLong(0),
            SnpParseError::CertTableTruncated(0),
            SnpParseError::CertTableUnterminated,
            SnpParseError::CertEntryOutOfBounds {
                index: 0,
                offset: 0,
                length: 0,
            },
            SnpParseError::CertDuplicate(String::new()),
            SnpParseError::MaskedChipId,
            SnpParseError::UnknownProcessor {
                family: 0,
                model: 0,
            },
            SnpParseError::Field("chip_id"),
        ] {
            assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn tcb_layouts() {
        let raw = u64::from_le_bytes([3, 0, 0, 0, 0, 0, 8, 115]);
        let t = TcbVersion::from_u64(raw, Some(Generation::Milan));
        assert_eq!((t.bootloader, t.tee, t.snp, t.microcode), (3, 0, 8, 115));
        let raw = u64::from_le_bytes([1, 2, 3, 4, 0, 0, 0, 9]);
        let t = TcbVersion::from_u64(raw, Some(Generation::Turin));
        assert_eq!(
            (t.fmc, t.bootloader, t.tee, t.snp, t.microcode),
            (1, 2, 3, 4, 9)
        );
        assert_eq!(
            t.meets(&TcbVersion {
                snp: 5,
                ..Default::default()
            }),
            Err("snp")
        );
    }
}
