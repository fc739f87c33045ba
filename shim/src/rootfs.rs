//! Container root filesystems: from containerd's rootfs mounts (overlay of
//! snapshot layers, or a bind of one snapshot) to a read-only image file
//! (erofs or ext4) that the sandbox hot-adds to the pod VM.
//!
//! Images are cached in `image_dir` by the identity of their layers, so pods
//! of the same image share one file, and reference-counted across shims: each
//! pod that uses an image holds a ref file `<key>.refs/<pod>` naming the
//! process that holds it (PID, start time, boot id). An image no pod holds
//! stays cached for the next pod of the same image; the mtime of its refs
//! directory is its last use (set at every acquire and release). Each
//! acquire and release collects the cache ([`ImageStore::collect`]):
//! references whose holder process is gone (a shim that crashed and whose
//! `delete` never ran, a reboot), temporary files of builds that died, and —
//! while the cache takes more than its bound (`image_cache_mib`) — the least
//! recently used images no pod holds. Images in use are never removed. A
//! crashed shim's refs are also dropped by `delete`
//! ([`ImageStore::release_holder`]). All of it runs under an exclusive
//! `flock` on `<image_dir>/.lock`, because shims of different pods race.
//!
//! Not owned here: attaching the image to the VM (the sandbox) and the
//! writable layer (inside the guest). Every image gets a dm-verity hash tree
//! appended after [`build_image`] ([`crate::storage::verity`]); its root hash
//! and layout are recorded next to it (`<key>.<fstype>.verity`) and go to the
//! guest with the image. erofs images are built reproducibly (fixed
//! timestamp and UUID), so the same layers give the same root hash on every
//! node — the value a security officer puts in the image policy.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};
use veil_common::{Classify, Kind};

use sha2::{Digest, Sha256};

use crate::{
    config::RootfsFormat,
    storage::verity::{self, VerityError, VerityInfo},
};

/// Errors building or sharing a root image.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// containerd's mounts are not a shape we can turn into an image.
    #[error("unsupported rootfs mounts: {0}")]
    Unsupported(String),
    /// A filesystem operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the layers on the host failed.
    #[error("cannot mount the image layers at {path}")]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// OS error.
        #[source]
        source: nix::Error,
    },
    /// The dm-verity hash tree.
    #[error("dm-verity hash tree")]
    Verity(#[from] VerityError),
    /// The image tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Which tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
}

