//! The SEV-SNP launch measurement QEMU + OVMF produce, computed offline from the firmware image,
//! the kernel/initrd/command-line hashes, the vCPU count and type, and the guest features.
//!
//! The launch digest is extended page by page as the SEV-SNP ABI's `SNP_LAUNCH_UPDATE` does
//! (`PAGE_INFO`: current digest, contents digest, length 0x70, page type, GPA): the OVMF image
//! as normal pages, then each OVMF SEV metadata section (zero, secrets, CPUID pages, the kernel
//! hashes page), then one VMSA page per vCPU. The `sev` crate parses the OVMF image and builds
//! the VMSAs; this file owns the page walk (so that `--verbose` can show it), the inputs and the
//! SEV hashes table QEMU writes into the `SNP_KERNEL_HASHES` page, built from its documented
//! layout. The command line is hashed exactly as QEMU does: its bytes as given (no trimming)
//! and a NUL.

use std::path::PathBuf;

use sev::measurement::ovmf::{SectionType, OVMF};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType, VMSA};
use sev::parser::ByteParser;
use sha2::{Digest, Sha256, Sha384};
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

const PAGE: usize = 4096;
/// The GPA the RMP records VMSA pages at.
const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// Why a measurement could not be computed.
#[derive(Debug, Error)]
pub enum SnpMeasureError {
    /// The vCPU type is not one the measurement knows.
    #[error("unknown vCPU type {0:?} (e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa, EPYC-Turin)")]
    VcpuType(String),
    /// The guest features value is not a number in the documented format.
    #[error("guest features {0:?} is not a number: decimal, or hex with 0x (as sev-snp-measure reads it)")]
    GuestFeatures(String),
    /// The vCPU count is zero.
    #[error("the vCPU count must be at least 1")]
    NoVcpus,
    /// An input that is only measured with a kernel was given without one.
    #[error("{0} is only measured with --kernel (direct boot); give --kernel or drop {0}")]
    NeedsKernel(&'static str),
    /// A file could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which input.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The OVMF image has no SEV metadata, or the `sev` crate's VMSA build failed.
    #[error("SNP measurement failed")]
    Measurement(#[source] sev::error::MeasurementError),
    /// Direct boot, but the OVMF image has no `SNP_KERNEL_HASHES` section to measure it in.
    #[error("the OVMF image has no SNP_KERNEL_HASHES section: it cannot measure --kernel, --initrd or --append (direct boot)")]
    NoKernelHashesSection,
    /// A section or table entry of the OVMF image is not page-shaped.
    #[error("OVMF SEV metadata section at {gpa:#x} ({size} bytes) is not whole pages")]
    SectionSize {
        /// The section's GPA.
        gpa: u64,
        /// Its size.
        size: u64,
    },
}

impl Classify for SnpMeasureError {
    fn kind(&self) -> Kind {
        match self {
            SnpMeasureError::VcpuType(_)
            | SnpMeasureError::GuestFeatures(_)
            | SnpMeasureError::NoVcpus
            | SnpMeasureError::NeedsKernel(_)
            | SnpMeasureError::Measurement(_)
            | SnpMeasureError::NoKernelHashesSection
            | SnpMeasureError::SectionSize { .. } => Kind::InvalidArgument,
            SnpMeasureError::Read { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Kind::NotFound
            }
            SnpMeasureError::Read { .. } => Kind::Internal,
        }
    }
}

/// Parses a guest-features value: decimal (`33`), or hex with a `0x` prefix (`0x21`), as
/// `sev-snp-measure --guest-features` reads it.
pub fn parse_guest_features(s: &str) -> Result<u64, SnpMeasureError> {
    let bad = || SnpMeasureError::GuestFeatures(s.to_string());
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) if !h.is_empty() => u64::from_str_radix(h, 16).map_err(|_| bad()),
        Some(_) => Err(bad()),
        // Like Python's int(x, 0): no leading zeros on a decimal other than 0 itself.
        None if t.len() > 1 && t.starts_with('0') => Err(bad()),
        None => t.parse().map_err(|_| bad()),
    }
}

/// Inputs of an SNP launch measurement.
#[derive(Debug, Clone)]
pub struct SnpMeasureInput {
    /// OVMF image with SEV metadata.
    pub ovmf: PathBuf,
    /// Kernel (direct boot); requires an OVMF with an `SNP_KERNEL_HASHES` section.
    pub kernel: Option<PathBuf>,
    /// Initrd (direct boot only).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`, direct boot only), hashed byte for byte.
    pub cmdline: Option<String>,
    /// vCPU count.
    pub vcpus: u32,
    /// QEMU CPU model, e.g. `EPYC-v4`.
    pub vcpu_type: String,
    /// Guest features (SEV_FEATURES); `None`: SNPActive only (0x1), QEMU's default.
    pub guest_features: Option<u64>,
}

