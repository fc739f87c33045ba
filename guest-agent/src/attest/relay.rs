//! The key broker connector that goes through the shim's relay
//! (host port [`veil_protocol::KBS_RELAY_VSOCK_PORT`]).
//!
//! The relay only moves bytes: the KBS client runs TLS over this connection
//! and accepts only the pinned broker certificate.

use veil_attestation::client::{ConnectFuture, Connector, Io};
use veil_protocol::vsock::dial_host;

/// Connects the KBS client to the broker through the shim's vsock relay.
#[derive(Debug, Clone, Copy)]
pub struct VsockRelay {
    /// Host vsock port of the relay.
    pub port: u32,
}

impl Default for VsockRelay {
    fn default() -> Self {
        VsockRelay {
            port: veil_protocol::KBS_RELAY_VSOCK_PORT,
        }
    }
}

impl Connector for VsockRelay {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let s = dial_host(self.port).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "key broker relay (host vsock port {}) not reachable: {e}",
                        self.port
                    ),
                )
            })?;
            Ok(Box::new(s) as Box<dyn Io>)
        })
    }
}
