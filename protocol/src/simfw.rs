//! The simulated TEE's firmware call: how the guest asks the shim for a signed
//! simulated report (vsock host port [`crate::SIM_FIRMWARE_VSOCK_PORT`]).
//!
//! Only pods of a simulated-TEE handler (`veil-sim`) have this service. One
//! request per connection:
//!
//! - guest → host: [`REQUEST_MAGIC`] (4 bytes) then the 64 bytes of
//!   `report_data` the report must carry;
//! - host → guest: one status byte ([`STATUS_OK`] or [`STATUS_ERROR`]), a
//!   4-byte big-endian length (at most [`MAX_RESPONSE_BODY`]) and the body:
//!   on success the `tee-evidence` JSON of the simulated TEE (the report and
//!   the chip certificate, see `veil_attestation::evidence::sim`), on error a
//!   UTF-8 message.
//!
//! The host is not trusted by this exchange: whatever it answers, the key
//! broker verifies the report (signature chain, `report_data`, measurement).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of a request: protocol name and version.
pub const REQUEST_MAGIC: [u8; 4] = *b"VSF1";
/// Length of a request: magic plus `report_data`.
pub const REQUEST_LEN: usize = REQUEST_MAGIC.len() + 64;
/// Status byte of a successful answer.
pub const STATUS_OK: u8 = 0;
/// Status byte of a refusal; the body is the reason.
pub const STATUS_ERROR: u8 = 1;
/// Largest response body accepted (simulated evidence is about 2 KiB).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A malformed or failed firmware exchange.
#[derive(Debug, thiserror::Error)]
pub enum SimFwError {
    /// The connection failed or closed early.
    #[error("simulated firmware connection")]
    Io(#[from] std::io::Error),
    /// The request does not start with [`REQUEST_MAGIC`].
    #[error("not a simulated firmware request (bad magic)")]
    BadMagic,
    /// The response announces a body over [`MAX_RESPONSE_BODY`].
    #[error("simulated firmware response of {0} bytes is too large")]
    TooLarge(usize),
    /// The response's status byte is unknown.
    #[error("unknown simulated firmware status {0}")]
    BadStatus(u8),
    /// The firmware refused; its reason.
    #[error("simulated firmware refused: {0}")]
    Refused(String),
}

/// Encodes a request for a report over `report_data`.
pub fn encode_request(report_data: &[u8; 64]) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[..4].copy_from_slice(&REQUEST_MAGIC);
    out[4..].copy_from_slice(report_data);
    out
}

/// Decodes a request; returns its `report_data`.
pub fn decode_request(bytes: &[u8; REQUEST_LEN]) -> Result<[u8; 64], SimFwError> {
    if bytes[..4] != REQUEST_MAGIC {
        return Err(SimFwError::BadMagic);
    }
    let mut rd = [0u8; 64];
    rd.copy_from_slice(&bytes[4..]);
    Ok(rd)
}

/// Reads one request (exactly [`REQUEST_LEN`] bytes).
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; 64], SimFwError> {
    let mut buf = [0u8; REQUEST_LEN];
    r.read_exact(&mut buf).await?;
    decode_request(&buf)
}

/// Writes an answer: `Ok(evidence JSON)` or `Err(reason)`.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    result: Result<&[u8], &str>,
) -> Result<(), SimFwError> {
    let (status, body) = match result {
        Ok(b) => (STATUS_OK, b),
        Err(m) => (STATUS_ERROR, m.as_bytes()),
    };
    if body.len() > MAX_RESPONSE_BODY {
        return Err(SimFwError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(5 + body.len());
    buf.push(status);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads an answer; `Ok` holds the evidence JSON bytes.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, SimFwError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_RESPONSE_BODY {
        return Err(SimFwError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    match head[0] {
        STATUS_OK => Ok(body),
        STATUS_ERROR => Err(SimFwError::Refused(
            String::from_utf8_lossy(&body).chars().take(512).collect(),
        )),
        s => Err(SimFwError::BadStatus(s)),
    }
}

/// Client side: sends a request on `conn` and reads the answer.
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    report_data: &[u8; 64],
) -> Result<Vec<u8>, SimFwError> {
    conn.write_all(&encode_request(report_data)).await?;
    conn.flush().await?;
    read_response(conn).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test]
    async fn request_and_answers_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(8192);
        let rd = [7u8; 64];
        let server = tokio::spawn(async move {
            let got = read_request(&mut b).await.unwrap();
            assert_eq!(got, [7u8; 64]);
            write_response(&mut b, Ok(b"{\"report\":\"x\"}"))
                .await
                .unwrap();
        });
        assert_eq!(request(&mut a, &rd).await.unwrap(), b"{\"report\":\"x\"}");
        server.await.unwrap();

        let (mut a, mut b) = tokio::io::duplex(8192);
        write_response(&mut b, Err("no chip key")).await.unwrap();
        match read_response(&mut a).await {
            Err(SimFwError::Refused(m)) => assert_eq!(m, "no chip key"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_frames_are_refused() {
        let mut bad = encode_request(&[0u8; 64]);
        bad[0] = b'X';
        assert!(matches!(decode_request(&bad), Err(SimFwError::BadMagic)));

        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(&[STATUS_OK, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert!(matches!(
            read_response(&mut a).await,
            Err(SimFwError::TooLarge(_))
        ));

        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(&[9, 0, 0, 0, 0]).await.unwrap();
        assert!(matches!(
            read_response(&mut a).await,
            Err(SimFwError::BadStatus(9))
        ));

        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        assert!(matches!(read_request(&mut a).await, Err(SimFwError::Io(_))));
    }
}
