//! Block volumes (`volumeDevices`, block-mode PVCs): host block devices in
//! the spec's `linux.devices` (containerd writes their host numbers), hot-added
//! to the VM like root images — SCSI disks on the virtio-scsi controller — and
//! found by the agent by their serial, which the guest spec names in the
//! annotation `io.veil.block-devices` (container path → serial); the agent
//! gives the container's device node the guest's numbers.
//!
//! A device used by several containers of the pod is attached once and
//! detached with the last of them.

use std::{collections::HashMap, ops::Range, path::PathBuf};

use veil_common::{Classify, Kind};

use crate::vmm::qmp::{Qmp, QmpError};

/// SCSI targets of root images.
pub const IMAGE_TARGETS: Range<u32> = 0..128;
/// SCSI targets of block volumes.
pub const BLOCK_TARGETS: Range<u32> = 128..256;
/// The agent's annotation of block volumes (container path → serial).
pub const BLOCK_DEVICES_ANNOTATION: &str = "io.veil.block-devices";

/// Errors attaching block volumes.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The host has no block device of those numbers.
    #[error("the block volume at {path} names host device {major}:{minor}, which the host does not have")]
    NoDevice {
        /// The container path.
        path: String,
        /// Major.
        major: i64,
        /// Minor.
        minor: i64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every SCSI target for block volumes is taken.
    #[error("no SCSI target left for the block volume at {0}")]
    NoSlot(String),
    /// QEMU refused the disk.
    #[error("cannot hot-add {device} (the block volume at {path})")]
    Qmp {
        /// The container path.
        path: String,
        /// The host device.
        device: PathBuf,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
}

impl Classify for BlockError {
    fn kind(&self) -> Kind {
        match self {
            BlockError::NoDevice { .. } => Kind::NotFound,
            BlockError::NoSlot(_) => Kind::ResourceExhausted,
            BlockError::Qmp { source, .. } => source.kind(),
        }
    }
}

/// One block volume of a container's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUse {
    /// Where the container has the device node.
    pub path: String,
    /// The host's major number.
    pub major: i64,
    /// The host's minor number.
    pub minor: i64,
}

impl BlockUse {
    /// The disk's serial in the guest (at most 20 characters: a major has
    /// 12 bits, a minor 20).
    pub fn serial(&self) -> String {
        format!("vb-{}-{}", self.major, self.minor)
    }

    /// The host's device node of these numbers, from
    /// `/sys/dev/block/MAJOR:MINOR/uevent`.
    pub fn host_device(&self) -> Result<PathBuf, BlockError> {
        let uevent = format!("/sys/dev/block/{}:{}/uevent", self.major, self.minor);
        let err = |source| BlockError::NoDevice {
            path: self.path.clone(),
            major: self.major,
            minor: self.minor,
            source,
        };
        let text = std::fs::read_to_string(&uevent).map_err(err)?;
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("DEVNAME="))
            .filter(|n| !n.is_empty() && !n.contains(".."))
            .ok_or_else(|| err(std::io::Error::other(format!("no DEVNAME in {uevent}"))))?;
        Ok(PathBuf::from("/dev").join(name))
    }
}

struct Disk {
    node: String,
    target: u32,
    users: usize,
}

#[derive(Default)]
struct State {
    disks: HashMap<String, Disk>,
    uses: HashMap<String, Vec<String>>,
}

/// The pod's block volumes.
#[derive(Default)]
pub struct PodBlocks {
    state: tokio::sync::Mutex<State>,
}

impl PodBlocks {
    /// Attaches container `container`'s block volumes not attached yet. On
    /// failure nothing of this container's is kept.
    pub async fn attach(
        &self,
        container: &str,
        uses: &[BlockUse],
        qmp: &tokio::sync::Mutex<Qmp>,
    ) -> Result<(), BlockError> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        let mut taken = Vec::new();
        let mut result = Ok(());
        for u in uses {
            let serial = u.serial();
            if let Some(d) = st.disks.get_mut(&serial) {
                d.users += 1;
                taken.push(serial);
                continue;
            }
            let used: Vec<u32> = st.disks.values().map(|d| d.target).collect();
            let Some(target) = BLOCK_TARGETS.clone().find(|t| !used.contains(t)) else {
                result = Err(BlockError::NoSlot(u.path.clone()));
                break;
            };
            let device = match u.host_device() {
                Ok(d) => d,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let node = format!("blk{target}");
            if let Err(source) = qmp
                .lock()
                .await
                .hot_add_block_device(&node, &device, &serial, target, false)
                .await
            {
                result = Err(BlockError::Qmp {
                    path: u.path.clone(),
                    device,
                    source,
                });
                break;
            }
            tracing::info!(path = %u.path, device = %device.display(), %serial, "block volume attached");
            st.disks.insert(
                serial.clone(),
                Disk {
                    node,
                    target,
                    users: 1,
                },
            );
            taken.push(serial);
        }
        st.uses
            .entry(container.to_string())
            .or_default()
            .extend(taken);
        drop(st);
        if result.is_err() {
            self.release(container, Some(qmp)).await;
        }
        result
    }

    /// Lets go of container `container`'s block volumes; the last use of
    /// one detaches it (with `qmp`: the VM still runs).
    pub async fn release(&self, container: &str, qmp: Option<&tokio::sync::Mutex<Qmp>>) {
        let mut st = self.state.lock().await;
        let Some(serials) = st.uses.remove(container) else {
            return;
        };
        for s in serials {
            let last = st.disks.get_mut(&s).is_some_and(|d| {
                d.users = d.users.saturating_sub(1);
                d.users == 0
            });
            if !last {
                continue;
            }
            let Some(d) = st.disks.remove(&s) else {
                continue;
            };
            if let Some(qmp) = qmp {
                if let Err(e) = qmp.lock().await.hot_remove_disk(&d.node).await {
                    tracing::warn!(serial = %s, error = %veil_common::error_chain(&e), "cannot detach a block volume");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_fit_and_name_the_host_numbers() {
        let u = BlockUse {
            path: "/dev/xvda".into(),
            major: 4095,
            minor: 1_048_575,
        };
        assert!(u.serial().len() <= 20, "{}", u.serial());
        assert_eq!(u.serial(), "vb-4095-1048575");
        const { assert!(IMAGE_TARGETS.end <= BLOCK_TARGETS.start) };
        let none = BlockUse {
            path: "/dev/x".into(),
            major: 4095,
            minor: 1_048_574,
        };
        assert!(matches!(
            none.host_device(),
            Err(BlockError::NoDevice { .. })
        ));
    }
}
