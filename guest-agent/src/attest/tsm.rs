//! configfs-tsm: the kernel's TEE-neutral report interface
//! (`/sys/kernel/config/tsm/report`, Linux ≥ 6.7), used for SEV-SNP reports
//! and TDX quotes.
//!
//! One request: make an entry directory, check its `provider`, read its
//! `generation`, write the 64 bytes of `inblob`, read `outblob` (the report
//! or quote) and, for SNP, `auxblob` (the host's certificate table), read
//! `generation` again — another writer in between would have changed it, and
//! the report might then bind someone else's data — and remove the entry.
//!
//! The filesystem is behind [`TsmFs`] so tests run the request logic against
//! a fake with configfs semantics; [`ConfigFsTsm`] is the real one, rooted at
//! a path passed in.

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// Where configfs-tsm reports live in a guest.
pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";
/// Largest `outblob`/`auxblob` read (a TDX quote with its PCK chain is ~5 KiB,
/// an SNP certificate table under 16 KiB).
pub const MAX_BLOB: usize = 128 * 1024;

/// Errors of a configfs-tsm request.
#[derive(Debug, thiserror::Error)]
pub enum TsmError {
    /// A configfs operation failed.
    #[error("configfs-tsm: cannot {op} {entry}/{attr}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Report entry.
        entry: String,
        /// Attribute ("" for the entry itself).
        attr: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel's TSM provider is not the expected TEE's.
    #[error("configfs-tsm provider is {found:?}, expected {expected:?}")]
    Provider {
        /// Expected provider.
        expected: &'static str,
        /// What the kernel says.
        found: String,
    },
    /// Another writer changed the entry while we used it.
    #[error("configfs-tsm entry changed during the request (generation {before} -> {after}, expected {expected})")]
    Conflict {
        /// Generation before.
        before: u64,
        /// Generation after.
        after: u64,
        /// What it should have been.
        expected: u64,
    },
    /// An attribute's content is malformed.
    #[error("configfs-tsm attribute {0} is malformed")]
    Malformed(&'static str),
    /// The report is empty or too large.
    #[error("configfs-tsm {attr} has {len} bytes")]
    BlobSize {
        /// Attribute.
        attr: &'static str,
        /// Its length.
        len: usize,
    },
}

/// The few configfs operations a report request needs; `entry` is a
/// directory name directly under the report root.
pub trait TsmFs: Send + Sync {
    /// Creates a report entry (configfs populates its attributes).
    fn mkdir(&self, entry: &str) -> io::Result<()>;
    /// Reads an attribute.
    fn read(&self, entry: &str, attr: &str) -> io::Result<Vec<u8>>;
    /// Writes an attribute.
    fn write(&self, entry: &str, attr: &str, data: &[u8]) -> io::Result<()>;
    /// Removes a report entry.
    fn rmdir(&self, entry: &str) -> io::Result<()>;
}

/// The real configfs-tsm, rooted at `root` (normally [`DEFAULT_ROOT`]).
#[derive(Debug, Clone)]
pub struct ConfigFsTsm {
    root: PathBuf,
}

impl ConfigFsTsm {
    /// configfs-tsm reports under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ConfigFsTsm { root: root.into() }
    }

    /// True when the kernel offers configfs-tsm reports at `root`.
    pub fn available(root: &Path) -> bool {
        root.is_dir()
    }
}

impl TsmFs for ConfigFsTsm {
    fn mkdir(&self, entry: &str) -> io::Result<()> {
        std::fs::create_dir(self.root.join(entry))
    }

    fn read(&self, entry: &str, attr: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let f = std::fs::File::open(self.root.join(entry).join(attr))?;
        let mut out = Vec::new();
        // One more than the limit, so an oversized blob is seen as such.
        f.take(MAX_BLOB as u64 + 1).read_to_end(&mut out)?;
        Ok(out)
    }

    fn write(&self, entry: &str, attr: &str, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        // configfs attributes take one write(2) each.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.root.join(entry).join(attr))?;
        f.write_all(data)
    }

    fn rmdir(&self, entry: &str) -> io::Result<()> {
        std::fs::remove_dir(self.root.join(entry))
    }
}

/// What one request returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    /// `outblob`: the report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// `auxblob`, if the provider has one and it is not empty.
    pub auxblob: Option<Vec<u8>>,
}

