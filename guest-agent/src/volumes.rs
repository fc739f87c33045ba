//! File volumes: kubelet's configMap, secret, projected and downwardAPI
//! volumes, copied in by the shim (`PutVolume`) and kept in guest memory.
//!
//! Each volume is a tmpfs of its own under `<state>/volumes/<id>` (bounded in
//! size and inodes), laid out as kubelet's atomic writer lays out the host
//! directory: the content lives in a version directory (`..<timestamp>`),
//! `..data` is a symlink to it, and the user-visible names at the root are
//! symlinks into `..data/`. A new version is written next to the current one
//! and `..data` is swapped to it with one `rename(2)`, so a container that has
//! the volume's root bind-mounted sees one version or the other, whole; a
//! container that bound a path inside it (a subPath, resolved at create) keeps
//! the inode it got, as with kubelet.
//!
//! Everything in a request is checked before anything is written: paths are
//! relative with plain components, every entry's parent is a directory of the
//! same request (never a symlink), symlink targets are relative and cannot
//! climb above the volume, and the whole version is size-bounded.
//!
//! This module does not know where volumes come from (the shim reads kubelet's
//! directories) nor how containers mount them (bind sources `volume:ID/SUB`,
//! resolved by [`Volumes::bind_source`]).

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use veil_protocol::agent::{PutVolumeRequest, VolumeEntry, VolumeEntryType};

use crate::{
    status::{Classify, Kind},
    validate::{self, ValidationError},
};

/// Largest version of a volume: the sum of its contents, paths and link
/// targets. Kubernetes caps a ConfigMap or Secret at 1 MiB; a projected volume
/// may combine several. The agent API's message limit (4 MiB) bounds it too.
pub const MAX_VOLUME_BYTES: usize = 3 * 1024 * 1024;
/// Most entries in one version.
pub const MAX_ENTRIES: usize = 4096;
/// Largest read of [`Volumes::read_file`].
pub const MAX_READ: u32 = 64 * 1024;
/// The symlink kubelet's atomic writer points at the current version.
pub const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// Path component limit (as Linux's NAME_MAX).
const NAME_MAX: usize = 255;

/// Errors of file volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A malformed request field.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A request that breaks the volume rules.
    #[error("volume '{volume}': {reason}")]
    Refused {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// The version is larger than allowed.
    #[error("volume '{volume}' is {size} bytes (or {entries} entries), more than the {max_bytes} bytes (or {max_entries} entries) a file volume may hold")]
    TooLarge {
        /// The volume.
        volume: String,
        /// Its size.
        size: usize,
        /// Its entries.
        entries: usize,
        /// The byte limit.
        max_bytes: usize,
        /// The entry limit.
        max_entries: usize,
    },
    /// No such volume.
    #[error("volume '{0}' not found")]
    NotFound(String),
    /// A file operation in the guest failed.
    #[error("cannot {what} {path}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for VolumeError {
    fn kind(&self) -> Kind {
        match self {
            VolumeError::Invalid(_) | VolumeError::Refused { .. } => Kind::InvalidArgument,
            VolumeError::TooLarge { .. } => Kind::ResourceExhausted,
            VolumeError::NotFound(_) => Kind::NotFound,
            VolumeError::Os { .. } => Kind::Internal,
        }
    }
}

fn os<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Os {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One volume in the guest.
#[derive(Debug)]
struct Volume {
    root: PathBuf,
    /// Whether its tmpfs is mounted (and must be unmounted).
    mounted: bool,
    /// The version `..data` points at.
    version: String,
    /// The user-visible names at the root.
    names: HashSet<String>,
}

/// The pod's file volumes.
pub struct Volumes {
    dir: PathBuf,
    /// Whether each volume gets a tmpfs of its own (always, but in unit
    /// tests of the layout, which run without root).
    tmpfs: bool,
    entries: HashMap<String, Volume>,
}

/// A request's checked entry.
pub struct Checked<'a> {
    /// The entry's path, plain components only.
    pub path: PathBuf,
    entry: &'a VolumeEntry,
    kind: VolumeEntryType,
}

fn refused(volume: &str, reason: impl Into<String>) -> VolumeError {
    VolumeError::Refused {
        volume: volume.to_string(),
        reason: reason.into(),
    }
}

