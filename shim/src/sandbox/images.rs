//! The root images attached to one pod VM, and the pod's references to them
//! in the shared image store — taken and given back here and nowhere else.
//!
//! Attaching builds (or reuses) the image in the store under the pod's
//! reference, hot-adds it to the VM's SCSI controller over QMP and asks the
//! agent to open it (through dm-verity when it has a hash tree). An image
//! used by several containers of the pod is attached once and counted. The
//! sandbox container's image is hot-added while the pod still boots
//! ([`Images::plug_ahead`]), so the guest has found the disk by the time
//! the container asks for it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use veil_common::{Classify, Kind};
use veil_protocol::agent::{AddStorageRequest, RemoveStorageRequest, StorageSource};

use crate::{
    agent::{self, Agent, AgentError},
    config::{Config, HandlerConfig},
    pod::AttachedImage,
    rootfs::{Image, ImageStore, Layers, RootfsError},
    vmm::qmp::{Qmp, QmpError},
};

/// The QMP node and disk serial of the image disk at SCSI target `target`.
fn disk_names(target: u32) -> (String, String) {
    (format!("img{target}"), format!("veil-img{target}"))
}

/// How long the agent may wait for a hot-added disk to appear.
const DISK_APPEAR_MS: u32 = 30_000;

/// Errors attaching or detaching an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Building or sharing the image file.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// Hot-adding or removing the disk.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// The agent refused or failed to open the image.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Every SCSI target of the controller is in use.
    #[error("no free SCSI target for another disk (256 images attached)")]
    NoSlot,
    /// The blocking build task died.
    #[error("the image build task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl Classify for ImageError {
    fn kind(&self) -> Kind {
        match self {
            ImageError::Rootfs(e) => e.kind(),
            ImageError::Qmp(e) => e.kind(),
            ImageError::Agent(e) => e.kind(),
            ImageError::NoSlot => Kind::ResourceExhausted,
            ImageError::Task(_) => Kind::Internal,
        }
    }
}

/// The image store configured by `config` for `handler`'s pods.
pub fn image_store(config: &Config, handler: &HandlerConfig) -> ImageStore {
    ImageStore::new(config, handler.rootfs_format)
}

/// A disk hot-added for container images.
#[derive(Debug)]
struct Attached {
    storage_id: String,
    node: String,
    target: u32,
    users: usize,
}

/// A disk hot-added before its image's first attach.
#[derive(Debug)]
struct Plugged {
    key: String,
    target: u32,
}

/// The sandbox container's image, built (or found in the store) once while
/// its pod boots and shared by the build and the early hot-add: whichever
/// asks first builds, the other waits for it.
pub struct Built {
    layers: Layers,
    work_dir: PathBuf,
    /// `None` inside: the build failed (logged; the attach tries again).
    image: tokio::sync::OnceCell<Option<Image>>,
}

impl Built {
    /// The image of `layers`, not built yet; `work_dir` is a private
    /// directory for its temporary mount.
    pub fn new(layers: Layers, work_dir: PathBuf) -> Self {
        Built {
            layers,
            work_dir,
            image: tokio::sync::OnceCell::new(),
        }
    }
}

/// The images of one pod.
pub struct Images {
    pod: String,
    store: ImageStore,
    attached: tokio::sync::Mutex<BTreeMap<String, Attached>>,
    ahead: tokio::sync::Mutex<Option<Plugged>>,
}

impl Images {
    /// No images yet, for pod `pod` in `store`.
    pub fn new(pod: &str, store: ImageStore) -> Self {
        Images {
            pod: pod.to_string(),
            store,
            attached: tokio::sync::Mutex::new(BTreeMap::new()),
            ahead: tokio::sync::Mutex::new(None),
        }
    }

