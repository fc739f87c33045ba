//! Where the storage secrets come from: the scratch disk's key and, in a
//! confidential pod, the image policy. A small seam ([`KeySource`]) so the
//! broker-backed source (attestation) plugs in, plain pods use an ephemeral
//! random key, and tests inject their own.
//!
//! Neither secret is ever logged or returned over the API; keys are wiped when
//! dropped ([`Zeroizing`]).

use crate::status::{Classify, Kind};
use std::sync::{Arc, Mutex};

use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use super::policy::ImagePolicy;

/// The broker resource (by its configured name) that unlocks the scratch disk.
pub const SCRATCH_KEY_RESOURCE: &str = "disk-key";
/// The broker resource holding the image policy (JSON, see
/// [`super::policy`]).
pub const IMAGE_POLICY_RESOURCE: &str = "image-policy";

/// Errors getting a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The broker refused to release it (attestation or policy failed).
    #[error("the key broker refused to release '{resource}': {reason}")]
    Refused {
        /// The resource name.
        resource: String,
        /// The broker's reason.
        reason: String,
    },
    /// The guest has not attested (yet), or is not configured for it.
    #[error("'{0}' is not available: the guest has not attested to a key broker")]
    NotAttested(String),
    /// The released resource is malformed (e.g. the policy is not JSON).
    #[error("released resource '{resource}' is malformed: {reason}")]
    Malformed {
        /// The resource name.
        resource: String,
        /// What is wrong.
        reason: String,
    },
    /// Fetching failed for another reason.
    #[error("cannot get '{resource}'")]
    Failed {
        /// The resource name.
        resource: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Classify for KeyError {
    fn kind(&self) -> Kind {
        match self {
            KeyError::Refused { .. } | KeyError::NotAttested(_) => Kind::PermissionDenied,
            KeyError::Malformed { .. } | KeyError::Failed { .. } => Kind::Internal,
        }
    }
}

/// Supplies the storage secrets of the pod.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync {
    /// The secret that opens the scratch disk's LUKS2 keyslot. The same value
    /// for the life of the guest.
    async fn scratch_key(&self) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// The image policy. `None`: the pod is not confidential and the root hash
    /// in the request is used as is.
    async fn image_policy(&self) -> Result<Option<ImagePolicy>, KeyError>;
    /// Whether the pod's measured configuration requires the scratch disk to
    /// have integrity (a request without it is refused).
    fn requires_scratch_integrity(&self) -> bool {
        false
    }
}

/// A plain (non-TEE) pod: a random key made once per boot, no image policy.
/// The scratch disk's contents are unreadable after the VM goes, by anyone.
#[derive(Default)]
pub struct EphemeralKeys {
    key: Mutex<Option<Zeroizing<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl KeySource for EphemeralKeys {
    async fn scratch_key(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        let key = k.get_or_insert_with(|| {
            let mut v = Zeroizing::new(vec![0u8; 32]);
            OsRng.fill_bytes(&mut v);
            v
        });
        Ok(key.clone())
    }

    async fn image_policy(&self) -> Result<Option<ImagePolicy>, KeyError> {
        Ok(None)
    }
}

/// Fixed secrets (tests, and sources that already hold the released ones).
pub struct StaticKeys {
    /// The scratch key, or the error to give.
    pub scratch: Result<Zeroizing<Vec<u8>>, Arc<dyn Fn() -> KeyError + Send + Sync>>,
    /// The image policy (`None`: not confidential).
    pub policy: Option<ImagePolicy>,
}

#[async_trait::async_trait]
impl KeySource for StaticKeys {
    async fn scratch_key(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        match &self.scratch {
            Ok(k) => Ok(k.clone()),
            Err(f) => Err(f()),
        }
    }

    async fn image_policy(&self) -> Result<Option<ImagePolicy>, KeyError> {
        Ok(self.policy.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ephemeral_key_is_random_and_stable() {
        let a = EphemeralKeys::default();
        let b = EphemeralKeys::default();
        let k1 = a.scratch_key().await.unwrap();
        assert_eq!(k1.len(), 32);
        assert_eq!(k1, a.scratch_key().await.unwrap());
        assert_ne!(k1, b.scratch_key().await.unwrap());
        assert!(a.image_policy().await.unwrap().is_none());
    }
}
