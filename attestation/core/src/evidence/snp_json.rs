//! SEV-SNP evidence in the shape Trustee's SNP attester sends and its verifier reads:
//!
//! ```text
//! {"attestation_report": <AttestationReport>, "cert_chain": [<CertTableEntry>, ...] | null}
//! ```
//!
//! both in the serde form of the `sev` crate's `AttestationReport` and `CertTableEntry` (the
//! report as a struct of its fields, byte arrays as JSON arrays of numbers, TCB versions as
//! `{fmc, bootloader, tee, snp, microcode}`, the certificate type as `"VCEK"`, `"ASK"`, ... or
//! `{"OTHER": "<guid>"}`). This module converts between that form and the report's raw 0x4A0
//! bytes without depending on `sev`; `veil-verifier`'s tests pin it to `sev`'s own serde.
//!
//! The raw layout follows the SEV-SNP ABI (report versions 2, 3 and 5) as `sev` reads it: the
//! TCB encoding depends on the generation (Turin's has an FMC byte), which version-3 and later
//! reports name by CPUID and version-2 reports by their chip ID's shape.

use serde::{Deserialize, Serialize};

use super::snp::{guid, CertEntry, CertTable, SnpParseError, SnpReport, REPORT_LEN};

/// A TCB version, as `sev` serialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcbJson {
    /// FMC SPL (Turin and later), `null` before.
    pub fmc: Option<u8>,
    /// Boot loader SPL.
    pub bootloader: u8,
    /// PSP OS SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

/// A firmware version, as `sev` serialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionJson {
    /// Major.
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Build.
    pub build: u8,
}

/// The report signature (r, s; 72 bytes each, little-endian), as `sev` serialises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureJson {
    /// r.
    pub r: Vec<u8>,
    /// s.
    pub s: Vec<u8>,
}

/// `sev::firmware::guest::AttestationReport` in its serde form (field order as `sev`'s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(
    missing_docs,
    reason = "each field is the report field of the same name"
)]
pub struct ReportJson {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: u64,
    pub family_id: Vec<u8>,
    pub image_id: Vec<u8>,
    pub vmpl: u32,
    pub sig_algo: u32,
    pub current_tcb: TcbJson,
    pub plat_info: u64,
    pub key_info: u32,
    pub report_data: Vec<u8>,
    pub measurement: Vec<u8>,
    pub host_data: Vec<u8>,
    pub id_key_digest: Vec<u8>,
    pub author_key_digest: Vec<u8>,
    pub report_id: Vec<u8>,
    pub report_id_ma: Vec<u8>,
    pub reported_tcb: TcbJson,
    pub cpuid_fam_id: Option<u8>,
    pub cpuid_mod_id: Option<u8>,
    pub cpuid_step: Option<u8>,
    pub chip_id: Vec<u8>,
    pub committed_tcb: TcbJson,
    pub current: VersionJson,
    pub committed: VersionJson,
    pub launch_tcb: TcbJson,
    pub launch_mit_vector: Option<u64>,
    pub current_mit_vector: Option<u64>,
    pub signature: SignatureJson,
}

/// `sev::firmware::host::CertType` in its serde form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertTypeJson {
    /// The table terminator.
    Empty,
    /// AMD Root Key.
    #[serde(rename = "ARK")]
    Ark,
    /// AMD SEV Key.
    #[serde(rename = "ASK")]
    Ask,
    /// Versioned Chip Endorsement Key.
    #[serde(rename = "VCEK")]
    Vcek,
    /// Versioned Loaded Endorsement Key.
    #[serde(rename = "VLEK")]
    Vlek,
    /// Certificate revocation list.
    #[serde(rename = "CRL")]
    Crl,
    /// Any other GUID.
    #[serde(rename = "OTHER")]
    Other(String),
}

/// `sev::firmware::host::CertTableEntry` in its serde form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertEntryJson {
    /// What the entry holds.
    pub cert_type: CertTypeJson,
    /// The certificate (DER) or CRL bytes.
    pub data: Vec<u8>,
}

/// Trustee's SNP evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpEvidenceJson {
    /// The report.
    pub attestation_report: ReportJson,
    /// The host's certificate table, if it supplied one.
    pub cert_chain: Option<Vec<CertEntryJson>>,
}

