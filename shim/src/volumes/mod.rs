//! Pod volumes on their way into the guest.
//!
//! [`kubelet`] says what a host bind source is (from kubelet's directory
//! layout); [`crate::spec`] decides, mount by mount, how the guest serves it
//! — or refuses it, naming the destination and why. File volumes
//! (configMap, secret, projected, downwardAPI) are copied into the guest
//! ([`files`] reads them, the agent's `PutVolume` writes them into a tmpfs of
//! their own) and kept in step with kubelet's updates ([`watch`]); a subPath
//! of one, and a container's termination message file, are fixed copies.
//!
//! [`PodVolumes`] owns the pod's file volumes: each is put in the guest once,
//! when the first container that uses it is created, shared by the
//! containers that use the same host directory, and removed (its watch
//! stopped, the guest's tmpfs unmounted) with the last of them. It does not
//! build specs or talk to containerd.

pub mod block;
pub mod files;
pub mod kubelet;
pub mod shared;
pub mod watch;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use sha2::{Digest, Sha256};
use veil_common::{Classify, Kind};
use veil_protocol::agent::{PutVolumeRequest, ReadVolumeFileRequest, RemoveVolumeRequest};

use crate::agent::{self, Agent, AgentError};

/// The most of a termination message that is read back (kubelet reads at
/// most 4096 bytes of it).
pub const TERMINATION_MESSAGE_MAX: u32 = 4096;

