//! QEMU as the VMM: the `microvm` machine for plain and simulated-TEE pods,
//! `q35` with firmware for SEV-SNP and TDX pods.
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

use super::{
    confidential::{self, Tee},
    Accel, Machine, RunningVm, VmSpec, Vmm, VmmError, VsockDevice,
};
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

/// QEMU option values are comma-separated: a literal comma is doubled.
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// The QEMU arguments for `spec`: microvm or q35 per its machine.
pub fn qemu_args(spec: &VmSpec) -> Result<Vec<String>, VmmError> {
    match &spec.machine {
        Machine::Microvm => Ok(microvm_args(spec)),
        Machine::Q35 { tee, firmware } => q35_args(spec, tee, firmware),
    }
}

/// TCG's translation cache, MiB. QEMU's default is 1 GiB, filled linearly
/// (as transparent huge pages) and only reset when full, so a pod's QEMU
/// keeps every block its guest ever translated: about 64 MiB 2 s after 10
/// pods started at once, growing further with every new guest workload, up
/// to the full GiB. The cap bounds that at the size a pod start needs;
/// smaller caps make the start itself retranslate (16 MiB: half of 10 pods
/// at once missed their boot deadline; 32 MiB: 38 MiB less per pod but
/// starts about 10–25 % slower), see `benches/README.md`, `pods`.
pub const TCG_TB_MIB: u32 = 64;

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
    // (Measured on 2 busy cores: without -icount the TSC calibration failed in
    // 8 boots out of 8, leaving the guest on a 4 ms jiffies clock.) The RTC stays
    // on under TCG: it is the guest's only wall clock, and without it the
    // kernel's early clock read spins until a timeout (about 0.7 s of boot).
    let (machine, cpu): (&str, &str) = match spec.accel {
        Accel::Kvm => (
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,acpi=off,memory-backend=mem",
            "host",
        ),
        Accel::Tcg => (
            "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off,memory-backend=mem",
            "max",
        ),
    };
    let accel = match spec.accel {
        Accel::Kvm => spec.accel.qemu_name().to_string(),
        Accel::Tcg => format!("tcg,tb-size={TCG_TB_MIB}"),
    };
    push(&["-M", machine, "-accel", &accel, "-cpu", cpu]);
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
    ]);
    common_args(spec, &mut a);
    devices(spec, Bus::Mmio, &mut a);
    a
}

/// The QEMU arguments for a q35 confidential guest (SNP or TDX): firmware,
/// the TEE object, PCI virtio devices that use the platform IOMMU (bounce
/// buffers through shared memory).
pub fn q35_args(spec: &VmSpec, tee: &Tee, firmware: &Path) -> Result<Vec<String>, VmmError> {
    if spec.accel != Accel::Kvm {
        return Err(VmmError::InvalidSpec(
            "SEV-SNP and TDX guests need KVM; TCG cannot run them".into(),
        ));
    }
    if matches!(spec.vsock, VsockDevice::VhostUser { .. }) {
        return Err(VmmError::InvalidSpec(
            "confidential guests need kernel vhost-vsock: a vhost-user backend cannot map private memory".into(),
        ));
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    push(&[
        "-machine",
        &confidential::machine_arg(tee),
        "-accel",
        "kvm",
        "-cpu",
        &confidential::cpu_arg(tee),
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    if let Tee::Snp(_) = tee {
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=true,prealloc=false",
                spec.memory_mib
            ),
        ]);
    }
    push(&[
        "-object",
        &confidential::object_arg(tee),
        "-bios",
        &escape(&firmware.display().to_string()),
    ]);
    common_args(spec, &mut a);
    devices(spec, Bus::Pci, &mut a);
    Ok(a)
}

/// QEMU's seccomp sandbox: besides its default deny list, no obsolete
/// syscalls, no setuid/setgid/capability changes, no fork/exec, no
/// scheduler/affinity changes. QEMU needs none of them once started.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Arguments every machine shares: seccomp sandbox, no defaults, kernel,
/// initrd, command line, serial console to a file, QMP.
fn common_args(spec: &VmSpec, a: &mut Vec<String>) {
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    push(&[
        "-sandbox",
        SANDBOX,
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
    if let Some(qmp) = &spec.qmp_socket {
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                escape(&qmp.display().to_string())
            ),
        ]);
    }
}

/// How virtio devices are attached: virtio-mmio (microvm) or PCI (q35, with
/// the platform IOMMU flag confidential guests need).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bus {
    Mmio,
    Pci,
}

impl Bus {
    fn device(self, kind: &str) -> String {
        match self {
            Bus::Mmio => format!("{kind}-device"),
            Bus::Pci => format!("{kind}-pci,disable-legacy=on,iommu_platform=on"),
        }
    }
}

