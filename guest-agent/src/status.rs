//! Where agent errors become ttrpc statuses: veil's one vocabulary
//! (`veil_common::Kind`, mapped to codes by `veil_protocol::status`), with
//! the agent's logging of what it refuses. Every domain error classifies
//! itself; nothing here looks at message text.

pub use veil_common::{Classify, Kind};
pub use veil_protocol::status::{code, code_number};

/// Converts a domain error into a ttrpc error carrying its status code and
/// its full chain as the message, and logs it (internal failures as
/// warnings, refusals at debug level).
pub fn to_ttrpc(e: &dyn Classify) -> ttrpc::Error {
    let kind = e.kind();
    if kind == Kind::Internal {
        tracing::warn!(error = %veil_common::error_chain(e), "request failed");
    } else {
        tracing::debug!(error = %veil_common::error_chain(e), ?kind, "request refused");
    }
    veil_protocol::status::to_ttrpc(e)
}
