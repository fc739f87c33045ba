//! Error kinds and error chains.
//!
//! Every error type of veil says which [`Kind`] it is ([`Classify`]), variant
//! by variant, so the status a caller sees is decided by the type, never by
//! matching message text. [`error_chain`] prints an error with its causes,
//! once, at the edge that reports it.

use std::error::Error as StdError;

/// What class of failure an error is, as the caller should see it. The
/// mapping to ttrpc/gRPC codes is `veil_protocol::status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An id that names nothing.
    NotFound,
    /// An id already in use.
    AlreadyExists,
    /// A malformed request or spec: the caller's mistake.
    InvalidArgument,
    /// The request is valid but the object is in the wrong state.
    FailedPrecondition,
    /// A feature veil does not have.
    Unimplemented,
    /// Policy forbids it (the broker refused a secret, the image policy or
    /// the pod policy does not allow it).
    PermissionDenied,
    /// Data that must be trusted is corrupt (an image failing dm-verity, a
    /// damaged LUKS2 header).
    DataLoss,
    /// A limit was reached (no free disk slot, a full cache).
    ResourceExhausted,
    /// The other side is gone or unreachable for now (a dead VM, a closed
    /// agent connection): retrying the same call will not help until it is
    /// back, but teardown still works.
    Unavailable,
    /// A deadline passed.
    DeadlineExceeded,
    /// Something failed that should not have.
    Internal,
}

impl Kind {
    /// Every kind, for tests that go over all of them.
    pub const ALL: [Kind; 11] = [
        Kind::NotFound,
        Kind::AlreadyExists,
        Kind::InvalidArgument,
        Kind::FailedPrecondition,
        Kind::Unimplemented,
        Kind::PermissionDenied,
        Kind::DataLoss,
        Kind::ResourceExhausted,
        Kind::Unavailable,
        Kind::DeadlineExceeded,
        Kind::Internal,
    ];
}

/// An error that knows its [`Kind`].
pub trait Classify: StdError {
    /// The kind of this error.
    fn kind(&self) -> Kind;
}

/// Formats an error with all its sources, outermost first, separated by
/// `": "`. A source whose text already ends the message so far (an error
/// that both prints and chains its cause) is not repeated.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !text.is_empty() && !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper: {0}")]
    struct PrintsAndChains(#[source] std::io::Error);

    #[test]
    fn the_chain_lists_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("disk on fire")));
        assert_eq!(error_chain(&e), "outer: middle: disk on fire");
        let e = PrintsAndChains(std::io::Error::other("gone"));
        assert_eq!(error_chain(&e), "wrapper: gone");
    }

    #[test]
    fn kinds_are_listed_once() {
        let set: std::collections::HashSet<_> = Kind::ALL.iter().collect();
        assert_eq!(set.len(), Kind::ALL.len());
    }
}
