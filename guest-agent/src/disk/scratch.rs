//! The pod's scratch disk: LUKS2 format-or-open with the pod's key, a
//! dm-crypt mapping of its data segment, and an ext4 filesystem on a fresh
//! disk. What the containers write there reaches the host as ciphertext.

use crate::status::{Classify, Kind};
use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

use super::{
    dm::{self, Control, DmError, Target},
    ext4::{self, Ext4Error},
    luks2::{self, Limits, Luks2Error, Unlocked},
};

/// Sector size of the encryption (and of the filesystem blocks).
pub const SECTOR_SIZE: u32 = 4096;

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
            ScratchError::Dm { .. } | ScratchError::Mkfs { .. } | ScratchError::Io { .. } => {
                Kind::Internal
            }
        }
    }
}

/// An open scratch disk.
#[derive(Debug)]
pub struct ScratchDevice {
    /// dm-crypt device name.
    pub name: String,
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

/// The dm-crypt table of `u`'s segment on `device` (`major:minor`) of
/// `dev_size` bytes.
fn crypt_table(u: &Unlocked, device: &str, dev_size: u64) -> Result<Target, Luks2Error> {
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
    Ok(Target {
        start: 0,
        length: bytes / 512,
        kind: "crypt",
        params: format!(
            "{} {} {} {device} {} {opt_str}",
            seg.cipher,
            key.as_str(),
            seg.iv_tweak,
            seg.offset / 512
        ),
    })
}

/// Opens `device` as scratch disk `name` with `key`: unlocks its LUKS2 header,
/// or formats it (and makes ext4 on it) when it has none. A header that is
/// there but does not open with `key` is an error, never a reason to format.
pub fn open(name: &str, device: &Path, key: &[u8]) -> Result<ScratchDevice, ScratchError> {
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
    let fresh = !luks2::is_luks(&f).map_err(luks)?;
    let unlocked = if fresh {
        tracing::info!(device = %device.display(), "formatting the scratch disk (LUKS2, aes-xts-plain64)");
        luks2::format(&f, size, key, SECTOR_SIZE).map_err(luks)?
    } else {
        luks2::unlock(&f, key, &Limits::default()).map_err(luks)?
    };
    drop(f);
    let nums = dm::dev_numbers(device).map_err(dmerr)?;
    let table = crypt_table(&unlocked, &nums, size).map_err(luks)?;
    let data_bytes = table.length * 512;
    drop(unlocked);
    let ctl = Control::open().map_err(dmerr)?;
    let path = ctl.create(name, &[table], false, true).map_err(dmerr)?;
    let dev = ScratchDevice {
        name: name.to_string(),
        path,
        formatted: fresh,
    };
    if fresh {
        let made = open_rw(&dev.path).and_then(|plain| {
            ext4::format(&plain, data_bytes, ext4::Options::default()).map_err(|source| {
                ScratchError::Mkfs {
                    device: device.to_path_buf(),
                    source,
                }
            })
        });
        if let Err(e) = made {
            let _ = ctl.remove(name);
            return Err(e);
        }
    }
    Ok(dev)
}

impl ScratchDevice {
    /// Removes the mapping (the key goes with it).
    pub fn close(&self) -> Result<(), DmError> {
        Control::open()?.remove(&self.name)
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
    }
}