/// A version name: `..` followed by a plain component, not `..data`.
fn check_version(volume: &str, v: &str) -> Result<(), VolumeError> {
    let plain = v.len() > 2
        && v.len() <= NAME_MAX
        && v.starts_with("..")
        && v != DATA_LINK
        && v != DATA_TMP
        && !v.contains(['/', '\0']);
    if plain {
        Ok(())
    } else {
        Err(refused(
            volume,
            format!(
                "version {:?} is not a '..'-prefixed path component",
                trunc(v)
            ),
        ))
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks a symlink target written at depth `depth` (components below the
/// volume root of the link's directory): relative, leading `..` only, never
/// above the root.
fn check_target(volume: &str, link: &Path, target: &str, depth: usize) -> Result<(), VolumeError> {
    let bad = |why: &str| {
        refused(
            volume,
            format!("symlink {} -> {:?} {why}", link.display(), trunc(target)),
        )
    };
    if target.is_empty() || target.len() > 4096 || target.contains('\0') {
        return Err(bad("has an empty, overlong or NUL target"));
    }
    if target.starts_with('/') {
        return Err(bad("is absolute"));
    }
    let mut ups = 0;
    let mut seen_name = false;
    for c in Path::new(target).components() {
        match c {
            Component::ParentDir if !seen_name => ups += 1,
            Component::ParentDir => return Err(bad("has '..' after a name")),
            Component::CurDir => {}
            Component::Normal(_) => seen_name = true,
            Component::RootDir | Component::Prefix(_) => return Err(bad("is absolute")),
        }
    }
    if ups > depth {
        return Err(bad("points outside the volume"));
    }
    Ok(())
}

/// Checks every entry of a version: plain relative paths, parents that are
/// directories of the same request, no duplicates, modes, targets, size.
fn check_entries<'a>(
    volume: &str,
    entries: &'a [VolumeEntry],
) -> Result<Vec<Checked<'a>>, VolumeError> {
    let mut dirs: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let path = validate::relative_path("volume entry", &e.path)?;
        let depth = path.components().count();
        if depth == 0 || path.components().any(|c| c.as_os_str().len() > NAME_MAX) {
            return Err(refused(volume, format!("entry path {:?}", trunc(&e.path))));
        }
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if !dirs.contains(&parent) {
            return Err(refused(
                volume,
                format!(
                    "entry {}: its parent is not a directory listed before it",
                    path.display()
                ),
            ));
        }
        if !seen.insert(path.clone()) {
            return Err(refused(volume, format!("entry {} twice", path.display())));
        }
        if e.mode > 0o7777 {
            return Err(refused(
                volume,
                format!("entry {}: mode {:o}", path.display(), e.mode),
            ));
        }
        let kind = match e.type_.enum_value() {
            Ok(VolumeEntryType::FILE) => VolumeEntryType::FILE,
            Ok(VolumeEntryType::DIRECTORY) => {
                dirs.insert(path.clone());
                VolumeEntryType::DIRECTORY
            }
            Ok(VolumeEntryType::SYMLINK) => {
                // The version directory is one level below the root.
                check_target(volume, &path, &e.target, depth)?;
                VolumeEntryType::SYMLINK
            }
            _ => {
                return Err(refused(
                    volume,
                    format!("entry {}: no type", path.display()),
                ))
            }
        };
        out.push(Checked {
            path,
            entry: e,
            kind,
        });
    }
    Ok(out)
}

