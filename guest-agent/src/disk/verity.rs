//! dm-verity: a read-only image whose every block is checked, when read,
//! against a hash tree whose root hash the guest trusts. A block that does
//! not match gives `EIO` to the reader.
//!
//! Layout (what the shim writes, `veritysetup format --no-superblock`
//! compatible): the filesystem's data blocks from offset 0, then the hash
//! tree at `hash_offset` in the same device. No verity superblock: every
//! parameter comes with the request, and the root hash binds them all.
//!
//! Not owned here: where the root hash is trusted from (the request in plain
//! pods, the broker's image policy in confidential ones — see `policy`).

use crate::status::{Classify, Kind};
use std::path::{Path, PathBuf};

use veil_protocol::agent::VerityParams;

use super::dm::{self, Control, DmError, Target};

/// Largest salt accepted, bytes (the kernel's limit is 256).
const MAX_SALT: usize = 256;

/// Errors opening a verity device.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// A malformed parameter.
    #[error("invalid dm-verity parameters: {0}")]
    Invalid(String),
    /// The device is smaller than the parameters say.
    #[error("{device} holds {size} bytes, too small for a hash tree at {hash_offset}")]
    TooSmall {
        /// The device.
        device: PathBuf,
        /// Its size.
        size: u64,
        /// Where the tree should start.
        hash_offset: u64,
    },
    /// The root hash (or the whole tree) is wrong: the kernel refused the table
    /// or the first read failed verification.
    #[error("image on {device} does not match its root hash")]
    Mismatch {
        /// The device.
        device: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A device-mapper call failed.
    #[error(transparent)]
    Dm(#[from] DmError),
    /// Reading the device failed.
    #[error("cannot read {path}")]
    Io {
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for VerityError {
    fn kind(&self) -> Kind {
        match self {
            VerityError::Invalid(_) | VerityError::TooSmall { .. } => Kind::InvalidArgument,
            VerityError::Mismatch { .. } => Kind::DataLoss,
            VerityError::Dm(e) => e.kind(),
            VerityError::Io { .. } => Kind::Internal,
        }
    }
}

/// Checked verity parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verity {
    /// Root hash, lowercase hex.
    pub root_hash: String,
    /// Byte offset of the hash tree; also the size of the data area.
    pub hash_offset: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Salt, lowercase hex ("" for none).
    pub salt: String,
    /// Hash algorithm (`sha256`, `sha512`).
    pub algorithm: String,
}

fn hex_field(what: &str, v: &str, max_bytes: usize) -> Result<String, VerityError> {
    let bytes = hex::decode(v).map_err(|_| VerityError::Invalid(format!("{what} is not hex")))?;
    if bytes.len() > max_bytes {
        return Err(VerityError::Invalid(format!(
            "{what} is longer than {max_bytes} bytes"
        )));
    }
    Ok(hex::encode(bytes))
}

impl Verity {
    /// Validates the request's parameters (defaults: 4096-byte blocks, sha256).
    pub fn from_request(p: &VerityParams) -> Result<Self, VerityError> {
        let algorithm = match p.hash_algorithm.as_str() {
            "" | "sha256" => "sha256",
            "sha512" => "sha512",
            other => {
                return Err(VerityError::Invalid(format!(
                    "hash algorithm '{}' (expected sha256 or sha512)",
                    other.chars().take(16).collect::<String>()
                )))
            }
        };
        let digest_len = if algorithm == "sha256" { 32 } else { 64 };
        let root_hash = hex_field("root_hash", &p.root_hash, digest_len)?;
        if root_hash.len() != digest_len * 2 {
            return Err(VerityError::Invalid(format!(
                "root_hash must be {digest_len} bytes of {algorithm}"
            )));
        }
        let bs = |v: u32, what: &str| -> Result<u32, VerityError> {
            let v = if v == 0 { 4096 } else { v };
            if !(512..=65536).contains(&v) || !v.is_power_of_two() {
                return Err(VerityError::Invalid(format!(
                    "{what} {v} (a power of two in 512..=65536)"
                )));
            }
            Ok(v)
        };
        let data_block_size = bs(p.data_block_size, "data_block_size")?;
        let hash_block_size = bs(p.hash_block_size, "hash_block_size")?;
        if p.hash_offset == 0
            || p.hash_offset % u64::from(data_block_size) != 0
            || p.hash_offset % u64::from(hash_block_size) != 0
        {
            return Err(VerityError::Invalid(
                "hash_offset must be a non-zero multiple of both block sizes".into(),
            ));
        }
        let salt = hex_field("salt", &p.salt, MAX_SALT)?;
        Ok(Verity {
            root_hash,
            hash_offset: p.hash_offset,
            data_block_size,
            hash_block_size,
            salt,
            algorithm: algorithm.to_string(),
        })
    }

    /// The dm-verity table for `device` (`major:minor`): data and hash tree
    /// on the same device.
    pub fn table(&self, device: &str) -> Target {
        let data_blocks = self.hash_offset / u64::from(self.data_block_size);
        let hash_start = self.hash_offset / u64::from(self.hash_block_size);
        let salt = if self.salt.is_empty() {
            "-"
        } else {
            &self.salt
        };
        Target {
            start: 0,
            length: self.hash_offset / 512,
            kind: "verity",
            params: format!(
                "1 {device} {device} {} {} {data_blocks} {hash_start} {} {} {salt}",
                self.data_block_size, self.hash_block_size, self.algorithm, self.root_hash
            ),
        }
    }
}

/// An open verity device.
#[derive(Debug)]
pub struct VerityDevice {
    /// Mapped device name.
    pub name: String,
    /// Its node (read-only, verified).
    pub path: PathBuf,
}

/// Opens `device` as verity device `name`. Reads the first data block so a
/// wrong root hash is reported here rather than at mount time.
pub fn open(name: &str, device: &Path, v: &Verity) -> Result<VerityDevice, VerityError> {
    let size = super::device_size(device).map_err(|source| VerityError::Io {
        path: device.to_path_buf(),
        source,
    })?;
    if size < v.hash_offset + u64::from(v.hash_block_size) {
        return Err(VerityError::TooSmall {
            device: device.to_path_buf(),
            size,
            hash_offset: v.hash_offset,
        });
    }
    let ctl = Control::open()?;
    let nums = dm::dev_numbers(device)?;
    let path = ctl.create(name, &[v.table(&nums)], true, false)?;
    let dev = VerityDevice {
        name: name.to_string(),
        path,
    };
    let mut first = vec![0u8; v.data_block_size as usize];
    let check = std::fs::File::open(&dev.path).and_then(|f| {
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut first, 0)
    });
    if let Err(source) = check {
        let _ = ctl.remove(name);
        return Err(VerityError::Mismatch {
            device: device.to_path_buf(),
            source,
        });
    }
    Ok(dev)
}

impl VerityDevice {
    /// Removes the mapping.
    pub fn close(&self) -> Result<(), DmError> {
        Control::open()?.remove(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> VerityParams {
        let mut p = VerityParams::new();
        p.root_hash = "ab".repeat(32);
        p.hash_offset = 8 * 4096;
        p.salt = "00ff".into();
        p
    }

    #[test]
    fn defaults_and_table() {
        let v = Verity::from_request(&params()).unwrap();
        assert_eq!(
            v.table("254:1").params,
            format!(
                "1 254:1 254:1 4096 4096 8 8 sha256 {} 00ff",
                "ab".repeat(32)
            )
        );
        assert_eq!(v.table("254:1").length, 64);
        let mut p = params();
        p.salt.clear();
        assert!(Verity::from_request(&p)
            .unwrap()
            .table("1:2")
            .params
            .ends_with(" -"));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let cases: [fn(&mut VerityParams); 10] = [
            |p| p.root_hash = "zz".into(),
            |p| p.root_hash = "ab".repeat(31),
            |p| p.root_hash = "ab".repeat(33),
            |p| p.hash_offset = 0,
            |p| p.hash_offset = 4095,
            |p| p.data_block_size = 1000,
            |p| p.hash_block_size = 1 << 20,
            |p| p.hash_algorithm = "md5".into(),
            |p| p.salt = "0".repeat(1000),
            |p| p.salt = "a b".into(),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut p = params();
            f(&mut p);
            assert!(
                matches!(Verity::from_request(&p), Err(VerityError::Invalid(_))),
                "case {i}"
            );
        }
    }
}