impl Classify for RootfsError {
    fn kind(&self) -> Kind {
        match self {
            RootfsError::Unsupported(_) => Kind::InvalidArgument,
            RootfsError::Io { .. } | RootfsError::Mount { .. } | RootfsError::Tool { .. } => {
                Kind::Internal
            }
            RootfsError::Verity(e) => e.kind(),
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One rootfs mount from containerd, in our terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// `overlay` or `bind`.
    pub typ: String,
    /// Mount source.
    pub source: PathBuf,
    /// Mount options.
    pub options: Vec<String>,
}

/// What the image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Read-only layers, top first (overlay `lowerdir` order).
    pub lowers: Vec<PathBuf>,
    /// The container's writable layer on the host, if it already has content
    /// (then the image is private to the container).
    pub upper: Option<PathBuf>,
}

impl Layers {
    /// Interprets containerd's rootfs mounts.
    pub fn from_mounts(mounts: &[RootfsMount]) -> Result<Self, RootfsError> {
        let [m] = mounts else {
            return Err(RootfsError::Unsupported(format!(
                "{} mounts (expected one overlay or bind)",
                mounts.len()
            )));
        };
        match m.typ.as_str() {
            "overlay" => {
                let mut lowers = Vec::new();
                let mut upper = None;
                for o in &m.options {
                    if let Some(l) = o.strip_prefix("lowerdir=") {
                        lowers.extend(l.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
                    } else if let Some(u) = o.strip_prefix("upperdir=") {
                        upper = Some(PathBuf::from(u));
                    }
                }
                if lowers.is_empty() {
                    return Err(RootfsError::Unsupported("overlay without lowerdir".into()));
                }
                let upper = upper.filter(|u| !dir_is_empty(u));
                Ok(Layers { lowers, upper })
            }
            "bind" | "rbind" => {
                let ro = m.options.iter().any(|o| o == "ro");
                // A writable bind is a container's own snapshot: private.
                if ro || dir_is_empty(&m.source) {
                    Ok(Layers {
                        lowers: vec![m.source.clone()],
                        upper: None,
                    })
                } else {
                    Ok(Layers {
                        lowers: Vec::new(),
                        upper: Some(m.source.clone()),
                    })
                }
            }
            other => Err(RootfsError::Unsupported(format!("mount type {other}"))),
        }
    }

    /// The cache key: shared layers give a key common to all pods; a private
    /// upper makes it unique to `owner`.
    pub fn key(&self, format: RootfsFormat, owner: &str) -> String {
        let mut h = Sha256::new();
        h.update(format.fstype());
        for l in &self.lowers {
            h.update(b"\0L");
            h.update(l.as_os_str().as_encoded_bytes());
        }
        if let Some(u) = &self.upper {
            h.update(b"\0U");
            h.update(u.as_os_str().as_encoded_bytes());
            h.update(b"\0O");
            h.update(owner.as_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// An image held by a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Cache key.
    pub key: String,
    /// The image file.
    pub path: PathBuf,
    /// Its filesystem type (`erofs`, `ext4`).
    pub fstype: &'static str,
    /// Its dm-verity hash tree (`None`: an image from before hash trees,
    /// which a confidential pod refuses).
    pub verity: Option<VerityInfo>,
}

/// The shared image cache: reference-counted by the pods that use its
/// images, bounded in size for the ones no pod uses.
#[derive(Debug, Clone)]
pub struct ImageStore {
    /// Cache directory.
    pub dir: PathBuf,
    /// Image format.
    pub format: RootfsFormat,
    /// `mkfs.erofs`.
    pub mkfs_erofs: PathBuf,
    /// `mkfs.ext4`.
    pub mkfs_ext4: PathBuf,
    /// The pods' state root: a reference without a holder record (written
    /// before records existed) is live while `<state_dir>/<pod>` exists.
    pub state_dir: PathBuf,
    /// Disk space the cache may take, bytes. Images no pod uses are removed
    /// least recently used first while the whole cache is larger; images in
    /// use are never removed.
    pub cache_bytes: u64,
}

/// What the cache holds after a collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Images in the cache.
    pub images: usize,
    /// Of which some pod uses.
    pub in_use: usize,
    /// Disk space of all images (with their dm-verity records), bytes.
    pub bytes: u64,
    /// Disk space of the images in use, bytes.
    pub in_use_bytes: u64,
    /// Live references (pods × images).
    pub refs: usize,
    /// What this collection removed: image keys, stale references
    /// (`key/holder`) and temporary files, by name.
    pub removed: Vec<String>,
}

/// An exclusive lock on the cache, released when dropped.
struct CacheLock(#[allow(dead_code, reason = "held for its Drop")] nix::fcntl::Flock<fs::File>);

impl CacheLock {
    fn take(dir: &Path) -> Result<Self, RootfsError> {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let lock =
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
                RootfsError::Io {
                    what: "lock",
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
        Ok(CacheLock(lock))
    }
}

/// The process that holds a reference (or builds a temporary image): its
/// PID, start time and the boot it ran in. The reference is live while that
/// very process runs; a PID reused by another process, or a reboot, does
/// not keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    pid: u32,
    start: u64,
    boot: String,
}

impl Holder {
    /// This process.
    fn this_process() -> Option<Self> {
        let pid = std::process::id();
        Some(Holder {
            pid,
            start: crate::state::start_time(pid)?,
            boot: boot_id()?,
        })
    }

    fn render(&self) -> String {
        format!(
            "pid {}\nstart {}\nboot {}\n",
            self.pid, self.start, self.boot
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let (mut pid, mut start, mut boot) = (None, None, None);
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("start", v)) => start = v.trim().parse().ok(),
                Some(("boot", v)) => boot = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Some(Holder {
            pid: pid?,
            start: start?,
            boot: boot?,
        })
    }

    fn alive(&self, boot_now: Option<&str>) -> bool {
        // A failed read of the boot id never makes a live holder stale.
        boot_now.is_none_or(|b| b == self.boot)
            && crate::state::start_time(self.pid) == Some(self.start)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string())
}

/// The builder of a temporary image file `.<key>.<fstype>.<pid>.<start>.tmp`
/// (or `.<key>.<pid>.tmp`, from before start times were in the name) is
/// gone.
fn temp_is_stale(name: &str) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    let mut parts = stem.rsplit('.');
    let (last, before) = (parts.next(), parts.next());
    let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    match (num(before), num(last)) {
        (Some(pid), Some(start)) => u32::try_from(pid)
            .map(|pid| crate::state::start_time(pid) != Some(start))
            .unwrap_or(true),
        (None, Some(pid)) => u32::try_from(pid)
            .map(|pid| crate::state::start_time(pid).is_none())
            .unwrap_or(true),
        _ => false,
    }
}

/// Disk space of a file (allocated blocks: a sparse ext4 image counts what
/// it takes, not its length).
fn disk_bytes(m: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.blocks().saturating_mul(512)
}

/// One image of the cache as a directory listing shows it.
#[derive(Debug, Default)]
struct Entry {
    /// `<key>.<fstype>`.
    image: Option<PathBuf>,
    /// `<key>.<fstype>.verity` records (one per format seen).
    records: Vec<PathBuf>,
    /// `<key>.refs`.
    refs: Option<PathBuf>,
}

/// Sets the last-use time of an image (its refs directory's mtime).
fn touch(refs: &Path) -> Result<(), RootfsError> {
    let d = fs::File::open(refs).map_err(io("open", refs))?;
    d.set_modified(std::time::SystemTime::now())
        .map_err(io("set the last use time of", refs))
}

fn remove_file_if_there(p: &Path) -> Result<(), RootfsError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", p)(e)),
    }
}

impl ImageStore {
    /// The store `config` describes, building images in `format`. (Which
    /// format only matters for building: collection handles all of them.)
    pub fn new(config: &crate::config::Config, format: RootfsFormat) -> Self {
        ImageStore {
            dir: config.image_dir.clone(),
            format,
            mkfs_erofs: config.mkfs_erofs.clone(),
            mkfs_ext4: config.mkfs_ext4.clone(),
            state_dir: config.state_dir.clone(),
            cache_bytes: config.image_cache_mib.saturating_mul(1024 * 1024),
        }
    }

    fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{}", self.format.fstype()))
    }

    fn refs_dir(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.refs"))
    }

    /// Gets (building if needed) the image of `layers` and records that
    /// `holder` (a pod, served by this process) uses it. `scratch` is a
    /// private directory for the temporary mount. Blocking: call from a
    /// blocking thread.
    pub fn acquire(
        &self,
        layers: &Layers,
        holder: &str,
        scratch: &Path,
    ) -> Result<Image, RootfsError> {
        let key = layers.key(self.format, holder);
        let path = self.image_path(&key);
        let me = Holder::this_process();
        let started = std::time::Instant::now();
        let _lock = CacheLock::take(&self.dir)?;
        if !path.exists() {
            let fstype = self.format.fstype();
            let tmp = self.dir.join(match &me {
                Some(h) => format!(".{key}.{fstype}.{}.{}.tmp", h.pid, h.start),
                None => format!(".{key}.{fstype}.{}.tmp", std::process::id()),
            });
            let built = build_image(self, layers, &tmp, scratch)
                .and_then(|()| Ok(verity::append_tree(&tmp)?));
            let info = match built {
                Ok(info) => info,
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            // The record first: an image file never exists without it.
            info.save(&path)?;
            fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
            let ms = started.elapsed().as_millis();
            tracing::info!(key, path = %path.display(), root_hash = %info.root_hash, ms, "built root image");
        } else {
            let ms = started.elapsed().as_millis();
            tracing::info!(key, path = %path.display(), ms, "root image from the cache");
        }
        let verity = match VerityInfo::load(&path) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(key, error = %e, "root image without a dm-verity record");
                None
            }
        };
        let refs = self.refs_dir(&key);
        fs::create_dir_all(&refs).map_err(io("create", &refs))?;
        let r = refs.join(holder);
        let record = me.map(|h| h.render()).unwrap_or_default();
        fs::write(&r, record).map_err(io("write", &r))?;
        touch(&refs)?;
        self.collect_logged();
        Ok(Image {
            key,
            path,
            fstype: self.format.fstype(),
            verity,
        })
    }

