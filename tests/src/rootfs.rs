//! Container root filesystems for tests: a busybox tree built from Debian's
//! `busybox-static` (`/bin/busybox`), an ext4 image of it, and a runc-like
//! default OCI runtime spec to run in it. Shared by the agent's and the shim's
//! tests.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The static busybox the rootfs is built from.
pub const BUSYBOX: &str = "/bin/busybox";

/// Builds a busybox root filesystem in `dir` (created if needed): `/bin` with
/// busybox and a symlink per applet, `/etc/passwd` and `/etc/group` with root,
/// `user` (1000) and `nobody`, and empty `/proc`, `/sys`, `/dev`, `/tmp`.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let bb = Path::new(BUSYBOX);
    if !bb.is_file() {
        bail!("{BUSYBOX} is missing: install Debian's busybox-static (ci/setup.sh does)");
    }
    let list = Command::new(bb)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    if !list.status.success() {
        bail!("{BUSYBOX} --list failed: is it busybox-static?");
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "home",
        "run", "var",
    ] {
        fs::create_dir_all(dir.join(d))
            .with_context(|| format!("creating {d} in {}", dir.display()))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let target = dir.join("bin/busybox");
    fs::copy(bb, &target).with_context(|| format!("copying busybox into {}", dir.display()))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link)?;
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nnobody:x:65534:\n",
    )?;
    Ok(())
}

/// Makes an ext4 image of `src` at `out` (`mkfs.ext4 -d`), `size_mib` large.
pub fn ext4_image(src: &Path, out: &Path, size_mib: u32) -> Result<()> {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(src)
        .arg(out)
        .arg(format!("{size_mib}M"))
        .status()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !status.success() {
        bail!("mkfs.ext4 -d {} {} failed", src.display(), out.display());
    }
    Ok(())
}

/// The capabilities runc and containerd give a container by default.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// An initrd with `a`'s agent as `/init` and a busybox ext4 image at
/// `/images/busybox.img` (an `IMAGE_FILE` storage the agent accepts from the
/// measured initrd), built in `dir`.
pub fn agent_initrd_with_busybox(a: &crate::Artefacts, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("busybox");
    busybox_rootfs(&tree)?;
    let img = dir.join("busybox.img");
    ext4_image(&tree, &img, 16)?;
    let out = dir.join("initrd.cpio");
    let st = Command::new(crate::workspace_root().join("rootfs/build.sh"))
        .arg("--init")
        .arg(&a.agent)
        .arg("--out")
        .arg(&out)
        .arg("--add")
        .arg(format!("{}:/images/busybox.img", img.display()))
        .status()
        .context("running rootfs/build.sh")?;
    if !st.success() {
        bail!("rootfs/build.sh failed");
    }
    Ok(out)
}

/// A runc-like default OCI runtime spec running `args` as root in `/`, with
/// new mount, PID, IPC, UTS and network namespaces, the usual mounts, masked
/// and read-only paths and the default capabilities. Tests edit the JSON.
pub fn default_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "veil-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