/// One step of the page walk, for `veil measure --verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasuredPages {
    /// `Normal`, `Zero`, `Secrets`, `Cpuid` or `Vmsa`.
    pub page_type: &'static str,
    /// GPA of the first page.
    pub gpa: u64,
    /// How many pages.
    pub pages: usize,
    /// What they are (`OVMF image`, `SNP_SEC_MEMORY`, `VMSA of vCPU 0`, ...).
    pub source: String,
}

/// The SEV-SNP page types (`PAGE_TYPE` of `SNP_LAUNCH_UPDATE`).
#[derive(Clone, Copy)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Secrets = 5,
    Cpuid = 6,
}

impl PageType {
    fn name(self) -> &'static str {
        match self {
            PageType::Normal => "Normal",
            PageType::Vmsa => "Vmsa",
            PageType::Zero => "Zero",
            PageType::Secrets => "Secrets",
            PageType::Cpuid => "Cpuid",
        }
    }
}

/// The launch digest being extended, with a trace of what went in.
struct LaunchDigest<'t> {
    ld: [u8; 48],
    trace: &'t mut dyn FnMut(MeasuredPages),
}

impl LaunchDigest<'_> {
    /// `PAGE_INFO` of one page: digest so far, contents, length, type, (IMI, VMPL permissions:
    /// zero), GPA; the new digest is its SHA-384.
    fn page(&mut self, page_type: PageType, gpa: u64, contents: &[u8; 48]) {
        let mut info = Vec::with_capacity(0x70);
        info.extend_from_slice(&self.ld);
        info.extend_from_slice(contents);
        info.extend_from_slice(&0x70u16.to_le_bytes());
        info.push(page_type as u8);
        info.extend_from_slice(&[0u8; 5]);
        info.extend_from_slice(&gpa.to_le_bytes());
        self.ld.copy_from_slice(&Sha384::digest(&info));
    }

    fn record(&mut self, page_type: PageType, gpa: u64, pages: usize, source: String) {
        (self.trace)(MeasuredPages {
            page_type: page_type.name(),
            gpa,
            pages,
            source,
        });
    }

    /// Normal pages: each page's contents digest is its SHA-384.
    fn normal(&mut self, gpa: u64, data: &[u8], source: &str) -> Result<(), SnpMeasureError> {
        if data.len() % PAGE != 0 {
            return Err(SnpMeasureError::SectionSize {
                gpa,
                size: data.len() as u64,
            });
        }
        for (i, page) in data.chunks(PAGE).enumerate() {
            let d: [u8; 48] = Sha384::digest(page).into();
            self.page(PageType::Normal, gpa + (i * PAGE) as u64, &d);
        }
        self.record(PageType::Normal, gpa, data.len() / PAGE, source.into());
        Ok(())
    }

    /// Pages measured without contents (zero, secrets, CPUID): the contents digest is zero.
    fn empty(
        &mut self,
        page_type: PageType,
        gpa: u64,
        len: u64,
        source: &str,
    ) -> Result<(), SnpMeasureError> {
        if len % PAGE as u64 != 0 {
            return Err(SnpMeasureError::SectionSize { gpa, size: len });
        }
        let pages = (len / PAGE as u64) as usize;
        for i in 0..pages {
            self.page(page_type, gpa + (i * PAGE) as u64, &[0u8; 48]);
        }
        self.record(page_type, gpa, pages, source.into());
        Ok(())
    }
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, SnpMeasureError> {
    std::fs::read(path).map_err(|source| SnpMeasureError::Read {
        what,
        path: path.clone(),
        source,
    })
}

/// Computes the 48-byte SNP launch digest.
pub fn snp_launch_measurement(input: &SnpMeasureInput) -> Result<[u8; 48], SnpMeasureError> {
    snp_launch_measurement_traced(input, &mut |_| {})
}

