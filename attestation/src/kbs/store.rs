//! The file-backed resource store: one file per resource under
//! `<root>/<repo>/<type>/<tag>`, files mode 0600, directories 0700, written atomically.
//!
//! Path components are validated ([`ResourcePath`]) so a request can never leave the root.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use zeroize::Zeroizing;

/// Largest resource stored.
pub const MAX_RESOURCE_LEN: usize = 64 * 1024;

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A path component is not `[A-Za-z0-9._-]{1,128}` or starts with a dot.
    #[error("resource path component {0:?} is invalid")]
    BadComponent(String),
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

/// `<repo>/<type>/<tag>`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourcePath {
    /// Repository.
    pub repo: String,
    /// Type.
    pub kind: String,
    /// Tag.
    pub tag: String,
}

impl ResourcePath {
    /// True for `[A-Za-z0-9._-]{1,128}` not starting with `.`.
    pub fn valid_component(c: &str) -> bool {
        !c.is_empty()
            && c.len() <= 128
            && !c.starts_with('.')
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }

    /// Validates three components.
    pub fn parse(repo: &str, kind: &str, tag: &str) -> Result<Self, StoreError> {
        for c in [repo, kind, tag] {
            if !Self::valid_component(c) {
                return Err(StoreError::BadComponent(c.chars().take(140).collect()));
            }
        }
        Ok(ResourcePath {
            repo: repo.into(),
            kind: kind.into(),
            tag: tag.into(),
        })
    }
}

impl std::fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.repo, self.kind, self.tag)
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
        let p = ResourcePath::parse("default", "key", "disk").unwrap();
        assert!(s.get(&p).unwrap().is_none());
        s.put(&p, b"secret").unwrap();
        assert_eq!(s.get(&p).unwrap().unwrap().as_slice(), b"secret");
        let mode = std::fs::metadata(d.path().join("res/default/key/disk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for bad in ["..", ".hidden", "a/b", "", "a\0b"] {
            assert!(ResourcePath::parse(bad, "key", "x").is_err(), "{bad:?}");
        }
    }
}
