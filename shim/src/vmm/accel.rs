//! Choosing the accelerator: KVM when it can really run a guest, TCG otherwise.
//!
//! On nested or paravirtualised hosts `/dev/kvm` can exist and still fail to run
//! a Linux guest ("KVM internal error" on XRSTOR or INT3): QEMU would then hang
//! or die mid-boot. `accel = "auto"` therefore runs a canary guest through
//! `kvm-ioctls` first — a few real-mode instructions that take a software
//! interrupt (INT3 through the IVT) and do an XSAVE/XRSTOR round trip — and uses
//! KVM only when the canary reports back exactly as expected.

use std::{sync::mpsc, thread, time::Duration};

use kvm_bindings::{kvm_userspace_memory_region, kvm_xcrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};

/// The accelerator QEMU is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name for it (`-accel NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator setting from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Run the KVM canary and fall back to TCG if it fails.
    #[default]
    Auto,
    /// Always KVM (fails at VM start if KVM cannot run the guest).
    Kvm,
    /// Always TCG.
    Tcg,
}

/// Why the KVM canary failed.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while setting up the canary.
    #[error("KVM set-up failed at {step}")]
    Setup {
        /// Which step.
        step: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map canary guest memory")]
    Memory(#[source] std::io::Error),
    /// The canary guest stopped in an unexpected way.
    #[error("canary guest misbehaved: {0}")]
    Unexpected(String),
    /// The canary guest did not finish in time.
    #[error("canary guest did not finish within {0:?}")]
    Timeout(Duration),
}

/// Resolves the configured choice to the accelerator to use, running the
/// canary for `Auto`. The reason for a fallback is logged.
pub fn resolve(choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => match kvm_canary(Duration::from_secs(2)) {
            Ok(()) => Accel::Kvm,
            Err(e) => {
                tracing::info!(reason = %crate::error_chain(&e), "KVM cannot run guests here; using TCG");
                Accel::Tcg
            }
        },
    }
}

const MEM_SIZE: usize = 0x10000;
const CODE_ADDR: usize = 0x1000;
const INT3_HANDLER_ADDR: usize = 0x2000;
const XSAVE_AREA: u16 = 0x3000;
const REPORT_PORT: u16 = 0x10;
const HANDLER_MARK: u8 = 0x33;
const DONE_MARK: u8 = 0x42;

/// Real-mode canary code at `CODE_ADDR`.
fn canary_code() -> Vec<u8> {
    let [lo, hi] = XSAVE_AREA.to_le_bytes();
    vec![
        0xCC, // int3 -> handler reports HANDLER_MARK, iret
        0x66,
        0xB8,
        0x03,
        0x00,
        0x00,
        0x00, // mov eax, 3 (x87 | SSE)
        0x66,
        0x31,
        0xD2, // xor edx, edx
        0x0F,
        0xAE,
        0x26,
        lo,
        hi, // xsave [XSAVE_AREA]
        0x0F,
        0xAE,
        0x2E,
        lo,
        hi, // xrstor [XSAVE_AREA]
        0xB0,
        DONE_MARK, // mov al, DONE_MARK
        0xE6,
        REPORT_PORT as u8, // out REPORT_PORT, al
        0xF4,              // hlt
    ]
}

/// INT3 handler at `INT3_HANDLER_ADDR`.
fn handler_code() -> Vec<u8> {
    vec![0xB0, HANDLER_MARK, 0xE6, REPORT_PORT as u8, 0xCF] // mov al, mark; out; iret
}

/// Runs the canary guest; `Ok` means KVM ran it exactly as expected.
pub fn kvm_canary(timeout: Duration) -> Result<(), CanaryError> {
    let (tx, rx) = mpsc::channel();
    // The vCPU thread is detached: if KVM wedges, the thread is abandoned and
    // the caller still gets an answer (TCG) instead of hanging.
    thread::spawn(move || {
        let _ = tx.send(run_canary());
    });
    rx.recv_timeout(timeout)
        .unwrap_or(Err(CanaryError::Timeout(timeout)))
}

fn run_canary() -> Result<(), CanaryError> {
    let setup = |step| move |source| CanaryError::Setup { step, source };
    let kvm = Kvm::new().map_err(CanaryError::Open)?;
    let vm = kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?;
    let mut mem = GuestMem::new(MEM_SIZE)?;
    mem.write(CODE_ADDR, &canary_code());
    mem.write(INT3_HANDLER_ADDR, &handler_code());
    // IVT entry 3: offset, segment.
    mem.write(
        3 * 4,
        &[
            (INT3_HANDLER_ADDR & 0xff) as u8,
            (INT3_HANDLER_ADDR >> 8) as u8,
            0,
            0,
        ],
    );
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.addr(),
        flags: 0,
    };
    // SAFETY: the region points at `mem`, a live private anonymous mapping of
    // MEM_SIZE bytes that outlives the VM (it is dropped after `vm` and `vcpu`
    // at the end of this function, as locals drop in reverse order).
    unsafe { vm.set_user_memory_region(region) }.map_err(setup("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(setup("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    sregs.ss.base = 0;
    sregs.ss.selector = 0;
    sregs.cr4 |= 1 << 18; // CR4.OSXSAVE
    vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = 0x3; // x87 | SSE
    vcpu.set_xcrs(&xcrs).map_err(setup("KVM_SET_XCRS"))?;
    let mut regs = vcpu.get_regs().map_err(setup("KVM_GET_REGS"))?;
    regs.rip = CODE_ADDR as u64;
    regs.rsp = 0x8000;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(setup("KVM_SET_REGS"))?;

    let mut marks = Vec::new();
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(REPORT_PORT, data)) => {
                marks.push(data.first().copied().unwrap_or(0))
            }
            Ok(VcpuExit::Hlt) => {
                return if marks == [HANDLER_MARK, DONE_MARK] {
                    Ok(())
                } else {
                    Err(CanaryError::Unexpected(format!(
                        "halted after reports {marks:02x?}"
                    )))
                };
            }
            Ok(exit) => return Err(CanaryError::Unexpected(format!("exit {exit:?}"))),
            Err(e) => return Err(CanaryError::Unexpected(format!("KVM_RUN failed: {e}"))),
        }
    }
    Err(CanaryError::Unexpected(format!(
        "no halt; reports {marks:02x?}"
    )))
}

/// A private anonymous mapping used as canary guest RAM.
struct GuestMem {
    ptr: *mut libc::c_void,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self, CanaryError> {
        // SAFETY: an anonymous private mapping with no address hint; the result
        // is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CanaryError::Memory(std::io::Error::last_os_error()));
        }
        Ok(GuestMem { ptr, len })
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len,
            "canary write out of bounds"
        );
        // SAFETY: the range was just checked to lie inside the mapping, which is
        // writable and exclusively borrowed through `&mut self`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.cast::<u8>().add(offset),
                bytes.len(),
            )
        };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `new`, unmapped once here.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_code_ends_in_hlt_and_handler_in_iret() {
        assert_eq!(canary_code().last(), Some(&0xF4));
        assert_eq!(handler_code().last(), Some(&0xCF));
    }

    #[test]
    fn explicit_choices_skip_the_canary() {
        assert_eq!(resolve(AccelChoice::Tcg), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm), Accel::Kvm);
    }
}
