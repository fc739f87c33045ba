//! dm-verity hash trees for root images, in Rust: the same tree and root hash
//! as `veritysetup format --no-superblock` (format 1, SHA-256, 4 KiB blocks,
//! no salt — so a given image always has the same root hash, and a security
//! officer can compute the one to put in the image policy).
//!
//! The tree is appended to the image file, after its data padded to a whole
//! block; [`VerityInfo`] says where it is and what its root hash is, and is
//! kept next to the image as JSON (`<image>.verity`).

use std::{
    fs::{File, OpenOptions},
    io::{BufReader, Read},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};
use veil_common::{Classify, Kind};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use veil_protocol::agent::VerityParams;

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const DIGEST: usize = 32;
const HASHES_PER_BLOCK: u64 = BLOCK / DIGEST as u64;

/// Errors building or reading a hash tree.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// A file operation failed.
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
    /// The sidecar file is malformed.
    #[error("malformed verity record {0}")]
    Record(PathBuf, #[source] serde_json::Error),
}

impl Classify for VerityError {
    fn kind(&self) -> Kind {
        match self {
            VerityError::Io { .. } | VerityError::Record(..) => Kind::Internal,
        }
    }
}

/// Where an image's hash tree is and what its root hash is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityInfo {
    /// Root hash, lowercase hex.
    pub root_hash: String,
    /// Offset of the tree in the image (= size of the data area), bytes.
    pub hash_offset: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Salt, hex ("" = none).
    pub salt: String,
    /// Hash algorithm.
    pub algorithm: String,
}

impl VerityInfo {
    /// The agent API's parameters for this tree; `image` names the image in
    /// the broker's image policy.
    pub fn params(&self, image: &str) -> VerityParams {
        let mut p = VerityParams::new();
        p.root_hash = self.root_hash.clone();
        p.hash_offset = self.hash_offset;
        p.data_block_size = self.data_block_size;
        p.hash_block_size = self.hash_block_size;
        p.salt = self.salt.clone();
        p.hash_algorithm = self.algorithm.clone();
        p.image = image.to_string();
        p
    }

    /// The sidecar path of `image`.
    pub fn record_path(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".verity");
        PathBuf::from(p)
    }

    /// Writes the sidecar of `image`.
    pub fn save(&self, image: &Path) -> Result<(), VerityError> {
        let path = Self::record_path(image);
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| VerityError::Record(path.clone(), e))?;
        std::fs::write(&path, text).map_err(|source| VerityError::Io {
            what: "write",
            path,
            source,
        })
    }

    /// Reads the sidecar of `image`.
    pub fn load(image: &Path) -> Result<Self, VerityError> {
        let path = Self::record_path(image);
        let text = std::fs::read(&path).map_err(|source| VerityError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| VerityError::Record(path, e))
    }
}

