//! QEMU as the VMM: the `microvm` machine for plain and simulated-TEE pods.
//!
//! microvm has no PCI and no firmware: the kernel's PVH entry is booted
//! directly and devices are virtio-mmio, announced on the kernel command line by
//! QEMU itself (`auto-kernel-cmdline`). Guest RAM is a shared memfd so that a
//! vhost-user backend (vhost-device-vsock) can map it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{Accel, RunningVm, VmSpec, Vmm, VmmError, VsockDevice};
use crate::process::{ManagedChild, SpawnOptions};

/// QEMU, found at `binary`.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// Path of `qemu-system-x86_64`.
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

/// The QEMU arguments for a microvm launch of `spec`.
pub fn microvm_args(spec: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    // No legacy PIC/RTC, no option ROMs, no ACPI: less to emulate at boot; the
    // MP table describes the CPUs. The guest powers off by rebooting, which
    // -no-reboot turns into QEMU exiting.
    //
    // Under KVM, kvmclock gives the guest its TSC frequency and the PIT stays
    // off. Under TCG there is no kvmclock: the guest needs the PIT, wired to
    // IRQ 0 through the PIC (without the PIC the kernel cannot register its
    // legacy timer interrupt, the LAPIC timer fails verification, and an idle
    // guest never wakes up). It also calibrates its TSC against the PIT, which
    // fails when the host is busy because emulated PIT reads get preempted;
    // instruction counting (-icount) runs the guest's TSC and PIT on one virtual
    // clock, which makes the calibration deterministic; sleep=on keeps idle time real.
    let (machine, cpu): (&str, &str) = match spec.accel {
        Accel::Kvm => (
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,acpi=off,memory-backend=mem",
            "host",
        ),
        Accel::Tcg => (
            "microvm,x-option-roms=off,pit=on,pic=on,rtc=off,isa-serial=on,acpi=off,memory-backend=mem",
            "max",
        ),
    };
    push(&["-M", machine, "-accel", spec.accel.qemu_name(), "-cpu", cpu]);
    if spec.accel == Accel::Tcg {
        push(&["-icount", "shift=auto,sleep=on"]);
    }
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            spec.memory_mib
        ),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &spec.kernel.display().to_string(),
        "-initrd",
        &spec.initrd.display().to_string(),
        "-append",
        &spec.cmdline,
        "-serial",
        &format!("file:{}", spec.console_log.display()),
    ]);
    match &spec.vsock {
        VsockDevice::VhostUser { socket } => push(&[
            "-chardev",
            &format!("socket,id=vsock0,path={}", socket.display()),
            "-device",
            "vhost-user-vsock-device,chardev=vsock0",
        ]),
        VsockDevice::Vhost { cid } => {
            push(&["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        }
    }
    if let Some(qmp) = &spec.qmp_socket {
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
    }
    a
}

fn require_file(what: &'static str, path: &Path) -> Result<(), VmmError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(VmmError::MissingFile {
            what,
            path: path.to_path_buf(),
        })
    }
}

impl Vmm for Qemu {
    fn launch(&self, spec: &VmSpec, opts: SpawnOptions) -> Result<Box<dyn RunningVm>, VmmError> {
        require_file("kernel", &spec.kernel)?;
        require_file("initrd", &spec.initrd)?;
        if spec.vcpus == 0 || spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(format!(
                "need at least 1 vCPU and 64 MiB (got {} vCPUs, {} MiB)",
                spec.vcpus, spec.memory_mib
            )));
        }
        let mut cmd = Command::new(&self.binary);
        cmd.args(microvm_args(spec));
        let process =
            ManagedChild::spawn("qemu", cmd, &spec.vmm_log, opts).map_err(VmmError::Spawn)?;
        Ok(Box::new(QemuVm { process }))
    }
}

/// A running QEMU.
struct QemuVm {
    process: ManagedChild,
}

impl RunningVm for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
    fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.process.wait_timeout(timeout)
    }
    fn kill(&mut self) {
        self.process.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            vcpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            vsock: VsockDevice::VhostUser {
                socket: "/run/v/vhost.sock".into(),
            },
            console_log: "/run/v/console.log".into(),
            vmm_log: "/run/v/qemu.log".into(),
            qmp_socket: Some("/run/v/qmp.sock".into()),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn microvm_with_shared_memfd_ram_for_vhost_user() {
        let a = microvm_args(&spec());
        assert!(after(&a, "-M")[0].starts_with("microvm,"));
        assert!(after(&a, "-M")[0].contains("memory-backend=mem"));
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert!(
            after(&a, "-M")[0].contains("pit=on"),
            "TCG guests calibrate their TSC on the PIT"
        );
        assert_eq!(after(&a, "-icount"), ["shift=auto,sleep=on"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(
            after(&a, "-chardev"),
            ["socket,id=vsock0,path=/run/v/vhost.sock"]
        );
        assert_eq!(
            after(&a, "-device"),
            ["vhost-user-vsock-device,chardev=vsock0"]
        );
        assert_eq!(
            after(&a, "-qmp"),
            ["unix:/run/v/qmp.sock,server=on,wait=off"]
        );
        assert!(a.iter().any(|s| s == "-no-reboot"));
    }

    #[test]
    fn kernel_vhost_vsock_uses_the_cid() {
        let mut s = spec();
        s.vsock = VsockDevice::Vhost { cid: 7 };
        s.accel = Accel::Kvm;
        let a = microvm_args(&s);
        assert_eq!(after(&a, "-device"), ["vhost-vsock-device,guest-cid=7"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert!(after(&a, "-M")[0].contains("pit=off"));
        assert!(after(&a, "-icount").is_empty());
    }

    #[test]
    fn launch_refuses_missing_kernel_by_name() {
        let e = Qemu::default()
            .launch(&spec(), SpawnOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(e, VmmError::MissingFile { what: "kernel", .. }),
            "{e}"
        );
    }
}
