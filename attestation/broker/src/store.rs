//! The file-backed resource store: one file per resource under
//! `<root>/<repo>/<type>/<tag>`, files mode 0600, directories 0700, written atomically.
//!
//! Paths are [`ResourcePath`]s, validated by their one rule, so a request can never leave the
//! root (nor name a temporary file: no component starts with a dot).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use veil_attestation::ResourcePath;
use veil_common::{Classify, Kind};
use zeroize::Zeroizing;

/// Largest resource stored.
pub const MAX_RESOURCE_LEN: usize = 64 * 1024;

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The resource is larger than accepted.
    #[error("resource is {0} bytes, more than the limit")]
    TooLarge(usize),
    /// File-system error.
    #[error("resource store I/O at {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for StoreError {
    fn kind(&self) -> Kind {
        match self {
            StoreError::TooLarge(_) => Kind::InvalidArgument,
            StoreError::Io { .. } => Kind::Internal,
        }
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct ResourceStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ResourceStore {
    /// A store rooted at `root` (created 0700 if missing).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io(root))?;
        Ok(ResourceStore {
            root: root.to_path_buf(),
        })
    }

    fn file(&self, p: &ResourcePath) -> PathBuf {
        self.root.join(&p.repo).join(&p.kind).join(&p.tag)
    }

    /// Reads a resource; `None` when absent.
    pub fn get(&self, p: &ResourcePath) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let f = self.file(p);
        match std::fs::read(&f) {
            Ok(b) => Ok(Some(Zeroizing::new(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path: f, source }),
        }
    }

    /// Deletes a resource; `false` when there was none.
    pub fn delete(&self, p: &ResourcePath) -> Result<bool, StoreError> {
        let f = self.file(p);
        match std::fs::remove_file(&f) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io { path: f, source }),
        }
    }

    /// Writes a resource (mode 0600, via a temporary file and rename).
    pub fn put(&self, p: &ResourcePath, data: &[u8]) -> Result<(), StoreError> {
        if data.len() > MAX_RESOURCE_LEN {
            return Err(StoreError::TooLarge(data.len()));
        }
        let f = self.file(p);
        let dir = f.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let tmp = dir.join(format!(".{}.tmp", p.tag));
        let _ = std::fs::remove_file(&tmp);
        let mut h = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        h.write_all(data).map_err(io(&tmp))?;
        h.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &f).map_err(io(&f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn put_get_mode_and_traversal() {
        let d = tempfile::tempdir().unwrap();
        let s = ResourceStore::open(&d.path().join("res")).unwrap();
        let p = ResourcePath::new("default", "key", "disk").unwrap();
        assert!(s.get(&p).unwrap().is_none());
        s.put(&p, b"secret").unwrap();
        assert_eq!(s.get(&p).unwrap().unwrap().as_slice(), b"secret");
        let mode = std::fs::metadata(d.path().join("res/default/key/disk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(s.delete(&p).unwrap());
        assert!(!s.delete(&p).unwrap());
        assert!(s.get(&p).unwrap().is_none());
        let big = s.put(&p, &vec![0u8; MAX_RESOURCE_LEN + 1]).unwrap_err();
        assert_eq!(big.kind(), Kind::InvalidArgument);
        let io = StoreError::Io {
            path: d.path().into(),
            source: std::io::Error::other("x"),
        };
        assert_eq!(io.kind(), Kind::Internal);
    }
}
