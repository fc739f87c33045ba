//! Storage the shim provides: filesystems mounted read-only in the guest
//! (a container image's block device; in host mode an image file on a loop
//! device or a directory), and the per-container overlay root built on them.
//!
//! Mounts live under `<state>/storage/<id>`. The dm-verity and dm-crypt layers
//! ([`crate::disk`]) slot in between "find the device" and "mount it".

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use veil_protocol::agent::{AddStorageRequest, StorageSource};

use crate::{
    disk::{loopdev, DiskError, Layer, Opened},
    status::{Classify, Kind},
    validate::{self, ValidationError},
};

/// Where the (measured) initrd may carry images of its own: image files and
/// directories below it are allowed outside host mode too.
pub const INITRD_IMAGES: &str = "/images";

/// Filesystems an image may have.
const FSTYPES: &[&str] = &["ext4", "erofs", "squashfs", "xfs"];
/// Longest wait for a disk to appear.
const MAX_WAIT_MS: u32 = 60_000;

/// Errors of storage handling.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A malformed request field.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A request the agent refuses.
    #[error("{0}")]
    Refused(String),
    /// The id is in use.
    #[error("storage '{0}' already exists")]
    Exists(String),
    /// No such storage.
    #[error("storage '{0}' not found")]
    NotFound(String),
    /// A container still uses it.
    #[error("storage '{0}' is in use by a container")]
    InUse(String),
    /// The device never appeared.
    #[error("no disk with serial '{0}' appeared in time")]
    NoDevice(String),
    /// The source does not exist.
    #[error("storage source {0} does not exist")]
    NoSource(PathBuf),
    /// A dm-verity or scratch-disk layer failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Mounting or attaching failed.
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

impl Classify for StorageError {
    fn kind(&self) -> Kind {
        match self {
            StorageError::Invalid(_) | StorageError::Refused(_) => Kind::InvalidArgument,
            StorageError::Exists(_) => Kind::AlreadyExists,
            StorageError::NotFound(_) | StorageError::NoSource(_) | StorageError::NoDevice(_) => {
                Kind::NotFound
            }
            StorageError::InUse(_) => Kind::FailedPrecondition,
            StorageError::Disk(e) => e.kind(),
            StorageError::Os { .. } => Kind::Internal,
        }
    }
}