fn hash_block(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Number of tree levels for `data_blocks` (as the kernel counts them).
fn levels(data_blocks: u64) -> u32 {
    let bits = HASHES_PER_BLOCK.trailing_zeros();
    let mut l = 0;
    while bits * l < 64 && (data_blocks.saturating_sub(1) >> (bits * l)) != 0 {
        l += 1;
    }
    l
}

/// Packs digests into hash blocks (zero-padded).
fn pack(digests: &[[u8; DIGEST]]) -> Vec<u8> {
    let blocks = (digests.len() as u64).div_ceil(HASHES_PER_BLOCK).max(1);
    let mut out = vec![0u8; (blocks * BLOCK) as usize];
    for (i, d) in digests.iter().enumerate() {
        out[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(d);
    }
    out
}

/// Computes the tree of `data_blocks` blocks read from `data`: the hash area
/// (top level first, as laid out on disk) and the root hash.
pub fn tree(
    mut data: impl Read,
    data_blocks: u64,
    salt: &[u8],
) -> std::io::Result<(Vec<u8>, [u8; DIGEST])> {
    let mut block = vec![0u8; BLOCK as usize];
    let mut digests = Vec::with_capacity(data_blocks as usize);
    for _ in 0..data_blocks {
        data.read_exact(&mut block)?;
        digests.push(hash_block(salt, &block));
    }
    let n = levels(data_blocks);
    if n == 0 {
        let root = digests
            .first()
            .copied()
            .unwrap_or_else(|| hash_block(salt, &block));
        return Ok((Vec::new(), root));
    }
    let mut per_level = Vec::new();
    let mut below = digests;
    for _ in 0..n {
        let packed = pack(&below);
        below = packed
            .chunks(BLOCK as usize)
            .map(|b| hash_block(salt, b))
            .collect();
        per_level.push(packed);
    }
    // `below` is now the hash of the single top-level block: the root.
    let root = below[0];
    let mut area = Vec::new();
    for level in per_level.iter().rev() {
        area.extend_from_slice(level);
    }
    Ok((area, root))
}

/// Appends the hash tree to `image` (padding its data to a whole block
/// first) and returns where it is. Blocking.
pub fn append_tree(image: &Path) -> Result<VerityInfo, VerityError> {
    let io = |what| {
        move |source| VerityError::Io {
            what,
            path: image.to_path_buf(),
            source,
        }
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io("open"))?;
    let len = f.metadata().map_err(io("stat"))?.len();
    let data_len = len.div_ceil(BLOCK) * BLOCK;
    f.set_len(data_len).map_err(io("pad"))?;
    let reader = BufReader::with_capacity(1 << 20, File::open(image).map_err(io("open"))?);
    let (area, root) = tree(reader, data_len / BLOCK, &[]).map_err(io("read"))?;
    f.write_all_at(&area, data_len)
        .map_err(io("write the hash tree to"))?;
    f.sync_all().map_err(io("sync"))?;
    Ok(VerityInfo {
        root_hash: hex::encode(root),
        hash_offset: data_len,
        data_block_size: BLOCK as u32,
        hash_block_size: BLOCK as u32,
        salt: String::new(),
        algorithm: "sha256".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_counts_match_the_kernel() {
        assert_eq!(levels(1), 0);
        assert_eq!(levels(2), 1);
        assert_eq!(levels(128), 1);
        assert_eq!(levels(129), 2);
        assert_eq!(levels(128 * 128), 2);
        assert_eq!(levels(128 * 128 + 1), 3);
    }

    #[test]
    fn one_level_tree_by_hand() {
        let data = vec![7u8; 3 * BLOCK as usize];
        let (area, root) = tree(&data[..], 3, &[]).unwrap();
        assert_eq!(area.len(), BLOCK as usize);
        let d = hash_block(&[], &data[..BLOCK as usize]);
        assert_eq!(&area[..32], &d);
        assert_eq!(&area[64..96], &d);
        assert!(area[96..].iter().all(|&b| b == 0));
        assert_eq!(root, hash_block(&[], &area));
    }

    /// Same root hash and the same hash area bytes as `veritysetup format
    /// --no-superblock` (Debian's cryptsetup-bin), for one, two and three
    /// tree levels.
    #[test]
    fn matches_veritysetup() {
        let tool = ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("veritysetup is missing: install cryptsetup-bin (ci/setup.sh does)");
        let d = tempfile::tempdir().unwrap();
        for blocks in [1u64, 100, 129, 128 * 128 + 7] {
            let img = d.path().join(format!("img{blocks}"));
            let mut data = vec![0u8; (blocks * BLOCK) as usize];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i as u64).wrapping_mul(2654435761).wrapping_shr(13) as u8;
            }
            std::fs::write(&img, &data).unwrap();
            let hash = d.path().join(format!("hash{blocks}"));
            let out = std::process::Command::new(tool)
                .args(["format", "--no-superblock", "--salt=-"])
                .arg(&img)
                .arg(&hash)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let want = text
                .lines()
                .find_map(|l| l.strip_prefix("Root hash:"))
                .unwrap()
                .trim()
                .to_string();
            let info = append_tree(&img).unwrap();
            assert_eq!(info.root_hash, want, "{blocks} blocks");
            assert_eq!(info.hash_offset, blocks * BLOCK);
            let all = std::fs::read(&img).unwrap();
            let theirs = std::fs::read(&hash).unwrap();
            assert_eq!(
                &all[(blocks * BLOCK) as usize..],
                &theirs[..],
                "{blocks} blocks"
            );
            info.save(&img).unwrap();
            assert_eq!(VerityInfo::load(&img).unwrap(), info);
        }
    }
}
