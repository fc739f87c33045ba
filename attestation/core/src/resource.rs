//! The KBS resource path `<repo>/<type>/<tag>`: one validation rule for everyone who names a
//! resource — the guest's measured configuration, the guest client building a URL, the broker's
//! store and policy.
//!
//! A component is 1 to 128 bytes of `[A-Za-z0-9._-]` that does not start with `.`: safe as one
//! file-system path component (never `.`, `..` or a hidden file) and as one URL path segment
//! without escaping.

use veil_common::{Classify, Kind};

/// The longest component accepted.
pub const MAX_COMPONENT_LEN: usize = 128;

/// Why a resource path is not `<repo>/<type>/<tag>` of valid components.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourcePathError {
    /// Not exactly three `/`-separated components.
    #[error("resource path {0:?} is not <repo>/<type>/<tag>")]
    Shape(String),
    /// A component breaks the rule.
    #[error("resource path component {0:?} is not 1 to 128 characters of [A-Za-z0-9._-] without a leading dot")]
    Component(String),
}

impl Classify for ResourcePathError {
    fn kind(&self) -> Kind {
        match self {
            ResourcePathError::Shape(_) | ResourcePathError::Component(_) => Kind::InvalidArgument,
        }
    }
}

/// `<repo>/<type>/<tag>`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePath {
    /// Repository.
    pub repo: String,
    /// Type.
    pub kind: String,
    /// Tag.
    pub tag: String,
}

/// At most 140 characters of untrusted text, for error messages.
fn bounded(s: &str) -> String {
    s.chars().take(140).collect()
}

impl ResourcePath {
    /// True for a valid component (see the module doc).
    pub fn valid_component(c: &str) -> bool {
        !c.is_empty()
            && c.len() <= MAX_COMPONENT_LEN
            && !c.starts_with('.')
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// Validates three components.
    pub fn new(repo: &str, kind: &str, tag: &str) -> Result<Self, ResourcePathError> {
        for c in [repo, kind, tag] {
            if !Self::valid_component(c) {
                return Err(ResourcePathError::Component(bounded(c)));
            }
        }
        Ok(ResourcePath {
            repo: repo.into(),
            kind: kind.into(),
            tag: tag.into(),
        })
    }
}

impl std::str::FromStr for ResourcePath {
    type Err = ResourcePathError;

    /// Parses `repo/type/tag`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut it = s.split('/');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(repo), Some(kind), Some(tag), None) => Self::new(repo, kind, tag),
            _ => Err(ResourcePathError::Shape(bounded(s))),
        }
    }
}

impl std::fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.repo, self.kind, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for good in [
            "default/key/disk",
            "a/b/c",
            "repo-1/type_2/tag.3",
            &format!("{0}/{0}/{0}", "x".repeat(128)),
        ] {
            let p: ResourcePath = good.parse().unwrap();
            assert_eq!(p.to_string(), good);
        }
        for bad in [
            "",
            "a/b",
            "a/b/c/d",
            "../b/c",
            "./b/c",
            "a/.hidden/c",
            "a//c",
            "a/b/",
            "a/b c/d",
            "a/b/c\0",
            "é/b/c",
            &format!("a/b/{}", "x".repeat(129)),
        ] {
            assert!(bad.parse::<ResourcePath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_error_is_invalid_argument_and_bounded() {
        let shape = "a/b".parse::<ResourcePath>().unwrap_err();
        assert!(matches!(shape, ResourcePathError::Shape(_)));
        let comp = ResourcePath::new("a", &"/".repeat(300), "c").unwrap_err();
        assert!(matches!(&comp, ResourcePathError::Component(c) if c.len() == 140));
        for e in [shape, comp] {
            assert_eq!(e.kind(), Kind::InvalidArgument);
        }
    }
}
