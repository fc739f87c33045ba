//! Confidential storage: the block layers the agent puts between a disk the
//! host provides and the filesystem it mounts.
//!
//! - [`verity`]: a container image opened read-only through dm-verity against
//!   a root hash — from the request in a plain pod, checked against the
//!   broker's [`policy`] in a confidential one.
//! - [`scratch`]: the pod's scratch disk, LUKS2 ([`luks2`]) + dm-crypt with
//!   the pod's key ([`keys`]) and a fresh [`ext4`] filesystem.
//! - [`dm`]: the device-mapper ioctls both use (the only `unsafe` here).
//!
//! Everything is done by the agent itself: no `cryptsetup`, `veritysetup` or
//! `mke2fs` in the guest (see `docs/storage.md` for why).
//!
//! Not owned here: finding the disk and mounting the result
//! ([`crate::storage`]), nor attestation (the [`keys::KeySource`] seam).

pub mod dm;
pub mod ext4;
pub mod keys;
pub mod loopdev;
pub mod luks2;
pub mod policy;
pub mod scratch;
pub mod verity;

use std::{
    io::{Seek, SeekFrom},
    path::Path,
};

use sha2::{Digest, Sha256};
use veil_protocol::agent::AddStorageRequest;
use zeroize::Zeroizing;

use crate::status::{Classify, Kind};

pub use keys::{EphemeralKeys, KeyError, KeySource, StaticKeys};
pub use policy::{ImagePolicy, PolicyError};

