//! The pod's scratch disk: LUKS2 format-or-open with the pod's key, a
//! dm-crypt mapping of its data segment, and an ext4 filesystem on a fresh
//! disk. What the containers write there reaches the host as ciphertext.
//!
//! With integrity, dm-crypt sits on dm-integrity, whose tags (a keyed
//! HMAC-SHA256 of each 4 KiB ciphertext block and its number, 16 bytes) are
//! kept in guest memory — a memfd behind a loop device — not on the host's
//! disk:
//!
//! ```text
//! ext4 → dm-crypt (aes-xts-plain64) → dm-integrity ─ tags: loop → memfd (guest RAM)
//!                                         └─ data: dm-linear → the disk's LUKS2 data segment
//! ```
//!
//! So a block the host changes, and a block it puts back as it was earlier
//! (with any tag it saw — it sees none), fails its check and reads as `EIO`.
//! The price: the disk cannot outlive its VM (the tags go with it), so an
//! integrity disk is always formatted afresh; tags cost 16 bytes of guest
//! memory per 4 KiB written (4 MiB for a full 1 GiB disk); and every inode
//! table is written at format time, since reading a block never written is an
//! error. The host-side file keeps the plain LUKS2 layout: ciphertext only.

use crate::status::{Classify, Kind};
use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    dm::{self, Control, DmError, Target},
    ext4::{self, Ext4Error},
    loopdev::{self, LoopError},
    luks2::{self, Limits, Luks2Error, Unlocked},
};

/// Sector size of the encryption (and of the filesystem blocks).
pub const SECTOR_SIZE: u32 = 4096;

/// Bytes of integrity tag per sector: HMAC-SHA256 truncated to 128 bits.
pub const TAG_SIZE: u64 = 16;

/// Room on the tag device beyond the tags: dm-integrity's superblock and its
/// (unused, mode `D`) journal section.
const TAG_DEVICE_SLACK: u64 = 4 << 20;

/// Errors of the scratch disk.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// The LUKS2 header.
    #[error("LUKS2 on {device}")]
    Luks2 {
        /// The disk.
        device: PathBuf,
        /// What failed.
        #[source]
        source: Luks2Error,
    },
    /// The dm-crypt mapping.
    #[error("dm-crypt mapping of {device}")]
    Dm {
        /// The disk.
        device: PathBuf,
        /// What failed.
        #[source]
        source: DmError,
    },
    /// Making the filesystem.
    #[error("making ext4 on the encrypted {device}")]
    Mkfs {
        /// The disk.
        device: PathBuf,
        /// What failed.
        #[source]
        source: Ext4Error,
    },
    /// The integrity layer (its tag device or its mappings).
    #[error("integrity layer of {device}")]
    Integrity {
        /// The disk.
        device: PathBuf,
        /// What failed.
        #[source]
        source: IntegrityError,
    },
    /// Opening the disk.
    #[error("cannot open {path}")]
    Io {
        /// The disk or mapping.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for ScratchError {
    fn kind(&self) -> Kind {
        match self {
            ScratchError::Luks2 { source, .. } => source.kind(),
            ScratchError::Integrity { source, .. } => source.kind(),
            ScratchError::Dm { .. } | ScratchError::Mkfs { .. } | ScratchError::Io { .. } => {
                Kind::Internal
            }
        }
    }
}

