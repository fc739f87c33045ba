//! Reads a file volume from the host into a `PutVolumeRequest`: kubelet's
//! atomic-writer directory as it is now (`..data` -> `..<timestamp>/`, the
//! content there, the user-visible symlinks at the root), or a fixed copy of
//! one file or directory (a subPath, a termination message file).
//!
//! Paths, modes, owners, symlinks (as symlinks) and contents are taken as
//! they are; sizes are bounded by the agent's limit so that a volume too big
//! for the guest fails here, naming it, before anything is sent.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use veil_protocol::agent::{PutVolumeRequest, VolumeEntry, VolumeEntryType};

use super::VolumeError;

/// The agent's limit on one version of a volume (contents, paths, targets).
pub const MAX_VOLUME_BYTES: usize = 3 * 1024 * 1024;
/// The agent's limit on the entries of one version.
pub const MAX_ENTRIES: usize = 4096;
/// The symlink naming the current version.
pub const DATA_LINK: &str = "..data";
/// The version name of a fixed copy.
pub const SNAPSHOT_VERSION: &str = "..snapshot";
/// The entry name of a fixed copy's file or directory, inside the version:
/// its bind source is `volume:ID/..data/data`.
pub const SNAPSHOT_ENTRY: &str = "data";

/// What a read gathered (the request has no volume id yet).
struct Reader<'a> {
    /// The host path being read (for errors).
    volume: &'a Path,
    size: usize,
    entries: usize,
}

impl Reader<'_> {
    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
        let path = path.to_path_buf();
        move |source| VolumeError::Read { path, source }
    }

    fn layout(&self, reason: String) -> VolumeError {
        VolumeError::Layout {
            path: self.volume.to_path_buf(),
            reason,
        }
    }

    /// Counts one entry of `bytes`.
    fn count(&mut self, bytes: usize) -> Result<(), VolumeError> {
        self.entries += 1;
        self.grow(bytes)
    }

    /// Counts `bytes` more.
    fn grow(&mut self, bytes: usize) -> Result<(), VolumeError> {
        self.size = self.size.saturating_add(bytes);
        if self.size > MAX_VOLUME_BYTES || self.entries > MAX_ENTRIES {
            return Err(VolumeError::TooLarge {
                path: self.volume.to_path_buf(),
                max_bytes: MAX_VOLUME_BYTES,
                max_entries: MAX_ENTRIES,
            });
        }
        Ok(())
    }

    /// One entry at host path `p`, named `rel` in the request; `follow`: the
    /// top of a fixed copy (a bind mount's source, followed as mount does).
    fn entry(
        &mut self,
        p: &Path,
        rel: &str,
        follow: bool,
        out: &mut Vec<VolumeEntry>,
    ) -> Result<(), VolumeError> {
        let meta = if follow {
            fs::metadata(p)
        } else {
            fs::symlink_metadata(p)
        }
        .map_err(self.io(p))?;
        let mut e = VolumeEntry::new();
        e.path = rel.to_string();
        e.mode = meta.permissions().mode() & 0o7777;
        e.uid = meta.uid();
        e.gid = meta.gid();
        let ft = meta.file_type();
        if ft.is_symlink() {
            let t = fs::read_link(p).map_err(self.io(p))?;
            e.type_ = VolumeEntryType::SYMLINK.into();
            e.target = t
                .to_str()
                .ok_or_else(|| {
                    self.layout(format!("symlink {} has a non-UTF-8 target", p.display()))
                })?
                .to_string();
            e.mode = 0;
            self.count(rel.len() + e.target.len())?;
            out.push(e);
        } else if ft.is_file() {
            // Bounded before it is read.
            let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
            self.count(rel.len().saturating_add(len))?;
            e.type_ = VolumeEntryType::FILE.into();
            e.content = fs::read(p).map_err(self.io(p))?;
            // It may have grown meanwhile.
            self.grow(e.content.len().saturating_sub(len))?;
            out.push(e);
        } else if ft.is_dir() {
            e.type_ = VolumeEntryType::DIRECTORY.into();
            self.count(rel.len())?;
            out.push(e);
            let mut names: Vec<String> = Vec::new();
            for d in fs::read_dir(p).map_err(self.io(p))? {
                let d = d.map_err(self.io(p))?;
                let name = d.file_name();
                let name = name
                    .to_str()
                    .ok_or_else(|| self.layout(format!("{} has a non-UTF-8 name", p.display())))?;
                names.push(name.to_string());
            }
            names.sort();
            for n in names {
                let child = if rel.is_empty() {
                    n.clone()
                } else {
                    format!("{rel}/{n}")
                };
                self.entry(&p.join(&n), &child, false, out)?;
            }
        } else {
            return Err(self.layout(format!(
                "{} is not a file, directory or symlink",
                p.display()
            )));
        }
        Ok(())
    }
}

