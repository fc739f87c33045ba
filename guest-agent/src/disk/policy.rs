//! The image policy of a confidential pod: which dm-verity root hashes each
//! image may have. Released by the key broker after attestation, so the host
//! cannot change it; an image whose root hash is not listed for its name is
//! refused, whatever the host's request says.
//!
//! Format (JSON):
//!
//! ```json
//! {"images": {
//!     "docker.io/library/busybox:1.36": "5e1c…(64 hex)",
//!     "registry.example/app@sha256:…": ["<root hash>", "<another>"]
//! }}
//! ```

use crate::status::{Classify, Kind};
use std::collections::BTreeMap;

use serde::Deserialize;

/// Largest policy accepted, bytes.
pub const MAX_POLICY: usize = 1024 * 1024;

/// Refusals of the image policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy does not name the image.
    #[error("image '{0}' is not in the released image policy")]
    UnknownImage(String),
    /// The root hash is not one the policy allows for the image.
    #[error(
        "image '{image}' has root hash {root_hash}, which the released image policy does not allow"
    )]
    WrongRootHash {
        /// The image.
        image: String,
        /// The root hash from the request.
        root_hash: String,
    },
    /// A confidential pod asked for an image without dm-verity.
    #[error("a confidential pod mounts container images only with dm-verity (no verity parameters for storage '{0}')")]
    VerityRequired(String),
    /// The measured configuration (`veil.scratch=integrity`) requires an
    /// integrity-protected scratch disk and the request asked for none.
    #[error("this pod's measured configuration requires the scratch disk to have integrity (veil.scratch=integrity), and the request asked for none")]
    IntegrityRequired,
    /// The policy document is malformed.
    #[error("malformed image policy: {0}")]
    Malformed(String),
}

impl Classify for PolicyError {
    fn kind(&self) -> Kind {
        match self {
            PolicyError::UnknownImage(_)
            | PolicyError::WrongRootHash { .. }
            | PolicyError::VerityRequired(_)
            | PolicyError::IntegrityRequired => Kind::PermissionDenied,
            PolicyError::Malformed(_) => Kind::Internal,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Hashes {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    images: BTreeMap<String, Hashes>,
}

/// Image → allowed root hashes (lowercase hex).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagePolicy {
    images: BTreeMap<String, Vec<String>>,
}

impl ImagePolicy {
    /// Parses a released policy document.
    pub fn parse(bytes: &[u8]) -> Result<Self, PolicyError> {
        if bytes.len() > MAX_POLICY {
            return Err(PolicyError::Malformed(format!(
                "{} bytes (limit {MAX_POLICY})",
                bytes.len()
            )));
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let mut images = BTreeMap::new();
        for (name, h) in doc.images {
            let list = match h {
                Hashes::One(s) => vec![s],
                Hashes::Many(v) => v,
            };
            let mut norm = Vec::new();
            for s in list {
                let b = hex::decode(&s).map_err(|_| {
                    PolicyError::Malformed(format!("root hash for '{name}' is not hex"))
                })?;
                if !matches!(b.len(), 32 | 64) {
                    return Err(PolicyError::Malformed(format!(
                        "root hash for '{name}' has {} bytes",
                        b.len()
                    )));
                }
                norm.push(hex::encode(b));
            }
            images.insert(name, norm);
        }
        Ok(ImagePolicy { images })
    }

    /// A policy from pairs (tests, tools).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut images: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, h) in pairs {
            images
                .entry(i.to_string())
                .or_default()
                .push(h.to_ascii_lowercase());
        }
        ImagePolicy { images }
    }

    /// Allows `root_hash` (lowercase hex) for `image`, or says why not.
    pub fn check(&self, image: &str, root_hash: &str) -> Result<(), PolicyError> {
        let allowed = self
            .images
            .get(image)
            .ok_or_else(|| PolicyError::UnknownImage(image.chars().take(256).collect()))?;
        if allowed.iter().any(|h| h == root_hash) {
            Ok(())
        } else {
            Err(PolicyError::WrongRootHash {
                image: image.chars().take(256).collect(),
                root_hash: root_hash.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let a = "aa".repeat(32);
        let b = "BB".repeat(32);
        let doc = format!(r#"{{"images": {{"busybox": "{a}", "app": ["{b}", "{a}"]}}}}"#);
        let p = ImagePolicy::parse(doc.as_bytes()).unwrap();
        p.check("busybox", &a).unwrap();
        p.check("app", &"bb".repeat(32)).unwrap();
        assert!(matches!(
            p.check("busybox", &"bb".repeat(32)),
            Err(PolicyError::WrongRootHash { .. })
        ));
        assert!(matches!(
            p.check("other", &a),
            Err(PolicyError::UnknownImage(_))
        ));
    }

    #[test]
    fn malformed_policies_are_refused() {
        for bad in [
            "",
            "[]",
            r#"{"images": {"x": "zz"}}"#,
            r#"{"images": {"x": "abcd"}}"#,
            r#"{"images": {}, "extra": 1}"#,
        ] {
            assert!(
                matches!(
                    ImagePolicy::parse(bad.as_bytes()),
                    Err(PolicyError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }
}
