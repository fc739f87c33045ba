//! The stdio stream listener: one connection per stream (vsock port 1025, or
//! `<api socket>.streams` in host mode). Each connection opens with a
//! `StreamOpen` frame; the agent answers with a `StreamOpenReply` and, on
//! success, hands the connection to the process's stdio.
//!
//! A plain connection per stream (rather than ttrpc stream RPCs) is what the
//! stream benchmark measured fastest, and it gives flow control for free.

use std::{
    os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::{io::unix::AsyncFd, net::UnixStream};
use veil_protocol::{
    agent::{StreamOpen, StreamOpenReply},
    stream::{read_frame, write_frame},
};

use crate::{pod::Pod, status::Classify};

/// How long a client may take to send its `StreamOpen`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves stream connections on a unix socket until the task is dropped.
pub async fn serve_unix(path: &Path, pod: Arc<Pod>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(handle(conn, Arc::clone(&pod)));
    }
}

/// Serves stream connections on AF_VSOCK `port` (any CID).
pub async fn serve_vsock(port: u32, pod: Arc<Pod>) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and
    // refers to the same socket for the AsyncFd's whole life.
    let listener = unsafe { AsyncFd::register(fd)? };
    loop {
        let mut guard = listener.readable().await?;
        match guard.try_io(|l| {
            accept4(
                l.get_ref().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(Ok(raw)) => {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                // A connected stream socket: tokio's UnixStream only reads,
                // writes and shuts down, which are the same calls for AF_VSOCK.
                // SAFETY: as above; ownership moves into the std stream.
                let std =
                    unsafe { std::os::unix::net::UnixStream::from_raw_fd(owned.into_raw_fd()) };
                match UnixStream::from_std(std) {
                    Ok(conn) => {
                        tokio::spawn(handle(conn, Arc::clone(&pod)));
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot register a stream connection"),
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "stream accept failed"),
            Err(_would_block) => continue,
        }
    }
}

async fn handle(mut conn: UnixStream, pod: Arc<Pod>) {
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
            reply.code = protobuf::Enum::value(&crate::status::code(e.kind())) as u32;
            reply.message = crate::error_chain(&e);
            let _ = write_frame(&mut conn, &reply).await;
        }
    }
}
