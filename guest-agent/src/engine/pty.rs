//! A pseudo-terminal in a container's own devpts instance, so that inside
//! the container the terminal is a `/dev/pts/N` of its `/dev/pts` (as runc
//! makes it): `tty` and `ttyname(3)` resolve it.
//!
//! The agent opens the container's `ptmx` through `/proc/<pid>/root` of a
//! process of the container, checks that what it opened is a devpts `ptmx`
//! (the container owns that path and could have put anything there), and
//! takes the slave with `TIOCGPTPEER`, without resolving any path the
//! container controls.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{open, OFlag},
    sys::stat::{fstat, Mode},
};

/// `DEVPTS_SUPER_MAGIC` (linux/magic.h).
const DEVPTS_SUPER_MAGIC: i64 = 0x1cd1;
/// The `ptmx` device number, 5:2.
const PTMX: (u64, u64) = (5, 2);

/// The `ptmx` of the devpts instance mounted on `/dev/pts` in the mount
/// namespace and root of process `pid`.
pub fn container_ptmx(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root/dev/pts/ptmx"))
}

/// Opens a new pty on the devpts `ptmx` at `ptmx`: (master, slave), both
/// close-on-exec.
pub fn open_in(ptmx: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    // O_PATH first: nothing is opened for I/O before it is known to be a
    // devpts ptmx (a device node of the container's could have effects).
    let path = owned(open(
        ptmx,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?);
    let st = fstat(path.as_raw_fd())?;
    let rdev = st.st_rdev;
    let is_ptmx = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)) == PTMX;
    let fs = nix::sys::statfs::fstatfs(&path)?;
    if !is_ptmx || fs.filesystem_type().0 as i64 != DEVPTS_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a devpts ptmx", ptmx.display()),
        ));
    }
    let master = owned(open(
        Path::new(&format!("/proc/self/fd/{}", path.as_raw_fd())),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?);
    drop(path);
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int through the pointer, a live local; the
    // fd is the pty master we just opened.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd for
    // the slave of the master `master`.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((master, owned(slave)))
}

/// Takes ownership of a descriptor just returned by the kernel.
fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by open(2) or an ioctl making a new
    // descriptor: it is open and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_devpts_ptmx() {
        let e = open_in(Path::new("/dev/null")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/pts/ptmx", d.path().join("ptmx")).unwrap();
        assert!(open_in(&d.path().join("ptmx")).is_err());
    }

    #[test]
    fn opens_a_pty_on_a_devpts_ptmx() {
        let (master, slave) = open_in(Path::new("/dev/pts/ptmx")).unwrap();
        let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap();
        assert!(name.starts_with("/dev/pts/"), "{}", name.display());
        drop((master, slave));
    }
}