fn root_fields(req: &mut PutVolumeRequest, meta: &fs::Metadata) {
    req.root_mode = meta.permissions().mode() & 0o7777;
    req.root_uid = meta.uid();
    req.root_gid = meta.gid();
}

/// Reads kubelet's atomic-writer directory `dir` as it is now.
pub fn read_atomic(dir: &Path) -> Result<PutVolumeRequest, VolumeError> {
    let mut r = Reader {
        volume: dir,
        size: 0,
        entries: 0,
    };
    let meta = fs::metadata(dir).map_err(r.io(dir))?;
    if !meta.is_dir() {
        return Err(r.layout("is not a directory".into()));
    }
    let data = dir.join(DATA_LINK);
    let version = fs::read_link(&data).map_err(|source| VolumeError::NotAtomic {
        path: dir.to_path_buf(),
        source,
    })?;
    let version = version
        .to_str()
        .filter(|v| v.starts_with("..") && !v.contains('/') && *v != DATA_LINK && v.len() > 2)
        .ok_or_else(|| {
            r.layout(format!(
                "..data points to {}, not a '..<timestamp>' directory beside it",
                version.display()
            ))
        })?
        .to_string();
    let mut req = PutVolumeRequest::new();
    root_fields(&mut req, &meta);
    let mut all = Vec::new();
    r.entry(&dir.join(&version), "", false, &mut all)?;
    // The first entry is the version directory itself.
    req.entries = all.into_iter().skip(1).collect();
    let mut names: Vec<String> = Vec::new();
    for d in fs::read_dir(dir).map_err(r.io(dir))? {
        let d = d.map_err(r.io(dir))?;
        let n = d.file_name();
        let n = n
            .to_str()
            .ok_or_else(|| r.layout("a non-UTF-8 name at the root".into()))?;
        if !n.starts_with("..") {
            names.push(n.to_string());
        }
    }
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let before = req.root.len();
        r.entry(&p, &n, false, &mut req.root)?;
        if req.root[before].type_.enum_value() != Ok(VolumeEntryType::SYMLINK) {
            return Err(r.layout(format!(
                "{n} at the root is not a symlink into ..data (not kubelet's atomic-writer layout)"
            )));
        }
        req.root.truncate(before + 1);
    }
    req.version = version;
    Ok(req)
}

/// Reads a fixed copy of the file or directory `path` (followed if a
/// symlink), as entry [`SNAPSHOT_ENTRY`] of version [`SNAPSHOT_VERSION`].
pub fn read_snapshot(path: &Path) -> Result<PutVolumeRequest, VolumeError> {
    let mut r = Reader {
        volume: path,
        size: 0,
        entries: 0,
    };
    let mut req = PutVolumeRequest::new();
    req.root_mode = 0o755;
    r.entry(path, SNAPSHOT_ENTRY, true, &mut req.entries)?;
    req.version = SNAPSHOT_VERSION.into();
    Ok(req)
}

/// The version and names of a request: what the guest has after it.
pub fn fingerprint(req: &PutVolumeRequest) -> (String, Vec<String>) {
    (
        req.version.clone(),
        req.root.iter().map(|e| e.path.clone()).collect(),
    )
}

/// The bind source inside a fixed copy.
pub fn snapshot_subpath() -> PathBuf {
    Path::new(DATA_LINK).join(SNAPSHOT_ENTRY)
}

/// Test fixtures: directories laid out as kubelet's atomic writer lays them
/// out (`pkg/volume/util/atomic_writer.go`).
pub mod fixture {
    use std::{fs, os::unix::fs::PermissionsExt, path::Path};