/// What failed in the integrity layer.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// The memfd holding the tags.
    #[error("cannot make the {0}-byte tag store in guest memory")]
    TagStore(u64, #[source] std::io::Error),
    /// Its loop device.
    #[error(transparent)]
    Loop(#[from] LoopError),
    /// A device-mapper layer (linear or integrity).
    #[error(transparent)]
    Dm(#[from] DmError),
}

impl Classify for IntegrityError {
    fn kind(&self) -> Kind {
        match self {
            IntegrityError::TagStore(..) => Kind::ResourceExhausted,
            IntegrityError::Loop(e) => e.kind(),
            IntegrityError::Dm(e) => e.kind(),
        }
    }
}

/// An open scratch disk.
#[derive(Debug)]
pub struct ScratchDevice {
    /// dm-crypt device name.
    pub name: String,
    /// The device-mapper devices under it, top first (integrity, linear);
    /// none without integrity.
    pub below: Vec<String>,
    /// Its node (plaintext view, guest only).
    pub path: PathBuf,
    /// True when the disk was formatted now (it had no LUKS2 header).
    pub formatted: bool,
}

fn open_rw(path: &Path) -> Result<File, ScratchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ScratchError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Bytes of `u`'s data segment on a `dev_size`-byte device, whole sectors.
fn segment_bytes(u: &Unlocked, dev_size: u64) -> Result<u64, Luks2Error> {
    let seg = &u.segment;
    let avail = dev_size.saturating_sub(seg.offset);
    let bytes = seg.size.unwrap_or(avail);
    let bytes = bytes - bytes % u64::from(seg.sector_size);
    if bytes == 0 || bytes > avail {
        return Err(Luks2Error::Corrupt(format!(
            "data segment of {bytes} bytes at {} on a {dev_size}-byte device",
            seg.offset
        )));
    }
    Ok(bytes)
}

/// The dm-crypt table of `u`'s segment: `bytes` from byte `offset` of
/// `device` (`major:minor`).
fn crypt_target(u: &Unlocked, device: &str, offset: u64, bytes: u64) -> Target {
    let seg = &u.segment;
    let key = Zeroizing::new(hex::encode(&u.volume_key[..]));
    let mut opts = vec![];
    if seg.sector_size != 512 {
        opts.push(format!("sector_size:{}", seg.sector_size));
    }
    let opt_str = if opts.is_empty() {
        "0".to_string()
    } else {
        format!("{} {}", opts.len(), opts.join(" "))
    };
    Target {
        start: 0,
        length: bytes / 512,
        kind: "crypt",
        params: format!(
            "{} {} {} {device} {} {opt_str}",
            seg.cipher,
            key.as_str(),
            seg.iv_tweak,
            offset / 512
        ),
    }
}

/// The dm-crypt table of `u`'s segment on `device` (`major:minor`) of
/// `dev_size` bytes.
fn crypt_table(u: &Unlocked, device: &str, dev_size: u64) -> Result<Target, Luks2Error> {
    let bytes = segment_bytes(u, dev_size)?;
    Ok(crypt_target(u, device, u.segment.offset, bytes))
}

/// The HMAC key of the integrity tags, derived from the volume key (so it
/// is as secret as the data, and never stored).
fn tag_key(volume_key: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut h = Sha256::new();
    h.update(b"veil scratch integrity tags v1\0");
    h.update(volume_key);
    Zeroizing::new(h.finalize().to_vec())
}

/// Size of the tag device for `bytes` of data: the tags rounded up to a
/// MiB, and the slack.
fn tag_device_size(bytes: u64) -> u64 {
    let tags = bytes / u64::from(SECTOR_SIZE) * TAG_SIZE;
    tags.next_multiple_of(1 << 20) + TAG_DEVICE_SLACK
}

/// The dm-integrity table: `bytes` of `data` (`major:minor`) with tags on
/// `tags` (`major:minor`), direct writes (mode `D`: no journal, since a crash
/// ends the VM and the tags with it), HMAC-SHA256 under `key`, the salt and
/// sector numbers mixed into each tag (`fix_hmac`).
fn integrity_target(data: &str, tags: &str, bytes: u64, key: &[u8]) -> Target {
    let key = Zeroizing::new(hex::encode(key));
    Target {
        start: 0,
        length: bytes / 512,
        kind: "integrity",
        params: format!(
            "{data} 0 {TAG_SIZE} D 5 meta_device:{tags} block_size:{SECTOR_SIZE} \
             internal_hash:hmac(sha256):{} journal_sectors:8 fix_hmac",
            key.as_str()
        ),
    }
}

/// The layers an integrity disk stacks under its dm-crypt device, removed
/// top first on failure unless kept.
struct Stack<'a> {
    ctl: &'a Control,
    made: Vec<String>,
}

impl Stack<'_> {
    fn push(&mut self, name: String, target: Target, secure: bool) -> Result<PathBuf, DmError> {
        let path = self.ctl.create(&name, &[target], false, secure)?;
        self.made.insert(0, name);
        Ok(path)
    }

    fn keep(mut self) -> Vec<String> {
        std::mem::take(&mut self.made)
    }
}