/// Checks a whole `PutVolume` request (nothing is written): the id, the
/// version name, the bounds, the entries, the root names. Returns the checked
/// entries and the root names.
pub fn check_request(
    req: &PutVolumeRequest,
) -> Result<(Vec<Checked<'_>>, HashSet<String>), VolumeError> {
    let id = req.volume_id.as_str();
    validate::id("volume_id", id)?;
    check_version(id, &req.version)?;
    let size = size_of(req);
    let count = req.entries.len() + req.root.len();
    if size > MAX_VOLUME_BYTES || count > MAX_ENTRIES {
        return Err(VolumeError::TooLarge {
            volume: id.to_string(),
            size,
            entries: count,
            max_bytes: MAX_VOLUME_BYTES,
            max_entries: MAX_ENTRIES,
        });
    }
    if req.root_mode > 0o7777 {
        return Err(refused(id, format!("root mode {:o}", req.root_mode)));
    }
    let entries = check_entries(id, &req.entries)?;
    let mut names = HashSet::new();
    for r in &req.root {
        let plain = !r.path.is_empty()
            && r.path.len() <= NAME_MAX
            && !r.path.starts_with("..")
            && !r.path.contains(['/', '\0'])
            && r.path != ".";
        if !plain || r.type_.enum_value() != Ok(VolumeEntryType::SYMLINK) {
            return Err(refused(
                id,
                format!(
                    "root entry {:?}: only symlinks with a plain name not starting with '..'",
                    trunc(&r.path)
                ),
            ));
        }
        check_target(id, Path::new(&r.path), &r.target, 0)?;
        if !names.insert(r.path.clone()) {
            return Err(refused(id, format!("root entry {} twice", r.path)));
        }
    }
    Ok((entries, names))
}

fn size_of(req: &PutVolumeRequest) -> usize {
    req.entries
        .iter()
        .chain(&req.root)
        .map(|e| e.content.len() + e.path.len() + e.target.len())
        .sum()
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), VolumeError> {
    nix::unistd::fchownat(
        None,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| VolumeError::Os {
        what: "change the owner of",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

fn chmod(path: &Path, mode: u32) -> Result<(), VolumeError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(os("chmod", path))
}

/// Writes the checked entries below `base` (which exists).
fn write_entries(base: &Path, entries: &[Checked<'_>]) -> Result<(), VolumeError> {
    for c in entries {
        let p = base.join(&c.path);
        let e = c.entry;
        match c.kind {
            VolumeEntryType::DIRECTORY => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .map_err(os("create directory", &p))?;
                chown(&p, e.uid, e.gid)?;
                chmod(&p, e.mode)?;
            }
            VolumeEntryType::FILE => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&p)
                    .map_err(os("create", &p))?;
                f.write_all(&e.content).map_err(os("write", &p))?;
                drop(f);
                // chown first: it clears set-id bits the mode may carry.
                chown(&p, e.uid, e.gid)?;
                chmod(&p, e.mode)?;
            }
            _ => {
                std::os::unix::fs::symlink(&e.target, &p).map_err(os("create symlink", &p))?;
                chown(&p, e.uid, e.gid)?;
            }
        }
    }
    Ok(())
}

fn mount_tmpfs(root: &Path, req: &PutVolumeRequest) -> Result<(), VolumeError> {
    // Two versions side by side during a swap, plus slack for metadata.
    let data = format!(
        "size={},nr_inodes={},mode={:o},uid={},gid={}",
        2 * MAX_VOLUME_BYTES + 1024 * 1024,
        2 * MAX_ENTRIES + 64,
        req.root_mode & 0o7777,
        req.root_uid,
        req.root_gid
    );
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| VolumeError::Os {
        what: "mount a tmpfs on",
        path: root.to_path_buf(),
        source: e.into(),
    })
}

