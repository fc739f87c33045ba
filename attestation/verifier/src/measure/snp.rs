//! The SEV-SNP launch measurement QEMU + OVMF produce, computed offline from the firmware image,
//! the kernel/initrd/command-line hashes, the vCPU count and type, and the guest features.
//!
//! The page-by-page launch digest (OVMF metadata sections, VMSA pages per vCPU) is the `sev`
//! crate's measurement module. This file owns the inputs, errors and the SEV hashes table that
//! QEMU places in the firmware's `SNP_KERNEL_HASHES` page, built here from its documented layout
//! (and tested against the `sev` crate's own builder).

use std::path::PathBuf;

use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType};
use sev::parser::ByteParser;
use sha2::{Digest, Sha256};
use thiserror::Error;
use veil_common::{Classify, Kind};

/// GUID of the hashes table header (`9438d606-4f22-4cc9-b479-a793d411fd21`).
pub const HASHES_TABLE_GUID: &str = "9438d606-4f22-4cc9-b479-a793d411fd21";
/// GUID of the kernel command-line entry.
pub const CMDLINE_ENTRY_GUID: &str = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a";
/// GUID of the initrd entry.
pub const INITRD_ENTRY_GUID: &str = "44baf731-3a2f-4bd7-9af1-41e29169781d";
/// GUID of the kernel entry.
pub const KERNEL_ENTRY_GUID: &str = "4de79437-abd2-427f-b835-d5b172d2045b";