    /// Drops `holder`'s reference to image `key`. The image stays cached
    /// (its last use now) until the size bound needs its space.
    pub fn release(&self, key: &str, holder: &str) -> Result<(), RootfsError> {
        let _lock = CacheLock::take(&self.dir)?;
        self.drop_ref(&self.refs_dir(key), holder)?;
        self.collect_logged();
        Ok(())
    }

    fn drop_ref(&self, refs: &Path, holder: &str) -> Result<(), RootfsError> {
        let r = refs.join(holder);
        if r.exists() {
            remove_file_if_there(&r)?;
            touch(refs)?;
        }
        Ok(())
    }

    /// Drops every reference `holder` has (its shutdown, or cleanup after
    /// a crashed shim).
    pub fn release_holder(&self, holder: &str) -> Result<(), RootfsError> {
        if !self.dir.exists() {
            return Ok(());
        }
        let _lock = CacheLock::take(&self.dir)?;
        let entries = fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".refs") {
                self.drop_ref(&e.path(), holder)?;
            }
        }
        self.collect_logged();
        Ok(())
    }

    /// Collects the cache: references whose holder is gone, temporary files
    /// of builds that died, records without images, and the least recently
    /// used images no pod holds while the cache is over its bound.
    pub fn collect(&self) -> Result<CacheUsage, RootfsError> {
        if !self.dir.exists() {
            return Ok(CacheUsage::default());
        }
        let _lock = CacheLock::take(&self.dir)?;
        self.collect_locked()
    }

    /// [`Self::collect`] where a failure is only logged: pods never fail on
    /// the cache's housekeeping.
    fn collect_logged(&self) {
        if let Err(e) = self.collect_locked() {
            tracing::warn!(dir = %self.dir.display(), error = %veil_common::error_chain(&e), "cannot collect the image cache");
        }
    }

    /// Whether `holder`'s reference, recorded as `text`, is still live.
    fn ref_is_live(&self, holder: &str, text: &str, boot_now: Option<&str>) -> bool {
        match Holder::parse(text) {
            Some(h) => h.alive(boot_now),
            // No record: live while the pod's state directory is there.
            None => self.state_dir.join(holder).exists(),
        }
    }

    fn collect_locked(&self) -> Result<CacheUsage, RootfsError> {
        let mut usage = CacheUsage::default();
        let mut entries: std::collections::BTreeMap<String, Entry> = Default::default();
        let listing = fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        for e in listing.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name == ".lock" {
                continue;
            }
            if name.starts_with('.') {
                if name.ends_with(".tmp") && temp_is_stale(&name) {
                    remove_file_if_there(&path)?;
                    tracing::info!(file = %name, "removed the temporary image of a build that died");
                    usage.removed.push(name);
                }
                continue;
            }
            if let Some(key) = name.strip_suffix(".refs") {
                entries.entry(key.to_string()).or_default().refs = Some(path);
                continue;
            }
            let (base, record) = match name.strip_suffix(".verity") {
                Some(b) => (b, true),
                None => (name.as_str(), false),
            };
            let Some((key, fstype)) = base.rsplit_once('.') else {
                continue;
            };
            if !matches!(fstype, "erofs" | "ext4") {
                continue;
            }
            let entry = entries.entry(key.to_string()).or_default();
            if record {
                entry.records.push(path);
            } else {
                entry.image = Some(path);
            }
        }

        let boot_now = boot_id();
        // (last use, key, bytes) of the images no pod holds.
        let mut idle = Vec::new();
        for (key, entry) in &entries {
            let mut live = 0;
            if let Some(refs) = &entry.refs {
                for r in fs::read_dir(refs).map_err(io("list", refs))?.flatten() {
                    let holder = r.file_name().to_string_lossy().into_owned();
                    let text = fs::read_to_string(r.path()).unwrap_or_default();
                    if self.ref_is_live(&holder, &text, boot_now.as_deref()) {
                        live += 1;
                        continue;
                    }
                    remove_file_if_there(&r.path())?;
                    tracing::info!(
                        key,
                        holder,
                        "collected the image reference of a pod that is gone"
                    );
                    usage.removed.push(format!("{key}/{holder}"));
                }
            }
            usage.refs += live;
            let Some(image) = &entry.image else {
                // A record or refs without an image: a removal that was cut
                // short (or an image gone under a pod, which keeps its refs).
                if live == 0 {
                    self.remove_entry(entry)?;
                }
                continue;
            };
            let Ok(meta) = image.metadata() else {
                continue;
            };
            let bytes = disk_bytes(&meta)
                + entry
                    .records
                    .iter()
                    .filter_map(|r| r.metadata().ok())
                    .map(|m| disk_bytes(&m))
                    .sum::<u64>();
            usage.images += 1;
            usage.bytes += bytes;
            if live > 0 {
                usage.in_use += 1;
                usage.in_use_bytes += bytes;
                continue;
            }
            let last_use = entry
                .refs
                .as_ref()
                .and_then(|r| r.metadata().ok())
                .unwrap_or(meta)
                .modified()
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            idle.push((last_use, key.clone(), bytes));
        }

        idle.sort();
        for (_, key, bytes) in idle {
            if usage.bytes <= self.cache_bytes {
                break;
            }
            if let Some(entry) = entries.get(&key) {
                self.remove_entry(entry)?;
            }
            usage.images -= 1;
            usage.bytes -= bytes;
            tracing::info!(
                key,
                bytes,
                bound = self.cache_bytes,
                "removed the least recently used cached root image"
            );
            usage.removed.push(key);
        }
        if usage.in_use_bytes > self.cache_bytes {
            tracing::warn!(
                in_use_bytes = usage.in_use_bytes,
                bound = self.cache_bytes,
                images = usage.in_use,
                "root images in use alone exceed the image cache bound (image_cache_mib); none of them is removed"
            );
        }
        Ok(usage)
    }

    /// Removes an image and everything next to it: the image first, so a
    /// removal cut short leaves only what the next collection removes.
    fn remove_entry(&self, entry: &Entry) -> Result<(), RootfsError> {
        if let Some(image) = &entry.image {
            remove_file_if_there(image)?;
        }
        for r in &entry.records {
            remove_file_if_there(r)?;
        }
        if let Some(refs) = &entry.refs {
            match fs::remove_dir_all(refs) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", refs)(e)),
            }
        }
        Ok(())
    }

    /// The cache's contents, collected first.
    pub fn usage(&self) -> Result<CacheUsage, RootfsError> {
        let mut u = self.collect()?;
        u.removed.clear();
        Ok(u)
    }
}

