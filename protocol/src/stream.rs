//! Stdio stream connections: the `StreamOpen` handshake framing.
//!
//! A stream connection starts with one frame from the client (a 4-byte
//! big-endian length, then a protobuf [`StreamOpen`]) and one frame back (a
//! [`StreamOpenReply`]); raw bytes follow. See the end of `agent.proto`.

use std::path::{Path, PathBuf};

use protobuf::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent::{StreamKind, StreamOpen, StreamOpenReply};

/// Largest handshake frame accepted (the messages are a few ids).
pub const MAX_FRAME: usize = 4096;

/// In host mode, the stream socket that goes with the agent API socket `api`:
/// the same path with `.streams` appended.
pub fn host_stream_socket(api: &Path) -> PathBuf {
    let mut s = api.as_os_str().to_owned();
    s.push(".streams");
    PathBuf::from(s)
}

/// A malformed or failed handshake.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed early.
    #[error("stream handshake I/O")]
    Io(#[from] std::io::Error),
    /// The length prefix is over [`MAX_FRAME`].
    #[error("handshake frame of {0} bytes is too large")]
    TooLarge(usize),
    /// The frame is not the expected message.
    #[error("malformed handshake frame")]
    Decode(#[from] protobuf::Error),
    /// The agent refused the stream.
    #[error("agent refused the stream (code {code}): {message}")]
    Refused {
        /// gRPC status code number.
        code: u32,
        /// The agent's reason.
        message: String,
    },
}

impl veil_common::Classify for FrameError {
    fn kind(&self) -> veil_common::Kind {
        match self {
            FrameError::Io(_) => veil_common::Kind::Unavailable,
            FrameError::TooLarge(_) | FrameError::Decode(_) => veil_common::Kind::Internal,
            FrameError::Refused { code, .. } => crate::status::kind_of_number(*code),
        }
    }
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Message>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    let body = msg.write_to_bytes()?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one length-prefixed frame (at most [`MAX_FRAME`] bytes).
pub async fn read_frame<R: AsyncRead + Unpin, M: Message>(r: &mut R) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(M::parse_from_bytes(&body)?)
}

/// Client side of the handshake: asks for `kind` of the process
/// (`container_id`, `exec_id`) and waits for the agent's answer.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    container_id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<(), FrameError> {
    let mut req = StreamOpen::new();
    req.container_id = container_id.to_string();
    req.exec_id = exec_id.to_string();
    req.kind = kind.into();
    open_with(conn, &req).await
}

/// Opens a `PORT_FORWARD` stream to `port` on the guest's localhost.
pub async fn open_port_forward<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    port: u16,
) -> Result<(), FrameError> {
    let mut req = StreamOpen::new();
    req.kind = StreamKind::PORT_FORWARD.into();
    req.port = u32::from(port);
    open_with(conn, &req).await
}

async fn open_with<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    req: &StreamOpen,
) -> Result<(), FrameError> {
    write_frame(conn, req).await?;
    let reply: StreamOpenReply = read_frame(conn).await?;
    if reply.code != 0 {
        return Err(FrameError::Refused {
            code: reply.code,
            message: reply.message,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_oversize() {
        let (mut a, mut b) = tokio::io::duplex(8192);
        let mut m = StreamOpen::new();
        m.container_id = "c1".into();
        m.kind = StreamKind::STDOUT.into();
        write_frame(&mut a, &m).await.unwrap();
        let got: StreamOpen = read_frame(&mut b).await.unwrap();
        assert_eq!(got, m);

        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read_frame::<_, StreamOpen>(&mut b).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(n) if n == MAX_FRAME + 1));
    }

    #[test]
    fn host_stream_socket_appends_suffix() {
        assert_eq!(
            host_stream_socket(Path::new("/run/a.sock")),
            PathBuf::from("/run/a.sock.streams")
        );
    }
}
