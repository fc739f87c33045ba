//! `veil-kbs`, the key broker: the Trustee KBS protocol over HTTPS, releasing resources as JWE
//! to guests whose evidence verifies and whose claims satisfy the resource's policy.
//!
//! | file | owns |
//! |---|---|
//! | [`session`] | nonce sessions and their expiry |
//! | [`server`] | the broker state, HTTP routes for auth/attest/resource, TLS serving |
//! | [`admin`] | the admin API (token-protected) |
//! | [`policy`] | the TOML release policy |
//! | [`store`] | the file-backed resource store |
//! | [`token`] | ES256 attestation tokens |
//! | [`audit`] | one line per release and refusal |
//!
//! The wire payloads and JWE are `veil_attestation`'s (shared with the guest client);
//! verification is `veil_verifier`'s. Every refusal maps to an HTTP status in one place
//! ([`KbsError::status`]) and writes an audit line with its reason.

pub mod admin;
pub mod audit;
pub mod policy;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;
pub mod token;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use thiserror::Error;
use veil_attestation::evidence::EvidenceError;
use veil_attestation::jwe::JweError;
use veil_attestation::protocol::{ErrorInformation, ProtocolError};
use veil_attestation::ResourcePathError;
use veil_common::{error_chain, Classify, Kind};
use veil_verifier::reference::ReferenceError;
use veil_verifier::VerifyError;

