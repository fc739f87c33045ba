//! The container process's filesystem: its mount namespace's propagation, the
//! spec's mounts under the rootfs, device nodes, `pivot_root`, sysctls, masked
//! and read-only paths. Runs in the container process only.

use std::{
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::symlink,
    },
    path::{Component, Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sys::stat::{makedev, mknod, Mode, SFlag},
    unistd::{chdir, chown, pivot_root, sethostname, Gid, Uid},
};

use super::wire::{InitSetup, MountPlan};

/// Devices every container gets when its `/dev` is a fresh tmpfs.
const DEFAULT_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Most symlinks followed when resolving a path inside the rootfs.
const MAX_SYMLINKS: usize = 40;

/// Sets up the container's filesystem. With `terminal`, the process's stdio
/// moves to a new pty of the container's own devpts (as runc makes it), whose
/// master is returned for the agent.
pub(super) fn setup(init: &InitSetup, terminal: bool) -> Result<Option<OwnedFd>, String> {
    let flags = MsFlags::from_bits_truncate(init.root_propagation) | MsFlags::MS_REC;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("setting / propagation: {e}"))?;
    let root = &init.rootfs;
    // pivot_root refuses a shared new root, or one whose parent is shared;
    // with rshared root propagation every mount is. The rootfs (its overlay)
    // and the mount holding it are made private, on their own: the mounts
    // made below keep the propagation they ask for, and `/` gets the root
    // propagation again after the pivot.
    let unshare_root = || -> Result<(), String> {
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making the rootfs mount private: {e}"))?;
        super::propagation::make_parent_private(root)
            .map_err(|e| format!("making the rootfs's parent mount private: {e}"))
    };
    unshare_root()?;
    // pivot_root needs the new root to be a mount point of its own.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting the rootfs {}: {e}", root.display()))?;

    let mut dev_is_tmpfs = false;
    for m in &init.mounts {
        do_mount(root, m)?;
        if m.destination == Path::new("/dev") && m.fstype == "tmpfs" {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        default_devices(root)?;
    }
    for d in &init.devices {
        let dest = resolve_in_root(root, &d.path)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("mkdir for {}: {e}", d.path.display()))?;
        }
        let kind = SFlag::from_bits_truncate(d.mode & libc::S_IFMT);
        let perm = Mode::from_bits_truncate(d.mode & 0o7777);
        // A node already there (a default device bound from the agent's
        // /dev, a node of the image) is replaced by the spec's.
        let _ = umount2(&dest, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&dest);
        mknod(&dest, kind, perm, makedev(d.major, d.minor))
            .map_err(|e| format!("mknod {}: {e}", d.path.display()))?;
        chown(
            &dest,
            Some(Uid::from_raw(d.uid)),
            Some(Gid::from_raw(d.gid)),
        )
        .map_err(|e| format!("chown {}: {e}", d.path.display()))?;
    }
    let master = if terminal { own_terminal(root)? } else { None };
    console(root)?;

    if let Some(h) = &init.hostname {
        sethostname(h).map_err(|e| format!("sethostname: {e}"))?;
    }

    // Private again right before the pivot (see above).
    unshare_root()?;
    match pivot_to(root) {
        Ok(()) => {}
        // The current root is the initramfs (as for the agent in a VM), which
        // pivot_root cannot move. Make our root a bind mount of it instead
        // (same files, but a mount with a parent) and pivot from there.
        Err(PivotError::Pivot(nix::errno::Errno::EINVAL)) => {
            leave_initramfs(root)?;
            unshare_root()?;
            pivot_to(root).map_err(|e| e.to_string())?;
        }
        Err(e) => return Err(e.to_string()),
    }
    let own = MsFlags::from_bits_truncate(init.root_propagation) - MsFlags::MS_REC;
    mount(None::<&str>, "/", None::<&str>, own, None::<&str>)
        .map_err(|e| format!("setting / propagation after pivot_root: {e}"))?;

    for (k, v) in &init.sysctls {
        let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
        fs::write(&path, v).map_err(|e| format!("sysctl {k}: {e}"))?;
    }
    for p in &init.masked_paths {
        mask(p)?;
    }
    for p in &init.readonly_paths {
        readonly(p)?;
    }
    if init.readonly_root {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("making / read-only: {e}"))?;
    }
    Ok(master)
}