impl Drop for Stack<'_> {
    fn drop(&mut self) {
        for n in &self.made {
            let _ = self.ctl.remove(n);
        }
    }
}

/// Puts dm-integrity (tags in a memfd) over `bytes` of `u`'s segment on
/// `device` (`major:minor`), and returns the layer names (top first) and the
/// integrity device's `major:minor` for dm-crypt to sit on.
fn integrity_layers(
    ctl: &Control,
    name: &str,
    u: &Unlocked,
    device: &str,
    bytes: u64,
) -> Result<(Vec<String>, String), IntegrityError> {
    let mut stack = Stack { ctl, made: vec![] };
    let data = stack.push(
        format!("{name}-data"),
        Target {
            start: 0,
            length: bytes / 512,
            kind: "linear",
            params: format!("{device} {}", u.segment.offset / 512),
        },
        false,
    )?;
    let size = tag_device_size(bytes);
    let store = nix::sys::memfd::memfd_create(
        c"veil-scratch-tags",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(std::io::Error::from)
    .map(File::from)
    .and_then(|f| f.set_len(size).map(|()| f))
    .map_err(|e| IntegrityError::TagStore(size, e))?;
    // The loop device holds the memfd, dm-integrity the loop device: both go
    // when the integrity device is removed.
    let tags = loopdev::attach(&store, Path::new("the scratch tag store"), false)?;
    let tags_dev = dm::dev_numbers(&tags.path)?;
    let key = tag_key(&u.volume_key);
    let top = stack.push(
        format!("{name}-integrity"),
        integrity_target(&dm::dev_numbers(&data)?, &tags_dev, bytes, &key),
        true,
    )?;
    drop(tags);
    let top = dm::dev_numbers(&top)?;
    Ok((stack.keep(), top))
}

/// Opens `device` as scratch disk `name` with `key`: unlocks its LUKS2 header,
/// or formats it (and makes ext4 on it) when it has none. A header that is
/// there but does not open with `key` is an error, never a reason to format.
/// With `integrity` the disk is always formatted: what it holds is from a VM
/// whose tags are gone, so nothing on it could be checked.
pub fn open(
    name: &str,
    device: &Path,
    key: &[u8],
    integrity: bool,
) -> Result<ScratchDevice, ScratchError> {
    let luks = |source| ScratchError::Luks2 {
        device: device.to_path_buf(),
        source,
    };
    let dmerr = |source| ScratchError::Dm {
        device: device.to_path_buf(),
        source,
    };
    let f = open_rw(device)?;
    let size = super::device_size(device).map_err(|source| ScratchError::Io {
        path: device.to_path_buf(),
        source,
    })?;
    let fresh = integrity || !luks2::is_luks(&f).map_err(luks)?;
    let unlocked = if fresh {
        tracing::info!(device = %device.display(), integrity, "formatting the scratch disk (LUKS2, aes-xts-plain64)");
        luks2::format(&f, size, key, SECTOR_SIZE).map_err(luks)?
    } else {
        luks2::unlock(&f, key, &Limits::default()).map_err(luks)?
    };
    drop(f);
    let nums = dm::dev_numbers(device).map_err(dmerr)?;
    let ctl = Control::open().map_err(dmerr)?;
    let (below, table) = if integrity {
        let bytes = segment_bytes(&unlocked, size).map_err(luks)?;
        let (below, top) =
            integrity_layers(&ctl, name, &unlocked, &nums, bytes).map_err(|source| {
                ScratchError::Integrity {
                    device: device.to_path_buf(),
                    source,
                }
            })?;
        (below, crypt_target(&unlocked, &top, 0, bytes))
    } else {
        (vec![], crypt_table(&unlocked, &nums, size).map_err(luks)?)
    };
    let data_bytes = table.length * 512;
    drop(unlocked);
    let remove_below = |ctl: &Control| {
        for n in &below {
            let _ = ctl.remove(n);
        }
    };
    let path = match ctl.create(name, &[table], false, true) {
        Ok(p) => p,
        Err(e) => {
            remove_below(&ctl);
            return Err(dmerr(e));
        }
    };
    if fresh {
        let opts = ext4::Options {
            zero_inode_tables: integrity,
        };
        let made = open_rw(&path).and_then(|plain| {
            ext4::format(&plain, data_bytes, opts).map_err(|source| ScratchError::Mkfs {
                device: device.to_path_buf(),
                source,
            })
        });
        if let Err(e) = made {
            let _ = ctl.remove(name);
            remove_below(&ctl);
            return Err(e);
        }
    }
    Ok(ScratchDevice {
        name: name.to_string(),
        below,
        path,
        formatted: fresh,
    })
}

impl ScratchDevice {
    /// Removes the mappings, top first (the keys go with them; the tag
    /// store with the integrity layer).
    pub fn close(&self) -> Result<(), DmError> {
        let ctl = Control::open()?;
        ctl.remove(&self.name)?;
        for n in &self.below {
            ctl.remove(n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luks2::Segment;

    #[test]
    fn crypt_table_for_a_4k_segment() {
        let u = Unlocked {
            volume_key: Zeroizing::new(vec![0xab; 64]),
            segment: Segment {
                offset: 16 << 20,
                size: None,
                iv_tweak: 0,
                cipher: "aes-xts-plain64".into(),
                sector_size: 4096,
            },
        };
        let t = crypt_table(&u, "254:0", (16 << 20) + 8192 + 100).unwrap();
        assert_eq!(t.length, 16);
        assert_eq!(
            t.params,
            format!(
                "aes-xts-plain64 {} 0 254:0 32768 1 sector_size:4096",
                "ab".repeat(64)
            )
        );
        assert!(crypt_table(&u, "254:0", 16 << 20).is_err());
        // Over the integrity device: the same cipher and IVs, from sector 0.
        let t = crypt_target(&u, "253:1", 0, 8192);
        assert!(
            t.params.ends_with(" 0 253:1 0 1 sector_size:4096"),
            "{}",
            t.params
        );
    }

    #[test]
    fn integrity_table_and_tag_store_size() {
        let t = integrity_target("253:0", "7:0", 1 << 30, &[0xcd; 32]);
        assert_eq!(t.kind, "integrity");
        assert_eq!(t.length, 2 << 20);
        assert_eq!(
            t.params,
            format!(
                "253:0 0 16 D 5 meta_device:7:0 block_size:4096 internal_hash:hmac(sha256):{} journal_sectors:8 fix_hmac",
                "cd".repeat(32)
            )
        );
        // 1 GiB: 262144 blocks of 16 bytes = 4 MiB of tags, and the slack.
        assert_eq!(tag_device_size(1 << 30), (4 << 20) + TAG_DEVICE_SLACK);
        assert_eq!(tag_device_size(4096), (1 << 20) + TAG_DEVICE_SLACK);
        // The tag key is derived, not the volume key itself.
        let k = tag_key(&[1; 64]);
        assert_eq!(k.len(), 32);
        assert_ne!(&k[..], &[1; 32][..]);
        assert_ne!(k, tag_key(&[2; 64]));
    }
}