/// Why a measurement could not be computed.
#[derive(Debug, Error)]
pub enum SnpMeasureError {
    /// The vCPU type is not one the measurement knows.
    #[error("unknown vCPU type {0:?} (e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa, EPYC-Turin)")]
    VcpuType(String),
    /// The guest features string is not a hex number.
    #[error("guest features {0:?} is not a hex number")]
    GuestFeatures(String),
    /// The VMM type is unknown.
    #[error("unknown VMM type {0:?} (qemu, ec2, krun)")]
    Vmm(String),
    /// The vCPU count is zero.
    #[error("the vCPU count must be at least 1")]
    NoVcpus,
    /// The `sev` crate's measurement failed (missing OVMF section, unreadable file, ...).
    #[error("SNP measurement failed")]
    Measurement(#[source] sev::error::MeasurementError),
    /// The launch digest is not 48 bytes (a `sev` crate problem).
    #[error("SNP launch digest is {0} bytes, not 48")]
    DigestLength(usize),
}

impl Classify for SnpMeasureError {
    fn kind(&self) -> Kind {
        match self {
            SnpMeasureError::VcpuType(_)
            | SnpMeasureError::GuestFeatures(_)
            | SnpMeasureError::Vmm(_)
            | SnpMeasureError::NoVcpus
            | SnpMeasureError::Measurement(_) => Kind::InvalidArgument,
            SnpMeasureError::DigestLength(_) => Kind::Internal,
        }
    }
}

/// Inputs of an SNP launch measurement.
#[derive(Debug, Clone)]
pub struct SnpMeasureInput {
    /// OVMF image with SEV metadata.
    pub ovmf: PathBuf,
    /// Kernel (direct boot); requires an OVMF with an `SNP_KERNEL_HASHES` section.
    pub kernel: Option<PathBuf>,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    pub cmdline: Option<String>,
    /// vCPU count.
    pub vcpus: u32,
    /// QEMU CPU model, e.g. `EPYC-v4`.
    pub vcpu_type: String,
    /// Guest features as hex (`0x1` = SNPActive, the default).
    pub guest_features: Option<String>,
    /// VMM (`qemu` by default, which is what veil launches). Note: for `ec2`, the `sev` crate
    /// 8.0 and `sev-snp-measure` disagree; veil's tests only vouch for `qemu`.
    pub vmm: Option<String>,
}

fn parse_cpu_type(name: &str) -> Result<CpuType, SnpMeasureError> {
    CpuType::try_from(name).map_err(|_| SnpMeasureError::VcpuType(name.to_string()))
}

/// Computes the 48-byte SNP launch digest.
pub fn snp_launch_measurement(input: &SnpMeasureInput) -> Result<[u8; 48], SnpMeasureError> {
    if input.vcpus == 0 {
        return Err(SnpMeasureError::NoVcpus);
    }
    let vcpu_type = parse_cpu_type(&input.vcpu_type)?;
    let guest_features = match &input.guest_features {
        None => GuestFeatures::default(),
        Some(s) => {
            let bits = u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .map_err(|_| SnpMeasureError::GuestFeatures(s.clone()))?;
            GuestFeatures::from_bytes(&bits.to_le_bytes())
                .map_err(|_| SnpMeasureError::GuestFeatures(s.clone()))?
        }
    };
    let vmm_type = match input.vmm.as_deref() {
        None => None,
        Some(v) => Some(
            v.parse::<VMMType>()
                .map_err(|_| SnpMeasureError::Vmm(v.to_string()))?,
        ),
    };
    let args = SnpMeasurementArgs {
        vcpus: input.vcpus,
        vcpu_type,
        ovmf_file: input.ovmf.clone(),
        guest_features,
        kernel_file: input.kernel.clone(),
        initrd_file: input.initrd.clone(),
        append: input.cmdline.as_deref(),
        ovmf_hash_str: None,
        vmm_type,
    };
    let ld = snp_calc_launch_digest(args).map_err(SnpMeasureError::Measurement)?;
    let v: Vec<u8> = ld.try_into().map_err(SnpMeasureError::Measurement)?;
    let len = v.len();
    v.try_into().map_err(|_| SnpMeasureError::DigestLength(len))
}

fn guid_le(text: &str) -> [u8; 16] {
    // GUIDs here are constants; the conversion cannot fail for them.
    veil_attestation::evidence::snp::guid_bytes(text).unwrap_or([0u8; 16])
}

/// The SEV hashes table QEMU writes for direct kernel boot, padded to 16 bytes:
///
/// ```text
/// header: guid(9438d606-…) [16, little-endian GUID] | length u16 = 168
/// entry ×3 (cmdline, initrd, kernel): guid [16] | length u16 = 50 | SHA-256 [32]
/// padding: zeros to a multiple of 16 (176 bytes in all)
/// ```
///
/// The command-line hash covers the trimmed string and its NUL terminator (`"\0"` alone when
/// there is none); a missing initrd hashes as the empty string.
pub fn sev_hashes_table(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&str>) -> Vec<u8> {
    let mut cmd = cmdline
        .map(|c| c.trim().as_bytes().to_vec())
        .unwrap_or_default();
    cmd.push(0);
    let entries = [
        (CMDLINE_ENTRY_GUID, Sha256::digest(&cmd)),
        (INITRD_ENTRY_GUID, Sha256::digest(initrd.unwrap_or(&[]))),
        (KERNEL_ENTRY_GUID, Sha256::digest(kernel)),
    ];
    let mut t = Vec::with_capacity(176);
    t.extend_from_slice(&guid_le(HASHES_TABLE_GUID));
    t.extend_from_slice(&168u16.to_le_bytes());
    for (g, h) in entries {
        t.extend_from_slice(&guid_le(g));
        t.extend_from_slice(&50u16.to_le_bytes());
        t.extend_from_slice(&h);
    }
    t.resize(t.len().div_ceil(16) * 16, 0);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_table_matches_documented_layout_and_sev_crate() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        let i = dir.path().join("i");
        std::fs::write(&k, b"a kernel image").unwrap();
        std::fs::write(&i, b"an initrd").unwrap();
        let ours = sev_hashes_table(
            b"a kernel image",
            Some(b"an initrd"),
            Some("console=ttyS0 quiet"),
        );
        assert_eq!(ours.len(), 176);
        assert_eq!(&ours[16..18], &168u16.to_le_bytes());
        // cmdline entry at 18: guid, length 50, SHA-256("console=ttyS0 quiet\0")
        assert_eq!(&ours[34..36], &50u16.to_le_bytes());
        assert_eq!(&ours[36..68], &Sha256::digest(b"console=ttyS0 quiet\0")[..]);
        assert_eq!(&ours[68 + 18..68 + 50], &Sha256::digest(b"an initrd")[..]);
        assert_eq!(
            &ours[118 + 18..118 + 50],
            &Sha256::digest(b"a kernel image")[..]
        );
        assert!(ours[168..].iter().all(|&b| b == 0));
        // first GUID bytes are the little-endian form of 9438d606
        assert_eq!(&ours[..4], &[0x06, 0xd6, 0x38, 0x94]);
        let theirs =
            sev::measurement::sev_hashes::SevHashes::new(k, Some(i), Some("console=ttyS0 quiet"))
                .unwrap()
                .construct_table()
                .unwrap();
        assert_eq!(ours, theirs.to_vec());
    }

    #[test]
    fn rejects_bad_inputs() {
        let input = SnpMeasureInput {
            ovmf: "/nonexistent".into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            vcpus: 1,
            vcpu_type: "Pentium".into(),
            guest_features: None,
            vmm: None,
        };
        assert!(matches!(
            snp_launch_measurement(&input),
            Err(SnpMeasureError::VcpuType(_))
        ));
        let mut zero = input.clone();
        zero.vcpus = 0;
        assert!(matches!(
            snp_launch_measurement(&zero),
            Err(SnpMeasureError::NoVcpus)
        ));
        let mut good_cpu = input.clone();
        good_cpu.vcpu_type = "EPYC-v4".into();
        let missing = snp_launch_measurement(&good_cpu).unwrap_err();
        assert!(matches!(missing, SnpMeasureError::Measurement(_)));
        for (e, k) in [
            (SnpMeasureError::VcpuType("x".into()), Kind::InvalidArgument),
            (
                SnpMeasureError::GuestFeatures("x".into()),
                Kind::InvalidArgument,
            ),
            (SnpMeasureError::Vmm("x".into()), Kind::InvalidArgument),
            (SnpMeasureError::NoVcpus, Kind::InvalidArgument),
            (missing, Kind::InvalidArgument),
            (SnpMeasureError::DigestLength(1), Kind::Internal),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