/// Opens a pty on the devpts mounted at the container's `/dev/pts` and makes
/// its slave fds 0-2 (replacing the agent's pty the process started on), so
/// that `tty` and `ttyname` name a device the container can see. `None` when
/// the container has no devpts there: the agent's pty stays.
fn own_terminal(root: &Path) -> Result<Option<OwnedFd>, String> {
    let ptmx = root.join("dev/pts/ptmx");
    if fs::symlink_metadata(&ptmx).is_err() {
        return Ok(None);
    }
    let (master, slave) = super::pty::open_in(&ptmx)
        .map_err(|e| format!("terminal in the container's devpts: {e}"))?;
    for fd in 0..=2 {
        nix::unistd::dup2(slave.as_raw_fd(), fd)
            .map_err(|e| format!("terminal in the container's devpts: dup2: {e}"))?;
    }
    Ok(Some(master))
}

/// How [`pivot_to`] failed.
enum PivotError {
    /// `pivot_root` itself.
    Pivot(nix::errno::Errno),
    /// A step around it.
    Other(String),
}

impl std::fmt::Display for PivotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PivotError::Pivot(e) => write!(f, "pivot_root: {e}"),
            PivotError::Other(s) => f.write_str(s),
        }
    }
}

/// Makes `root` the root and detaches the old one. The old root is made a
/// slave (so the detach does not reach the agent's mounts) through a handle
/// on it taken before the pivot: after `pivot_root(".", ".")` the old root is
/// stacked on the new one, and `.` still names the new root's own mount —
/// changing the propagation of `.` would turn every mount of the container
/// (its rshared volumes too) into a slave.
fn pivot_to(root: &Path) -> Result<(), PivotError> {
    let other = |what: &str, e: nix::errno::Errno| PivotError::Other(format!("{what}: {e}"));
    let old_root = nix::fcntl::open(
        "/",
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| other("opening the old root", e))?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    let old_root = unsafe { super::owned(old_root) };
    chdir(root).map_err(|e| other("chdir rootfs", e))?;
    pivot_root(".", ".").map_err(PivotError::Pivot)?;
    nix::unistd::fchdir(old_root.as_raw_fd()).map_err(|e| other("chdir to the old root", e))?;
    drop(old_root);
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| other("making the old root a slave", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| other("detaching the old root", e))?;
    chdir("/").map_err(|e| other("chdir /", e))
}

fn leave_initramfs(root: &Path) -> Result<(), String> {
    let holder = root
        .parent()
        .map(|p| p.join("initramfs"))
        .ok_or("rootfs has no parent")?;
    fs::create_dir_all(&holder).map_err(|e| format!("mkdir {}: {e}", holder.display()))?;
    // A shared mount cannot be moved (rshared root propagation makes them
    // all shared): the initramfs root and its bind are made private, on
    // their own only — the mounts below keep the propagation asked for.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making the initramfs root private: {e}"))?;
    super::propagation::make_parent_private(&holder)
        .map_err(|e| format!("making the mount holding {} private: {e}", holder.display()))?;
    mount(
        Some("/"),
        &holder,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding / for pivot_root: {e}"))?;
    mount(
        None::<&str>,
        &holder,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making the root bind private: {e}"))?;
    chdir(&holder).map_err(|e| format!("chdir {}: {e}", holder.display()))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the root bind: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

fn do_mount(root: &Path, m: &MountPlan) -> Result<(), String> {
    let dest = resolve_in_root(root, &m.destination)?;
    let ctx = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "mount {} on {}: {what}: {e}",
            m.fstype,
            m.destination.display()
        )
    };
    let flags = MsFlags::from_bits_truncate(m.flags);
    if m.is_bind() {
        let src_is_dir = fs::metadata(&m.source)
            .map_err(|e| ctx(&format!("source {}", m.source.display()), &e))?
            .is_dir();
        make_mount_point(&dest, src_is_dir).map_err(|e| ctx("mount point", &e))?;
        let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(&m.source), &dest, None::<&str>, bind, None::<&str>)
            .map_err(|e| ctx("bind", &e))?;
        let extra = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|e| ctx("remount", &e))?;
        }
    } else {
        make_mount_point(&dest, true).map_err(|e| ctx("mount point", &e))?;
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        let res = mount(Some(&m.source), &dest, Some(m.fstype.as_str()), flags, data);
        match res {
            Ok(()) => {}
            // sysfs cannot be mounted while sharing the host network
            // namespace; bind the agent's instead (read-only as asked).
            Err(nix::errno::Errno::EPERM) if m.fstype == "sysfs" => {
                mount(
                    Some("/sys"),
                    &dest,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| ctx("bind /sys", &e))?;
                mount(
                    None::<&str>,
                    &dest,
                    None::<&str>,
                    flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .map_err(|e| ctx("remount /sys", &e))?;
            }
            Err(e) => return Err(ctx("mount", &e)),
        }
    }
    if m.propagation != 0 {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            MsFlags::from_bits_truncate(m.propagation),
            None::<&str>,
        )
        .map_err(|e| ctx("propagation", &e))?;
    }
    Ok(())
}

