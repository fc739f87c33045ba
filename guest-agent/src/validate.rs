//! Checks on request fields that come from the (untrusted) host: identifiers,
//! relative paths, sizes. Everything the host names passes through here.

use std::path::{Component, Path, PathBuf};

/// A request field that fails validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// An identifier that breaks veil's id rule (`veil_common::id`).
    #[error(transparent)]
    Id(#[from] veil_common::IdError),
    /// A host name with characters a host name cannot have.
    #[error("invalid {field} '{value}': expected letters, digits, '-' and '.'")]
    HostName {
        /// Which field.
        field: &'static str,
        /// The offending value (truncated).
        value: String,
    },
    /// A path that is absolute, has `..`, or characters we refuse.
    #[error("invalid {field} path '{value}'")]
    Path {
        /// Which field.
        field: &'static str,
        /// The offending value (truncated).
        value: String,
    },
    /// A field longer than allowed.
    #[error("{field} is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl crate::status::Classify for ValidationError {
    fn kind(&self) -> crate::status::Kind {
        match self {
            ValidationError::Id(_)
            | ValidationError::HostName { .. }
            | ValidationError::Path { .. }
            | ValidationError::TooLong { .. } => crate::status::Kind::InvalidArgument,
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks an identifier (sandbox, container, exec, storage) against veil's
/// one id rule, the same the shim applies.
pub fn id(field: &'static str, value: &str) -> Result<(), ValidationError> {
    Ok(veil_common::validate_id(field, value)?)
}

/// Checks an exec id: empty (the init process) or a valid id.
pub fn exec_id(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        Ok(())
    } else {
        id("exec_id", value)
    }
}

/// Checks a relative path that must stay below its base: no `..`, not
/// absolute, no NUL, at most 4096 bytes. "" is the base itself.
pub fn relative_path(field: &'static str, value: &str) -> Result<PathBuf, ValidationError> {
    let bad = || ValidationError::Path {
        field,
        value: truncate(value),
    };
    if value.len() > 4096 || value.contains('\0') {
        return Err(bad());
    }
    let p = Path::new(value);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(out)
}

/// Checks an absolute path: no `..`, no NUL, at most 4096 bytes.
pub fn absolute_path(field: &'static str, value: &str) -> Result<PathBuf, ValidationError> {
    let bad = || ValidationError::Path {
        field,
        value: truncate(value),
    };
    if !value.starts_with('/') {
        return Err(bad());
    }
    let rel = relative_path(field, &value[1..]).map_err(|_| bad())?;
    Ok(Path::new("/").join(rel))
}

/// Checks a path that goes into an overlayfs option string (no `,` `:` `\`).
pub fn overlay_safe(field: &'static str, p: &Path) -> Result<(), ValidationError> {
    let s = p.to_string_lossy();
    if s.contains([',', ':', '\\', '\n']) {
        return Err(ValidationError::Path {
            field,
            value: truncate(&s),
        });
    }
    Ok(())
}

/// Checks a length limit.
pub fn max_len(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        Err(ValidationError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "c1", "Abc_1.2-x", &"x".repeat(128)] {
            id("container_id", ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "../x", "é", &"x".repeat(129)] {
            assert!(id("container_id", bad).is_err(), "{bad:?} accepted");
        }
        exec_id("").unwrap();
        assert!(exec_id("/").is_err());
    }

    #[test]
    fn relative_paths_cannot_escape() {
        assert_eq!(relative_path("p", "").unwrap(), PathBuf::new());
        assert_eq!(relative_path("p", "a/./b/").unwrap(), PathBuf::from("a/b"));
        for bad in ["/a", "a/../../b", "..", "a\0b"] {
            assert!(relative_path("p", bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            absolute_path("p", "/dev/vdb").unwrap(),
            PathBuf::from("/dev/vdb")
        );
        assert!(absolute_path("p", "/dev/../etc").is_err());
        assert!(absolute_path("p", "dev").is_err());
    }

    #[test]
    fn overlay_option_paths() {
        overlay_safe("p", Path::new("/run/a")).unwrap();
        assert!(overlay_safe("p", Path::new("/run/a,b")).is_err());
        assert!(overlay_safe("p", Path::new("/run/a:b")).is_err());
    }
}
