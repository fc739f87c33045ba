//! The storage secrets of a confidential pod, from the key broker: the
//! [`KeySource`] the pod's scratch disk and image checks use. A resource the
//! guest's measured configuration names (`veil.kbs.res.disk-key`,
//! `veil.kbs.res.image-policy`) comes from the broker — attesting first if
//! that has not happened — and a refusal is the storage's error; a pod that
//! names no disk key gets an ephemeral random one (made in the guest, so the
//! host still sees only ciphertext), and without an image policy the
//! request's root hash is used as is.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{AttestError, Attestation};
use crate::disk::{
    keys::{IMAGE_POLICY_RESOURCE, SCRATCH_KEY_RESOURCE},
    EphemeralKeys, ImagePolicy, KeyError, KeySource,
};

/// Storage secrets from the guest's attestation.
pub struct BrokerKeys {
    attestation: Arc<Attestation>,
    ephemeral: EphemeralKeys,
}

impl BrokerKeys {
    /// The key source over `attestation`.
    pub fn new(attestation: Arc<Attestation>) -> Self {
        BrokerKeys {
            attestation,
            ephemeral: EphemeralKeys::default(),
        }
    }

    async fn fetch(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        let wanted = self
            .attestation
            .names_resource(name)
            .map_err(|e| key_error(name, e))?;
        if !wanted {
            return Ok(None);
        }
        self.attestation
            .resource(name)
            .await
            .map(Some)
            .map_err(|e| key_error(name, e))
    }
}

fn key_error(name: &str, e: AttestError) -> KeyError {
    match e {
        AttestError::Refused {
            what,
            status,
            reason,
        } => KeyError::Refused {
            resource: name.to_string(),
            reason: format!("{what} refused (HTTP {status}): {reason}"),
        },
        AttestError::NotConfigured | AttestError::NoBroker => KeyError::NotAttested(name.into()),
        other => KeyError::Failed {
            resource: name.to_string(),
            source: Box::new(other),
        },
    }
}

#[async_trait::async_trait]
impl KeySource for BrokerKeys {
    async fn scratch_key(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        match self.fetch(SCRATCH_KEY_RESOURCE).await? {
            Some(k) if k.is_empty() => Err(KeyError::Malformed {
                resource: SCRATCH_KEY_RESOURCE.into(),
                reason: "empty key".into(),
            }),
            Some(k) => Ok(k),
            None => self.ephemeral.scratch_key().await,
        }
    }

    async fn image_policy(&self) -> Result<Option<ImagePolicy>, KeyError> {
        let Some(doc) = self.fetch(IMAGE_POLICY_RESOURCE).await? else {
            return Ok(None);
        };
        ImagePolicy::parse(&doc)
            .map(Some)
            .map_err(|e| KeyError::Malformed {
                resource: IMAGE_POLICY_RESOURCE.into(),
                reason: e.to_string(),
            })
    }

    fn requires_scratch_integrity(&self) -> bool {
        self.attestation.requires_scratch_integrity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_broker_the_key_is_ephemeral_and_there_is_no_policy() {
        let k = BrokerKeys::new(Arc::new(Attestation::disabled()));
        let a = k.scratch_key().await.unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(a, k.scratch_key().await.unwrap());
        assert!(k.image_policy().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_malformed_configuration_is_an_error_not_an_ephemeral_key() {
        let k = BrokerKeys::new(Arc::new(Attestation::from_cmdline(
            "veil.tee=sim veil.kbs.res.disk-key=a/b/c",
        )));
        assert!(matches!(
            k.scratch_key().await,
            Err(KeyError::Failed { .. })
        ));
    }
}