fn devices(spec: &VmSpec, bus: Bus, a: &mut Vec<String>) {
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    match &spec.vsock {
        VsockDevice::VhostUser { socket } => push(&[
            "-chardev",
            &format!(
                "socket,id=vsock0,path={}",
                escape(&socket.display().to_string())
            ),
            "-device",
            &format!("{},chardev=vsock0", bus.device("vhost-user-vsock")),
        ]),
        VsockDevice::Vhost { cid, fd } => {
            let mut dev = format!("{},guest-cid={cid}", bus.device("vhost-vsock"));
            if let Some(fd) = fd {
                dev.push_str(&format!(",vhostfd={fd}"));
            }
            push(&["-device", &dev])
        }
    }
    if let Some((socket, tag)) = &spec.virtio_fs {
        push(&[
            "-chardev",
            &format!(
                "socket,id=fs0,path={}",
                escape(&socket.display().to_string())
            ),
            "-device",
            &format!(
                "{},chardev=fs0,tag={}",
                bus.device("vhost-user-fs"),
                escape(tag)
            ),
        ]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        let vhost = if n.vhost { ",vhost=on" } else { "" };
        push(&[
            "-netdev",
            &format!("tap,id=net{i},fd={}{vhost}", n.tap_fd),
            "-device",
            &format!(
                "{},netdev=net{i},mac={},host_mtu={}",
                bus.device("virtio-net"),
                escape(&n.mac),
                n.mtu
            ),
        ]);
    }
    if spec.scsi_controller {
        push(&[
            "-device",
            &format!("{},id=scsi0", bus.device("virtio-scsi")),
        ]);
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let ro = if d.read_only { ",readonly=on" } else { "" };
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=boot{i},format=raw{ro}",
                escape(&d.path.display().to_string())
            ),
            "-device",
            &format!(
                "{},drive=boot{i},serial={}",
                bus.device("virtio-blk"),
                escape(&d.serial)
            ),
        ]);
    }
}