    /// Writes `files` (path, content, mode) as a new version of the atomic
    /// writer volume `dir`, the way kubelet does: a new `..<timestamp>.<n>`
    /// directory with the payload, user-visible symlinks for new top-level
    /// names, `..data_tmp` -> the version renamed over `..data`, old
    /// top-level names removed, the old version removed. Returns the
    /// version's name.
    pub fn write_version(
        dir: &Path,
        stamp: &str,
        files: &[(&str, &[u8], u32)],
    ) -> std::io::Result<String> {
        fs::create_dir_all(dir)?;
        let old = fs::read_link(dir.join("..data")).ok();
        let version = format!("..{stamp}");
        let ts = dir.join(&version);
        fs::create_dir(&ts)?;
        fs::set_permissions(&ts, fs::Permissions::from_mode(0o755))?;
        for (path, content, mode) in files {
            let p = ts.join(path);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&p, content)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
        }
        let top = |p: &str| p.split('/').next().unwrap_or(p).to_string();
        let new_names: Vec<String> = files.iter().map(|(p, _, _)| top(p)).collect();
        for n in &new_names {
            let link = dir.join(n);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(n), &link)?;
            }
        }
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp)?;
        fs::rename(&tmp, dir.join("..data"))?;
        for e in fs::read_dir(dir)? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with("..") && !new_names.contains(&n) {
                fs::remove_file(e.path())?;
            }
        }
        if let Some(old) = old {
            fs::remove_dir_all(dir.join(old))?;
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_writer_volume_is_read_as_kubelet_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("cfg");
        fixture::write_version(
            &vol,
            "2026_01_02_03_04_05.1",
            &[("app.conf", b"a=1", 0o644), ("tls/key", b"k", 0o400)],
        )
        .unwrap();
        let req = read_atomic(&vol).unwrap();
        assert_eq!(req.version, "..2026_01_02_03_04_05.1");
        let entries: Vec<(&str, VolumeEntryType, u32)> = req
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.type_.enum_value().unwrap(), e.mode))
            .collect();
        assert_eq!(
            entries,
            [
                ("app.conf", VolumeEntryType::FILE, 0o644),
                ("tls", VolumeEntryType::DIRECTORY, 0o755),
                ("tls/key", VolumeEntryType::FILE, 0o400),
            ]
        );
        assert_eq!(req.entries[0].content, b"a=1");
        let root: Vec<(&str, &str)> = req
            .root
            .iter()
            .map(|e| (e.path.as_str(), e.target.as_str()))
            .collect();
        assert_eq!(
            root,
            [("app.conf", "..data/app.conf"), ("tls", "..data/tls")]
        );

        fixture::write_version(&vol, "2026_01_02_03_04_06.2", &[("other", b"x", 0o644)]).unwrap();
        let req2 = read_atomic(&vol).unwrap();
        assert_ne!(fingerprint(&req), fingerprint(&req2));
        assert_eq!(req2.root.len(), 1);
        assert!(!vol.join("..2026_01_02_03_04_05.1").exists());
    }

    #[test]
    fn what_is_not_the_atomic_writer_layout_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_atomic(dir.path()).unwrap_err();
        assert!(matches!(e, VolumeError::NotAtomic { .. }), "{e}");
        fixture::write_version(dir.path(), "1", &[("k", b"v", 0o644)]).unwrap();
        fs::write(dir.path().join("stray"), b"x").unwrap();
        let e = read_atomic(dir.path()).unwrap_err().to_string();
        assert!(e.contains("stray at the root is not a symlink"), "{e}");
    }

    #[test]
    fn volumes_over_the_limit_fail_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; MAX_VOLUME_BYTES + 1];
        fixture::write_version(dir.path(), "1", &[("big", &big, 0o644)]).unwrap();
        assert!(matches!(
            read_atomic(dir.path()).unwrap_err(),
            VolumeError::TooLarge { .. }
        ));
    }

    #[test]
    fn a_fixed_copy_follows_its_source_and_keeps_modes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"old").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let req = read_snapshot(&link).unwrap();
        assert_eq!(req.entries.len(), 1);
        assert_eq!(req.entries[0].path, SNAPSHOT_ENTRY);
        assert_eq!(req.entries[0].content, b"old");
        assert_eq!(req.entries[0].mode, 0o600);
        assert_eq!(snapshot_subpath(), Path::new("..data/data"));
    }
}