fn os<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Os {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One attached storage.
#[derive(Debug)]
struct Entry {
    /// Where its filesystem is visible.
    root: PathBuf,
    /// Whether we mounted it (and must unmount it).
    mounted: bool,
    /// Containers using it.
    users: usize,
    /// The device-mapper layer under the mount, if any.
    layer: Option<Opened>,
    /// The pod's scratch disk (writable; bind sources are created on use).
    scratch: bool,
}

/// The attached storages.
pub struct Storages {
    dir: PathBuf,
    host_mode: bool,
    entries: HashMap<String, Entry>,
}

impl Storages {
    /// Storages mounted under `dir`; `host_mode` allows image files and directories.
    pub fn new(dir: PathBuf, host_mode: bool) -> Self {
        Storages {
            dir,
            host_mode,
            entries: HashMap::new(),
        }
    }

    /// Attaches a storage with `layer` (from [`crate::disk::prepare`])
    /// between its disk and its mount; returns where its filesystem is.
    pub async fn add(
        &mut self,
        req: &AddStorageRequest,
        layer: Layer,
    ) -> Result<PathBuf, StorageError> {
        validate::id("storage_id", &req.storage_id)?;
        if self.entries.contains_key(&req.storage_id) {
            return Err(StorageError::Exists(req.storage_id.clone()));
        }
        let source = req.source.enum_value_or_default();
        let host_only = matches!(source, StorageSource::IMAGE_FILE | StorageSource::DIRECTORY);
        let in_initrd = validate::absolute_path("locator", &req.locator)
            .is_ok_and(|p| p.starts_with(INITRD_IMAGES));
        if host_only && !self.host_mode && !in_initrd {
            return Err(StorageError::Refused(format!(
                "source {source:?} is only allowed in host mode or below {INITRD_IMAGES}"
            )));
        }
        if source == StorageSource::DIRECTORY {
            if !matches!(layer, Layer::None) {
                return Err(StorageError::Refused(
                    "a directory cannot have a verity or scratch layer".into(),
                ));
            }
            let dir = validate::absolute_path("locator", &req.locator)?;
            validate::overlay_safe("locator", &dir)?;
            if !dir.is_dir() {
                return Err(StorageError::NoSource(dir));
            }
            self.entries.insert(
                req.storage_id.clone(),
                Entry {
                    root: dir.clone(),
                    mounted: false,
                    users: 0,
                    layer: None,
                    scratch: false,
                },
            );
            return Ok(dir);
        }
        if source == StorageSource::VIRTIO_FS {
            if !matches!(layer, Layer::None) {
                return Err(StorageError::Refused(
                    "a virtio-fs share cannot have a verity or scratch layer".into(),
                ));
            }
            validate::id("virtio-fs tag", &req.locator)?;
            let root = self.dir.join(&req.storage_id);
            fs::create_dir_all(&root).map_err(os("create", &root))?;
            let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
            if req.read_only {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(
                Some(req.locator.as_str()),
                &root,
                Some("virtiofs"),
                flags,
                None::<&str>,
            )
            .map_err(|e| StorageError::Os {
                what: "mount the virtio-fs share on",
                path: root.clone(),
                source: e.into(),
            })?;
            self.entries.insert(
                req.storage_id.clone(),
                Entry {
                    root: root.clone(),
                    mounted: true,
                    users: 0,
                    layer: None,
                    scratch: false,
                },
            );
            return Ok(root);
        }
        let scratch = layer.is_scratch();
        let fstype = if scratch { "ext4" } else { req.fstype.as_str() };
        if !FSTYPES.contains(&fstype) {
            return Err(StorageError::Refused(format!(
                "filesystem type '{}' (expected one of {FSTYPES:?})",
                req.fstype.chars().take(32).collect::<String>()
            )));
        }
        // An autoclear loop device detaches when its last opener goes: keep our
        // fd open until the mount holds it.
        let mut _loop_fd = None;
        let device = match source {
            StorageSource::BLOCK_SERIAL => {
                let wait = if req.wait_ms == 0 {
                    5000
                } else {
                    req.wait_ms.min(MAX_WAIT_MS)
                };
                find_by_serial(&req.locator, Duration::from_millis(u64::from(wait))).await?
            }
            StorageSource::DEVICE_PATH => {
                let p = validate::absolute_path("locator", &req.locator)?;
                if !p.starts_with("/dev") {
                    return Err(StorageError::Refused(
                        "a device path must be under /dev".into(),
                    ));
                }
                if !p.exists() {
                    return Err(StorageError::NoSource(p));
                }
                p
            }
            StorageSource::IMAGE_FILE => {
                let p = validate::absolute_path("locator", &req.locator)?;
                if !p.is_file() {
                    return Err(StorageError::NoSource(p));
                }
                let img = fs::OpenOptions::new()
                    .read(true)
                    .write(!req.read_only)
                    .open(&p)
                    .map_err(os("open", &p))?;
                let l = loopdev::attach(&img, &p, req.read_only).map_err(DiskError::from)?;
                _loop_fd = Some(l.device);
                l.path
            }
            _ => {
                return Err(StorageError::Refused(
                    "storage source is unspecified".into(),
                ))
            }
        };
        let (device, opened) = layer.open(&req.storage_id, &device)?;
        let close = |opened: &Option<Opened>| {
            if let Some(o) = opened {
                if let Err(e) = o.close() {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot remove a device-mapper layer");
                }
            }
        };
        let root = self.dir.join(&req.storage_id);
        if let Err(e) = fs::create_dir_all(&root) {
            close(&opened);
            return Err(os("create", &root)(e));
        }
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if req.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if let Err(e) = mount(Some(&device), &root, Some(fstype), flags, None::<&str>) {
            close(&opened);
            return Err(StorageError::Os {
                what: "mount",
                path: device.clone(),
                source: e.into(),
            });
        }
        self.entries.insert(
            req.storage_id.clone(),
            Entry {
                root: root.clone(),
                mounted: true,
                users: 0,
                layer: opened,
                scratch,
            },
        );
        Ok(root)
    }

    /// Detaches a storage no container uses.
    pub fn remove(&mut self, id: &str) -> Result<(), StorageError> {
        validate::id("storage_id", id)?;
        let e = self
            .entries
            .get(id)
            .ok_or_else(|| StorageError::NotFound(id.to_string()))?;
        if e.users > 0 {
            return Err(StorageError::InUse(id.to_string()));
        }
        if let Some(e) = self.entries.remove(id) {
            release(&e);
        }
        Ok(())
    }

    /// Detaches everything (sandbox teardown).
    pub fn remove_all(&mut self) {
        for (_, e) in self.entries.drain() {
            release(&e);
        }
    }

    /// Resolves `subpath` in storage `id` and counts a user of it.
    pub fn acquire(&mut self, id: &str, subpath: &str) -> Result<PathBuf, StorageError> {
        validate::id("storage_id", id)?;
        let sub = validate::relative_path("subpath", subpath)?;
        let e = self
            .entries
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_string()))?;
        // The storage's content comes from the host: follow its symlinks as if
        // its root were `/`, so a link cannot point the lower layer elsewhere.
        let p = crate::engine::rootfs::resolve_in_root(&e.root, &Path::new("/").join(sub))
            .map_err(StorageError::Refused)?;
        if !p.is_dir() {
            return Err(StorageError::NoSource(p));
        }
        e.users += 1;
        Ok(p)
    }

    /// Releases a use taken with [`Storages::acquire`].
    pub fn release_use(&mut self, id: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            e.users = e.users.saturating_sub(1);
        }
    }

    /// Where storage `id` is, if attached (bind sources `storage:ID/SUB`).
    pub fn root(&self, id: &str) -> Option<&Path> {
        self.entries.get(id).map(|e| e.root.as_path())
    }

    /// Whether storage `id` is the pod's (writable, guest-encrypted) scratch disk.
    pub fn is_scratch(&self, id: &str) -> bool {
        self.entries.get(id).is_some_and(|e| e.scratch)
    }

    /// A directory for container `container`'s writable layer on scratch
    /// storage `id` (`<root>/containers/<container>`); counts a user of it.
    pub fn acquire_upper(&mut self, id: &str, container: &str) -> Result<PathBuf, StorageError> {
        validate::id("upper_storage_id", id)?;
        let e = self
            .entries
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_string()))?;
        if !e.scratch {
            return Err(StorageError::Refused(format!(
                "storage '{id}' is not a scratch disk: it cannot hold a writable layer"
            )));
        }
        let dir = e.root.join("containers").join(container);
        // A leftover of an earlier container of the same id starts afresh.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(os("create", &dir))?;
        e.users += 1;
        Ok(dir)
    }
}