fn make_mount_point(dest: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        fs::create_dir_all(dest)
    } else {
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)?;
        }
        if !dest.exists() {
            fs::File::create(dest)?;
        }
        Ok(())
    }
}

fn default_devices(root: &Path) -> Result<(), String> {
    let dev = root.join("dev");
    for name in DEFAULT_DEVICES {
        let dest = dev.join(name);
        make_mount_point(&dest, false).map_err(|e| format!("/dev/{name}: {e}"))?;
        mount(
            Some(&Path::new("/dev").join(name)),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding /dev/{name}: {e}"))?;
    }
    let links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
        ("pts/ptmx", "ptmx"),
    ];
    for (target, name) in links {
        let p = dev.join(name);
        if fs::symlink_metadata(&p).is_err() {
            symlink(target, &p).map_err(|e| format!("/dev/{name}: {e}"))?;
        }
    }
    if fs::symlink_metadata("/proc/kcore").is_ok() {
        let _ = symlink("/proc/kcore", dev.join("core"));
    }
    Ok(())
}

/// With a terminal, bind its slave to `/dev/console` (as runc does).
fn console(root: &Path) -> Result<(), String> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return Ok(());
    }
    let slave = fs::read_link("/proc/self/fd/0").map_err(|e| format!("terminal path: {e}"))?;
    let dest = root.join("dev/console");
    if !root.join("dev").is_dir() {
        return Ok(());
    }
    make_mount_point(&dest, false).map_err(|e| format!("/dev/console: {e}"))?;
    mount(
        Some(&slave),
        &dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding /dev/console: {e}"))
}

fn mask(p: &Path) -> Result<(), String> {
    let Ok(meta) = fs::metadata(p) else {
        return Ok(());
    };
    let res = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0k"),
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    res.map_err(|e| format!("masking {}: {e}", p.display()))
}

fn readonly(p: &Path) -> Result<(), String> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} read-only: {e}", p.display()))?;
    mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("remounting {} read-only: {e}", p.display()))
}

/// Resolves `path` (absolute, as the container sees it) to a path under
/// `root`, following symlinks as if `root` were `/`: a symlink in the image
/// cannot make a mount land outside the rootfs.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, String> {
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved = PathBuf::new();
    let mut followed = 0;
    while let Some(c) = pending.pop() {
        if c == Path::new("..") {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(format!("too many symlinks in {}", path.display()));
                }
                let target = fs::read_link(&candidate)
                    .map_err(|e| format!("reading link {}: {e}", candidate.display()))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(n) => pending.push(PathBuf::from(n)),
                        Component::ParentDir => pending.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(c),
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_cannot_escape_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("rel")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/abs/x")).unwrap(),
            root.join("etc/x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/rel/x")).unwrap(),
            root.join("etc/x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        assert!(resolve_in_root(root, Path::new("/loop/x")).is_err());
    }
}