/// How a TCB is laid out in the raw report.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcbLayout {
    /// Milan and Genoa.
    Legacy,
    /// Turin and later: an FMC byte first.
    Turin,
}

/// The layout as `sev` decides it: by CPUID from version 3, by the chip ID's shape in version 2.
fn tcb_layout(
    version: u32,
    cpuid: Option<(u8, u8)>,
    chip_id: &[u8],
) -> Result<TcbLayout, SnpParseError> {
    if version == 2 {
        if chip_id.iter().all(|&b| b == 0) {
            return Err(SnpParseError::MaskedChipId);
        }
        return Ok(if chip_id[8..].iter().all(|&b| b == 0) {
            TcbLayout::Turin
        } else {
            TcbLayout::Legacy
        });
    }
    let (family, model) = cpuid.ok_or(SnpParseError::Field("cpuid_fam_id"))?;
    match (family, model) {
        (0x19, 0x00..=0x0F) | (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Ok(TcbLayout::Legacy),
        (0x1A, 0x00..=0x11)
        | (0x1A, 0x50..=0x57)
        | (0x1A, 0x90..=0x9F)
        | (0x1A, 0xA0..=0xAF)
        | (0x1A, 0xC0..=0xC7) => Ok(TcbLayout::Turin),
        _ => Err(SnpParseError::UnknownProcessor { family, model }),
    }
}

fn tcb_from(b: [u8; 8], layout: TcbLayout) -> TcbJson {
    match layout {
        TcbLayout::Legacy => TcbJson {
            fmc: None,
            bootloader: b[0],
            tee: b[1],
            snp: b[6],
            microcode: b[7],
        },
        TcbLayout::Turin => TcbJson {
            fmc: Some(b[0]),
            bootloader: b[1],
            tee: b[2],
            snp: b[3],
            microcode: b[7],
        },
    }
}

fn tcb_to(t: &TcbJson, layout: TcbLayout) -> [u8; 8] {
    match layout {
        TcbLayout::Legacy => [t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode],
        TcbLayout::Turin => [
            t.fmc.unwrap_or(0),
            t.bootloader,
            t.tee,
            t.snp,
            0,
            0,
            0,
            t.microcode,
        ],
    }
}

/// Offsets of the fields this module moves (SEV-SNP ABI, `ATTESTATION_REPORT`).
mod off {
    pub const GUEST_SVN: usize = 0x04;
    pub const POLICY: usize = 0x08;
    pub const FAMILY_ID: usize = 0x10;
    pub const IMAGE_ID: usize = 0x20;
    pub const VMPL: usize = 0x30;
    pub const SIG_ALGO: usize = 0x34;
    pub const CURRENT_TCB: usize = 0x38;
    pub const PLAT_INFO: usize = 0x40;
    pub const KEY_INFO: usize = 0x48;
    pub const REPORT_DATA: usize = 0x50;
    pub const MEASUREMENT: usize = 0x90;
    pub const HOST_DATA: usize = 0xC0;
    pub const ID_KEY_DIGEST: usize = 0xE0;
    pub const AUTHOR_KEY_DIGEST: usize = 0x110;
    pub const REPORT_ID: usize = 0x140;
    pub const REPORT_ID_MA: usize = 0x160;
    pub const REPORTED_TCB: usize = 0x180;
    pub const CPUID_FAM: usize = 0x188;
    pub const CPUID_MOD: usize = 0x189;
    pub const CPUID_STEP: usize = 0x18A;
    pub const CHIP_ID: usize = 0x1A0;
    pub const COMMITTED_TCB: usize = 0x1E0;
    pub const CURRENT: usize = 0x1E8;
    pub const COMMITTED: usize = 0x1EC;
    pub const LAUNCH_TCB: usize = 0x1F0;
    pub const LAUNCH_MIT: usize = 0x1F8;
    pub const CURRENT_MIT: usize = 0x200;
    pub const SIG_R: usize = 0x2A0;
    pub const SIG_S: usize = 0x2E8;
}

fn bytes<const N: usize>(r: &[u8; REPORT_LEN], at: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&r[at..at + N]);
    v
}

fn put(
    r: &mut [u8; REPORT_LEN],
    at: usize,
    field: &'static str,
    v: &[u8],
    len: usize,
) -> Result<(), SnpParseError> {
    if v.len() != len {
        return Err(SnpParseError::Field(field));
    }
    r[at..at + len].copy_from_slice(v);
    Ok(())
}

