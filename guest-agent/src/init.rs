//! PID 1 duties: the guest's base mounts and becoming the reaper of orphans.
//!
//! This module owns the guest-wide mounts only; container mounts belong to the
//! container engine.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// A base mount failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot mount {fstype} on {target}")]
pub struct InitError {
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// The OS error.
    #[source]
    pub source: nix::Error,
}

/// True when this process is PID 1.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

struct BaseMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The guest's base mounts, in order.
const BASE_MOUNTS: &[BaseMount] = &[
    BaseMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    BaseMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    BaseMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    BaseMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    BaseMount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    BaseMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Mounts `/proc`, `/sys`, `/dev` (devtmpfs, devpts, shm), `/run`, `/tmp` and
/// cgroup2 on `/sys/fs/cgroup`, and enables the cgroup controllers for children.
pub fn setup_guest() -> Result<(), InitError> {
    for m in BASE_MOUNTS {
        let _ = std::fs::create_dir_all(m.target);
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    let _ = std::os::unix::fs::symlink("/dev/pts/ptmx", "/dev/ptmx");
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    Ok(())
}

/// Delegates every available controller to child cgroups. Best effort: a
/// controller the kernel lacks is simply not offered.
fn enable_cgroup_controllers(root: &Path) {
    let Ok(avail) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        return;
    };
    let wanted: Vec<String> = avail.split_whitespace().map(|c| format!("+{c}")).collect();
    if !wanted.is_empty() {
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), wanted.join(" ")) {
            tracing::warn!(error = %e, "cannot enable cgroup controllers");
        }
    }
}

/// Makes this process the reaper of its orphaned descendants (a no-op for PID 1,
/// which already is; in host mode it keeps container processes ours).
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches no
    // memory of ours; the unused arguments are ignored by the kernel.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot become child subreaper");
    }
}

/// Moves this (single-threaded) process into a new mount namespace whose
/// mounts do not propagate back to the host (host mode).
pub fn private_mount_namespace() -> Result<(), InitError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|source| InitError {
        fstype: "namespace",
        target: "/",
        source,
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|source| InitError {
        fstype: "propagation",
        target: "/",
        source,
    })
}
