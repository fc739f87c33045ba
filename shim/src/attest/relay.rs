//! The key broker relay: the guest has no network, so it reaches the broker
//! through the shim. Each guest connection to vsock host port 1028 is joined
//! to a new TCP connection to the broker's address (handler key
//! `kbs_address`), and bytes are copied both ways until either side closes.
//!
//! The relay sees only ciphertext: the guest runs TLS end to end and accepts
//! only the broker certificate pinned in its measured command line, and the
//! released resources are JWE-encrypted to a key that never leaves the guest.
//! A relay that drops, delays or redirects connections can deny service; it
//! cannot read or forge anything.

use std::{sync::Arc, time::Duration};

use tokio::{
    net::{TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::sandbox::launch::{HostService, LaunchInfo};

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most relayed connections at once per pod.
const MAX_CONNECTIONS: usize = 16;

/// Relays the guest's connections to the broker at `addr` (`host:port`).
#[derive(Debug, Clone)]
pub struct KbsRelay {
    addr: String,
}

impl KbsRelay {
    /// A relay to `addr`.
    pub fn new(addr: String) -> Self {
        KbsRelay { addr }
    }
}

/// Joins one guest connection to a new broker connection.
async fn relay(mut guest: UnixStream, addr: String) {
    let broker = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%addr, error = %e, "cannot reach the key broker");
            return;
        }
        Err(_) => {
            tracing::warn!(%addr, "connecting to the key broker timed out");
            return;
        }
    };
    let _ = broker.set_nodelay(true);
    let mut broker = broker;
    match tokio::io::copy_bidirectional(&mut guest, &mut broker).await {
        Ok((up, down)) => tracing::debug!(%addr, up, down, "key broker connection relayed"),
        Err(e) => tracing::debug!(%addr, error = %e, "key broker relay ended"),
    }
}

impl HostService for KbsRelay {
    fn port(&self) -> u32 {
        veil_protocol::KBS_RELAY_VSOCK_PORT
    }

    fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        _launch: LaunchInfo,
    ) -> tokio::task::JoinHandle<()> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let (conn, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "key broker relay accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!("too many key broker connections from the guest; dropping one");
                    continue;
                };
                let addr = self.addr.clone();
                tokio::spawn(async move {
                    relay(conn, addr).await;
                    drop(permit);
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TeeKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_bytes_both_ways_to_the_broker_address() {
        let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = broker.local_addr().unwrap().to_string();
        let echo = tokio::spawn(async move {
            let (mut s, _) = broker.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("relay.sock");
        let launch = LaunchInfo {
            tee: TeeKind::Sim,
            kernel: "/k".into(),
            initrd: "/i".into(),
            firmware: None,
            cmdline: String::new(),
            vcpus: 1,
            host_data: None,
        };
        let task = Arc::new(KbsRelay::new(addr)).serve(UnixListener::bind(&sock).unwrap(), launch);
        let mut c = UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HELLO");
        echo.await.unwrap();
        // The broker closed: the guest sees EOF.
        assert_eq!(c.read(&mut got).await.unwrap(), 0);
        task.abort();
    }
}
