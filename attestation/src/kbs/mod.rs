//! `veil-kbs`, the key broker: the Trustee KBS protocol over HTTPS, releasing resources as JWE
//! to guests whose evidence verifies and whose claims satisfy the resource's policy.
//!
//! | file | owns |
//! |---|---|
//! | [`protocol`] | wire payloads, JCS, `report_data` binding |
//! | [`session`] | nonce sessions and their expiry |
//! | [`server`] | the broker state, HTTP routes for auth/attest/resource, TLS serving |
//! | [`admin`] | the admin API (token-protected) |
//! | [`policy`] | the TOML release policy |
//! | [`store`] | the file-backed resource store |
//! | [`jwe`] | ECDH-ES+A256KW / A256GCM |
//! | [`token`] | ES256 attestation tokens |
//! | [`audit`] | one line per release and refusal |
//!
//! Every refusal maps to an HTTP status in one place ([`KbsError::status`]) and writes an audit
//! line with its reason.

pub mod admin;
pub mod audit;
pub mod jwe;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod session;
pub mod store;
pub mod token;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use thiserror::Error;

use protocol::ErrorInformation;

/// Why the broker refused or failed a request.
#[derive(Debug, Error)]
pub enum KbsError {
    /// The request body or path is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The protocol version is not 0.4.0-compatible.
    #[error("protocol version {0:?} is not supported (0.4.0 expected)")]
    ProtocolVersion(String),
    /// The TEE type is unknown.
    #[error("TEE type {0:?} is not supported")]
    UnknownTee(String),
    /// No or bad session cookie / bearer token.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The session could not be used.
    #[error("session: {0}")]
    Session(#[from] session::SessionError),
    /// The evidence did not verify.
    #[error("attestation failed: {0}")]
    AttestationFailed(String),
    /// The policy refused the resource.
    #[error("policy denied the resource: {0}")]
    PolicyDenied(#[from] policy::PolicyError),
    /// The resource does not exist.
    #[error("unknown resource")]
    ResourceNotFound,
    /// The admin token is missing or wrong, or the admin API is disabled.
    #[error("admin authentication failed: {0}")]
    AdminAuth(&'static str),
    /// A storage or encryption failure inside the broker.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KbsError {
    /// The HTTP status for this error (the one place that decides it).
    pub fn status(&self) -> StatusCode {
        match self {
            KbsError::InvalidRequest(_)
            | KbsError::ProtocolVersion(_)
            | KbsError::UnknownTee(_) => StatusCode::BAD_REQUEST,
            KbsError::Unauthenticated(_)
            | KbsError::Session(_)
            | KbsError::AttestationFailed(_)
            | KbsError::PolicyDenied(_)
            | KbsError::AdminAuth(_) => StatusCode::UNAUTHORIZED,
            KbsError::ResourceNotFound => StatusCode::NOT_FOUND,
            KbsError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error kind, as the last segment of the `type` URI.
    pub fn kind(&self) -> &'static str {
        match self {
            KbsError::InvalidRequest(_) => "InvalidRequest",
            KbsError::ProtocolVersion(_) => "ProtocolVersion",
            KbsError::UnknownTee(_) => "UnsupportedTee",
            KbsError::Unauthenticated(_) | KbsError::Session(_) => "UnAuthenticated",
            KbsError::AttestationFailed(_) => "AttestationFailed",
            KbsError::PolicyDenied(_) => "PolicyDeny",
            KbsError::ResourceNotFound => "ResourceNotFound",
            KbsError::AdminAuth(_) => "AdminAuthFailed",
            KbsError::Internal(_) => "InternalError",
        }
    }
}

impl IntoResponse for KbsError {
    fn into_response(self) -> Response {
        let body = ErrorInformation {
            error_type: format!("https://veil.invalid/kbs/errors/{}", self.kind()),
            detail: self.to_string(),
        };
        (self.status(), axum::Json(body)).into_response()
    }
}

/// Formats an error and its whole `source()` chain on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