fn unique_entry() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "veil-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn parse_u64(attr: &'static str, raw: &[u8]) -> Result<u64, TsmError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(TsmError::Malformed(attr))
}

/// Removes the entry however the request ends.
struct EntryGuard<'a> {
    fs: &'a dyn TsmFs,
    entry: String,
}

impl Drop for EntryGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.fs.rmdir(&self.entry) {
            tracing::debug!(entry = %self.entry, error = %e, "cannot remove configfs-tsm entry");
        }
    }
}

/// Requests a report binding `inblob` from provider `provider`
/// (`sev_guest`, `tdx_guest`); reads `auxblob` when `want_aux`. Blocking.
pub fn request(
    fs: &dyn TsmFs,
    provider: &'static str,
    inblob: &[u8; 64],
    want_aux: bool,
) -> Result<TsmReport, TsmError> {
    let entry = unique_entry();
    let io = |op, attr, entry: &str| {
        let entry = entry.to_string();
        move |source| TsmError::Io {
            op,
            entry,
            attr,
            source,
        }
    };
    fs.mkdir(&entry).map_err(io("create", "", &entry))?;
    let guard = EntryGuard {
        fs,
        entry: entry.clone(),
    };
    let found = fs
        .read(&entry, "provider")
        .map_err(io("read", "provider", &entry))?;
    let found = String::from_utf8_lossy(&found).trim().to_string();
    if found != provider {
        return Err(TsmError::Provider {
            expected: provider,
            found,
        });
    }
    let before = parse_u64(
        "generation",
        &fs.read(&entry, "generation")
            .map_err(io("read", "generation", &entry))?,
    )?;
    fs.write(&entry, "inblob", inblob)
        .map_err(io("write", "inblob", &entry))?;
    let outblob = fs
        .read(&entry, "outblob")
        .map_err(io("read", "outblob", &entry))?;
    if outblob.is_empty() || outblob.len() > MAX_BLOB {
        return Err(TsmError::BlobSize {
            attr: "outblob",
            len: outblob.len(),
        });
    }
    let auxblob = if want_aux {
        match fs.read(&entry, "auxblob") {
            Ok(a) if a.is_empty() => None,
            Ok(a) if a.len() > MAX_BLOB => {
                return Err(TsmError::BlobSize {
                    attr: "auxblob",
                    len: a.len(),
                })
            }
            Ok(a) => Some(a),
            // Providers without certificates have no auxblob (or fail it).
            Err(e) => {
                tracing::debug!(error = %e, "no configfs-tsm auxblob");
                None
            }
        }
    } else {
        None
    };
    let after = parse_u64(
        "generation",
        &fs.read(&entry, "generation")
            .map_err(io("read", "generation", &entry))?,
    )?;
    let expected = before.wrapping_add(1);
    if after != expected {
        return Err(TsmError::Conflict {
            before,
            after,
            expected,
        });
    }
    drop(guard);
    Ok(TsmReport { outblob, auxblob })
}

/// A fake configfs-tsm with the kernel's semantics, for tests of the
/// attesters: entries get `provider` and `generation` on mkdir; a write bumps
/// `generation`; `outblob` is computed from `inblob` on read.
#[cfg(test)]
pub mod fake {
    use std::{collections::HashMap, io, sync::Mutex};

    use super::TsmFs;

    /// Computes an outblob from an inblob.
    pub type Produce = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

    #[derive(Default)]
    struct Entry {
        generation: u64,
        inblob: Vec<u8>,
    }

    /// The fake.
    pub struct FakeTsm {
        /// What `provider` reads.
        pub provider: String,
        /// `outblob` from `inblob`.
        pub produce: Produce,
        /// `auxblob` content (None: the attribute fails).
        pub aux: Option<Vec<u8>>,
        /// Simulate another writer: bump `generation` on every outblob read.
        pub interfere: bool,
        entries: Mutex<HashMap<String, Entry>>,
        /// Entries ever removed.
        pub removed: Mutex<Vec<String>>,
    }

    impl FakeTsm {
        /// A fake of `provider` producing outblobs with `produce`.
        pub fn new(provider: &str, produce: Produce) -> Self {
            FakeTsm {
                provider: provider.into(),
                produce,
                aux: None,
                interfere: false,
                entries: Mutex::default(),
                removed: Mutex::default(),
            }
        }

