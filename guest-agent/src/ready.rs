//! Telling the host that the agent is ready.
//!
//! Once the API server listens, the agent dials the host (CID 2) on
//! [`veil_protocol::AGENT_READY_VSOCK_PORT`] and writes the readiness line
//! (`veil_protocol::vsock::ready_line`). The host waits for that call instead
//! of polling the guest: with hybrid vsock, a host connection attempt made
//! before the guest's vsock driver is up can wedge the backend. The
//! connection stays open for the agent's lifetime.
//!
//! A host that does not listen (kernel vhost-vsock, where the shim polls) only
//! costs a few refused attempts.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use veil_protocol::vsock::{dial_host, ready_line};

/// How long to keep trying to reach a host that refuses.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Dials the host's readiness port in a task of its own; never fails the
/// agent. Call from within the runtime.
pub fn announce() {
    tokio::spawn(async {
        let started = Instant::now();
        loop {
            match dial_host(veil_protocol::AGENT_READY_VSOCK_PORT).await {
                Ok(mut conn) => {
                    let line = ready_line(env!("CARGO_PKG_VERSION"));
                    match conn.write_all(line.as_bytes()).await {
                        Ok(()) => {
                            tracing::debug!("announced readiness to the host");
                            // Keep the connection open as long as the agent runs.
                            std::future::pending::<()>().await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot write readiness line"),
                    }
                    return;
                }
                Err(e) if started.elapsed() < GIVE_UP_AFTER => {
                    tracing::trace!(error = %e, "host readiness port not reachable yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "host does not listen for readiness; not announcing");
                    return;
                }
            }
        }
    });
}