/// Errors of the storage layers.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Getting a secret failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The image policy refused the image.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// dm-verity.
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
    /// The scratch disk.
    #[error(transparent)]
    Scratch(#[from] scratch::ScratchError),
    /// A request combination that makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// A device-mapper call outside the two layers (teardown).
    #[error(transparent)]
    Dm(#[from] dm::DmError),
    /// A loop device.
    #[error(transparent)]
    Loop(#[from] loopdev::LoopError),
}

impl Classify for DiskError {
    fn kind(&self) -> Kind {
        match self {
            DiskError::Key(e) => e.kind(),
            DiskError::Policy(e) => e.kind(),
            DiskError::Verity(e) => e.kind(),
            DiskError::Scratch(e) => e.kind(),
            DiskError::Dm(e) => e.kind(),
            DiskError::Loop(e) => e.kind(),
            DiskError::Invalid(_) => Kind::InvalidArgument,
        }
    }
}

/// Size in bytes of a block device or file.
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    std::fs::File::open(path)?.seek(SeekFrom::End(0))
}

/// The device-mapper name for storage `id` (ids may be longer than dm names).
pub fn dm_name(id: &str) -> String {
    if id.len() <= 100 {
        format!("veil-{id}")
    } else {
        format!("veil-{}", &hex::encode(Sha256::digest(id.as_bytes()))[..32])
    }
}

/// What goes between a storage's disk and its mount.
pub enum Layer {
    /// Nothing: the disk's filesystem is mounted directly.
    None,
    /// dm-verity with checked parameters.
    Verity(verity::Verity),
    /// The encrypted scratch disk, with its key; `integrity` adds
    /// dm-integrity under dm-crypt (see [`scratch`]).
    Scratch {
        /// The pod's key.
        key: Zeroizing<Vec<u8>>,
        /// Whether every block is checked.
        integrity: bool,
    },
}

/// A layer that is open: its device-mapper devices, removed by
/// [`Opened::close`].
#[derive(Debug)]
pub struct Opened {
    /// The mapped device's name.
    pub name: String,
    /// The devices under it, top first (the scratch disk's integrity layers).
    pub below: Vec<String>,
    /// Whether a fresh filesystem was made (scratch).
    pub formatted: bool,
}

impl Opened {
    /// Removes the device-mapper devices, top first.
    pub fn close(&self) -> Result<(), DiskError> {
        let ctl = dm::Control::open()?;
        ctl.remove(&self.name)?;
        for n in &self.below {
            ctl.remove(n)?;
        }
        Ok(())
    }
}

/// Decides the layer of an AddStorage request and fetches what it needs
/// (policy, key) — before the pod is locked, since that may mean asking the
/// broker. In a confidential pod (the key source has an image policy) a
/// read-only disk image must come with verity parameters whose root hash the
/// policy allows for the named image.
pub async fn prepare(req: &AddStorageRequest, keys: &dyn KeySource) -> Result<Layer, DiskError> {
    use veil_protocol::agent::StorageSource as S;
    let source = req.source.enum_value_or_default();
    if let Some(s) = req.scratch.as_ref() {
        if req.verity.is_some() {
            return Err(DiskError::Invalid(
                "a storage cannot be both verity and scratch".into(),
            ));
        }
        if req.read_only || !matches!(req.fstype.as_str(), "" | "ext4") {
            return Err(DiskError::Invalid(
                "the scratch disk is read-write ext4 (read_only false, fstype \"\" or ext4)".into(),
            ));
        }
        if matches!(source, S::DIRECTORY) {
            return Err(DiskError::Invalid(
                "the scratch disk must be a block device or image file".into(),
            ));
        }
        if !s.integrity && keys.requires_scratch_integrity() {
            return Err(PolicyError::IntegrityRequired.into());
        }
        return Ok(Layer::Scratch {
            key: keys.scratch_key().await?,
            integrity: s.integrity,
        });
    }
    let policy = keys.image_policy().await?;
    let Some(p) = req.verity.as_ref() else {
        // Block devices come from the host; image files and directories only
        // in host mode or from the measured initrd (checked by storage).
        if policy.is_some() && matches!(source, S::BLOCK_SERIAL | S::DEVICE_PATH) {
            return Err(PolicyError::VerityRequired(req.storage_id.clone()).into());
        }
        return Ok(Layer::None);
    };
    if !req.read_only {
        return Err(DiskError::Invalid(
            "a verity storage must be read-only".into(),
        ));
    }
    let v = verity::Verity::from_request(p)?;
    if let Some(policy) = policy {
        policy.check(&p.image, &v.root_hash)?;
        tracing::info!(image = %p.image, root_hash = %v.root_hash, "image allowed by the released policy");
    }
    Ok(Layer::Verity(v))
}

impl Layer {
    /// Opens the layer over `device` for storage `id`; returns the device to
    /// mount and the open layer (to close when the storage goes).
    pub fn open(
        &self,
        id: &str,
        device: &Path,
    ) -> Result<(std::path::PathBuf, Option<Opened>), DiskError> {
        let name = dm_name(id);
        match self {
            Layer::None => Ok((device.to_path_buf(), None)),
            Layer::Verity(v) => {
                let d = verity::open(&name, device, v)?;
                Ok((
                    d.path,
                    Some(Opened {
                        name,
                        below: vec![],
                        formatted: false,
                    }),
                ))
            }
            Layer::Scratch { key, integrity } => {
                let d = scratch::open(&name, device, key, *integrity)?;
                Ok((
                    d.path,
                    Some(Opened {
                        name,
                        below: d.below,
                        formatted: d.formatted,
                    }),
                ))
            }
        }
    }

    /// Whether this is the scratch disk.
    pub fn is_scratch(&self) -> bool {
        matches!(self, Layer::Scratch { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use veil_protocol::agent::{ScratchParams, StorageSource, VerityParams};

    fn keys(policy: Option<ImagePolicy>) -> StaticKeys {
        StaticKeys {
            scratch: Ok(Zeroizing::new(b"k".to_vec())),
            policy,
        }
    }

    fn image_req(root: &str) -> AddStorageRequest {
        let mut r = AddStorageRequest::new();
        r.storage_id = "img".into();
        r.source = StorageSource::BLOCK_SERIAL.into();
        r.read_only = true;
        r.fstype = "erofs".into();
        let mut v = VerityParams::new();
        v.root_hash = root.into();
        v.hash_offset = 4096;
        v.image = "busybox".into();
        r.verity = Some(v).into();
        r
    }

    #[tokio::test]
    async fn confidential_pods_check_the_root_hash_against_the_policy() {
        let good = "ab".repeat(32);
        let policy = ImagePolicy::from_pairs([("busybox", good.as_str())]);
        let k = keys(Some(policy));
        assert!(matches!(
            prepare(&image_req(&good), &k).await,
            Ok(Layer::Verity(_))
        ));
        let e = prepare(&image_req(&"cd".repeat(32)), &k)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), Kind::PermissionDenied);
        let mut r = image_req(&good);
        r.verity = None.into();
        let e = prepare(&r, &k).await.err().unwrap();
        assert!(matches!(
            e,
            DiskError::Policy(PolicyError::VerityRequired(_))
        ));
        // A plain pod takes the request's root hash as is.
        assert!(matches!(
            prepare(&image_req(&"cd".repeat(32)), &keys(None)).await,
            Ok(Layer::Verity(_))
        ));
        assert!(matches!(prepare(&r, &keys(None)).await, Ok(Layer::None)));
    }

    #[tokio::test]
    async fn scratch_requests_are_checked_and_the_refusal_surfaces() {
        let mut r = AddStorageRequest::new();
        r.storage_id = "scratch".into();
        r.source = StorageSource::BLOCK_SERIAL.into();
        r.scratch = Some(ScratchParams::new()).into();
        assert!(prepare(&r, &keys(None)).await.unwrap().is_scratch());
        r.read_only = true;
        assert_eq!(
            prepare(&r, &keys(None)).await.err().unwrap().kind(),
            Kind::InvalidArgument
        );
        r.read_only = false;
        let refused = StaticKeys {
            scratch: Err(Arc::new(|| KeyError::Refused {
                resource: "disk-key".into(),
                reason: "measurement not in reference values".into(),
            })),
            policy: None,
        };
        let e = prepare(&r, &refused).await.err().unwrap();
        assert_eq!(e.kind(), Kind::PermissionDenied);
        assert!(crate::error_chain(&e).contains("measurement not in reference values"));
        let mut s = ScratchParams::new();
        s.integrity = true;
        r.scratch = Some(s).into();
        assert!(matches!(
            prepare(&r, &keys(None)).await,
            Ok(Layer::Scratch {
                integrity: true,
                ..
            })
        ));
    }

    /// Keys whose measured configuration requires integrity.
    struct Strict(StaticKeys);

    #[async_trait::async_trait]
    impl KeySource for Strict {
        async fn scratch_key(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            self.0.scratch_key().await
        }
        async fn image_policy(&self) -> Result<Option<ImagePolicy>, KeyError> {
            self.0.image_policy().await
        }
        fn requires_scratch_integrity(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_measured_integrity_requirement_refuses_a_plain_scratch_disk() {
        let mut r = AddStorageRequest::new();
        r.storage_id = "scratch".into();
        r.source = StorageSource::BLOCK_SERIAL.into();
        r.scratch = Some(ScratchParams::new()).into();
        let strict = Strict(keys(None));
        let e = prepare(&r, &strict).await.err().unwrap();
        assert_eq!(e.kind(), Kind::PermissionDenied);
        assert!(e.to_string().contains("veil.scratch=integrity"), "{e}");
        let mut s = ScratchParams::new();
        s.integrity = true;
        r.scratch = Some(s).into();
        assert!(matches!(
            prepare(&r, &strict).await,
            Ok(Layer::Scratch {
                integrity: true,
                ..
            })
        ));
    }

    #[test]
    fn dm_names_fit() {
        assert_eq!(dm_name("scratch"), "veil-scratch");
        assert!(dm_name(&"x".repeat(128)).len() < 128);
    }
}
