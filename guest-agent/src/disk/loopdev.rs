//! Loop devices (`linux/loop.h`): a file — an image the host shares, or a
//! memfd in guest memory — attached as a block device that detaches itself
//! once its last opener closes it (`LO_FLAGS_AUTOCLEAR`).

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::status::{Classify, Kind};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const CONTROL: &str = "/dev/loop-control";

/// Errors attaching a loop device.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A file or ioctl operation failed.
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
    /// Every device offered was taken by someone else first.
    #[error("no free loop device (16 tries)")]
    NoneFree,
}

impl Classify for LoopError {
    fn kind(&self) -> Kind {
        match self {
            LoopError::Io { .. } => Kind::Internal,
            LoopError::NoneFree => Kind::ResourceExhausted,
        }
    }
}

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device: its node, and an open handle that keeps it
/// attached (dropping the last handle — this one, and whatever else opened
/// the device — detaches it).
#[derive(Debug)]
pub struct Attached {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The open device.
    pub device: File,
}

/// Attaches `backing` (named `what` in errors) to a free loop device.
pub fn attach(backing: &File, what: &Path, read_only: bool) -> Result<Attached, LoopError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LoopError::Io { what, path, source }
    };
    let ctl_path = Path::new(CONTROL);
    let ctl = File::open(ctl_path).map_err(io("open", ctl_path))?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io("find a free loop device for", what)(
                std::io::Error::last_os_error(),
            ));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(io("open", &path))?;
        // SAFETY: an all-zero LoopConfig is a valid value (plain integers and arrays).
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` from the pointer,
        // which points at a live, correctly laid out local.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if rc == 0 {
            return Ok(Attached { path, device });
        }
        let err = std::io::Error::last_os_error();
        // Another process took this device between GET_FREE and CONFIGURE.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(io("attach a loop device to", what)(err));
        }
    }
    Err(LoopError::NoneFree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_has_the_kernel_layout() {
        // struct loop_info64 is 232 bytes, struct loop_config 304 (linux/loop.h).
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