/// Builds the image of `layers` at `out`. With several layers (or a non-empty
/// upper), they are overlay-mounted read-only at a scratch mount point first
/// so that whiteouts apply.
pub fn build_image(
    store: &ImageStore,
    layers: &Layers,
    out: &Path,
    scratch: &Path,
) -> Result<(), RootfsError> {
    let mut stack: Vec<&Path> = Vec::new();
    if let Some(u) = &layers.upper {
        stack.push(u);
    }
    stack.extend(layers.lowers.iter().map(PathBuf::as_path));
    let mounted;
    let source: &Path = match stack.as_slice() {
        [] => return Err(RootfsError::Unsupported("no layers".into())),
        [one] => one,
        many => {
            let mp = scratch.join(format!("layers-{}", std::process::id()));
            fs::create_dir_all(&mp).map_err(io("create", &mp))?;
            let lowerdir = many
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":");
            nix::mount::mount(
                Some("overlay"),
                &mp,
                Some("overlay"),
                nix::mount::MsFlags::MS_RDONLY,
                Some(format!("lowerdir={lowerdir}").as_str()),
            )
            .map_err(|source| RootfsError::Mount {
                path: mp.clone(),
                source,
            })?;
            mounted = ScratchMount(mp);
            &mounted.0
        }
    };
    let mut cmd = match store.format {
        RootfsFormat::Erofs => {
            let mut c = Command::new(&store.mkfs_erofs);
            // Reproducible: the same tree gives the same image (and root hash).
            c.args(["--quiet", "-T0", "-U", ZERO_UUID])
                .arg(out)
                .arg(source);
            c
        }
        RootfsFormat::Ext4 => {
            let size_mib = du_mib(source).saturating_mul(13) / 10 + 16;
            let mut c = Command::new(&store.mkfs_ext4);
            c.args(["-q", "-F", "-O", "^has_journal", "-d"])
                .arg(source)
                .arg(out)
                .arg(format!("{size_mib}M"));
            c
        }
    };
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| RootfsError::Tool {
        tool: tool.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(RootfsError::Tool {
            tool,
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    let f = fs::File::open(out).map_err(io("open", out))?;
    f.sync_all().map_err(io("sync", out))?;
    Ok(())
}

/// The filesystem UUID of every image: images are identified by their root
/// hash, and a random UUID would make it differ from build to build.
const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Apparent size of a tree in MiB (for sizing ext4 images).
fn du_mib(dir: &Path) -> u64 {
    fn walk(p: &Path, total: &mut u64) {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                if let Ok(m) = e.path().symlink_metadata() {
                    *total += m.len().max(4096);
                    if m.is_dir() {
                        walk(&e.path(), total);
                    }
                }
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total / (1024 * 1024) + 1
}

/// A temporary mount, lazily unmounted and removed when dropped.
struct ScratchMount(PathBuf);

impl Drop for ScratchMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot unmount scratch mount");
        }
        let _ = fs::remove_dir(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(opts: &[&str]) -> Vec<RootfsMount> {
        vec![RootfsMount {
            typ: "overlay".into(),
            source: "overlay".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
        }]
    }

    #[test]
    fn overlay_layers_and_a_shared_key_while_the_upper_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let upper = d.path().join("upper");
        fs::create_dir(&upper).unwrap();
        let m = overlay(&[
            "index=off",
            &format!("upperdir={}", upper.display()),
            "workdir=/w",
            "lowerdir=/s/2/fs:/s/1/fs",
        ]);
        let l = Layers::from_mounts(&m).unwrap();
        assert_eq!(
            l.lowers,
            [PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        assert_eq!(l.upper, None);
        assert_eq!(
            l.key(RootfsFormat::Erofs, "pod-a"),
            l.key(RootfsFormat::Erofs, "pod-b")
        );
        assert_ne!(
            l.key(RootfsFormat::Erofs, "a"),
            l.key(RootfsFormat::Ext4, "a")
        );

        fs::write(upper.join("f"), "x").unwrap();
        let private = Layers::from_mounts(&m).unwrap();
        assert_eq!(private.upper.as_deref(), Some(upper.as_path()));
        assert_ne!(
            private.key(RootfsFormat::Erofs, "pod-a"),
            private.key(RootfsFormat::Erofs, "pod-b")
        );
    }

    #[test]
    fn unsupported_shapes_are_named() {
        assert!(matches!(
            Layers::from_mounts(&[]),
            Err(RootfsError::Unsupported(_))
        ));
        assert!(matches!(
            Layers::from_mounts(&overlay(&["upperdir=/u"])),
            Err(RootfsError::Unsupported(_))
        ));
        let tmpfs = vec![RootfsMount {
            typ: "tmpfs".into(),
            source: "x".into(),
            options: vec![],
        }];
        assert!(matches!(
            Layers::from_mounts(&tmpfs),
            Err(RootfsError::Unsupported(_))
        ));
    }

    /// A store in `d` that cannot build (so every image a test uses is
    /// one it put there).
    fn store_in(d: &Path, cache_bytes: u64) -> ImageStore {
        let store = ImageStore {
            dir: d.join("images"),
            format: RootfsFormat::Erofs,
            mkfs_erofs: "/bin/false".into(),
            mkfs_ext4: "/bin/false".into(),
            state_dir: d.join("state"),
            cache_bytes,
        };
        fs::create_dir_all(&store.dir).unwrap();
        fs::create_dir_all(&store.state_dir).unwrap();
        store
    }

    /// A cached image of `kib` KiB (and its record) for the layer `name`,
    /// used last `age_s` seconds ago.
    fn cached(store: &ImageStore, d: &Path, name: &str, kib: usize, age_s: u64) -> Layers {
        let layer = d.join(name);
        fs::create_dir_all(&layer).unwrap();
        let layers = Layers {
            lowers: vec![layer],
            upper: None,
        };
        let key = layers.key(store.format, "x");
        fs::write(store.image_path(&key), vec![0x5a; kib * 1024]).unwrap();
        fs::write(VerityInfo::record_path(&store.image_path(&key)), b"{}").unwrap();
        let refs = store.refs_dir(&key);
        fs::create_dir_all(&refs).unwrap();
        set_last_use(&refs, age_s);
        layers
    }

    fn set_last_use(refs: &Path, age_s: u64) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        fs::File::open(refs).unwrap().set_modified(t).unwrap();
    }

    fn size_of(store: &ImageStore, l: &Layers) -> u64 {
        let img = store.image_path(&l.key(store.format, "x"));
        let rec = VerityInfo::record_path(&img);
        disk_bytes(&img.metadata().unwrap()) + disk_bytes(&rec.metadata().unwrap())
    }

    fn is_cached(store: &ImageStore, l: &Layers) -> bool {
        store.image_path(&l.key(store.format, "x")).exists()
    }

    /// A holder record of a process that is gone: this process's PID with
    /// another start time (as after a PID reuse).
    fn gone_holder() -> String {
        let mut h = Holder::this_process().unwrap();
        h.start += 1;
        h.render()
    }

    #[test]
    fn a_released_image_stays_cached_and_is_reused_without_a_build() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 1 << 30);
        let l = cached(&store, d.path(), "layer", 64, 0);
        let a = store.acquire(&l, "pod-a", d.path()).unwrap();
        let b = store.acquire(&l, "pod-b", d.path()).unwrap();
        assert_eq!(a, b);
        store.release(&a.key, "pod-a").unwrap();
        store.release_holder("pod-b").unwrap();
        assert!(a.path.exists(), "an unused image stays cached");
        assert!(store.refs_dir(&a.key).read_dir().unwrap().next().is_none());
        // mkfs is /bin/false: a third pod gets the cached file, no build.
        let c = store.acquire(&l, "pod-c", d.path()).unwrap();
        assert_eq!(c.path, a.path);
        let refs = fs::read_to_string(store.refs_dir(&a.key).join("pod-c")).unwrap();
        assert_eq!(Holder::parse(&refs), Holder::this_process());
    }

    #[test]
    fn least_recently_used_unreferenced_images_go_first_down_to_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let mut store = store_in(d.path(), 0);
        let old = cached(&store, d.path(), "old", 64, 300);
        let mid = cached(&store, d.path(), "mid", 64, 200);
        let new = cached(&store, d.path(), "new", 64, 100);
        store.cache_bytes = size_of(&store, &mid) + size_of(&store, &new);
        let u = store.collect().unwrap();
        assert!(!is_cached(&store, &old));
        assert!(is_cached(&store, &mid) && is_cached(&store, &new));
        assert_eq!(u.images, 2);
        assert_eq!(u.bytes, store.cache_bytes);
        assert_eq!(u.removed, [old.key(store.format, "x")]);
        assert!(!store.refs_dir(&old.key(store.format, "x")).exists());
        assert!(!VerityInfo::record_path(&store.image_path(&old.key(store.format, "x"))).exists());

        // A use makes `mid` the most recent: one more byte short, `new` goes.
        let m = store.acquire(&mid, "pod", d.path()).unwrap();
        store.release(&m.key, "pod").unwrap();
        store.cache_bytes -= 1;
        store.collect().unwrap();
        assert!(is_cached(&store, &mid) && !is_cached(&store, &new));
    }

    #[test]
    fn images_in_use_are_never_removed_even_over_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 0);
        let used = cached(&store, d.path(), "used", 64, 1000);
        let idle = cached(&store, d.path(), "idle", 64, 10);
        store.acquire(&used, "pod", d.path()).unwrap();
        // The acquire collected already: over a zero bound, only the idle
        // image could go.
        assert!(is_cached(&store, &used));
        assert!(!is_cached(&store, &idle));
        let u = store.usage().unwrap();
        assert_eq!((u.images, u.in_use, u.refs), (1, 1, 1));
        assert_eq!(u.in_use_bytes, size_of(&store, &used));
        assert!(u.in_use_bytes > store.cache_bytes);
        // Its last holder gone, a zero bound removes it.
        store.release(&used.key(store.format, "x"), "pod").unwrap();
        assert!(!is_cached(&store, &used));
        assert_eq!(store.usage().unwrap(), CacheUsage::default());
    }

    #[test]
    fn references_of_gone_holders_are_collected_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 0);
        let l = cached(&store, d.path(), "layer", 64, 10);
        let key = l.key(store.format, "x");
        let refs = store.refs_dir(&key);
        let me = Holder::this_process().unwrap();
        fs::write(refs.join("live"), me.render()).unwrap();
        fs::write(refs.join("reused-pid"), gone_holder()).unwrap();
        let rebooted = Holder {
            boot: "another-boot".into(),
            ..me.clone()
        };
        fs::write(refs.join("rebooted"), rebooted.render()).unwrap();
        // Refs from before holder records: live while the pod dir is there.
        fs::create_dir(store.state_dir.join("old-live")).unwrap();
        fs::write(refs.join("old-live"), b"").unwrap();
        fs::write(refs.join("old-gone"), b"").unwrap();

        let u = store.collect().unwrap();
        let mut removed = u.removed.clone();
        removed.sort();
        assert_eq!(
            removed,
            [
                format!("{key}/old-gone"),
                format!("{key}/rebooted"),
                format!("{key}/reused-pid")
            ]
        );
        assert!(is_cached(&store, &l), "live refs keep the image");
        assert_eq!(u.refs, 2);
        assert!(refs.join("live").exists() && refs.join("old-live").exists());

        fs::remove_dir(store.state_dir.join("old-live")).unwrap();
        fs::remove_file(refs.join("live")).unwrap();
        store.collect().unwrap();
        assert!(!is_cached(&store, &l), "nothing holds it, the bound is 0");
    }

    #[test]
    fn a_crashed_holders_ref_is_collected_at_the_next_acquire() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 1 << 30);
        let l = cached(&store, d.path(), "layer", 64, 10);
        let key = l.key(store.format, "x");
        fs::write(store.refs_dir(&key).join("crashed"), gone_holder()).unwrap();
        store.acquire(&l, "next", d.path()).unwrap();
        assert!(!store.refs_dir(&key).join("crashed").exists());
        assert!(store.refs_dir(&key).join("next").exists());
    }

    #[test]
    fn temporary_files_of_dead_builders_are_collected() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 1 << 30);
        let me = Holder::this_process().unwrap();
        let ours = format!(".k1.erofs.{}.{}.tmp", me.pid, me.start);
        let reused = format!(".k2.erofs.{}.{}.tmp", me.pid, me.start + 1);
        // A PID above the kernel's maximum (4194304) never runs.
        let dead_old_style = ".k3.4194999.tmp".to_string();
        let unknown = ".something.tmp".to_string();
        for n in [&ours, &reused, &dead_old_style, &unknown] {
            fs::write(store.dir.join(n), b"partial").unwrap();
        }
        let mut removed = store.collect().unwrap().removed;
        removed.sort();
        let mut want = [dead_old_style, reused];
        want.sort();
        assert_eq!(removed, want);
        assert!(store.dir.join(&ours).exists(), "its builder still runs");
        assert!(store.dir.join(&unknown).exists(), "not a name we make");
    }

    #[test]
    fn leftovers_of_a_cut_removal_are_collected() {
        let d = tempfile::tempdir().unwrap();
        let store = store_in(d.path(), 1 << 30);
        fs::write(store.dir.join("abc.erofs.verity"), b"{}").unwrap();
        fs::create_dir(store.dir.join("abc.refs")).unwrap();
        fs::create_dir(store.dir.join("def.refs")).unwrap();
        fs::write(store.dir.join("def.refs/pod"), gone_holder()).unwrap();
        store.collect().unwrap();
        let left: Vec<_> = fs::read_dir(&store.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn holder_records_round_trip_and_junk_is_no_record() {
        let h = Holder::this_process().unwrap();
        assert_eq!(Holder::parse(&h.render()), Some(h.clone()));
        assert!(h.alive(Some(&h.boot)));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("pid x\nstart 1\nboot b\n"), None);
    }
}