fn release(e: &Entry) {
    if e.mounted {
        if let Err(err) = umount2(&e.root, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %e.root.display(), error = %err, "cannot unmount storage");
        }
        let _ = fs::remove_dir(&e.root);
    }
    if let Some(l) = &e.layer {
        if let Err(err) = l.close() {
            tracing::warn!(device = %l.name, error = %crate::error_chain(&err), "cannot remove a device-mapper layer");
        }
    }
}

/// The serial a disk reports: virtio-blk's `serial` attribute, or a SCSI
/// disk's unit serial number (VPD page 0x80: a 4-byte header, then the
/// serial). Hot-added disks are SCSI (`scsi-hd,serial=...`).
fn disk_serial(block: &Path) -> Option<String> {
    if let Ok(s) = fs::read_to_string(block.join("serial")) {
        return Some(s.trim_end_matches(['\n', '\0']).to_string());
    }
    let page = fs::read(block.join("device/vpd_pg80")).ok()?;
    let body = page.get(4..)?;
    let len = usize::from(u16::from_be_bytes([*page.get(2)?, *page.get(3)?])).min(body.len());
    Some(
        String::from_utf8_lossy(&body[..len])
            .trim_end_matches(['\0', ' '])
            .to_string(),
    )
}

/// Finds the disk (virtio-blk or SCSI) whose serial is `serial`, waiting for it.
pub(crate) async fn find_by_serial(serial: &str, wait: Duration) -> Result<PathBuf, StorageError> {
    if serial.is_empty() || serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StorageError::Refused(
            "a virtio-blk serial is 1-20 printable characters".into(),
        ));
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(dir) = fs::read_dir("/sys/block") {
            for entry in dir.flatten() {
                if disk_serial(&entry.path()).as_deref() == Some(serial) {
                    return Ok(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(StorageError::NoDevice(serial.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The overlay root of one container: `<dir>/rootfs`, with `upper` and
/// `work` in `dir` too or, on the scratch disk, in a directory of their own.
#[derive(Debug)]
pub struct OverlayRoot {
    dir: PathBuf,
    /// The scratch storage holding upper and work, and their directory there.
    upper: Option<(String, PathBuf)>,
}

impl OverlayRoot {
    /// Mounts an overlay with `lower` read-only and a fresh upper in `dir`.
    pub fn mount(dir: PathBuf, lower: &Path) -> Result<Self, StorageError> {
        Self::mount_with_upper(dir, lower, None)
    }

    /// Like [`OverlayRoot::mount`], with upper and work in `upper`'s
    /// directory (on scratch storage `upper.0`) when given.
    pub fn mount_with_upper(
        dir: PathBuf,
        lower: &Path,
        upper: Option<(String, PathBuf)>,
    ) -> Result<Self, StorageError> {
        validate::overlay_safe("lower", lower)?;
        validate::overlay_safe("state dir", &dir)?;
        if let Some((_, u)) = &upper {
            validate::overlay_safe("upper dir", u)?;
        }
        let me = OverlayRoot { dir, upper };
        let rw = me.rw_dir().to_path_buf();
        for p in [rw.join("upper"), rw.join("work"), me.dir.join("rootfs")] {
            fs::create_dir_all(&p).map_err(os("create", &p))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        let target = me.rootfs();
        mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| StorageError::Os {
            what: "mount overlay on",
            path: target.clone(),
            source: e.into(),
        })?;
        Ok(me)
    }

    /// Where upper and work live.
    fn rw_dir(&self) -> &Path {
        self.upper.as_ref().map_or(&self.dir, |(_, p)| p)
    }

    /// The merged root.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The scratch storage holding the upper layer, if any.
    pub fn upper_storage(&self) -> Option<&str> {
        self.upper.as_ref().map(|(id, _)| id.as_str())
    }

    /// Unmounts and deletes the upper layer.
    pub fn remove(&self) {
        let root = self.rootfs();
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        let _ = umount2(&self.dir.join("initramfs"), MntFlags::MNT_DETACH);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove container state");
        }
        if let Some((_, u)) = &self.upper {
            if let Err(e) = fs::remove_dir_all(u) {
                tracing::warn!(dir = %u.display(), error = %e, "cannot remove the upper layer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_protocol::agent::VerityParams;

    #[tokio::test]
    async fn refuses_bad_requests_with_the_right_kind() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Storages::new(d.path().to_path_buf(), false);
        let mut r = AddStorageRequest::new();
        r.storage_id = "../x".into();
        assert_eq!(
            s.add(&r, Layer::None).await.unwrap_err().kind(),
            Kind::InvalidArgument
        );
        r.storage_id = "img".into();
        r.source = StorageSource::DIRECTORY.into();
        r.locator = "/".into();
        assert_eq!(
            s.add(&r, Layer::None).await.unwrap_err().kind(),
            Kind::InvalidArgument,
            "directory outside host mode"
        );
        r.source = StorageSource::DEVICE_PATH.into();
        r.fstype = "ext4".into();
        r.locator = "/etc/passwd".into();
        assert_eq!(
            s.add(&r, Layer::None).await.unwrap_err().kind(),
            Kind::InvalidArgument
        );
        r.fstype = "nfs".into();
        assert_eq!(
            s.add(&r, Layer::None).await.unwrap_err().kind(),
            Kind::InvalidArgument
        );
        r.fstype = "ext4".into();
        r.source = StorageSource::DIRECTORY.into();
        let v = crate::disk::verity::Verity::from_request(&{
            let mut p = VerityParams::new();
            p.root_hash = "ab".repeat(32);
            p.hash_offset = 4096;
            p
        })
        .unwrap();
        assert_eq!(
            s.add(&r, Layer::Verity(v)).await.unwrap_err().kind(),
            Kind::InvalidArgument,
            "verity on a directory"
        );
        assert_eq!(s.remove("nope").unwrap_err().kind(), Kind::NotFound);
    }

    #[tokio::test]
    async fn directories_in_host_mode_count_their_users() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("rootfs")).unwrap();
        let mut s = Storages::new(d.path().join("state"), true);
        let mut r = AddStorageRequest::new();
        r.storage_id = "img".into();
        r.source = StorageSource::DIRECTORY.into();
        r.locator = d.path().to_string_lossy().into_owned();
        s.add(&r, Layer::None).await.unwrap();
        assert_eq!(
            s.add(&r, Layer::None).await.unwrap_err().kind(),
            Kind::AlreadyExists
        );
        assert_eq!(s.acquire("img", "rootfs").unwrap(), d.path().join("rootfs"));
        assert_eq!(
            s.acquire("img", "missing").unwrap_err().kind(),
            Kind::NotFound
        );
        assert_eq!(
            s.acquire("img", "../x").unwrap_err().kind(),
            Kind::InvalidArgument
        );
        // A symlink in the storage cannot lead out of it.
        std::os::unix::fs::symlink("/", d.path().join("escape")).unwrap();
        assert_eq!(s.acquire("img", "escape").unwrap(), d.path().to_path_buf());
        s.release_use("img");
        assert_eq!(
            s.remove("img").unwrap_err().kind(),
            Kind::FailedPrecondition
        );
        s.release_use("img");
        s.remove("img").unwrap();
    }
}