/// Errors bringing a file volume into the guest.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A host file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has no `..data` symlink.
    #[error("{path} is not in kubelet's atomic-writer layout (no ..data symlink)")]
    NotAtomic {
        /// The volume's directory.
        path: PathBuf,
        /// Why `..data` could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The directory is not laid out as kubelet's atomic writer lays it out.
    #[error("{path}: {reason}")]
    Layout {
        /// The volume's directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The volume is larger than the guest takes.
    #[error("{path} holds more than a file volume may: at most {max_bytes} bytes and {max_entries} entries are copied into the pod VM")]
    TooLarge {
        /// The volume's directory.
        path: PathBuf,
        /// The byte limit.
        max_bytes: usize,
        /// The entry limit.
        max_entries: usize,
    },
    /// The volume's directory could not be watched.
    #[error("cannot watch {path} for kubelet's updates")]
    Watch {
        /// The volume's directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// The volume could not be shared through virtio-fs.
    #[error(transparent)]
    Shared(#[from] shared::SharedError),
    /// A host directory, but the pod has no virtio-fs share.
    #[error("the pod has no virtio-fs share")]
    NoShare,
    /// The agent refused or failed the volume.
    #[error("volume {volume} in the pod VM")]
    Agent {
        /// The volume's id.
        volume: String,
        /// The agent's answer.
        #[source]
        source: AgentError,
    },
}

impl Classify for VolumeError {
    fn kind(&self) -> Kind {
        match self {
            VolumeError::Read { source, .. } | VolumeError::NotAtomic { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Kind::NotFound
            }
            VolumeError::Read { .. } | VolumeError::Watch { .. } => Kind::Internal,
            VolumeError::NotAtomic { .. } | VolumeError::Layout { .. } => Kind::InvalidArgument,
            VolumeError::TooLarge { .. } => Kind::ResourceExhausted,
            VolumeError::Agent { source, .. } => source.kind(),
            VolumeError::Shared(e) => e.kind(),
            VolumeError::NoShare => Kind::FailedPrecondition,
        }
    }
}

/// A container's file volume that could not be brought into the guest.
#[derive(Debug, thiserror::Error)]
#[error("the volume at {destination} cannot be brought into the pod VM")]
pub struct AcquireError {
    /// Where the container has it.
    pub destination: String,
    /// Why.
    #[source]
    pub source: VolumeError,
}

impl Classify for AcquireError {
    fn kind(&self) -> Kind {
        self.source.kind()
    }
}

/// How a container uses a file volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UseKind {
    /// The whole volume, kept in step with kubelet's updates.
    Live,
    /// A fixed copy of a file or directory (a subPath).
    Snapshot,
    /// A fixed copy of the container's termination message file, read back
    /// into the host file when the container exits.
    TerminationLog,
    /// A host directory or file shared through the pod's virtio-fs
    /// ([`shared`]): not a copy, the host's own.
    Shared,
}

/// One file volume a container's spec uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUse {
    /// The guest volume's id.
    pub id: String,
    /// The host path it is read from.
    pub host: PathBuf,
    /// How.
    pub kind: UseKind,
    /// Where the container has it (for errors and logs).
    pub destination: String,
}

impl VolumeUse {
    /// The use of host path `host` at `destination`; its id is derived from
    /// the path and the kind, so containers of a pod that use the same
    /// volume share it.
    pub fn new(host: &Path, kind: UseKind, destination: &str) -> Self {
        let tag = match kind {
            UseKind::Live => "live",
            UseKind::Snapshot => "snap",
            UseKind::TerminationLog => "term",
            UseKind::Shared => "host",
        };
        let mut h = Sha256::new();
        h.update(tag.as_bytes());
        h.update([0]);
        h.update(host.as_os_str().as_encoded_bytes());
        VolumeUse {
            id: format!("fv-{tag}-{}", &hex::encode(h.finalize())[..24]),
            host: host.to_path_buf(),
            kind,
            destination: destination.to_string(),
        }
    }

    /// The guest bind source that serves it.
    pub fn bind_source(&self) -> String {
        match self.kind {
            UseKind::Live => format!("volume:{}", self.id),
            UseKind::Snapshot | UseKind::TerminationLog => {
                format!("volume:{}/{}", self.id, files::snapshot_subpath().display())
            }
            UseKind::Shared => shared::bind_source(&self.id),
        }
    }

    /// Reads the host side as it is now.
    fn read(&self) -> Result<PutVolumeRequest, VolumeError> {
        match self.kind {
            UseKind::Live => files::read_atomic(&self.host),
            UseKind::Snapshot | UseKind::TerminationLog | UseKind::Shared => {
                files::read_snapshot(&self.host)
            }
        }
    }
}

/// Puts `req` as volume `id`.
async fn push(agent: &Agent, id: &str, mut req: PutVolumeRequest) -> Result<(), VolumeError> {
    req.volume_id = id.to_string();
    agent::rpc(
        "PutVolume",
        agent.sandbox.put_volume(agent::ctx(), &req).await,
    )
    .map(drop)
    .map_err(|source| VolumeError::Agent {
        volume: id.to_string(),
        source,
    })
}

/// One volume in the guest.
struct Entry {
    users: usize,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Held across each push, so a release waits for one in flight.
    push_lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct State {
    volumes: HashMap<String, Entry>,
    /// Each container's uses.
    uses: HashMap<String, Vec<VolumeUse>>,
}

/// What it took to bring a container's volumes in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Volumes copied now (not already in the guest).
    pub copied: usize,
    /// Bytes of file content copied.
    pub bytes: usize,
    /// Time to read and put them, microseconds.
    pub elapsed_us: u64,
}

/// The pod's volumes: file volumes copied in, host directories shared.
#[derive(Default)]
pub struct PodVolumes {
    state: tokio::sync::Mutex<State>,
    /// The staging directory of the pod's virtio-fs share, if it has one.
    shared_root: Option<PathBuf>,
}

impl PodVolumes {
    /// Volumes of a pod whose virtio-fs share serves `shared_root`, if any.
    pub fn new(shared_root: Option<PathBuf>) -> Self {
        PodVolumes {
            state: Default::default(),
            shared_root,
        }
    }

    /// Brings `uses` of container `container` into the guest: each volume
    /// not there yet is read, put and (if live) watched. On failure nothing
    /// of this container's is kept.
    pub async fn acquire(
        &self,
        container: &str,
        uses: &[VolumeUse],
        agent: &Agent,
    ) -> Result<CopyStats, AcquireError> {
        let started = Instant::now();
        let mut stats = CopyStats::default();
        let mut st = self.state.lock().await;
        let mut taken: Vec<VolumeUse> = Vec::new();
        let mut result = Ok(());
        for u in uses {
            if let Some(e) = st.volumes.get_mut(&u.id) {
                e.users += 1;
                taken.push(u.clone());
                continue;
            }
            let brought = match (u.kind, &self.shared_root) {
                (UseKind::Shared, Some(root)) => shared::share(root, &u.id, &u.host)
                    .map(|()| {
                        let e = Entry {
                            users: 1,
                            watcher: None,
                            push_lock: Arc::default(),
                        };
                        tracing::info!(destination = %u.destination, host = %u.host.display(), "host directory shared with the pod VM");
                        (e, 0)
                    })
                    .map_err(VolumeError::from),
                (UseKind::Shared, None) => Err(VolumeError::NoShare),
                _ => bring_in(u, agent).await,
            };
            match brought {
                Ok((entry, bytes)) => {
                    stats.copied += 1;
                    stats.bytes += bytes;
                    st.volumes.insert(u.id.clone(), entry);
                    taken.push(u.clone());
                }
                Err(source) => {
                    result = Err(AcquireError {
                        destination: u.destination.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        st.uses
            .entry(container.to_string())
            .or_default()
            .extend(taken);
        drop(st);
        if let Err(e) = result {
            self.release(container, Some(agent)).await;
            return Err(e);
        }
        stats.elapsed_us = started.elapsed().as_micros() as u64;
        Ok(stats)
    }

    /// Lets go of container `container`'s volumes; each one no container uses
    /// any more stops being watched and, with `agent` (the VM still runs), is
    /// removed from the guest.
    pub async fn release(&self, container: &str, agent: Option<&Agent>) {
        let mut st = self.state.lock().await;
        let Some(uses) = st.uses.remove(container) else {
            return;
        };
        for u in uses {
            let last = match st.volumes.get_mut(&u.id) {
                Some(e) => {
                    e.users = e.users.saturating_sub(1);
                    e.users == 0
                }
                None => false,
            };
            if !last {
                continue;
            }
            let Some(e) = st.volumes.remove(&u.id) else {
                continue;
            };
            let _held = e.push_lock.lock().await;
            if let Some(w) = e.watcher {
                w.abort();
            }
            if u.kind == UseKind::Shared {
                if let Some(root) = &self.shared_root {
                    shared::unshare(root, &u.id);
                }
                continue;
            }
            if let Some(agent) = agent {
                let mut r = RemoveVolumeRequest::new();
                r.volume_id = u.id.clone();
                if let Err(err) = agent::rpc(
                    "RemoveVolume",
                    agent.sandbox.remove_volume(agent::ctx(), &r).await,
                ) {
                    tracing::warn!(volume = %u.id, error = %veil_common::error_chain(&err), "cannot remove the volume from the pod VM");
                }
            }
        }
    }

    /// Writes container `container`'s termination message back to its host
    /// file (where kubelet reads it), from the guest's copy.
    pub async fn copy_back(&self, container: &str, agent: &Agent) {
        let uses: Vec<VolumeUse> = {
            let st = self.state.lock().await;
            st.uses
                .get(container)
                .map(|u| {
                    u.iter()
                        .filter(|u| u.kind == UseKind::TerminationLog)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        for u in uses {
            let mut r = ReadVolumeFileRequest::new();
            r.volume_id = u.id.clone();
            r.path = files::snapshot_subpath().display().to_string();
            r.max_bytes = TERMINATION_MESSAGE_MAX;
            let read = agent::rpc(
                "ReadVolumeFile",
                agent.sandbox.read_volume_file(agent::ctx(), &r).await,
            );
            let written = match read {
                Ok(resp) => std::fs::write(&u.host, &resp.content).map_err(|e| e.to_string()),
                Err(e) => Err(veil_common::error_chain(&e)),
            };
            if let Err(e) = written {
                tracing::warn!(%container, destination = %u.destination, host = %u.host.display(), error = %e,
                    "cannot bring the termination message back to the host");
            }
        }
    }

    /// Stops every watch (the pod is going).
    pub async fn stop_all(&self) {
        stop(&mut *self.state.lock().await);
    }
}

fn stop(st: &mut State) {
    for (_, e) in st.volumes.drain() {
        if let Some(w) = e.watcher {
            w.abort();
        }
    }
    st.uses.clear();
}

impl Drop for PodVolumes {
    fn drop(&mut self) {
        stop(self.state.get_mut());
    }
}

/// Reads and puts one volume, and watches it if live: its entry and the
/// content bytes copied.
async fn bring_in(u: &VolumeUse, agent: &Agent) -> Result<(Entry, usize), VolumeError> {
    let started = Instant::now();
    let reader = u.clone();
    let req = tokio::task::spawn_blocking(move || reader.read())
        .await
        .map_err(|e| VolumeError::Layout {
            path: u.host.clone(),
            reason: format!("reader task failed: {e}"),
        })??;
    let bytes: usize = req.entries.iter().map(|e| e.content.len()).sum();
    let entries = req.entries.len();
    let pushed = files::fingerprint(&req);
    push(agent, &u.id, req).await?;
    let push_lock = Arc::new(tokio::sync::Mutex::new(()));
    let watcher = if u.kind == UseKind::Live {
        match watch::spawn(
            u.id.clone(),
            u.host.clone(),
            agent.clone(),
            pushed,
            Arc::clone(&push_lock),
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                let mut r = RemoveVolumeRequest::new();
                r.volume_id = u.id.clone();
                let _ = agent.sandbox.remove_volume(agent::ctx(), &r).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    tracing::info!(
        volume = %u.id, destination = %u.destination, host = %u.host.display(),
        entries, bytes, elapsed_us = started.elapsed().as_micros() as u64,
        "file volume copied into the pod VM"
    );
    Ok((
        Entry {
            users: 1,
            watcher,
            push_lock,
        },
        bytes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_id_rule_and_differ_by_path_and_kind() {
        let a = VolumeUse::new(
            Path::new("/k/pods/u/volumes/x/cfg"),
            UseKind::Live,
            "/etc/c",
        );
        let b = VolumeUse::new(
            Path::new("/k/pods/u/volumes/x/cfg"),
            UseKind::Snapshot,
            "/f",
        );
        let c = VolumeUse::new(Path::new("/k/pods/u/volumes/x/other"), UseKind::Live, "/o");
        for u in [&a, &b, &c] {
            veil_common::validate_id("volume_id", &u.id).unwrap();
        }
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.bind_source(), format!("volume:{}", a.id));
        assert_eq!(b.bind_source(), format!("volume:{}/..data/data", b.id));
    }
}