/// Opens `path` read-only for a child to inherit; returns the name the child
/// opens it by (`/dev/fd/N`).
fn open_for_child(
    what: &'static str,
    path: &Path,
    files: &mut Vec<std::fs::File>,
) -> Result<PathBuf, VmmError> {
    let f = std::fs::File::open(path).map_err(|_| VmmError::MissingFile {
        what,
        path: path.to_path_buf(),
    })?;
    let name = PathBuf::from(format!("/dev/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)));
    files.push(f);
    Ok(name)
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
        if let Machine::Q35 { firmware, .. } = &spec.machine {
            require_file("firmware", firmware)?;
        }
        // A jailed QEMU reads the files it boots through descriptors the shim
        // opened, as `/dev/fd/N`: it needs no search permission on their
        // directories (shared, read-only files anywhere on the node), only
        // read permission on the files themselves.
        let mut boot_files: Vec<std::fs::File> = Vec::new();
        let jailed_spec;
        let spec = if opts.jail.is_some() {
            let mut s = spec.clone();
            s.kernel = open_for_child("kernel", &s.kernel, &mut boot_files)?;
            s.initrd = open_for_child("initrd", &s.initrd, &mut boot_files)?;
            if let Machine::Q35 { firmware, .. } = &mut s.machine {
                *firmware = open_for_child("firmware", firmware, &mut boot_files)?;
            }
            jailed_spec = s;
            &jailed_spec
        } else {
            spec
        };
        let mut cmd = Command::new(&self.binary);
        cmd.args(qemu_args(spec)?);
        let mut inherited: Vec<i32> = spec.nics.iter().map(|n| n.tap_fd).collect();
        if let VsockDevice::Vhost { fd: Some(fd), .. } = spec.vsock {
            inherited.push(fd);
        }
        inherited.extend(boot_files.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        if !inherited.is_empty() {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs between fork and exec and only calls fcntl(2), which
            // is async-signal-safe, on a vector allocated before the fork;
            // every fd is an open descriptor owned by the caller for at least
            // as long as this spawn.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &inherited {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let process =
            ManagedChild::spawn("qemu", cmd, &spec.vmm_log, opts).map_err(VmmError::Spawn)?;
        // QEMU holds its own copies now.
        drop(boot_files);
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
            machine: Machine::Microvm,
            scsi_controller: false,
            disks: Vec::new(),
            virtio_fs: None,
            nics: Vec::new(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn every_machine_runs_under_the_seccomp_sandbox() {
        assert_eq!(after(&microvm_args(&spec()), "-sandbox"), [SANDBOX]);
        for deny in ["obsolete", "elevateprivileges", "spawn", "resourcecontrol"] {
            assert!(SANDBOX.contains(&format!("{deny}=deny")), "{deny}");
        }
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
        assert_eq!(after(&a, "-accel"), [format!("tcg,tb-size={TCG_TB_MIB}")]);
        assert!(
            after(&a, "-M")[0].contains("pit=on,pic=on,rtc=on"),
            "TCG guests need the PIT on IRQ 0 and the RTC as wall clock"
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
    fn a_virtio_fs_share_is_a_vhost_user_fs_device() {
        let mut s = spec();
        s.virtio_fs = Some(("/run/v/virtiofs.sock".into(), "veil-shared".into()));
        let a = microvm_args(&s);
        assert_eq!(
            after(&a, "-chardev"),
            [
                "socket,id=vsock0,path=/run/v/vhost.sock",
                "socket,id=fs0,path=/run/v/virtiofs.sock"
            ]
        );
        assert_eq!(
            after(&a, "-device")[1],
            "vhost-user-fs-device,chardev=fs0,tag=veil-shared"
        );
    }

    #[test]
    fn tap_nics_are_virtio_net_with_mac_and_mtu() {
        let mut s = spec();
        s.nics = vec![crate::vmm::Nic {
            tap_fd: 7,
            mac: "0a:58:0a:00:00:02".into(),
            mtu: 1450,
            vhost: true,
        }];
        let a = microvm_args(&s);
        assert!(after(&a, "-netdev").contains(&"tap,id=net0,fd=7,vhost=on"));
        assert!(after(&a, "-device")
            .contains(&"virtio-net-device,netdev=net0,mac=0a:58:0a:00:00:02,host_mtu=1450"));
    }

    #[test]
    fn kernel_vhost_vsock_uses_the_cid() {
        let mut s = spec();
        s.vsock = VsockDevice::Vhost { cid: 7, fd: None };
        s.accel = Accel::Kvm;
        let a = microvm_args(&s);
        assert_eq!(after(&a, "-device"), ["vhost-vsock-device,guest-cid=7"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-accel"), ["kvm"], "KVM has no translation cache");
        assert!(after(&a, "-M")[0].contains("pit=off"));
        assert!(after(&a, "-icount").is_empty());
    }

    #[test]
    fn scsi_controller_and_boot_disks_on_virtio_mmio() {
        let mut s = spec();
        s.scsi_controller = true;
        s.disks.push(super::super::BootDisk {
            path: "/run/v/scratch,1.img".into(),
            serial: "scratch".into(),
            read_only: false,
        });
        let a = microvm_args(&s);
        assert_eq!(
            after(&a, "-device"),
            [
                "vhost-user-vsock-device,chardev=vsock0",
                "virtio-scsi-device,id=scsi0",
                "virtio-blk-device,drive=boot0,serial=scratch"
            ]
        );
        assert_eq!(
            after(&a, "-drive"),
            ["file=/run/v/scratch,,1.img,if=none,id=boot0,format=raw"]
        );
    }

    #[test]
    fn snp_guest_on_q35_in_the_documented_form() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.vsock = VsockDevice::Vhost {
            cid: 9,
            fd: Some(5),
        };
        s.scsi_controller = true;
        s.machine = Machine::Q35 {
            tee: Tee::Snp(confidential::SnpParams::default()),
            firmware: "/opt/veil/OVMF.fd".into(),
        };
        let a = qemu_args(&s).unwrap();
        assert_eq!(
            after(&a, "-machine"),
            ["q35,confidential-guest-support=sev0,memory-backend=mem"]
        );
        assert_eq!(
            after(&a, "-object"),
            [
                "memory-backend-memfd,id=mem,size=256M,share=true,prealloc=false",
                "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on"
            ]
        );
        assert_eq!(after(&a, "-bios"), ["/opt/veil/OVMF.fd"]);
        assert_eq!(after(&a, "-cpu"), ["EPYC-v4"]);
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(
            after(&a, "-device"),
            [
                "vhost-vsock-pci,disable-legacy=on,iommu_platform=on,guest-cid=9,vhostfd=5",
                "virtio-scsi-pci,disable-legacy=on,iommu_platform=on,id=scsi0"
            ]
        );
        assert!(after(&a, "-M").is_empty() && after(&a, "-icount").is_empty());
    }

    #[test]
    fn tdx_guest_on_q35_in_the_documented_form() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.vsock = VsockDevice::Vhost { cid: 4, fd: None };
        s.machine = Machine::Q35 {
            tee: Tee::Tdx(confidential::TdxParams {
                sept_ve_disable: true,
                mrconfigid_b64: None,
            }),
            firmware: "/opt/veil/OVMF.tdx.fd".into(),
        };
        let a = qemu_args(&s).unwrap();
        assert_eq!(
            after(&a, "-machine"),
            ["q35,kernel-irqchip=split,confidential-guest-support=tdx0"]
        );
        assert_eq!(
            after(&a, "-object"),
            ["tdx-guest,id=tdx0,sept-ve-disable=on"]
        );
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-bios"), ["/opt/veil/OVMF.tdx.fd"]);
    }

    #[test]
    fn confidential_guests_refuse_tcg_and_vhost_user() {
        let mut s = spec();
        s.machine = Machine::Q35 {
            tee: Tee::Snp(confidential::SnpParams::default()),
            firmware: "/f".into(),
        };
        assert!(matches!(qemu_args(&s), Err(VmmError::InvalidSpec(_))));
        s.accel = Accel::Kvm;
        assert!(matches!(qemu_args(&s), Err(VmmError::InvalidSpec(_))));
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
