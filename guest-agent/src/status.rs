//! The one place where agent errors become ttrpc statuses.
//!
//! Every domain error reports a [`Kind`]; [`to_ttrpc`] maps the kind to a
//! status code and puts the whole error chain in the message. Nothing here
//! looks at message text.

use ttrpc::{Code, Status};

/// What class of failure an error is, as the caller should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An id that names nothing.
    NotFound,
    /// An id already in use.
    AlreadyExists,
    /// A malformed request or spec.
    InvalidArgument,
    /// The request is valid but the object is in the wrong state.
    FailedPrecondition,
    /// A feature the agent does not have.
    Unimplemented,
    /// Policy forbids it: the broker refused a secret, or the image policy
    /// does not allow an image.
    PermissionDenied,
    /// Data the guest must trust is corrupt (an image that fails dm-verity, a
    /// damaged LUKS2 header).
    DataLoss,
    /// The guest failed to do something it should have been able to do.
    Internal,
}

/// An error that knows its [`Kind`].
pub trait Classify: std::error::Error {
    /// The kind of this error.
    fn kind(&self) -> Kind;
}

/// The ttrpc code for a kind.
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::NotFound => Code::NOT_FOUND,
        Kind::AlreadyExists => Code::ALREADY_EXISTS,
        Kind::InvalidArgument => Code::INVALID_ARGUMENT,
        Kind::FailedPrecondition => Code::FAILED_PRECONDITION,
        Kind::Unimplemented => Code::UNIMPLEMENTED,
        Kind::PermissionDenied => Code::PERMISSION_DENIED,
        Kind::DataLoss => Code::DATA_LOSS,
        Kind::Internal => Code::INTERNAL,
    }
}

/// Converts a domain error into a ttrpc error carrying its status code and
/// its full chain as the message.
pub fn to_ttrpc<E: Classify>(e: &E) -> ttrpc::Error {
    let kind = e.kind();
    let msg = crate::error_chain(e);
    if kind == Kind::Internal {
        tracing::warn!(error = %msg, "request failed");
    } else {
        tracing::debug!(error = %msg, ?kind, "request refused");
    }
    let mut status = Status::new();
    status.set_code(code(kind));
    status.set_message(msg);
    ttrpc::Error::RpcStatus(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(Kind, #[source] std::io::Error);

    impl Classify for Outer {
        fn kind(&self) -> Kind {
            self.0
        }
    }

    #[test]
    fn every_kind_maps_to_its_code_with_the_chain() {
        let cases = [
            (Kind::NotFound, Code::NOT_FOUND),
            (Kind::AlreadyExists, Code::ALREADY_EXISTS),
            (Kind::InvalidArgument, Code::INVALID_ARGUMENT),
            (Kind::FailedPrecondition, Code::FAILED_PRECONDITION),
            (Kind::Unimplemented, Code::UNIMPLEMENTED),
            (Kind::PermissionDenied, Code::PERMISSION_DENIED),
            (Kind::DataLoss, Code::DATA_LOSS),
            (Kind::Internal, Code::INTERNAL),
        ];
        for (kind, want) in cases {
            let e = Outer(kind, std::io::Error::other("inner cause"));
            match to_ttrpc(&e) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), want);
                    assert_eq!(s.message(), "outer: inner cause");
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }
}
