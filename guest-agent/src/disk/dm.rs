//! The kernel's device-mapper, driven through its ioctls on
//! `/dev/mapper/control` (`linux/dm-ioctl.h`): create a mapped device, load
//! one table, activate it, remove it. This is the only module of [`crate::disk`]
//! with `unsafe` code.
//!
//! It knows nothing about what a table means (see `verity` and `scratch`).
//! Device nodes are made by this module (`mknod` under `/dev/mapper`), so no
//! udev is needed.

use crate::status::{Classify, Kind};
use std::{
    fs,
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use zeroize::Zeroize;

/// The control node.
pub const CONTROL: &str = "/dev/mapper/control";
/// Where mapped-device nodes are made.
pub const NODE_DIR: &str = "/dev/mapper";

/// Errors of device-mapper calls.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// `/dev/mapper/control` is missing and cannot be made (no device-mapper
    /// in the kernel).
    #[error("device-mapper is not available (no {CONTROL}, and /proc/misc has no device-mapper)")]
    Unavailable,
    /// A name, target type or parameter string that cannot be passed.
    #[error("invalid device-mapper request: {0}")]
    Invalid(String),
    /// An ioctl failed.
    #[error("device-mapper {op} on '{name}' failed")]
    Ioctl {
        /// The command.
        op: &'static str,
        /// The mapped device's name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file operation (control node, device node) failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for DmError {
    fn kind(&self) -> Kind {
        match self {
            DmError::Unavailable => Kind::FailedPrecondition,
            DmError::Invalid(_) => Kind::InvalidArgument,
            DmError::Ioctl { .. } | DmError::Io { .. } => Kind::Internal,
        }
    }
}

// struct dm_ioctl is 312 bytes; struct dm_target_spec 40.
const DM_IOCTL_SIZE: usize = 312;
const TARGET_SPEC_SIZE: usize = 40;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;

// _IOWR(0xfd, cmd, struct dm_ioctl)
const fn dm_cmd(nr: u64) -> u64 {
    (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | nr
}
const DM_VERSION: u64 = dm_cmd(0);
const DM_DEV_CREATE: u64 = dm_cmd(3);
const DM_DEV_REMOVE: u64 = dm_cmd(4);
const DM_DEV_SUSPEND: u64 = dm_cmd(6);
const DM_DEV_STATUS: u64 = dm_cmd(7);
const DM_TABLE_LOAD: u64 = dm_cmd(9);
const DM_TABLE_STATUS: u64 = dm_cmd(12);

const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_SECURE_DATA_FLAG: u32 = 1 << 15;
const DM_DEFERRED_REMOVE: u32 = 1 << 17;

/// One line of a table: `length` 512-byte sectors from `start`, mapped by
/// target `kind` with `params`.
pub struct Target {
    /// First sector.
    pub start: u64,
    /// Length in 512-byte sectors.
    pub length: u64,
    /// Target type (`verity`, `crypt`, `linear`, ...).
    pub kind: &'static str,
    /// The target's parameter string. May hold a key: wiped when dropped.
    pub params: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.params.zeroize();
    }
}

/// An open `/dev/mapper/control`.
pub struct Control {
    file: fs::File,
}

/// `major:minor` of a block device, as tables name devices.
pub fn dev_numbers(path: &Path) -> Result<String, DmError> {
    let m = fs::metadata(path).map_err(|source| DmError::Io {
        what: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_block_device() {
        return Err(DmError::Invalid(format!(
            "{} is not a block device",
            path.display()
        )));
    }
    let rdev = m.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

fn check_name(name: &str) -> Result<(), DmError> {
    if name.is_empty()
        || name.len() >= DM_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(DmError::Invalid(format!("bad device name '{name}'")));
    }
    Ok(())
}

/// A zeroed ioctl buffer with the header filled in.
fn buffer(size: usize, name: &str, flags: u32) -> Vec<u8> {
    let mut b = vec![0u8; size.max(DM_IOCTL_SIZE)];
    let len = b.len() as u32;
    // version 4.0.0: the interface every kernel since 2.6 speaks.
    b[0..4].copy_from_slice(&4u32.to_ne_bytes());
    b[12..16].copy_from_slice(&len.to_ne_bytes()); // data_size
    b[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    b
}

/// Offset of `target_count` in `struct dm_ioctl` (after `version[3]`,
/// `data_size`, `data_start`; `open_count` follows it).
const TARGET_COUNT_AT: usize = 20;

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl Control {
    /// Opens the control node, making it from `/proc/misc` if devtmpfs lacks it.
    pub fn open() -> Result<Self, DmError> {
        let path = Path::new(CONTROL);
        if !path.exists() {
            make_control_node()?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DmError::Io {
                what: "open",
                path: path.to_path_buf(),
                source,
            })?;
        let c = Control { file };
        let mut b = buffer(DM_IOCTL_SIZE, "", 0);
        c.call(DM_VERSION, "version", "", &mut b)?;
        Ok(c)
    }

    fn call(&self, cmd: u64, op: &'static str, name: &str, buf: &mut [u8]) -> Result<(), DmError> {
        debug_assert!(buf.len() >= DM_IOCTL_SIZE);
        // SAFETY: every device-mapper command reads and writes a `struct
        // dm_ioctl` followed by `data_size - data_start` bytes of payload;
        // `buf` is a live, writable allocation of exactly `data_size` bytes
        // (set by `buffer`) that starts with such a header, so the kernel
        // stays inside it. The fd is the open control node.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as _, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(DmError::Ioctl {
                op,
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Creates mapped device `name`, loads `targets` and activates it.
    /// Returns its device node (made under [`NODE_DIR`]). `secure` asks the
    /// kernel to wipe the ioctl buffers (tables holding keys).
    pub fn create(
        &self,
        name: &str,
        targets: &[Target],
        read_only: bool,
        secure: bool,
    ) -> Result<PathBuf, DmError> {
        check_name(name)?;
        let mut b = buffer(DM_IOCTL_SIZE, name, 0);
        // A uuid lets tools tell our devices apart; not relied on.
        let uuid = format!("VEIL-{name}");
        let ulen = uuid.len().min(DM_UUID_LEN - 1);
        b[176..176 + ulen].copy_from_slice(&uuid.as_bytes()[..ulen]);
        self.call(DM_DEV_CREATE, "create", name, &mut b)?;
        let dev = read_u64(&b, 40);
        let loaded = self.load(name, targets, read_only, secure).and_then(|()| {
            let mut r = buffer(DM_IOCTL_SIZE, name, 0);
            self.call(DM_DEV_SUSPEND, "resume", name, &mut r)
        });
        if let Err(e) = loaded {
            let _ = self.remove(name);
            return Err(e);
        }
        make_node(name, dev)
    }

    fn load(
        &self,
        name: &str,
        targets: &[Target],
        read_only: bool,
        secure: bool,
    ) -> Result<(), DmError> {
        let mut size = DM_IOCTL_SIZE;
        for t in targets {
            if t.kind.is_empty() || t.kind.len() >= DM_MAX_TYPE_NAME || t.params.contains('\0') {
                return Err(DmError::Invalid(format!("bad target '{}'", t.kind)));
            }
            size += (TARGET_SPEC_SIZE + t.params.len() + 1).next_multiple_of(8);
        }
        let mut flags = 0;
        if read_only {
            flags |= DM_READONLY_FLAG;
        }
        if secure {
            flags |= DM_SECURE_DATA_FLAG;
        }
        let mut b = buffer(size, name, flags);
        b[TARGET_COUNT_AT..TARGET_COUNT_AT + 4]
            .copy_from_slice(&(targets.len() as u32).to_ne_bytes());
        let mut at = DM_IOCTL_SIZE;
        for t in targets {
            let next = (TARGET_SPEC_SIZE + t.params.len() + 1).next_multiple_of(8);
            b[at..at + 8].copy_from_slice(&t.start.to_ne_bytes());
            b[at + 8..at + 16].copy_from_slice(&t.length.to_ne_bytes());
            b[at + 20..at + 24].copy_from_slice(&(next as u32).to_ne_bytes());
            b[at + 24..at + 24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
            let p = at + TARGET_SPEC_SIZE;
            b[p..p + t.params.len()].copy_from_slice(t.params.as_bytes());
            at += next;
        }
        let r = self.call(DM_TABLE_LOAD, "table load", name, &mut b);
        b.zeroize();
        r
    }

    /// Removes mapped device `name` and its node. A device still open is
    /// removed when its last user closes it (deferred removal).
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        check_name(name)?;
        let mut b = buffer(DM_IOCTL_SIZE, name, 0);
        let r = match self.call(DM_DEV_REMOVE, "remove", name, &mut b) {
            Err(DmError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                let mut b = buffer(DM_IOCTL_SIZE, name, DM_DEFERRED_REMOVE);
                self.call(DM_DEV_REMOVE, "deferred remove", name, &mut b)
            }
            other => other,
        };
        let _ = fs::remove_file(Path::new(NODE_DIR).join(name));
        r
    }

    /// Whether device `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool, DmError> {
        check_name(name)?;
        let mut b = buffer(DM_IOCTL_SIZE, name, 0);
        match self.call(DM_DEV_STATUS, "status", name, &mut b) {
            Ok(()) => Ok(true),
            Err(DmError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::ENXIO) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The status line of each target of `name` (e.g. verity's `V` or `C`
    /// for corruption seen).
    pub fn status(&self, name: &str) -> Result<Vec<String>, DmError> {
        self.table_query(name, 0)
    }

    /// The loaded table of `name` (parameter strings; a crypt key shows).
    pub fn table(&self, name: &str) -> Result<Vec<String>, DmError> {
        self.table_query(name, DM_STATUS_TABLE_FLAG)
    }

    fn table_query(&self, name: &str, flags: u32) -> Result<Vec<String>, DmError> {
        check_name(name)?;
        let mut size = 16 * 1024;
        loop {
            let mut b = buffer(size, name, flags);
            self.call(DM_TABLE_STATUS, "table status", name, &mut b)?;
            if read_u32(&b, 28) & DM_BUFFER_FULL_FLAG != 0 && size < 1 << 20 {
                size *= 4;
                continue;
            }
            let count = read_u32(&b, TARGET_COUNT_AT) as usize;
            let start = read_u32(&b, 16) as usize;
            let mut out = Vec::with_capacity(count);
            let mut at = start;
            for _ in 0..count {
                let Some(spec) = b.get(at..at + TARGET_SPEC_SIZE) else {
                    break;
                };
                let next = read_u32(spec, 20) as usize;
                let p = at + TARGET_SPEC_SIZE;
                let tail = b.get(p..).unwrap_or_default();
                let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
                out.push(String::from_utf8_lossy(&tail[..end]).into_owned());
                if next == 0 {
                    break;
                }
                at = start + next;
            }
            b.zeroize();
            return Ok(out);
        }
    }
}

/// Makes `/dev/mapper/control` from the misc minor in `/proc/misc`.
fn make_control_node() -> Result<(), DmError> {
    let misc = fs::read_to_string("/proc/misc").map_err(|source| DmError::Io {
        what: "read",
        path: "/proc/misc".into(),
        source,
    })?;
    let minor = misc
        .lines()
        .find_map(|l| {
            let (n, what) = l.trim().split_once(' ')?;
            (what.trim() == "device-mapper").then(|| n.parse::<u64>().ok())?
        })
        .ok_or(DmError::Unavailable)?;
    mknod(
        Path::new(CONTROL),
        libc::S_IFCHR,
        libc::makedev(10, minor as u32),
    )
}

fn make_node(name: &str, dev: u64) -> Result<PathBuf, DmError> {
    let path = Path::new(NODE_DIR).join(name);
    let _ = fs::remove_file(&path);
    mknod(&path, libc::S_IFBLK, dev)?;
    Ok(path)
}

fn mknod(path: &Path, kind: libc::mode_t, dev: u64) -> Result<(), DmError> {
    let io = |what, source| DmError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    let sflag = nix::sys::stat::SFlag::from_bits_truncate(kind);
    nix::sys::stat::mknod(
        path,
        sflag,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        dev,
    )
    .map_err(|e| io("mknod", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from <linux/dm-ioctl.h> on x86_64.
        assert_eq!(DM_VERSION, 0xc138_fd00);
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
        assert_eq!(DM_TABLE_STATUS, 0xc138_fd0c);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("veil-scratch").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(200)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_layout() {
        let b = buffer(1000, "dev", DM_READONLY_FLAG);
        assert_eq!(b.len(), 1000);
        assert_eq!(read_u32(&b, 0), 4);
        assert_eq!(read_u32(&b, 12), 1000);
        assert_eq!(read_u32(&b, 16), 312);
        assert_eq!(read_u32(&b, 28), DM_READONLY_FLAG);
        assert_eq!(&b[48..51], b"dev");
        // version[3], data_size, data_start, then target_count.
        assert_eq!(TARGET_COUNT_AT, 3 * 4 + 4 + 4);
    }
}