fn version_from(b: [u8; 3]) -> VersionJson {
    VersionJson {
        build: b[0],
        minor: b[1],
        major: b[2],
    }
}

impl ReportJson {
    /// The serde form of a parsed report.
    pub fn from_report(report: &SnpReport) -> Result<Self, SnpParseError> {
        let r = report.as_bytes();
        let version = report.version();
        let v3 = version >= 3;
        let v5 = version >= 5;
        let cpuid = v3.then(|| (r[off::CPUID_FAM], r[off::CPUID_MOD]));
        let layout = tcb_layout(version, cpuid, &r[off::CHIP_ID..off::CHIP_ID + 64])?;
        let u32_at = |at| u32::from_le_bytes(bytes(r, at));
        let u64_at = |at| u64::from_le_bytes(bytes(r, at));
        let tcb = |at| tcb_from(bytes(r, at), layout);
        let vec = |at: usize, len: usize| r[at..at + len].to_vec();
        Ok(ReportJson {
            version,
            guest_svn: u32_at(off::GUEST_SVN),
            policy: u64_at(off::POLICY),
            family_id: vec(off::FAMILY_ID, 16),
            image_id: vec(off::IMAGE_ID, 16),
            vmpl: u32_at(off::VMPL),
            sig_algo: u32_at(off::SIG_ALGO),
            current_tcb: tcb(off::CURRENT_TCB),
            plat_info: u64_at(off::PLAT_INFO),
            key_info: u32_at(off::KEY_INFO),
            report_data: vec(off::REPORT_DATA, 64),
            measurement: vec(off::MEASUREMENT, 48),
            host_data: vec(off::HOST_DATA, 32),
            id_key_digest: vec(off::ID_KEY_DIGEST, 48),
            author_key_digest: vec(off::AUTHOR_KEY_DIGEST, 48),
            report_id: vec(off::REPORT_ID, 32),
            report_id_ma: vec(off::REPORT_ID_MA, 32),
            reported_tcb: tcb(off::REPORTED_TCB),
            cpuid_fam_id: v3.then(|| r[off::CPUID_FAM]),
            cpuid_mod_id: v3.then(|| r[off::CPUID_MOD]),
            cpuid_step: v3.then(|| r[off::CPUID_STEP]),
            chip_id: vec(off::CHIP_ID, 64),
            committed_tcb: tcb(off::COMMITTED_TCB),
            current: version_from(bytes(r, off::CURRENT)),
            committed: version_from(bytes(r, off::COMMITTED)),
            launch_tcb: tcb(off::LAUNCH_TCB),
            launch_mit_vector: v5.then(|| u64_at(off::LAUNCH_MIT)),
            current_mit_vector: v5.then(|| u64_at(off::CURRENT_MIT)),
            signature: SignatureJson {
                r: vec(off::SIG_R, 72),
                s: vec(off::SIG_S, 72),
            },
        })
    }