/// [`snp_launch_measurement`], calling `trace` for each run of measured pages, in order.
pub fn snp_launch_measurement_traced(
    input: &SnpMeasureInput,
    trace: &mut dyn FnMut(MeasuredPages),
) -> Result<[u8; 48], SnpMeasureError> {
    if input.vcpus == 0 {
        return Err(SnpMeasureError::NoVcpus);
    }
    if input.kernel.is_none() {
        if input.initrd.is_some() {
            return Err(SnpMeasureError::NeedsKernel("--initrd"));
        }
        if input.cmdline.is_some() {
            return Err(SnpMeasureError::NeedsKernel("--append"));
        }
    }
    let vcpu_type = CpuType::try_from(input.vcpu_type.as_str())
        .map_err(|_| SnpMeasureError::VcpuType(input.vcpu_type.clone()))?;
    let guest_features = match input.guest_features {
        None => GuestFeatures::default(),
        Some(bits) => GuestFeatures::from_bytes(&bits.to_le_bytes())
            .map_err(|_| SnpMeasureError::GuestFeatures(format!("{bits:#x}")))?,
    };
    let ovmf = OVMF::new(input.ovmf.clone()).map_err(SnpMeasureError::Measurement)?;
    let hashes = match &input.kernel {
        None => None,
        Some(k) => {
            if !ovmf.has_metadata_section(SectionType::SnpKernelHashes) {
                return Err(SnpMeasureError::NoKernelHashesSection);
            }
            let kernel = read("kernel", k)?;
            let initrd = input
                .initrd
                .as_ref()
                .map(|p| read("initrd", p))
                .transpose()?;
            Some(sev_hashes_table(
                &kernel,
                initrd.as_deref(),
                input.cmdline.as_deref(),
            ))
        }
    };

    let mut ld = LaunchDigest {
        ld: [0u8; 48],
        trace,
    };
    ld.normal(ovmf.gpa(), ovmf.data(), "OVMF image")?;
    for desc in ovmf.metadata_items() {
        let (gpa, size) = (u64::from(desc.gpa), u64::from(desc.size));
        match desc.section_type {
            SectionType::SnpSecMemory => ld.empty(PageType::Zero, gpa, size, "SNP_SEC_MEMORY")?,
            SectionType::SnpSecrets => {
                ld.empty(PageType::Secrets, gpa, PAGE as u64, "SNP_SECRETS")?
            }
            SectionType::Cpuid => ld.empty(PageType::Cpuid, gpa, PAGE as u64, "CPUID")?,
            SectionType::SvsmCaa => ld.empty(PageType::Zero, gpa, size, "SVSM_CAA")?,
            SectionType::SnpKernelHashes => match &hashes {
                None => ld.empty(PageType::Zero, gpa, size, "SNP_KERNEL_HASHES (no kernel)")?,
                Some(table) => {
                    if size != PAGE as u64 {
                        return Err(SnpMeasureError::SectionSize { gpa, size });
                    }
                    let offset = (ovmf
                        .sev_hashes_table_gpa()
                        .map_err(|e| SnpMeasureError::Measurement(e.into()))?
                        & 0xFFF) as usize;
                    let mut page = vec![0u8; PAGE];
                    let end = (offset + table.len()).min(PAGE);
                    page[offset..end].copy_from_slice(&table[..end - offset]);
                    ld.normal(
                        gpa,
                        &page,
                        "SNP_KERNEL_HASHES (kernel, initrd, command line)",
                    )?;
                }
            },
        }
    }
    let eip = ovmf
        .sev_es_reset_eip()
        .map_err(|e| SnpMeasureError::Measurement(e.into()))?;
    let vmsa = VMSA::new(
        eip.into(),
        vcpu_type,
        VMMType::QEMU,
        Some(u64::from(input.vcpus)),
        guest_features,
    );
    let pages = vmsa
        .pages(input.vcpus as usize)
        .map_err(SnpMeasureError::Measurement)?;
    for (i, page) in pages.iter().enumerate() {
        let d: [u8; 48] = Sha384::digest(page).into();
        ld.page(PageType::Vmsa, VMSA_GPA, &d);
        ld.record(PageType::Vmsa, VMSA_GPA, 1, format!("VMSA of vCPU {i}"));
    }
    Ok(ld.ld)
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
/// The command-line hash covers the command line exactly as given — leading and trailing
/// whitespace, newlines — and its NUL terminator (`"\0"` alone when there is none); a missing
/// initrd hashes as the empty string.
pub fn sev_hashes_table(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&str>) -> Vec<u8> {
    let mut cmd = cmdline.map(|c| c.as_bytes().to_vec()).unwrap_or_default();
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

/// A minimal OVMF-shaped image: 64 KiB holding just the footer table (SEV metadata, SEV hashes
/// table and SEV-ES reset block entries) and SEV metadata with SNP_SEC_MEMORY, SNP_SECRETS,
/// CPUID and SNP_KERNEL_HASHES sections — what measurement tools read of a firmware. Debian's
/// OVMF has no SNP_KERNEL_HASHES section; tests use this one to measure direct boot.
pub fn synthetic_ovmf() -> Vec<u8> {
    const SIZE: usize = 64 * 1024;
    const META_AT: usize = 0x1000;
    let mut img = vec![0u8; SIZE];
    let sections: [(u32, u32, u32); 4] = [
        (0x0080_0000, 0x3000, 1),  // SNP_SEC_MEMORY
        (0x0080_3000, 0x1000, 2),  // SNP_SECRETS
        (0x0080_4000, 0x1000, 3),  // CPUID
        (0x0080_5000, 0x1000, 16), // SNP_KERNEL_HASHES
    ];
    let mut meta = b"ASEV".to_vec();
    meta.extend_from_slice(&(16 + 12 * sections.len() as u32).to_le_bytes());
    meta.extend_from_slice(&1u32.to_le_bytes());
    meta.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (gpa, size, kind) in sections {
        meta.extend_from_slice(&gpa.to_le_bytes());
        meta.extend_from_slice(&size.to_le_bytes());
        meta.extend_from_slice(&kind.to_le_bytes());
    }
    img[META_AT..META_AT + meta.len()].copy_from_slice(&meta);
    let entry = |data: &[u8], guid: &str| {
        let mut e = data.to_vec();
        e.extend_from_slice(&((data.len() + 18) as u16).to_le_bytes());
        e.extend_from_slice(&guid_le(guid));
        e
    };
    let mut table = Vec::new();
    table.extend(entry(
        &((SIZE - META_AT) as u32).to_le_bytes(),
        "dc886566-984a-4798-a75e-5585a7bf67cc", // OVMF SEV metadata
    ));
    let mut hashes = 0x0080_5C00u32.to_le_bytes().to_vec();
    hashes.extend_from_slice(&0x400u32.to_le_bytes());
    table.extend(entry(&hashes, "7255371f-3a3b-4b04-927b-1da6efa8d454")); // SEV hashes table
    table.extend(entry(
        &0xFFFF_F000u32.to_le_bytes(),
        "00f771de-1a7e-4fcb-890e-68c77e2fb44e", // SEV-ES reset block
    ));
    let footer_at = SIZE - 32 - 18;
    img[footer_at - table.len()..footer_at].copy_from_slice(&table);
    img[footer_at..footer_at + 2].copy_from_slice(&((table.len() + 18) as u16).to_le_bytes());
    img[footer_at + 2..footer_at + 18]
        .copy_from_slice(&guid_le("96b582de-1fb2-45f7-baea-a366c55a082d")); // footer
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};

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
        assert_eq!(&ours[34..36], &50u16.to_le_bytes());
        assert_eq!(&ours[36..68], &Sha256::digest(b"console=ttyS0 quiet\0")[..]);
        assert_eq!(&ours[68 + 18..68 + 50], &Sha256::digest(b"an initrd")[..]);
        assert_eq!(
            &ours[118 + 18..118 + 50],
            &Sha256::digest(b"a kernel image")[..]
        );
        assert!(ours[168..].iter().all(|&b| b == 0));
        assert_eq!(&ours[..4], &[0x06, 0xd6, 0x38, 0x94]);
        let theirs =
            sev::measurement::sev_hashes::SevHashes::new(k, Some(i), Some("console=ttyS0 quiet"))
                .unwrap()
                .construct_table()
                .unwrap();
        assert_eq!(ours, theirs.to_vec());
        // Unlike the sev crate, the command line's bytes are hashed as given.
        let spaced = sev_hashes_table(b"k", None, Some(" console=ttyS0 \n"));
        assert_eq!(&spaced[36..68], &Sha256::digest(b" console=ttyS0 \n\0")[..]);
    }

    fn input(dir: &std::path::Path, cmdline: Option<&str>) -> SnpMeasureInput {
        std::fs::write(dir.join("ovmf.fd"), synthetic_ovmf()).unwrap();
        std::fs::write(dir.join("k"), b"kernel").unwrap();
        std::fs::write(dir.join("i"), b"initrd").unwrap();
        SnpMeasureInput {
            ovmf: dir.join("ovmf.fd"),
            kernel: Some(dir.join("k")),
            initrd: Some(dir.join("i")),
            cmdline: cmdline.map(str::to_string),
            vcpus: 2,
            vcpu_type: "EPYC-Milan".into(),
            guest_features: None,
        }
    }

    #[test]
    fn the_page_walk_is_the_sev_crates_for_a_command_line_it_does_not_trim() {
        let dir = tempfile::tempdir().unwrap();
        let inp = input(dir.path(), Some("console=ttyS0 quiet"));
        let mut trace = Vec::new();
        let ours = snp_launch_measurement_traced(&inp, &mut |p| trace.push(p)).unwrap();
        let theirs: Vec<u8> = snp_calc_launch_digest(SnpMeasurementArgs {
            vcpus: 2,
            vcpu_type: CpuType::try_from("EPYC-Milan").unwrap(),
            ovmf_file: inp.ovmf.clone(),
            guest_features: GuestFeatures::default(),
            kernel_file: inp.kernel.clone(),
            initrd_file: inp.initrd.clone(),
            append: Some("console=ttyS0 quiet"),
            ovmf_hash_str: None,
            vmm_type: Some(VMMType::QEMU),
        })
        .unwrap()
        .try_into()
        .unwrap();
        assert_eq!(ours.to_vec(), theirs);
        let types: Vec<&str> = trace.iter().map(|p| p.page_type).collect();
        assert_eq!(
            types,
            ["Normal", "Zero", "Secrets", "Cpuid", "Normal", "Vmsa", "Vmsa"]
        );
        assert_eq!(trace[0].pages, 16);
        // A trailing newline is measured (QEMU hashes the bytes as given).
        let nl = input(dir.path(), Some("console=ttyS0 quiet\n"));
        assert_ne!(snp_launch_measurement(&nl).unwrap(), ours);
    }

    #[test]
    fn rejects_bad_and_ignored_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let mut inp = input(dir.path(), None);
        inp.vcpu_type = "Pentium".into();
        assert!(matches!(
            snp_launch_measurement(&inp),
            Err(SnpMeasureError::VcpuType(_))
        ));
        let mut zero = input(dir.path(), None);
        zero.vcpus = 0;
        assert!(matches!(
            snp_launch_measurement(&zero),
            Err(SnpMeasureError::NoVcpus)
        ));
        let mut no_kernel = input(dir.path(), Some("x"));
        no_kernel.kernel = None;
        assert!(matches!(
            snp_launch_measurement(&no_kernel),
            Err(SnpMeasureError::NeedsKernel("--initrd"))
        ));
        no_kernel.initrd = None;
        assert!(matches!(
            snp_launch_measurement(&no_kernel),
            Err(SnpMeasureError::NeedsKernel("--append"))
        ));
        let mut missing = input(dir.path(), None);
        missing.ovmf = dir.path().join("none");
        let missing = snp_launch_measurement(&missing).unwrap_err();
        assert!(matches!(missing, SnpMeasureError::Measurement(_)));
        let unread = SnpMeasureError::Read {
            what: "kernel",
            path: "k".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        for (e, k) in [
            (SnpMeasureError::VcpuType("x".into()), Kind::InvalidArgument),
            (
                SnpMeasureError::GuestFeatures("x".into()),
                Kind::InvalidArgument,
            ),
            (SnpMeasureError::NoVcpus, Kind::InvalidArgument),
            (
                SnpMeasureError::NeedsKernel("--initrd"),
                Kind::InvalidArgument,
            ),
            (unread, Kind::NotFound),
            (
                SnpMeasureError::Read {
                    what: "kernel",
                    path: "k".into(),
                    source: std::io::Error::other("x"),
                },
                Kind::Internal,
            ),
            (missing, Kind::InvalidArgument),
            (
                SnpMeasureError::NoKernelHashesSection,
                Kind::InvalidArgument,
            ),
            (
                SnpMeasureError::SectionSize { gpa: 0, size: 1 },
                Kind::InvalidArgument,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }

    #[test]
    fn guest_features_read_as_sev_snp_measure_reads_them() {
        assert_eq!(parse_guest_features("21").unwrap(), 21);
        assert_eq!(parse_guest_features("0x21").unwrap(), 0x21);
        assert_eq!(parse_guest_features("0X1").unwrap(), 1);
        assert_eq!(parse_guest_features("0").unwrap(), 0);
        for bad in ["", "0x", "021", "x21", "21h", "-1"] {
            assert!(parse_guest_features(bad).is_err(), "{bad:?}");
        }
    }
}