impl Volumes {
    /// Volumes below `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Self {
        Volumes {
            dir,
            tmpfs: true,
            entries: HashMap::new(),
        }
    }

    /// Volumes as plain directories below `dir`, without a tmpfs each: only
    /// for tests of the layout, which run without root.
    pub fn without_tmpfs(dir: PathBuf) -> Self {
        Volumes {
            dir,
            tmpfs: false,
            entries: HashMap::new(),
        }
    }

    /// Puts a version of a volume (see the module doc); the volume is created
    /// on its first version.
    pub fn put(&mut self, req: &PutVolumeRequest) -> Result<(), VolumeError> {
        let id = req.volume_id.as_str();
        let (entries, names) = check_request(req)?;
        if !self.entries.contains_key(id) {
            let root = self.dir.join(id);
            fs::create_dir_all(&root).map_err(os("create", &root))?;
            if self.tmpfs {
                mount_tmpfs(&root, req)?;
            }
            self.entries.insert(
                id.to_string(),
                Volume {
                    root,
                    mounted: self.tmpfs,
                    version: String::new(),
                    names: HashSet::new(),
                },
            );
        }
        let Some(vol) = self.entries.get_mut(id) else {
            return Err(VolumeError::NotFound(id.to_string()));
        };
        let root = vol.root.clone();
        if vol.version != req.version {
            chown(&root, req.root_uid, req.root_gid)?;
            chmod(&root, req.root_mode)?;
            let version_dir = root.join(&req.version);
            if fs::symlink_metadata(&version_dir).is_ok() {
                // Left by a put that failed half-way.
                fs::remove_dir_all(&version_dir).map_err(os("remove", &version_dir))?;
            }
            // As kubelet's atomic writer: the version, then the new names
            // (dangling until the swap), then the swap.
            let written = fs::DirBuilder::new()
                .mode(0o755)
                .create(&version_dir)
                .map_err(os("create directory", &version_dir))
                .and_then(|()| chown(&version_dir, req.root_uid, req.root_gid))
                .and_then(|()| chmod(&version_dir, 0o755))
                .and_then(|()| write_entries(&version_dir, &entries))
                .and_then(|()| put_names(&root, &req.root))
                .and_then(|()| swap_data(&root, &req.version));
            if let Err(e) = written {
                let _ = fs::remove_dir_all(&version_dir);
                return Err(e);
            }
        } else {
            // The same version: kubelet removes old names after its swap,
            // so a put of the same version can carry fewer names.
            put_names(&root, &req.root)?;
        }
        for old in vol.names.difference(&names) {
            let p = root.join(old);
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(volume = %id, path = %p.display(), error = %e, "cannot remove an old name");
            }
        }
        vol.names = names;
        let previous = std::mem::replace(&mut vol.version, req.version.clone());
        if !previous.is_empty() && previous != req.version {
            let p = root.join(&previous);
            if let Err(e) = fs::remove_dir_all(&p) {
                tracing::warn!(volume = %id, path = %p.display(), error = %e, "cannot remove the old version");
            }
        }
        tracing::debug!(volume = %id, version = %req.version, entries = req.entries.len(), "volume version in place");
        Ok(())
    }

    /// Unmounts and forgets a volume; a volume that does not exist is fine.
    pub fn remove(&mut self, id: &str) -> Result<(), VolumeError> {
        validate::id("volume_id", id)?;
        if let Some(v) = self.entries.remove(id) {
            release(v);
        }
        Ok(())
    }

    /// Unmounts every volume.
    pub fn remove_all(&mut self) {
        for (_, v) in self.entries.drain() {
            release(v);
        }
    }

    fn root(&self, id: &str) -> Result<&Path, VolumeError> {
        validate::id("volume_id", id)?;
        self.entries
            .get(id)
            .map(|v| v.root.as_path())
            .ok_or_else(|| VolumeError::NotFound(id.to_string()))
    }

    /// Resolves the bind source `volume:ID[/SUB]` (after the prefix): the
    /// volume's root, or a path inside it with symlinks resolved inside the
    /// volume, which must exist.
    pub fn bind_source(&self, rest: &str) -> Result<PathBuf, VolumeError> {
        let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
        let root = self.root(id)?;
        let sub = validate::relative_path("volume subpath", sub)?;
        if sub.as_os_str().is_empty() {
            return Ok(root.to_path_buf());
        }
        let p = crate::engine::rootfs::resolve_in_root(root, &Path::new("/").join(&sub))
            .map_err(|reason| refused(id, reason))?;
        if fs::symlink_metadata(&p).is_err() {
            return Err(refused(id, format!("{} does not exist", sub.display())));
        }
        Ok(p)
    }

    /// Reads at most `max` bytes of the regular file `path` of volume `id`.
    pub fn read_file(&self, id: &str, path: &str, max: u32) -> Result<Vec<u8>, VolumeError> {
        let root = self.root(id)?;
        let rel = validate::relative_path("volume file", path)?;
        if max > MAX_READ {
            return Err(refused(id, format!("max_bytes {max} > {MAX_READ}")));
        }
        let p = crate::engine::rootfs::resolve_in_root(root, &Path::new("/").join(&rel))
            .map_err(|reason| refused(id, reason))?;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&p)
            .map_err(os("open", &p))?;
        let meta = f.metadata().map_err(os("stat", &p))?;
        if !meta.is_file() {
            return Err(refused(
                id,
                format!("{} is not a regular file", rel.display()),
            ));
        }
        let mut out = Vec::new();
        f.take(u64::from(max))
            .read_to_end(&mut out)
            .map_err(os("read", &p))?;
        Ok(out)
    }

    /// The current version of volume `id` (tests, diagnostics).
    pub fn version(&self, id: &str) -> Option<&str> {
        self.entries.get(id).map(|v| v.version.as_str())
    }
}

