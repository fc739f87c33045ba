//! Telling the host that the agent is ready.
//!
//! Once the API server listens, the agent dials the host (CID 2) on
//! [`veil_protocol::AGENT_READY_VSOCK_PORT`] and writes `READY <version>\n`. The
//! host waits for that call instead of polling the guest: with hybrid vsock, a
//! host connection attempt made before the guest's vsock driver is up can wedge
//! the backend. The connection stays open; it is where agent logs can go.
//!
//! A host that does not listen (kernel vhost-vsock, where the shim polls) only
//! costs a few refused attempts.

use std::{
    io::Write,
    os::fd::{FromRawFd, IntoRawFd, OwnedFd},
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// vsock CID of the host.
const HOST_CID: u32 = 2;
/// How long to keep trying to reach a host that refuses.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// The open readiness connection, kept for the agent's lifetime.
static READY_CONNECTION: OnceLock<std::fs::File> = OnceLock::new();

/// Dials the host's readiness port on a thread of its own; never fails the agent.
pub fn announce() {
    std::thread::spawn(|| {
        let started = Instant::now();
        loop {
            match dial(veil_protocol::AGENT_READY_VSOCK_PORT) {
                Ok(mut conn) => {
                    let line = format!(
                        "{}{}\n",
                        veil_protocol::AGENT_READY_LINE_PREFIX,
                        env!("CARGO_PKG_VERSION")
                    );
                    match conn.write_all(line.as_bytes()) {
                        Ok(()) => {
                            tracing::debug!("announced readiness to the host");
                            let _ = READY_CONNECTION.set(conn);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot write readiness line"),
                    }
                    return;
                }
                Err(e) if started.elapsed() < GIVE_UP_AFTER => {
                    tracing::trace!(error = %e, "host readiness port not reachable yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "host does not listen for readiness; not announcing");
                    return;
                }
            }
        }
    });
}

fn dial(port: u32) -> nix::Result<std::fs::File> {
    let fd: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(HOST_CID, port),
    )?;
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open socket
    // descriptor, which the File now owns and closes.
    Ok(unsafe { std::fs::File::from_raw_fd(fd.into_raw_fd()) })
}
