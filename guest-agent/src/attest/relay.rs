//! Reaching the host from the guest: vsock connections to the host (CID 2),
//! and the key broker connector that goes through the shim's relay
//! (host port [`veil_protocol::KBS_RELAY_VSOCK_PORT`]).
//!
//! The relay only moves bytes: the KBS client runs TLS over this connection
//! and accepts only the pinned broker certificate.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use veil_attestation::client::{ConnectFuture, Connector, Io};

/// vsock CID of the host.
pub const HOST_CID: u32 = 2;

/// Connects to host vsock `port` and hands the socket to tokio.
pub async fn dial_host(port: u32) -> std::io::Result<tokio::net::UnixStream> {
    let fd = tokio::task::spawn_blocking(move || {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))?;
        Ok::<_, nix::Error>(fd)
    })
    .await
    .map_err(std::io::Error::other)??;
    // A connected stream socket: tokio's UnixStream only reads, writes and
    // shuts down, which are the same calls for AF_VSOCK.
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open,
    // connected socket descriptor, which the std stream now owns and closes.
    let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd.into_raw_fd()) };
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}

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