        /// Entries still present.
        pub fn live(&self) -> usize {
            self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
        }
    }

    fn nf() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    impl TsmFs for FakeTsm {
        fn mkdir(&self, entry: &str) -> io::Result<()> {
            let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if e.contains_key(entry) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            e.insert(entry.to_string(), Entry::default());
            Ok(())
        }

        fn read(&self, entry: &str, attr: &str) -> io::Result<Vec<u8>> {
            let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let e = all.get_mut(entry).ok_or_else(nf)?;
            match attr {
                "provider" => Ok(format!("{}\n", self.provider).into_bytes()),
                "generation" => Ok(format!("{}\n", e.generation).into_bytes()),
                "outblob" => {
                    if self.interfere {
                        e.generation += 1;
                    }
                    Ok((self.produce)(&e.inblob))
                }
                "auxblob" => self.aux.clone().ok_or_else(nf),
                _ => Err(nf()),
            }
        }

        fn write(&self, entry: &str, attr: &str, data: &[u8]) -> io::Result<()> {
            let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let e = all.get_mut(entry).ok_or_else(nf)?;
            match attr {
                "inblob" if data.len() <= 64 => {
                    e.inblob = data.to_vec();
                    e.generation += 1;
                    Ok(())
                }
                _ => Err(io::Error::from(io::ErrorKind::InvalidInput)),
            }
        }

        fn rmdir(&self, entry: &str) -> io::Result<()> {
            let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            all.remove(entry).ok_or_else(nf)?;
            self.removed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(entry.to_string());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeTsm, *};

    fn echo() -> fake::Produce {
        Box::new(|inblob: &[u8]| [b"REPORT:".as_slice(), inblob].concat())
    }

    #[test]
    fn request_binds_inblob_and_removes_its_entry() {
        let mut fs = FakeTsm::new("sev_guest", echo());
        fs.aux = Some(b"certs".to_vec());
        let r = request(&fs, "sev_guest", &[3; 64], true).unwrap();
        assert_eq!(r.outblob, [b"REPORT:".as_slice(), &[3; 64]].concat());
        assert_eq!(r.auxblob.as_deref(), Some(b"certs".as_slice()));
        assert_eq!(fs.live(), 0);
        // Without auxblob (TDX), or when it is empty/absent: None.
        let fs = FakeTsm::new("tdx_guest", echo());
        assert_eq!(
            request(&fs, "tdx_guest", &[0; 64], true).unwrap().auxblob,
            None
        );
        assert_eq!(
            request(&fs, "tdx_guest", &[0; 64], false).unwrap().auxblob,
            None
        );
    }

    #[test]
    fn wrong_provider_conflicts_and_empty_reports_fail_and_clean_up() {
        let fs = FakeTsm::new("tdx_guest", echo());
        match request(&fs, "sev_guest", &[0; 64], true) {
            Err(TsmError::Provider { found, .. }) => assert_eq!(found, "tdx_guest"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fs.live(), 0);

        let mut fs = FakeTsm::new("sev_guest", echo());
        fs.interfere = true;
        assert!(matches!(
            request(&fs, "sev_guest", &[0; 64], false),
            Err(TsmError::Conflict {
                before: 0,
                after: 2,
                expected: 1
            })
        ));
        assert_eq!(fs.live(), 0);

        let fs = FakeTsm::new("sev_guest", Box::new(|_: &[u8]| Vec::new()));
        assert!(matches!(
            request(&fs, "sev_guest", &[0; 64], false),
            Err(TsmError::BlobSize {
                attr: "outblob",
                ..
            })
        ));
        assert_eq!(fs.live(), 0);
    }

    #[test]
    fn the_real_backend_works_on_paths_under_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let fs = ConfigFsTsm::new(dir.path());
        assert!(ConfigFsTsm::available(dir.path()));
        fs.mkdir("e").unwrap();
        std::fs::write(dir.path().join("e/inblob"), b"").unwrap();
        fs.write("e", "inblob", &[1; 64]).unwrap();
        assert_eq!(fs.read("e", "inblob").unwrap(), vec![1; 64]);
        assert!(
            fs.write("e", "missing", b"x").is_err(),
            "attributes are never created"
        );
        assert!(!ConfigFsTsm::available(&dir.path().join("none")));
    }
}