/// Makes the user-visible names at the root (symlinks into `..data/`).
fn put_names(root: &Path, names: &[VolumeEntry]) -> Result<(), VolumeError> {
    for r in names {
        let p = root.join(&r.path);
        let same = fs::read_link(&p).is_ok_and(|t| t == Path::new(&r.target));
        if !same {
            if fs::symlink_metadata(&p).is_ok() {
                fs::remove_file(&p).map_err(os("remove", &p))?;
            }
            std::os::unix::fs::symlink(&r.target, &p).map_err(os("create symlink", &p))?;
        }
        chown(&p, r.uid, r.gid)?;
    }
    Ok(())
}

/// Points `..data` at `version` with one rename.
fn swap_data(root: &Path, version: &str) -> Result<(), VolumeError> {
    let tmp = root.join(DATA_TMP);
    if fs::symlink_metadata(&tmp).is_ok() {
        fs::remove_file(&tmp).map_err(os("remove", &tmp))?;
    }
    std::os::unix::fs::symlink(version, &tmp).map_err(os("create symlink", &tmp))?;
    let data = root.join(DATA_LINK);
    fs::rename(&tmp, &data).map_err(os("swap", &data))
}

fn release(v: Volume) {
    if v.mounted {
        if let Err(e) = umount2(&v.root, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %v.root.display(), error = %e, "cannot unmount a volume");
        }
        let _ = fs::remove_dir(&v.root);
    } else {
        let _ = fs::remove_dir_all(&v.root);
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        self.remove_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str, mode: u32) -> VolumeEntry {
        let mut e = VolumeEntry::new();
        e.path = path.into();
        e.type_ = VolumeEntryType::FILE.into();
        e.content = content.as_bytes().to_vec();
        e.mode = mode;
        e
    }

    fn dir(path: &str) -> VolumeEntry {
        let mut e = VolumeEntry::new();
        e.path = path.into();
        e.type_ = VolumeEntryType::DIRECTORY.into();
        e.mode = 0o755;
        e
    }

    fn link(path: &str, target: &str) -> VolumeEntry {
        let mut e = VolumeEntry::new();
        e.path = path.into();
        e.type_ = VolumeEntryType::SYMLINK.into();
        e.target = target.into();
        e
    }

    fn refusal(entries: Vec<VolumeEntry>) -> String {
        match check_entries("v", &entries) {
            Ok(_) => "accepted".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn entries_stay_inside_the_version_and_parents_are_real_directories() {
        assert_eq!(
            refusal(vec![dir("a"), file("a/k", "x", 0o644), link("l", "a/k")]),
            "accepted"
        );
        // Up to the volume root (where `..data` is) is fine.
        assert_eq!(refusal(vec![link("l", "../..data/k")]), "accepted");
        for (entries, why) in [
            (vec![file("../x", "", 0o644)], "invalid volume entry path"),
            (vec![file("/etc/x", "", 0o644)], "invalid volume entry path"),
            (vec![file("a/k", "", 0o644)], "parent is not a directory"),
            // Writing through a symlink: its parent is a link, not a listed dir.
            (
                vec![link("a", "."), file("a/k", "", 0o644)],
                "parent is not a directory",
            ),
            (vec![link("l", "/etc/shadow")], "is absolute"),
            (vec![link("l", "../../etc")], "outside the volume"),
            (vec![link("l", "x/../../..")], "'..' after a name"),
            (vec![file("k", "", 0o644), file("k", "", 0o644)], "twice"),
            (vec![file("k", "", 0o17777)], "mode"),
            (
                vec![VolumeEntry {
                    path: "k".into(),
                    ..Default::default()
                }],
                "no type",
            ),
        ] {
            let got = refusal(entries);
            assert!(got.contains(why), "{got:?} should say {why:?}");
        }
    }

    #[test]
    fn version_names_are_dot_dot_components() {
        check_version("v", "..2024_01_02_03_04_05.123").unwrap();
        for bad in ["..data", "..", "x", "../x", "..a/b", "..data_tmp"] {
            assert!(check_version("v", bad).is_err(), "{bad}");
        }
    }

    fn put(vols: &mut Volumes, version: &str, files: &[(&str, &str)]) -> Result<(), VolumeError> {
        let mut req = PutVolumeRequest::new();
        req.volume_id = "cfg".into();
        req.version = version.into();
        req.root_mode = 0o755;
        req.root_uid = nix::unistd::getuid().as_raw();
        req.root_gid = nix::unistd::getgid().as_raw();
        for (k, v) in files {
            let mut f = file(k, v, 0o640);
            f.uid = req.root_uid;
            f.gid = req.root_gid;
            req.entries.push(f);
            let mut l = link(k, &format!("..data/{k}"));
            l.uid = req.root_uid;
            l.gid = req.root_gid;
            req.root.push(l);
        }
        vols.put(&req)
    }

    #[test]
    fn a_new_version_swaps_data_and_removes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut vols = Volumes::without_tmpfs(dir.path().join("volumes"));
        put(&mut vols, "..v1", &[("a", "1"), ("b", "2")]).unwrap();
        let root = dir.path().join("volumes/cfg");
        assert_eq!(
            fs::read_link(root.join("..data")).unwrap(),
            Path::new("..v1")
        );
        assert_eq!(
            fs::read_link(root.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(fs::read_to_string(root.join("b")).unwrap(), "2");
        let mode = fs::metadata(root.join("..v1/a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        // A subPath bound at create keeps the old version's inode.
        let sub = vols.bind_source("cfg/a").unwrap();
        assert_eq!(sub, root.join("..v1/a"));
        let held = fs::File::open(&sub).unwrap();

        put(&mut vols, "..v2", &[("a", "10"), ("c", "3")]).unwrap();
        assert_eq!(fs::read_to_string(root.join("a")).unwrap(), "10");
        assert_eq!(fs::read_to_string(root.join("c")).unwrap(), "3");
        assert!(fs::symlink_metadata(root.join("b")).is_err(), "b stayed");
        assert!(!root.join("..v1").exists(), "the old version stayed");
        let mut old = String::new();
        std::io::Read::read_to_string(&mut &held, &mut old).unwrap();
        assert_eq!(old, "1");
        // The same version again with fewer names: only the names change.
        put(&mut vols, "..v2", &[("a", "10")]).unwrap();
        assert_eq!(vols.version("cfg"), Some("..v2"));
        assert!(fs::symlink_metadata(root.join("c")).is_err(), "c stayed");
        assert_eq!(fs::read_to_string(root.join("..v2/c")).unwrap(), "3");
        assert_eq!(vols.read_file("cfg", "a", 1).unwrap(), b"1");
        assert_eq!(vols.read_file("cfg", "..data/c", 100).unwrap(), b"3");
        assert!(vols.read_file("cfg", "..data", 100).is_err());
        assert!(vols.read_file("cfg", "c", 100).is_err());

        // A bad version leaves the current one as it was.
        let mut req = PutVolumeRequest::new();
        req.volume_id = "cfg".into();
        req.version = "..v3".into();
        req.root_mode = 0o755;
        req.entries = vec![file("a", "x", 0o644), link("l", "/etc/passwd")];
        assert!(vols.put(&req).is_err());
        assert_eq!(
            fs::read_link(root.join("..data")).unwrap(),
            Path::new("..v2")
        );
        assert!(!root.join("..v3").exists());

        vols.remove("cfg").unwrap();
        assert!(!root.exists());
        vols.remove("cfg").unwrap();
        assert_eq!(vols.bind_source("cfg").unwrap_err().kind(), Kind::NotFound);
    }

    #[test]
    fn oversized_versions_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut vols = Volumes::new(dir.path().join("volumes"));
        let mut req = PutVolumeRequest::new();
        req.volume_id = "big".into();
        req.version = "..1".into();
        req.entries = vec![file("k", &"x".repeat(MAX_VOLUME_BYTES + 1), 0o644)];
        let e = vols.put(&req).unwrap_err();
        assert_eq!(e.kind(), Kind::ResourceExhausted, "{e}");
        assert!(!dir.path().join("volumes").exists());
    }
}