/// Why the broker refused or failed a request.
#[derive(Debug, Error)]
pub enum KbsError {
    /// A request body is not the KBS payload the step expects, or names an unsupported TEE.
    #[error("invalid request")]
    Payload(#[source] ProtocolError),
    /// The protocol version is not 0.4.0-compatible.
    #[error("protocol version {0:?} is not supported (0.4.0 expected)")]
    ProtocolVersion(String),
    /// The resource path in the URL is invalid.
    #[error("invalid resource path")]
    ResourcePath(#[source] ResourcePathError),
    /// An `/attest` or resource request without a session cookie (or bearer token).
    #[error("not authenticated: no kbs-session-id cookie or bearer token")]
    NoCredentials,
    /// The bearer token was refused.
    #[error("not authenticated: bearer token refused")]
    Token(#[source] token::TokenError),
    /// The session could not be used.
    #[error("session refused")]
    Session(#[source] session::SessionError),
    /// The runtime data carries another nonce than this session's challenge.
    #[error("runtime-data nonce is not this session's challenge (replayed or stale)")]
    NonceMismatch,
    /// The TEE public key is not one resources can be encrypted to.
    #[error("runtime-data tee-pubkey is not usable")]
    TeeKey(#[source] JweError),
    /// The evidence does not parse.
    #[error("attestation failed: evidence does not parse")]
    Evidence(#[source] EvidenceError),
    /// The evidence did not verify.
    #[error("attestation failed")]
    Verify(#[source] VerifyError),
    /// The init-data sent does not hash to the evidence's host data.
    #[error("attestation failed: init-data digest {digest} differs from the evidence's host data {host_data}")]
    InitDataMismatch {
        /// Digest of the init-data sent.
        digest: String,
        /// The evidence's host data.
        host_data: String,
    },
    /// The policy refused the resource.
    #[error("policy denied the resource")]
    PolicyDenied(#[source] policy::PolicyError),
    /// The resource does not exist.
    #[error("unknown resource")]
    ResourceNotFound,
    /// The admin token is missing or wrong, or the admin API is disabled.
    #[error("admin authentication failed: {0}")]
    AdminAuth(&'static str),
    /// A new policy sent to the admin API is not UTF-8.
    #[error("policy is not UTF-8")]
    PolicyEncoding(#[source] std::str::Utf8Error),
    /// A new policy sent to the admin API is invalid.
    #[error("invalid policy")]
    PolicyInvalid(#[source] policy::PolicyError),
    /// Reference values sent to the admin API are invalid.
    #[error("invalid reference values")]
    Reference(#[source] ReferenceError),
    /// The resource store failed (or refused an oversized resource).
    #[error("resource store")]
    Store(#[source] store::StoreError),
    /// A state file could not be written.
    #[error("cannot write state file {path}")]
    StateFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Encrypting the resource to the TEE key failed.
    #[error("cannot encrypt the resource")]
    Encrypt(#[source] JweError),
    /// The endpoint exists, but not with this method.
    #[error("method {0} is not allowed on this endpoint")]
    MethodNotAllowed(String),
    /// No such endpoint.
    #[error("no such KBS endpoint")]
    NoSuchEndpoint,
}

impl Classify for KbsError {
    fn kind(&self) -> Kind {
        match self {
            KbsError::Payload(e) => e.kind(),
            KbsError::ProtocolVersion(_) | KbsError::PolicyEncoding(_) => Kind::InvalidArgument,
            KbsError::MethodNotAllowed(_) => Kind::Unimplemented,
            KbsError::NoSuchEndpoint => Kind::NotFound,
            KbsError::ResourcePath(e) => e.kind(),
            KbsError::NoCredentials
            | KbsError::Token(_)
            | KbsError::NonceMismatch
            | KbsError::InitDataMismatch { .. }
            | KbsError::PolicyDenied(_)
            | KbsError::AdminAuth(_) => Kind::PermissionDenied,
            KbsError::Session(e) => e.kind(),
            KbsError::TeeKey(e) => e.kind(),
            KbsError::Evidence(e) => e.kind(),
            KbsError::Verify(e) => e.kind(),
            KbsError::ResourceNotFound => Kind::NotFound,
            KbsError::PolicyInvalid(e) => e.kind(),
            KbsError::Reference(e) => e.kind(),
            KbsError::Store(e) => e.kind(),
            KbsError::StateFile { .. } | KbsError::Encrypt(_) => Kind::Internal,
        }
    }
}

impl KbsError {
    /// The HTTP status for this error (the one place that decides it): as Trustee's broker,
    /// 401 for every refusal of authentication, attestation or release (the evidence's own
    /// faults included), 400 for malformed requests, 404 for unknown resources.
    pub fn status(&self) -> StatusCode {
        match self {
            KbsError::Payload(_)
            | KbsError::ProtocolVersion(_)
            | KbsError::ResourcePath(_)
            | KbsError::PolicyEncoding(_)
            | KbsError::PolicyInvalid(_)
            | KbsError::Reference(_) => StatusCode::BAD_REQUEST,
            KbsError::Session(session::SessionError::Full) => StatusCode::SERVICE_UNAVAILABLE,
            KbsError::NoCredentials
            | KbsError::Token(_)
            | KbsError::Session(_)
            | KbsError::NonceMismatch
            | KbsError::TeeKey(_)
            | KbsError::Evidence(_)
            | KbsError::Verify(_)
            | KbsError::InitDataMismatch { .. }
            | KbsError::PolicyDenied(_)
            | KbsError::AdminAuth(_) => StatusCode::UNAUTHORIZED,
            KbsError::ResourceNotFound | KbsError::NoSuchEndpoint => StatusCode::NOT_FOUND,
            KbsError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            KbsError::Store(store::StoreError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            KbsError::Store(_) | KbsError::StateFile { .. } | KbsError::Encrypt(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The error type, as the last segment of the `type` URI of [`ErrorInformation`].
    pub fn error_type(&self) -> &'static str {
        match self {
            KbsError::Payload(ProtocolError::UnsupportedTee(_)) => "UnsupportedTee",
            KbsError::Payload(_) | KbsError::ResourcePath(_) => "InvalidRequest",
            KbsError::ProtocolVersion(_) => "ProtocolVersion",
            KbsError::MethodNotAllowed(_) => "MethodNotAllowed",
            KbsError::NoSuchEndpoint => "NotFound",
            KbsError::NoCredentials | KbsError::Token(_) | KbsError::Session(_) => {
                "UnAuthenticated"
            }
            KbsError::NonceMismatch
            | KbsError::TeeKey(_)
            | KbsError::Evidence(_)
            | KbsError::Verify(_)
            | KbsError::InitDataMismatch { .. } => "AttestationFailed",
            KbsError::PolicyDenied(_) => "PolicyDeny",
            KbsError::ResourceNotFound => "ResourceNotFound",
            KbsError::AdminAuth(_) => "AdminAuthFailed",
            KbsError::PolicyEncoding(_)
            | KbsError::PolicyInvalid(_)
            | KbsError::Reference(_)
            | KbsError::Store(store::StoreError::TooLarge(_)) => "InvalidRequest",
            KbsError::Store(_) | KbsError::StateFile { .. } | KbsError::Encrypt(_) => {
                "InternalError"
            }
        }
    }
}

impl IntoResponse for KbsError {
    fn into_response(self) -> Response {
        // The whole chain tells the guest why it was refused; an internal failure says only
        // what failed, not the broker's paths or I/O details.
        let detail = match self.kind() {
            Kind::Internal => self.to_string(),
            _ => error_chain(&self),
        };
        let body = ErrorInformation {
            error_type: format!("https://veil.invalid/kbs/errors/{}", self.error_type()),
            detail,
        };
        (self.status(), axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests;
