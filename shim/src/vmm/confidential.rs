//! Confidential-guest launch parameters: the QEMU objects that make a q35 VM
//! an AMD SEV-SNP or an Intel TDX guest.
//!
//! The command lines follow QEMU's documented form
//! (`docs/system/i386/amd-memory-encryption.rst` and `docs/system/i386/tdx.rst`):
//!
//! ```text
//! SNP: -machine q35,confidential-guest-support=sev0,memory-backend=ram1
//!      -object memory-backend-memfd,id=ram1,size=512M,share=true,prealloc=false
//!      -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000
//!      -bios OVMF.fd
//! TDX: -machine q35,kernel-irqchip=split,confidential-guest-support=tdx0
//!      -object tdx-guest,id=tdx0
//!      -bios OVMF.fd
//! ```
//!
//! Both need KVM with host support (QEMU ≥ 9.1 for SNP, ≥ 10.1 for TDX); they
//! cannot run on machines without it, so this module only builds and checks
//! the arguments. The simulated TEE does not use it: simulated pods are plain
//! microvm guests whose evidence comes from the shim's simulated firmware.

/// Which hardware TEE a q35 guest runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tee {
    /// AMD SEV-SNP.
    Snp(SnpParams),
    /// Intel TDX.
    Tdx(TdxParams),
}

/// Launch parameters of an SEV-SNP guest (`sev-snp-guest` object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpParams {
    /// Guest policy (`policy=`); 0x30000 = SMT allowed, reserved bit 17 set,
    /// debug off.
    pub policy: u64,
    /// Position of the C-bit in guest page-table entries (51 on EPYC).
    pub cbitpos: u32,
    /// Physical address bits lost to encryption.
    pub reduced_phys_bits: u32,
    /// Have QEMU add the kernel/initrd/cmdline hashes table to the measured
    /// firmware so that direct kernel boot is measured.
    pub kernel_hashes: bool,
    /// 32 bytes the host binds into the report (`host-data`, base64); used for
    /// the init-data digest.
    pub host_data_b64: Option<String>,
    /// vCPU model (`-cpu`), e.g. `EPYC-v4`; it is part of the measurement.
    pub cpu_model: String,
}

impl Default for SnpParams {
    fn default() -> Self {
        SnpParams {
            policy: 0x30000,
            cbitpos: 51,
            reduced_phys_bits: 1,
            kernel_hashes: true,
            host_data_b64: None,
            cpu_model: "EPYC-v4".into(),
        }
    }
}

/// Launch parameters of a TDX guest (`tdx-guest` object).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TdxParams {
    /// `sept-ve-disable=on`: EPT violations are not converted to #VE (what
    /// Linux guests want).
    pub sept_ve_disable: bool,
    /// `mrconfigid` (base64 of 48 bytes), bound into the TD report.
    pub mrconfigid_b64: Option<String>,
}

/// The id QEMU knows the confidential-guest object by.
pub fn object_id(tee: &Tee) -> &'static str {
    match tee {
        Tee::Snp(_) => "sev0",
        Tee::Tdx(_) => "tdx0",
    }
}

/// The `-object` value for the confidential-guest object.
pub fn object_arg(tee: &Tee) -> String {
    match tee {
        Tee::Snp(p) => {
            let mut s = format!(
                "sev-snp-guest,id=sev0,cbitpos={},reduced-phys-bits={},policy={:#x}",
                p.cbitpos, p.reduced_phys_bits, p.policy
            );
            if p.kernel_hashes {
                s.push_str(",kernel-hashes=on");
            }
            if let Some(h) = &p.host_data_b64 {
                s.push_str(&format!(",host-data={h}"));
            }
            s
        }
        Tee::Tdx(p) => {
            let mut s = String::from("tdx-guest,id=tdx0");
            if p.sept_ve_disable {
                s.push_str(",sept-ve-disable=on");
            }
            if let Some(m) = &p.mrconfigid_b64 {
                s.push_str(&format!(",mrconfigid={m}"));
            }
            s
        }
    }
}

/// The `-machine` value for a q35 confidential guest whose RAM is the memory
/// backend `mem`.
pub fn machine_arg(tee: &Tee) -> String {
    match tee {
        // SNP guest RAM must come from a memory backend the machine names.
        Tee::Snp(_) => "q35,confidential-guest-support=sev0,memory-backend=mem".into(),
        // TDX needs the split irqchip (the TDX module virtualises the LAPIC);
        // private memory is guest_memfd, allocated by QEMU itself.
        Tee::Tdx(_) => "q35,kernel-irqchip=split,confidential-guest-support=tdx0".into(),
    }
}

/// The `-cpu` value.
pub fn cpu_arg(tee: &Tee) -> String {
    match tee {
        Tee::Snp(p) => p.cpu_model.clone(),
        Tee::Tdx(_) => "host".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_object_has_the_documented_properties() {
        let tee = Tee::Snp(SnpParams::default());
        assert_eq!(
            object_arg(&tee),
            "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on"
        );
        assert_eq!(
            machine_arg(&tee),
            "q35,confidential-guest-support=sev0,memory-backend=mem"
        );
        assert_eq!(cpu_arg(&tee), "EPYC-v4");
        let with_host_data = Tee::Snp(SnpParams {
            host_data_b64: Some("AAAA".into()),
            kernel_hashes: false,
            ..SnpParams::default()
        });
        assert!(object_arg(&with_host_data).ends_with("policy=0x30000,host-data=AAAA"));
    }

    #[test]
    fn tdx_object_and_split_irqchip() {
        let tee = Tee::Tdx(TdxParams {
            sept_ve_disable: true,
            mrconfigid_b64: None,
        });
        assert_eq!(object_arg(&tee), "tdx-guest,id=tdx0,sept-ve-disable=on");
        assert!(machine_arg(&tee).contains("kernel-irqchip=split"));
        assert!(machine_arg(&tee).ends_with("confidential-guest-support=tdx0"));
        assert_eq!(object_id(&tee), "tdx0");
    }
}
