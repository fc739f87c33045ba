//! Container root filesystems: from containerd's rootfs mounts (overlay of
//! snapshot layers, or a bind of one snapshot) to a read-only image file
//! (erofs or ext4) that the sandbox hot-adds to the pod VM.
//!
//! Images are cached in `image_dir` by the identity of their layers, so pods
//! of the same image share one file, and reference-counted across shims: each
//! pod that uses an image holds a ref file `<key>.refs/<pod>`; the image goes
//! when its last ref does. A crashed shim's refs are dropped by `delete`
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

/// The shared, reference-counted image cache.
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

impl ImageStore {
    fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{}", self.format.fstype()))
    }

    fn refs_dir(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.refs"))
    }

    /// Gets (building if needed) the image of `layers` and records that
    /// `holder` (a pod) uses it. `scratch` is a private directory for the
    /// temporary mount. Blocking: call from a blocking thread.
    pub fn acquire(
        &self,
        layers: &Layers,
        holder: &str,
        scratch: &Path,
    ) -> Result<Image, RootfsError> {
        let key = layers.key(self.format, holder);
        let path = self.image_path(&key);
        let _lock = CacheLock::take(&self.dir)?;
        if !path.exists() {
            let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
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
            tracing::info!(key, path = %path.display(), root_hash = %info.root_hash, "built root image");
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
        fs::write(&r, b"").map_err(io("write", &r))?;
        Ok(Image {
            key,
            path,
            fstype: self.format.fstype(),
            verity,
        })
    }

    /// Drops `holder`'s reference to image `key`; the last reference removes
    /// the image.
    pub fn release(&self, key: &str, holder: &str) -> Result<(), RootfsError> {
        let _lock = CacheLock::take(&self.dir)?;
        self.release_locked(key, holder)
    }

    fn release_locked(&self, key: &str, holder: &str) -> Result<(), RootfsError> {
        let refs = self.refs_dir(key);
        let _ = fs::remove_file(refs.join(holder));
        if dir_is_empty(&refs) {
            let _ = fs::remove_dir(&refs);
            let img = self.image_path(key);
            let _ = fs::remove_file(VerityInfo::record_path(&img));
            match fs::remove_file(&img) {
                Ok(()) => tracing::info!(key, "removed unused root image"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &img)(e)),
            }
        }
        Ok(())
    }

    /// Drops every reference `holder` has (cleanup after a crashed shim).
    pub fn release_holder(&self, holder: &str) -> Result<(), RootfsError> {
        if !self.dir.exists() {
            return Ok(());
        }
        let _lock = CacheLock::take(&self.dir)?;
        let entries = fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".refs") {
                if e.path().join(holder).exists() {
                    self.release_locked(key, holder)?;
                }
            }
        }
        Ok(())
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

    #[test]
    fn refs_keep_an_image_until_the_last_holder_goes() {
        let d = tempfile::tempdir().unwrap();
        let store = ImageStore {
            dir: d.path().join("images"),
            format: RootfsFormat::Ext4,
            mkfs_erofs: "mkfs.erofs".into(),
            mkfs_ext4: "/bin/true".into(),
        };
        // A stand-in image so no mkfs runs: pre-create the file under its key.
        let layer = d.path().join("layer");
        fs::create_dir(&layer).unwrap();
        let layers = Layers {
            lowers: vec![layer],
            upper: None,
        };
        let key = layers.key(store.format, "x");
        fs::create_dir_all(&store.dir).unwrap();
        fs::write(store.image_path(&key), b"img").unwrap();
        let a = store.acquire(&layers, "pod-a", d.path()).unwrap();
        let b = store.acquire(&layers, "pod-b", d.path()).unwrap();
        assert_eq!(a, b);
        store.release(&a.key, "pod-a").unwrap();
        assert!(a.path.exists(), "pod-b still uses it");
        store.release_holder("pod-b").unwrap();
        assert!(!a.path.exists());
        assert!(!store.refs_dir(&key).exists());
    }
}
