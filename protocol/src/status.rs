//! Error kinds on the wire: the one mapping from [`Kind`] to ttrpc/gRPC
//! codes, used by the agent to answer and by the shim to answer containerd,
//! and the way back: a ttrpc error as a readable, classified
//! [`RemoteError`] (never the debug dump ttrpc's own `Display` prints).

use ttrpc::Code;
use veil_common::{error_chain, Classify, Kind};

/// The ttrpc code of `kind`.
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::NotFound => Code::NOT_FOUND,
        Kind::AlreadyExists => Code::ALREADY_EXISTS,
        Kind::InvalidArgument => Code::INVALID_ARGUMENT,
        Kind::FailedPrecondition => Code::FAILED_PRECONDITION,
        Kind::Unimplemented => Code::UNIMPLEMENTED,
        Kind::PermissionDenied => Code::PERMISSION_DENIED,
        Kind::DataLoss => Code::DATA_LOSS,
        Kind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        Kind::Unavailable => Code::UNAVAILABLE,
        Kind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        Kind::Internal => Code::INTERNAL,
    }
}

/// The kind a ttrpc code stands for (codes veil never sends are `Internal`).
pub fn kind_of_code(code: Code) -> Kind {
    match code {
        Code::NOT_FOUND => Kind::NotFound,
        Code::ALREADY_EXISTS => Kind::AlreadyExists,
        Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => Kind::InvalidArgument,
        Code::FAILED_PRECONDITION | Code::ABORTED => Kind::FailedPrecondition,
        Code::UNIMPLEMENTED => Kind::Unimplemented,
        Code::PERMISSION_DENIED | Code::UNAUTHENTICATED => Kind::PermissionDenied,
        Code::DATA_LOSS => Kind::DataLoss,
        Code::RESOURCE_EXHAUSTED => Kind::ResourceExhausted,
        Code::UNAVAILABLE | Code::CANCELLED => Kind::Unavailable,
        Code::DEADLINE_EXCEEDED => Kind::DeadlineExceeded,
        Code::OK | Code::UNKNOWN | Code::INTERNAL => Kind::Internal,
    }
}

/// The ttrpc code number of `kind` (as carried in a `StreamOpenReply`).
pub fn code_number(kind: Kind) -> u32 {
    u32::try_from(protobuf::Enum::value(&code(kind))).unwrap_or(13)
}

/// The kind of a code number (a `StreamOpenReply`'s code).
pub fn kind_of_number(n: u32) -> Kind {
    i32::try_from(n)
        .ok()
        .and_then(<Code as protobuf::Enum>::from_i32)
        .map_or(Kind::Internal, kind_of_code)
}

/// `e` as a ttrpc status: the code of its kind, its whole chain as the
/// message.
pub fn to_ttrpc(e: &dyn Classify) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code(e.kind()), error_chain(e)))
}

/// What a ttrpc call failed with, classified and readable: the peer's own
/// message for a status it answered, a plain sentence for a transport
/// failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// Its kind: the status the peer answered, `Unavailable` when the
    /// connection is gone, `DeadlineExceeded` on a timeout.
    pub kind: Kind,
    /// What to tell the user.
    pub message: String,
}

impl RemoteError {
    /// Whether the peer is unreachable (its connection closed), rather than
    /// having refused the call.
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Unavailable
    }
}

impl Classify for RemoteError {
    fn kind(&self) -> Kind {
        self.kind
    }
}

impl From<ttrpc::Error> for RemoteError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => {
                let code = s.code();
                let kind = kind_of_code(code);
                let message = if s.message.is_empty() {
                    format!("{code:?}")
                } else {
                    s.message
                };
                RemoteError { kind, message }
            }
            ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed => RemoteError {
                kind: Kind::Unavailable,
                message: "the connection is closed".into(),
            },
            ttrpc::Error::Socket(s) => RemoteError {
                kind: Kind::Unavailable,
                message: format!("connection failed: {s}"),
            },
            ttrpc::Error::Nix(errno) => RemoteError {
                kind: Kind::Unavailable,
                message: format!("connection failed: {}", errno.desc()),
            },
            ttrpc::Error::Eof => RemoteError {
                kind: Kind::Unavailable,
                message: "the connection ended".into(),
            },
            other => RemoteError {
                kind: Kind::Internal,
                message: other.to_string(),
            },
        }
    }
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
    fn every_kind_round_trips_through_its_code_with_the_chain() {
        for kind in Kind::ALL {
            let e = Outer(kind, std::io::Error::other("inner cause"));
            let wire = to_ttrpc(&e);
            match &wire {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code(kind));
                    assert_eq!(s.message(), "outer: inner cause");
                }
                other => panic!("not a status: {other:?}"),
            }
            let back = RemoteError::from(wire);
            assert_eq!(back.kind, kind);
            assert_eq!(back.to_string(), "outer: inner cause");
            assert_eq!(kind_of_number(code_number(kind)), kind);
        }
    }

    #[test]
    fn transport_failures_are_unavailable_and_readable() {
        for e in [ttrpc::Error::LocalClosed, ttrpc::Error::RemoteClosed] {
            let r = RemoteError::from(e);
            assert!(r.is_unavailable());
            assert!(!r.to_string().contains("Status"), "{r}");
        }
        let r = RemoteError::from(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::NOT_FOUND,
            "container c1 not found",
        )));
        assert_eq!(r.to_string(), "container c1 not found");
        assert_eq!(r.kind, Kind::NotFound);
        assert_eq!(kind_of_number(9999), Kind::Internal);
    }
}
