//! Host directories shared with the pod through virtio-fs.
//!
//! A pod whose handler has `shared_dirs` gets one `virtiofsd` at boot, before
//! QEMU (which needs its vhost-user socket): it serves the pod's staging
//! directory `<pod dir>/shared`, which the guest mounts once (storage
//! `shared`, `AddStorage` with `VIRTIO_FS`). The device exists from boot —
//! microvm has no hotplug for virtio-mmio — so volumes come and go below it:
//! each host directory or file a container mounts is bind-mounted (on the
//! host) at `shared/<id>`, and the container's bind source is
//! `storage:shared/<id>`. The staging directory is a shared mount, so those
//! binds propagate into virtiofsd's own mount namespace (`--sandbox
//! namespace` makes it a slave of the host's).
//!
//! virtiofsd is the shim's child (killed with the shim, `PR_SET_PDEATHSIG`),
//! its PID is recorded in the pod directory (so `delete` after a crash kills
//! it), and every teardown path stops it by that PID; the staging binds are
//! unmounted with the pod directory.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use veil_common::{Classify, Kind};
use veil_protocol::agent::{AddStorageRequest, StorageSource};

use crate::process::{ManagedChild, ProcessError, SpawnOptions};

/// The guest storage id of the pod's share.
pub const STORAGE_ID: &str = "shared";
/// The virtio-fs tag of the pod's share.
pub const TAG: &str = "veil-shared";

/// Errors of the pod's share.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// virtiofsd is not where the config says.
    #[error("virtiofsd not found at {0} (config key `virtiofsd`; ci/setup.sh installs it): needed because the handler has shared_dirs = true")]
    NoDaemon(PathBuf),
    /// virtiofsd could not be started.
    #[error("cannot start virtiofsd")]
    Spawn(#[source] ProcessError),
    /// virtiofsd did not listen in time.
    #[error("virtiofsd did not listen on {socket} within {timeout:?} (log: {log})")]
    NotReady {
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// Its log.
        log: PathBuf,
    },
    /// A mount operation on the host failed.
    #[error("cannot {what} {path}")]
    Mount {
        /// What.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for SharedError {
    fn kind(&self) -> Kind {
        match self {
            SharedError::NoDaemon(_) => Kind::FailedPrecondition,
            SharedError::Spawn(e) => e.kind(),
            SharedError::NotReady { .. } | SharedError::Mount { .. } => Kind::Internal,
        }
    }
}

fn mount_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> SharedError + 'a {
    move |e| SharedError::Mount {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// The pod's virtiofsd and its staging directory.
pub struct VirtioFs {
    process: ManagedChild,
    /// vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The staging directory virtiofsd serves.
    pub root: PathBuf,
}

impl VirtioFs {
    /// Makes `<dir>/shared` a shared mount and starts `binary` on it; waits
    /// until it listens on `<dir>/virtiofs.sock`.
    pub fn start(binary: &Path, dir: &Path, opts: SpawnOptions) -> Result<Self, SharedError> {
        if !binary.is_file() {
            return Err(SharedError::NoDaemon(binary.to_path_buf()));
        }
        let root = dir.join("shared");
        std::fs::create_dir_all(&root).map_err(|source| SharedError::Mount {
            what: "create",
            path: root.clone(),
            source,
        })?;
        mount(
            Some(&root),
            &root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err("bind", &root))?;
        mount(
            None::<&str>,
            &root,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(mount_err("make shared", &root))?;
        let socket = dir.join("virtiofs.sock");
        let log = dir.join("virtiofsd.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&root)
            .args([
                "--sandbox",
                "namespace",
                // What the host changes is seen at once, as with runc.
                "--cache",
                "never",
                "--announce-submounts",
                "--log-level",
                "warn",
            ]);
        let mut process =
            ManagedChild::spawn("virtiofsd", cmd, &log, opts).map_err(SharedError::Spawn)?;
        let timeout = crate::patience::scaled(Duration::from_secs(10));
        if !crate::vsock::wait_listening(&mut process, &socket, timeout) {
            return Err(SharedError::NotReady {
                socket,
                timeout,
                log,
            });
        }
        Ok(VirtioFs {
            process,
            socket,
            root,
        })
    }

    /// virtiofsd's PID.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether it still runs (reaps it once it exited).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops virtiofsd (SIGKILL to its PID, reaped) and removes its socket.
    pub fn stop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The AddStorage request that mounts the share in the guest.
pub fn add_request() -> AddStorageRequest {
    let mut r = AddStorageRequest::new();
    r.storage_id = STORAGE_ID.into();
    r.source = StorageSource::VIRTIO_FS.into();
    r.locator = TAG.into();
    r
}

/// The guest bind source of share `id`.
pub fn bind_source(id: &str) -> String {
    format!("storage:{STORAGE_ID}/{id}")
}

/// Binds host path `host` (a directory or a file) at `<root>/<id>`.
pub fn share(root: &Path, id: &str, host: &Path) -> Result<(), SharedError> {
    let target = root.join(id);
    let meta = std::fs::metadata(host).map_err(|source| SharedError::Mount {
        what: "stat",
        path: host.to_path_buf(),
        source,
    })?;
    let made = if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        std::fs::File::create(&target).map(drop)
    };
    made.map_err(|source| SharedError::Mount {
        what: "create",
        path: target.clone(),
        source,
    })?;
    if let Err(e) = mount(
        Some(host),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        remove_target(&target);
        return Err(mount_err("bind into the pod's share", host)(e));
    }
    Ok(())
}

/// Unbinds `<root>/<id>`.
pub fn unshare(root: &Path, id: &str) {
    let target = root.join(id);
    if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
        tracing::warn!(path = %target.display(), error = %e, "cannot unmount a shared volume");
    }
    remove_target(&target);
}

fn remove_target(target: &Path) {
    let _ = std::fs::remove_dir(target).or_else(|_| std::fs::remove_file(target));
}