    /// The raw report (reserved bytes zero), parsed.
    pub fn to_report(&self) -> Result<SnpReport, SnpParseError> {
        let mut r = [0u8; REPORT_LEN];
        let cpuid = match (self.cpuid_fam_id, self.cpuid_mod_id) {
            (Some(f), Some(m)) => Some((f, m)),
            _ => None,
        };
        if self.chip_id.len() != 64 {
            return Err(SnpParseError::Field("chip_id"));
        }
        let layout = tcb_layout(self.version, cpuid, &self.chip_id)?;
        r[0..4].copy_from_slice(&self.version.to_le_bytes());
        r[off::GUEST_SVN..off::GUEST_SVN + 4].copy_from_slice(&self.guest_svn.to_le_bytes());
        r[off::POLICY..off::POLICY + 8].copy_from_slice(&self.policy.to_le_bytes());
        put(&mut r, off::FAMILY_ID, "family_id", &self.family_id, 16)?;
        put(&mut r, off::IMAGE_ID, "image_id", &self.image_id, 16)?;
        r[off::VMPL..off::VMPL + 4].copy_from_slice(&self.vmpl.to_le_bytes());
        r[off::SIG_ALGO..off::SIG_ALGO + 4].copy_from_slice(&self.sig_algo.to_le_bytes());
        let tcbs = [
            (off::CURRENT_TCB, &self.current_tcb),
            (off::REPORTED_TCB, &self.reported_tcb),
            (off::COMMITTED_TCB, &self.committed_tcb),
            (off::LAUNCH_TCB, &self.launch_tcb),
        ];
        for (at, t) in tcbs {
            r[at..at + 8].copy_from_slice(&tcb_to(t, layout));
        }
        r[off::PLAT_INFO..off::PLAT_INFO + 8].copy_from_slice(&self.plat_info.to_le_bytes());
        r[off::KEY_INFO..off::KEY_INFO + 4].copy_from_slice(&self.key_info.to_le_bytes());
        put(
            &mut r,
            off::REPORT_DATA,
            "report_data",
            &self.report_data,
            64,
        )?;
        put(
            &mut r,
            off::MEASUREMENT,
            "measurement",
            &self.measurement,
            48,
        )?;
        put(&mut r, off::HOST_DATA, "host_data", &self.host_data, 32)?;
        put(
            &mut r,
            off::ID_KEY_DIGEST,
            "id_key_digest",
            &self.id_key_digest,
            48,
        )?;
        put(
            &mut r,
            off::AUTHOR_KEY_DIGEST,
            "author_key_digest",
            &self.author_key_digest,
            48,
        )?;
        put(&mut r, off::REPORT_ID, "report_id", &self.report_id, 32)?;
        put(
            &mut r,
            off::REPORT_ID_MA,
            "report_id_ma",
            &self.report_id_ma,
            32,
        )?;
        if self.version >= 3 {
            r[off::CPUID_FAM] = self.cpuid_fam_id.unwrap_or(0);
            r[off::CPUID_MOD] = self.cpuid_mod_id.unwrap_or(0);
            r[off::CPUID_STEP] = self.cpuid_step.unwrap_or(0);
        }
        put(&mut r, off::CHIP_ID, "chip_id", &self.chip_id, 64)?;
        for (at, v) in [
            (off::CURRENT, &self.current),
            (off::COMMITTED, &self.committed),
        ] {
            r[at..at + 3].copy_from_slice(&[v.build, v.minor, v.major]);
        }
        if self.version >= 5 {
            let launch = self.launch_mit_vector.unwrap_or(0).to_le_bytes();
            let current = self.current_mit_vector.unwrap_or(0).to_le_bytes();
            r[off::LAUNCH_MIT..off::LAUNCH_MIT + 8].copy_from_slice(&launch);
            r[off::CURRENT_MIT..off::CURRENT_MIT + 8].copy_from_slice(&current);
        }
        put(&mut r, off::SIG_R, "signature.r", &self.signature.r, 72)?;
        put(&mut r, off::SIG_S, "signature.s", &self.signature.s, 72)?;
        SnpReport::parse(&r)
    }
}

impl CertEntryJson {
    /// The entry for a certificate-table entry (known GUIDs by name, others as `OTHER`).
    pub fn from_entry(e: &CertEntry) -> Self {
        let cert_type = match e.guid.as_str() {
            guid::ARK => CertTypeJson::Ark,
            guid::ASK => CertTypeJson::Ask,
            guid::VCEK => CertTypeJson::Vcek,
            guid::VLEK => CertTypeJson::Vlek,
            guid::CRL => CertTypeJson::Crl,
            other => CertTypeJson::Other(other.to_string()),
        };
        CertEntryJson {
            cert_type,
            data: e.data.clone(),
        }
    }

    /// The certificate-table entry, by GUID.
    pub fn to_entry(&self) -> Result<CertEntry, SnpParseError> {
        let guid = match &self.cert_type {
            CertTypeJson::Ark => guid::ARK.to_string(),
            CertTypeJson::Ask => guid::ASK.to_string(),
            CertTypeJson::Vcek => guid::VCEK.to_string(),
            CertTypeJson::Vlek => guid::VLEK.to_string(),
            CertTypeJson::Crl => guid::CRL.to_string(),
            CertTypeJson::Other(g) => {
                let g = g.to_ascii_lowercase();
                if super::snp::guid_bytes(&g).is_none() {
                    return Err(SnpParseError::Field("cert_chain.cert_type"));
                }
                g
            }
            CertTypeJson::Empty => return Err(SnpParseError::Field("cert_chain.cert_type")),
        };
        Ok(CertEntry {
            guid,
            data: self.data.clone(),
        })
    }
}

