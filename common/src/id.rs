//! The identifier rule: sandbox, container, exec and storage ids, as the
//! shim accepts them from containerd and the agent accepts them from the
//! host. One rule on both sides, so an id the shim takes is never refused by
//! the agent.
//!
//! An id is 1 to 128 bytes of `[A-Za-z0-9_.-]` starting with a letter or a
//! digit: safe as one path component (never `.`, `..` or a leading `-` that a
//! tool could read as an option), and a superset of what containerd
//! (`[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`, at most 76) and CRI (64 hex digits)
//! generate.

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// An id that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} '{value}': expected 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_.-] starting with a letter or digit")]
pub struct IdError {
    /// Which field (`container_id`, `exec_id`, …).
    pub field: &'static str,
    /// The offending value, truncated to 64 characters.
    pub value: String,
}

/// Whether `value` is a valid id.
pub fn is_valid_id(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Checks `value`, naming `field` in the error.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), IdError> {
    if is_valid_id(value) {
        Ok(())
    } else {
        Err(IdError {
            field,
            value: value.chars().take(64).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for good in ["a", "abc-1_2.x", "0", &"x".repeat(128), "pod.1-a_b"] {
            assert!(is_valid_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-rf",
            "_x",
            ".hidden",
            "a/b",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_error_names_the_field_and_a_bounded_value() {
        let e = validate_id("exec_id", &"/".repeat(200)).unwrap_err();
        assert_eq!(e.field, "exec_id");
        assert_eq!(e.value.len(), 64);
        assert!(e.to_string().starts_with("invalid exec_id '"));
    }
}
