//! The stdio stream listener: one connection per stream (vsock port 1025, or
//! `<api socket>.streams` in host mode). Each connection opens with a
//! `StreamOpen` frame; the agent answers with a `StreamOpenReply` and, on
//! success, hands the connection to the process's stdio.
//!
//! A plain connection per stream (rather than ttrpc stream RPCs) is what the
//! stream benchmark measured fastest, and it gives flow control for free.

use std::{path::Path, sync::Arc, time::Duration};

use veil_protocol::{
    agent::{StreamKind, StreamOpen, StreamOpenReply},
    stream::{read_frame, write_frame},
    vsock::{Connection, VsockListener},
};

use crate::{pod::Pod, policy::gate::Gate, status::Classify};

/// How long a client may take to send its `StreamOpen`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves stream connections on a unix socket until the task is dropped.
pub async fn serve_unix(path: &Path, pod: Arc<Pod>, gate: Arc<Gate>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(handle(
            Connection::Unix(conn),
            Arc::clone(&pod),
            Arc::clone(&gate),
        ));
    }
}

/// Serves stream connections on AF_VSOCK `port` (any CID).
pub async fn serve_vsock(port: u32, pod: Arc<Pod>, gate: Arc<Gate>) -> std::io::Result<()> {
    let listener =
        VsockListener::bind_with_buffer(port, veil_protocol::vsock::STREAM_BUFFER_BYTES)?;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                tokio::spawn(handle(
                    Connection::Vsock(conn),
                    Arc::clone(&pod),
                    Arc::clone(&gate),
                ));
            }
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(error = %e, "stream accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A CRI PortForward connection: to `port` on the guest's localhost (where
/// the pod's containers listen: they share the VM's network namespace),
/// IPv4 first, then IPv6, as containerd does in a runc pod's namespace.
async fn port_forward(mut conn: Connection, port: u32) {
    let mut reply = StreamOpenReply::new();
    let target = match u16::try_from(port) {
        Ok(p) if p != 0 => {
            match tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, p)).await {
                Ok(s) => Ok(s),
                Err(_) => tokio::net::TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, p)).await,
            }
        }
        _ => {
            reply.code = crate::status::code_number(crate::status::Kind::InvalidArgument);
            reply.message = format!("port {port} is not a TCP port");
            let _ = write_frame(&mut conn, &reply).await;
            return;
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            reply.code = crate::status::code_number(crate::status::Kind::Unavailable);
            reply.message = format!("nothing answers on localhost:{port} in the pod: {e}");
            let _ = write_frame(&mut conn, &reply).await;
            return;
        }
    };
    if write_frame(&mut conn, &reply).await.is_err() {
        return;
    }
    relay(conn, target, port).await;
}

/// Copies between the host's connection and the pod's `target` socket.
/// When the target's output ends, what it wrote is sent and the connection
/// is closed entirely: the hybrid vsock backend does not pass a one-way
/// shutdown on, only a full close reaches the host as the end of the
/// stream (and so the port-forward client as EOF). Whatever the client
/// still sends after that is not delivered.
async fn relay(conn: Connection, target: tokio::net::TcpStream, port: u32) {
    use tokio::io::AsyncWriteExt;
    let (mut conn_r, mut conn_w) = tokio::io::split(conn);
    let (mut target_r, mut target_w) = target.into_split();
    let input = tokio::spawn(async move {
        let r = tokio::io::copy(&mut conn_r, &mut target_w).await;
        // The client's end of input (a full close on hybrid vsock, a
        // half-close in host mode) becomes the target's.
        let _ = target_w.shutdown().await;
        (r, conn_r)
    });
    match tokio::io::copy(&mut target_r, &mut conn_w).await {
        Ok(_) => {
            let _ = conn_w.flush().await;
        }
        Err(e) => tracing::debug!(error = %e, port, "port-forward output ended"),
    }
    // Both halves dropped: the connection closes.
    input.abort();
    if let Ok((Err(e), _)) = input.await {
        tracing::debug!(error = %e, port, "port-forward input ended");
    }
    drop(conn_w);
}

async fn handle(mut conn: Connection, pod: Arc<Pod>, gate: Arc<Gate>) {
    let open: StreamOpen =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut conn)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "bad stream handshake");
                return;
            }
            Err(_) => return,
        };
    let kind = open.kind.enum_value_or_default();
    let mut reply = StreamOpenReply::new();
    if let Err(e) = gate.check_stream(kind) {
        tracing::warn!(denial = %e, "stream denied by policy");
        reply.code = crate::status::code_number(e.kind());
        reply.message = e.to_string();
        let _ = write_frame(&mut conn, &reply).await;
        return;
    }
    if kind == StreamKind::PORT_FORWARD {
        return port_forward(conn, open.port).await;
    }
    match pod
        .take_stream(&open.container_id, &open.exec_id, kind)
        .await
    {
        Ok(att) => {
            // Reply before the copy starts: after it the connection is raw bytes.
            if write_frame(&mut conn, &reply).await.is_err() {
                return;
            }
            if let Err(e) = att.run(conn) {
                tracing::warn!(error = %crate::error_chain(&e), "stream attach failed");
            }
        }
        Err(e) => {
            reply.code = crate::status::code_number(e.kind());
            reply.message = crate::error_chain(&e);
            let _ = write_frame(&mut conn, &reply).await;
        }
    }
}