    /// The image of `built`, building it (or finding it in the store) on
    /// the first call; `None` if that failed.
    pub async fn first_built<'b>(&self, built: &'b Built) -> Option<&'b Image> {
        built
            .image
            .get_or_init(|| async {
                match self.acquire(&built.layers, built.work_dir.clone()).await {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::debug!(error = %veil_common::error_chain(&e), "image build during boot failed; retried at attach");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Hot-adds the disk of `built` before any container asks for it, so
    /// the guest's SCSI scan runs while the pod's boot goes on; the first
    /// [`Images::attach`] of the image then only asks the agent to open it.
    /// Nothing depends on this succeeding: a failure is logged and the
    /// attach does the whole work.
    pub async fn plug_ahead(&self, built: &Built, qmp: &mut Qmp) {
        let Some(image) = self.first_built(built).await else {
            return;
        };
        // The locks in attach's order.
        let attached = self.attached.lock().await;
        let mut ahead = self.ahead.lock().await;
        if ahead.is_some() || !attached.is_empty() {
            return;
        }
        let target = crate::volumes::block::IMAGE_TARGETS.start;
        let (node, serial) = disk_names(target);
        match qmp
            .hot_add_disk(&node, &image.path, &serial, target, true)
            .await
        {
            Ok(()) => {
                *ahead = Some(Plugged {
                    key: image.key.clone(),
                    target,
                })
            }
            Err(e) => {
                tracing::debug!(error = %veil_common::error_chain(&e), "image hot-add ahead of its attach failed; retried at attach")
            }
        }
    }

    /// Builds (or reuses) the image of `layers` under this pod's reference;
    /// `work_dir` is a private directory for its temporary mount.
    pub async fn acquire(&self, layers: &Layers, work_dir: PathBuf) -> Result<Image, ImageError> {
        let (store, l, holder) = (self.store.clone(), layers.clone(), self.pod.clone());
        tokio::task::spawn_blocking(move || store.acquire(&l, &holder, &work_dir))
            .await
            .map_err(ImageError::Task)?
            .map_err(Into::into)
    }

    /// Makes the image of `layers` available in the guest; `name` is the
    /// image as the pod names it (the key into a confidential pod's image
    /// policy). An image already attached is shared.
    pub async fn attach(
        &self,
        layers: &Layers,
        name: &str,
        work_dir: PathBuf,
        qmp: &tokio::sync::Mutex<Qmp>,
        agent: &Agent,
    ) -> Result<AttachedImage, ImageError> {
        let image = self.acquire(layers, work_dir).await?;
        let mut attached = self.attached.lock().await;
        if let Some(a) = attached.get_mut(&image.key) {
            a.users += 1;
            return Ok(AttachedImage {
                key: image.key,
                storage_id: a.storage_id.clone(),
            });
        }
        let mut ahead = self.ahead.lock().await;
        let target = match ahead.take_if(|p| p.key == image.key) {
            // Hot-added while the pod booted.
            Some(p) => p.target,
            None => {
                let used: BTreeSet<u32> = attached
                    .values()
                    .map(|a| a.target)
                    .chain(ahead.as_ref().map(|p| p.target))
                    .collect();
                let Some(target) = crate::volumes::block::IMAGE_TARGETS
                    .clone()
                    .find(|t| !used.contains(t))
                else {
                    self.release(&image.key).await;
                    return Err(ImageError::NoSlot);
                };
                let (node, serial) = disk_names(target);
                if let Err(e) = qmp
                    .lock()
                    .await
                    .hot_add_disk(&node, &image.path, &serial, target, true)
                    .await
                {
                    self.release(&image.key).await;
                    return Err(e.into());
                }
                target
            }
        };
        drop(ahead);
        let (node, serial) = disk_names(target);
        let storage_id = format!("img-{}", image.key);
        let mut req = AddStorageRequest::new();
        req.storage_id = storage_id.clone();
        req.source = StorageSource::BLOCK_SERIAL.into();
        req.locator = serial;
        req.fstype = image.fstype.to_string();
        req.read_only = true;
        req.wait_ms = DISK_APPEAR_MS;
        req.verity = image.verity.as_ref().map(|v| v.params(name)).into();
        if let Err(e) = agent::rpc(
            "AddStorage",
            agent.sandbox.add_storage(agent::ctx(), &req).await,
        ) {
            let _ = qmp.lock().await.hot_remove_disk(&node).await;
            self.release(&image.key).await;
            return Err(e.into());
        }
        attached.insert(
            image.key.clone(),
            Attached {
                storage_id: storage_id.clone(),
                node,
                target,
                users: 1,
            },
        );
        Ok(AttachedImage {
            key: image.key,
            storage_id,
        })
    }

    /// Drops one use of `image`; the last use detaches it from the guest
    /// and releases the pod's reference in the store. The reference goes
    /// even when the guest cannot be reached.
    pub async fn detach(
        &self,
        image: &AttachedImage,
        qmp: &tokio::sync::Mutex<Qmp>,
        agent: &Agent,
    ) -> Result<(), ImageError> {
        // Held until the guest let go, so an attach of the same image
        // waits rather than racing the removal.
        let mut attached = self.attached.lock().await;
        let Some(a) = last_use(&mut attached, image) else {
            return Ok(());
        };
        let mut req = RemoveStorageRequest::new();
        req.storage_id = a.storage_id.clone();
        let removed = agent::rpc(
            "RemoveStorage",
            agent.sandbox.remove_storage(agent::ctx(), &req).await,
        );
        let unplugged = match &removed {
            Ok(_) => qmp.lock().await.hot_remove_disk(&a.node).await,
            Err(_) => Ok(()),
        };
        self.release(&image.key).await;
        removed?;
        Ok(unplugged?)
    }

    /// Drops one use of `image` without the guest (its VM is gone): the
    /// last use releases the pod's reference in the store.
    pub async fn forget(&self, image: &AttachedImage) {
        let last = last_use(&mut *self.attached.lock().await, image).is_some();
        if last {
            self.release(&image.key).await;
        }
    }

    async fn release(&self, key: &str) {
        let (store, k, holder) = (self.store.clone(), key.to_string(), self.pod.clone());
        let released = tokio::task::spawn_blocking(move || store.release(&k, &holder)).await;
        match released {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(key, error = %veil_common::error_chain(&e), "cannot release an image reference")
            }
            Err(e) => tracing::warn!(key, error = %e, "image release task failed"),
        }
    }

    /// Releases every reference the pod holds (its shutdown).
    pub async fn release_all(&self) {
        self.ahead.lock().await.take();
        self.attached.lock().await.clear();
        let (store, holder) = (self.store.clone(), self.pod.clone());
        match tokio::task::spawn_blocking(move || store.release_holder(&holder)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %veil_common::error_chain(&e), "cannot release the pod's images")
            }
            Err(e) => tracing::warn!(error = %e, "image release task failed"),
        }
    }
}

/// Drops one use of `image`; the last one takes it out of the attached set
/// and returns it.
fn last_use(attached: &mut BTreeMap<String, Attached>, image: &AttachedImage) -> Option<Attached> {
    let a = attached.get_mut(&image.key)?;
    a.users = a.users.saturating_sub(1);
    if a.users > 0 {
        return None;
    }
    attached.remove(&image.key)
}