/// A certificate chain in Trustee's form, as a certificate table.
pub fn cert_table_from_chain(chain: &[CertEntryJson]) -> Result<CertTable, SnpParseError> {
    if chain.len() > super::snp::MAX_CERT_ENTRIES {
        return Err(SnpParseError::CertTableUnterminated);
    }
    let mut entries: Vec<CertEntry> = Vec::with_capacity(chain.len());
    for c in chain {
        let e = c.to_entry()?;
        if entries.iter().any(|x| x.guid == e.guid) {
            return Err(SnpParseError::CertDuplicate(e.guid));
        }
        entries.push(e);
    }
    Ok(CertTable { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: u32, fam: u8, model: u8, chip: [u8; 64]) -> SnpReport {
        let turin = fam == 0x1A || (version == 2 && chip[8..] == [0; 56] && chip != [0; 64]);
        let tcb = if turin {
            [1, 2, 3, 4, 0, 0, 0, 6]
        } else {
            [1, 2, 0, 0, 0, 0, 5, 6]
        };
        let mut r = [0u8; REPORT_LEN];
        r[0..4].copy_from_slice(&version.to_le_bytes());
        r[off::SIG_ALGO] = 1;
        r[off::CPUID_FAM] = fam;
        r[off::CPUID_MOD] = model;
        r[off::CHIP_ID..off::CHIP_ID + 64].copy_from_slice(&chip);
        r[off::REPORTED_TCB..off::REPORTED_TCB + 8].copy_from_slice(&tcb);
        r[off::CURRENT..off::CURRENT + 3].copy_from_slice(&[7, 8, 9]);
        r[off::SIG_R] = 0xAA;
        SnpReport::parse(&r).unwrap()
    }

    #[test]
    fn round_trips_every_version_and_layout() {
        let mut turin_chip = [0u8; 64];
        turin_chip[..8].copy_from_slice(&[1; 8]);
        for (r, fmc) in [
            (report(2, 0, 0, [3; 64]), None),
            (report(2, 0, 0, turin_chip), Some(1)),
            (report(3, 0x19, 0x01, [3; 64]), None),
            (report(5, 0x1A, 0x02, turin_chip), Some(1)),
        ] {
            let j = ReportJson::from_report(&r).unwrap();
            assert_eq!(j.reported_tcb.fmc, fmc);
            assert_eq!(j.current.build, 7);
            assert_eq!(j.current.major, 9);
            assert_eq!(j.cpuid_fam_id.is_some(), r.version() >= 3);
            assert_eq!(j.launch_mit_vector.is_some(), r.version() >= 5);
            let back = j.to_report().unwrap();
            assert_eq!(back.as_bytes(), r.as_bytes());
        }
    }

    #[test]
    fn refuses_what_sev_refuses_and_bad_lengths() {
        assert!(matches!(
            ReportJson::from_report(&report(2, 0, 0, [0; 64])),
            Err(SnpParseError::MaskedChipId)
        ));
        assert!(matches!(
            ReportJson::from_report(&report(3, 0x17, 0, [3; 64])),
            Err(SnpParseError::UnknownProcessor { family: 0x17, .. })
        ));
        let mut j = ReportJson::from_report(&report(3, 0x19, 0x11, [3; 64])).unwrap();
        j.measurement.pop();
        assert!(matches!(
            j.to_report(),
            Err(SnpParseError::Field("measurement"))
        ));
    }

    #[test]
    fn cert_types_by_name_and_guid() {
        let table = CertTable {
            entries: vec![
                CertEntry {
                    guid: guid::VLEK.into(),
                    data: vec![1],
                },
                CertEntry {
                    guid: "11111111-2222-3333-4444-555555555555".into(),
                    data: vec![2],
                },
            ],
        };
        let chain: Vec<CertEntryJson> = table
            .entries
            .iter()
            .map(CertEntryJson::from_entry)
            .collect();
        let v = serde_json::to_value(&chain).unwrap();
        assert_eq!(v[0]["cert_type"], "VLEK");
        assert_eq!(
            v[1]["cert_type"]["OTHER"],
            "11111111-2222-3333-4444-555555555555"
        );
        assert_eq!(cert_table_from_chain(&chain).unwrap(), table);
        let dup = vec![chain[0].clone(), chain[0].clone()];
        assert!(matches!(
            cert_table_from_chain(&dup),
            Err(SnpParseError::CertDuplicate(_))
        ));
    }
}
