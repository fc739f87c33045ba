//! Tap devices: opened through `/dev/net/tun` in the calling thread's network
//! namespace, handed to QEMU as an open descriptor. A tap opened this way is
//! not persistent: it exists while a descriptor of it is open (the shim's,
//! until QEMU has started, then QEMU's), so it goes with the VM.

use std::{
    fs::OpenOptions,
    io,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
};

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// A layer-2 device (not `IFF_TUN`).
const IFF_TAP: i16 = 0x0002;
/// No packet-information prefix.
const IFF_NO_PI: i16 = 0x1000;
/// Frames carry a virtio-net header (QEMU's offloads use it).
const IFF_VNET_HDR: i16 = 0x4000;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Whether `name` can name a link (1-15 bytes, no `/`, whitespace or NUL).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Creates tap `name` in the current thread's network namespace and returns
/// its descriptor (close-on-exec; the VMM launch clears that for QEMU).
pub fn open(name: &str) -> io::Result<OwnedFd> {
    if !valid_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad tap name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a
    // properly sized, initialised `struct ifreq` (name NUL-terminated: at
    // most 15 bytes copied into 16) that outlives the call; TUNSETIFF only
    // reads and writes within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("vtap0"));
        assert!(!valid_name(""));
        assert!(!valid_name("a-very-long-name0"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
